"""Softmax attention of the FoT model's layers: local layers attend within their window,
memory layers also to the memory (:mod:`modeling_fot_llama` says how windows and memory
work).  :class:`FoTLlamaAttention` holds the LLaMA projections (Hugging Face names), which
every attention family of the model shares.

This file is copied into exported model directories: only relative imports of its own files.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .cache_fot_llama import join
from .prefill_fot_llama import repeat_heads


# Decoding keeps off cuDNN attention: it builds a plan per shape, and the key length changes
# with every generated token; re-planning cost ~1.7 ms per call on an H200, more than the
# attention itself.  (Window-sized prefill shapes repeat, and there cuDNN is the fastest.)
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _heads(x, start, end, num_heads):
    """Key/value heads ``[B, KV, S, D]`` serving query heads ``start .. end - 1``."""
    group = num_heads // x.shape[1]
    if start % group == 0 and end % group == 0:
        return x[:, start // group:end // group]
    index = torch.arange(start, end, device=x.device) // group
    return x.index_select(1, index)


def _attend(q, k, v, use_sdpa):
    """Softmax attention where query ``i`` of ``n`` sees keys ``j <= S - n + i`` of ``S``.

    ``k``/``v`` may have fewer heads than ``q`` (GQA).  That bottom-right-aligned causal
    mask lets the memory (the first keys) be seen by every query.
    """
    num_queries, num_keys = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    if use_sdpa and num_queries == 1:
        with sdpa_kernel(DECODE_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)
    if use_sdpa and num_queries == num_keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    k, v = repeat_heads(k, v, q.shape[1])  # the bottom-right causal bias does not take GQA
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v,
                                              attn_mask=causal_lower_right(num_queries, num_keys))
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * q.shape[-1] ** -0.5
    hidden = torch.ones(num_queries, num_keys, dtype=torch.bool, device=q.device).triu(
        num_keys - num_queries + 1)
    probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def windowed_attention(q, k, v, grouping=None, use_sdpa=True):
    """Attention of ``q`` ``[B, H, n, D]`` (the last ``n`` positions) over ``k``/``v``
    ``[B, KV, S, D]`` (memory, then the local window), in one softmax per query.

    ``grouping = (heads, queries)`` processes that many heads and queries at a time, which
    bounds the score tensor; each query chunk reads only the keys some query of it can see.
    """
    num_heads, num_queries = q.shape[1], q.shape[2]
    num_keys = k.shape[2]
    heads, queries = grouping or (num_heads, num_queries)
    if heads >= num_heads and queries >= num_queries:
        return _attend(q, k, v, use_sdpa)
    out = torch.empty_like(q)
    for h0 in range(0, num_heads, heads):
        h1 = min(h0 + heads, num_heads)
        k_h, v_h = _heads(k, h0, h1, num_heads), _heads(v, h0, h1, num_heads)
        for i0 in range(0, num_queries, queries):
            i1 = min(i0 + queries, num_queries)
            visible = num_keys - num_queries + i1
            out[:, h0:h1, i0:i1] = _attend(q[:, h0:h1, i0:i1], k_h[:, :, :visible],
                                           v_h[:, :, :visible], use_sdpa)
    return out


class FoTLlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def _project(self, hidden):
        batch, length, _ = hidden.shape
        return tuple(proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
                     for proj in (self.q_proj, self.k_proj, self.v_proj))

    def forward(self, hidden, past_keys, past_values, memory_keys, memory_values, rope,
                positional=True):
        """Autograd form: ``hidden`` ``[B, n, hidden]`` of one piece attends to the local
        window (un-rotated ``past_keys``/``past_values`` ``[B, KV, *, D]`` or ``None``, then
        the piece) and, in a memory layer, to ``memory_keys``/``memory_values`` (``None`` when
        empty).  ``positional=False`` uses no RoPE.  Returns the output and the piece's
        un-rotated keys and values; changes no state."""
        batch, length, _ = hidden.shape
        q, k, v = self._project(hidden)
        keys, values = join(past_keys, k), join(past_values, v)
        if positional:
            q = rope.rotate(q, keys.shape[2] - length)
            keys = rope.rotate(keys, 0)
        grouping = None
        if memory_keys is not None:
            grouping = self.config.mem_attention_grouping
            keys, values = join(memory_keys, keys), join(memory_values, values)
        out = windowed_attention(q, keys, values, grouping, self.config.torch_attention)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), k, v

    def infer(self, hidden, layer, step, rope):
        """Inference form: one lockstep piece ``[B, P, hidden]`` (row ``b``'s first
        ``step.lengths[b]`` entries are tokens); the piece's keys and values are stored in
        ``layer`` (:class:`InferenceLayer`) behind each row's memory and local window, and
        each row attends to its own ``[memory | local window]`` slice."""
        batch, length, _ = hidden.shape
        q, k, v = self._project(hidden)
        raw_k = k
        if layer.rotated:
            q, k = rope.rotate_rows(q, step.local), rope.rotate_rows(k, step.local)
        grouping = self.config.mem_attention_grouping if layer.has_memory else None
        offsets = [local + (memory if layer.has_memory else 0)
                   for local, memory in zip(step.local, step.memory)]
        sdpa = self.config.torch_attention
        if step.uniform:
            layer.write(None, offsets[0], step.local[0], k, raw_k, v)
            end = offsets[0] + length
            out = windowed_attention(q, layer.keys[:, :, :end].to(q.dtype),
                                     layer.values[:, :, :end].to(q.dtype), grouping, sdpa)
        else:
            out = torch.zeros_like(q)
            for row, count in enumerate(step.lengths):
                if not count:
                    continue
                layer.write(row, offsets[row], step.local[row], k[row, :, :count],
                            raw_k[row, :, :count], v[row, :, :count])
                end = offsets[row] + count
                out[row:row + 1, :, :count] = windowed_attention(
                    q[row:row + 1, :, :count], layer.keys[row:row + 1, :, :end].to(q.dtype),
                    layer.values[row:row + 1, :, :end].to(q.dtype), grouping, sdpa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
