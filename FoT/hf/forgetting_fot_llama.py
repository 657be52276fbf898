"""Forgetting attention (FoX, the Forgetting Transformer) layers of the exported model: the
PyTorch twin of the toolkit's ``forgetting`` attention family, whose order of operations and
float32 steps it follows.

A FoX layer is softmax attention whose logit for query ``i`` and key ``j <= i`` carries the
sum of the log forget gates between them:

    s_ij = q_i . k_j / sqrt(D) + (c_i - c_j),   c_t = sum_{u <= t} log f_u,
    f_t = sigmoid(x_t W_f + b_f)   (one gate per token and query head, ``fgate``)

with ``x`` the attention's input.  Options of the config (all off by default; "FoX-Pro" is
all on): ``forgetting_kv_shift`` mixes each key and value with the previous token's,
``k'_t = a_t k_{t-1} + (1 - a_t) k_t`` with ``a_t = sigmoid(x_t W_k + b_k)`` per key/value
head (``kshift``, ``vshift``); ``forgetting_qk_norm`` then RMS-normalises queries and keys
per head (``q_norm``, ``k_norm``); ``forgetting_use_rope`` rotates them (FoX needs no
positions: off by default); ``forgetting_output_gate`` normalises each head's output
(``o_norm``) and multiplies it by ``sigmoid(x W_g)`` (``ogate``) before ``o_proj``.

A FoX layer's context is its local window: as every training row starts with no decay and
``k_{-1} = 0``, a window that starts over (the first, or after the previous one left) starts
its sums and its shift afresh.  The cache keeps the window's entries as attention reads them,
each entry's ``c`` and, per row, the running ``c`` and the last token's un-shifted key and
value (:class:`~cache_fot_llama.ForgettingLayer`).  Scores are materialised in float32, a
block of queries at a time.

This file is copied into exported model directories: only relative imports of its own files.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .attention_fot_llama import FoTLlamaAttention

# Queries per score tensor: bounds its memory ([B, H, QUERY_BLOCK, keys] float32).
QUERY_BLOCK = 512
# The norms of queries, keys and head outputs (as the JAX layer's).
HEAD_NORM_EPS = 1e-5


def forgetting_attention(q, k, v, decay_q, decay_k):
    """Forgetting attention of ``q`` ``[B, H, n, D]`` (the last ``n`` of ``S`` positions) over
    ``k``/``v`` ``[B, KV, S, D]`` (GQA: ``KV`` divides ``H``): query ``i`` sees keys
    ``j <= S - n + i``, with ``decay_q`` ``[B, H, n]`` and ``decay_k`` ``[B, H, S]`` the
    cumulative log forget gates ``c`` of queries and keys (float32).  Computed in float32;
    returns ``q.dtype``."""
    num_queries, num_keys, head_dim = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    keys = k.float().repeat_interleave(group, dim=1)
    values = v.float().repeat_interleave(group, dim=1)
    outs = []
    for start in range(0, num_queries, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, num_queries)
        visible = num_keys - num_queries + end  # keys later queries of the block may see
        scores = torch.matmul(q[:, :, start:end].float(), keys[:, :, :visible].transpose(2, 3))
        # Each pair's decay first: the running sums grow along the context, and adding one
        # to a score before subtracting the other would round the decay at their magnitude.
        scores = scores * head_dim ** -0.5 + (decay_q[:, :, start:end, None]
                                              - decay_k[:, :, None, :visible])
        hidden = torch.ones(end - start, visible, dtype=torch.bool, device=q.device).triu(
            num_keys - num_queries + start + 1)
        probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
        outs.append(torch.matmul(probs, values[:, :, :visible]))
    return torch.cat(outs, dim=2).to(q.dtype)


def _shift(x, previous, gate):
    """``x`` ``[B, KV, n, D]`` mixed with each token's predecessor (``previous`` ``[B, KV, D]``
    before the first) by ``sigmoid(gate)``, ``gate`` ``[B, n, KV]``; in float32."""
    mix = torch.sigmoid(gate.float()).transpose(1, 2)[..., None]
    before = torch.cat([previous[:, :, None].to(x.dtype), x[:, :, :-1]], dim=2)
    return (mix * before.float() + (1 - mix) * x.float()).to(x.dtype)


def _head_norm(norm, x):
    """RMS norm of each head ``x`` ``[..., D]`` by ``norm`` (a ``LlamaRMSNorm``), scaled in
    float32 before rounding, as the toolkit's norm is."""
    return F.rms_norm(x.float(), norm.weight.shape, norm.weight.float(),
                      norm.variance_epsilon).to(x.dtype)


class FoTLlamaForgettingAttention(FoTLlamaAttention):
    """A FoX layer: the LLaMA projections plus the gates and norms the config asks for."""

    def __init__(self, config):
        super().__init__(config)
        hidden, heads, kv_heads = config.hidden_size, self.num_heads, self.num_kv_heads
        self.fgate = nn.Linear(hidden, heads, bias=True)
        if config.forgetting_kv_shift:
            self.kshift = nn.Linear(hidden, kv_heads, bias=True)
            self.vshift = nn.Linear(hidden, kv_heads, bias=True)
        if config.forgetting_qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=HEAD_NORM_EPS)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=HEAD_NORM_EPS)
        if config.forgetting_output_gate:
            self.o_norm = LlamaRMSNorm(self.head_dim, eps=HEAD_NORM_EPS)
            self.ogate = nn.Linear(hidden, heads * self.head_dim, bias=False)

    def features(self, hidden, previous_keys, previous_values):
        """Queries ``[B, H, n, D]``, keys and values ``[B, KV, n, D]`` as attention reads them
        (before RoPE), the log forget gates ``[B, H, n]`` (float32) and the un-shifted keys
        and values (what the next token's shift reads)."""
        q, k, v = self._project(hidden)
        raw_k, raw_v = k, v
        log_forget = F.logsigmoid(self.fgate(hidden).float()).transpose(1, 2)
        if self.config.forgetting_kv_shift:
            k = _shift(k, previous_keys, self.kshift(hidden))
            v = _shift(v, previous_values, self.vshift(hidden))
        if self.config.forgetting_qk_norm:
            q, k = _head_norm(self.q_norm, q), _head_norm(self.k_norm, k)
        return q, k, v, log_forget, raw_k, raw_v

    def output(self, hidden, attended):
        """``o_proj`` of the heads' outputs ``attended`` ``[B, H, n, D]`` (gated when the
        config says so)."""
        attended = attended.transpose(1, 2)  # [B, n, H, D]
        if self.config.forgetting_output_gate:
            gate = torch.sigmoid(self.ogate(hidden).float()).view(attended.shape)
            attended = (_head_norm(self.o_norm, attended).float() * gate).to(attended.dtype)
        return self.o_proj(attended.reshape(*attended.shape[:2], -1))

    def infer(self, hidden, layer, step, rope):
        """Inference form (as :meth:`FoTLlamaAttention.infer`): each row's piece enters its
        local window (``layer``, a :class:`~cache_fot_llama.ForgettingLayer`) behind the
        entries there, continuing the window's running sum of log forget gates and its
        kv-shift, and attends to the window."""
        length = hidden.shape[1]
        q, k, v, log_forget, raw_k, raw_v = self.features(hidden, layer.previous_keys,
                                                          layer.previous_values)
        decay = layer.decay_sum[:, :, None] + log_forget.cumsum(dim=2)
        if layer.rotated:
            q, k = rope.rotate_rows(q, step.local), rope.rotate_rows(k, step.local)
        if step.uniform:
            layer.enter(None, step.local[0], k, v, decay, raw_k, raw_v)
            end = step.local[0] + length
            out = forgetting_attention(q, layer.keys[:, :, :end], layer.values[:, :, :end],
                                       decay, layer.decay[:, :, :end])
        else:
            out = torch.zeros_like(q)
            for row, count in enumerate(step.lengths):
                if not count:
                    continue
                rows = slice(row, row + 1)
                layer.enter(row, step.local[row], k[row, :, :count], v[row, :, :count],
                            decay[row, :, :count], raw_k[row, :, :count],
                            raw_v[row, :, :count])
                end = step.local[row] + count
                out[rows, :, :count] = forgetting_attention(
                    q[rows, :, :count], layer.keys[rows, :, :end], layer.values[rows, :, :end],
                    decay[rows, :, :count], layer.decay[rows, :, :end])
        return self.output(hidden, out)
