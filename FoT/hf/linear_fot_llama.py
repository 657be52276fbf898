"""Linear attention layers of the exported model (SUPRA, gated linear attention): the PyTorch
twins of the toolkit's ``supra`` and ``gla`` attention families, whose order of operations
and float32 steps they follow.

Both keep, per head, a state ``S [D, D]`` and compute ``S_t = diag(alpha_t) S_{t-1} + k_t
v_t^T``, ``o_t = q_t^T S_t / sqrt(D)``:

* ``supra``: queries and keys through ``ReLU(x W + b)`` (``feature_map``; keys through
  ``key_feature_map`` under GQA), then RoPE at the token's position in the row
  (``supra_use_rope``); a fixed decay per head ``exp(-2^(-8 (h + 1) / H))``; each head's
  output normalised (a GroupNorm of one group per head, no affine parameters) before
  ``o_proj``.
* ``gla``: the decay per key dimension, ``logsigmoid(gate_up(gate_down(x))) /
  gla_gate_normaliser``; the output ``o_proj(RMSNorm_head(o) * silu(ogate(x)))``.

A linear layer's context is its state: it reads the whole stream, whatever the window, and
its positions count from the row's start.  The cache keeps the state and the tokens each row
has read (:class:`~cache_fot_llama.LinearLayer`).  A piece runs in chunks of
:data:`CHUNK` tokens (sub-chunks of :data:`SUBCHUNK`), every exponent a non-positive sum of
few terms, as the toolkit's chunked form computes it.

This file is copied into exported model directories: only relative imports of its own files.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from .attention_fot_llama import FoTLlamaAttention
from .decode_fot_llama import rotate

CHUNK, SUBCHUNK = 64, 16
# Pieces run in blocks of at most this many tokens: it bounds the [s, s, D] tiles' memory.
BLOCK_TOKENS = 4096
GROUP_NORM_EPS = HEAD_NORM_EPS = 1e-5


def _within_chunks(q, k, v, local):
    """Pairs inside each chunk: ``q``, ``k``, ``local`` ``[G, C, Dk]`` (``local``: the log
    gates' running sums inside each sub-chunk), ``v`` ``[G, C, Dv]`` -> ``[G, C, Dv]``."""
    groups, chunk, dim = q.shape
    n = chunk // SUBCHUNK
    qs, ks, cs = (x.view(groups, n, SUBCHUNK, -1) for x in (q, k, local))
    vs = v.view(groups, n, SUBCHUNK, -1)
    totals = cs[:, :, -1]  # [G, S, Dk]
    before = torch.ones(SUBCHUNK, SUBCHUNK, dtype=torch.bool, device=q.device).tril(-1)
    same = torch.eye(SUBCHUNK, dtype=torch.bool, device=q.device)
    gaps = cs[:, :, :, None] - cs[:, :, None]  # [G, S, i, j, Dk]
    weights = torch.exp(gaps.masked_fill(~before[..., None], float("-inf")))
    weights = weights.masked_fill(same[..., None], 1.0)
    scores = torch.einsum("gsid,gsjd,gsijd->gsij", qs, ks, weights)
    out = torch.einsum("gsij,gsje->gsie", scores, vs)
    index = torch.arange(n, device=q.device)
    between = ((index[None, :, None] < index[None, None, :])
               & (index[None, None, :] < index[:, None, None])).float()  # [I, J, K]
    spanned = torch.einsum("ijk,gkd->gijd", between, totals)
    rest = totals[:, :, None] - cs  # [G, J, s, Dk]
    earlier = (index[None, :] < index[:, None])[..., None, None]  # [I, J, 1, 1]
    key_gap = (rest[:, None] + spanned[:, :, :, None]).masked_fill(~earlier, float("-inf"))
    k_hat = ks[:, None] * torch.exp(key_gap)  # [G, I, J, s, Dk]
    scores = torch.einsum("gsid,gsjtd->gsijt", qs * torch.exp(cs), k_hat)
    out = out + torch.einsum("gsijt,gjte->gsie", scores, vs)
    return out.reshape(groups, chunk, -1)


def _chunked(q, k, v, log_alpha, state):
    """Outputs ``[B, H, n, Dv]`` and the state after the piece, ``q``, ``k`` ``[B, H, n, Dk]``
    (``q`` scaled), ``v`` ``[B, H, n, Dv]``, ``log_alpha`` ``[B, H, n, Dk]``, ``state``
    ``[B, H, Dk, Dv]``, all float32; ``n`` a multiple of :data:`CHUNK`."""
    batch, heads, length, dim = q.shape
    n_chunks, n_sub = length // CHUNK, CHUNK // SUBCHUNK

    def chunks(x):
        return x.reshape(batch, heads, n_chunks, CHUNK, -1)

    qc, kc, vc, ac = (chunks(x) for x in (q, k, v, log_alpha))
    local = ac.view(batch, heads, n_chunks, n_sub, SUBCHUNK, -1).cumsum(dim=4)
    totals = local[:, :, :, :, -1]  # [B, H, N, S, Dk]
    index = torch.arange(n_sub, device=q.device)
    earlier = (index[None, :] < index[:, None]).float()
    later = (index[None, :] > index[:, None]).float()
    local = local.reshape(batch, heads, n_chunks, CHUNK, -1)

    def per_token(x):
        return x.repeat_interleave(SUBCHUNK, dim=3)

    from_start = per_token(torch.einsum("ik,bhnkd->bhnid", earlier, totals)) + local
    to_end = (per_token(totals) - local
              + per_token(torch.einsum("ik,bhnkd->bhnid", later, totals)))
    written = torch.einsum("bhncd,bhnce->bhnde", kc * torch.exp(to_end), vc)
    kept = torch.exp(totals.sum(dim=3))  # [B, H, N, Dk]
    befores = []
    for n in range(n_chunks):
        befores.append(state)
        state = kept[:, :, n, :, None] * state + written[:, :, n]
    before = torch.stack(befores, dim=2)
    out = torch.einsum("bhncd,bhnde->bhnce", qc * torch.exp(from_start), before)
    flat = [x.reshape(-1, CHUNK, x.shape[-1]) for x in (qc, kc, vc, local)]
    out = out + _within_chunks(*flat).view(out.shape)
    return out.reshape(batch, heads, length, -1), state


def linear_attention(q, k, v, log_alpha, state, valid=None):
    """Linear attention of a piece: ``q`` ``[B, H, n, Dk]``, ``k``/``v`` ``[B, KV, n, D]``,
    ``log_alpha`` ``[B, H, n, Dk or 1]``, ``state`` ``[B, H, Dk, Dv]`` float32 and ``valid``
    ``[B, n]`` (None: all tokens; padding neither writes nor decays the state).  Returns the
    output in ``q.dtype`` and the state after the piece (float32)."""
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    q32 = q.float() * dim ** -0.5
    k32 = k.float().repeat_interleave(group, dim=1)
    v32 = v.float().repeat_interleave(group, dim=1)
    a = log_alpha.float().expand(batch, heads, length, dim)
    if valid is not None:
        real = valid[:, None, :, None]
        k32, a = k32 * real, a * real
    if length == 1:  # one token: the recurrence's step
        state = torch.exp(a[:, :, 0, :, None]) * state + k32[:, :, 0, :, None] * v32[:, :, 0,
                                                                                     None]
        return torch.einsum("bhk,bhkv->bhv", q32[:, :, 0], state)[:, :, None].to(q.dtype), \
            state
    outs = []
    for start in range(0, length, BLOCK_TOKENS):
        end = min(start + BLOCK_TOKENS, length)
        pad = (-(end - start)) % CHUNK
        parts = [F.pad(x[:, :, start:end], (0, 0, 0, pad)) for x in (q32, k32, v32, a)]
        out, state = _chunked(*parts, state)
        outs.append(out[:, :, :end - start])
    return torch.cat(outs, dim=2).to(q.dtype), state


class _FoTLlamaLinearAttention(FoTLlamaAttention):
    """What both linear layers share: the piece through the recurrence, from the cache's
    state."""

    def infer(self, hidden, layer, step, rope):
        del rope  # window positions; this layer counts from the row's start
        batch, length, _ = hidden.shape
        q, k, v = self._project(hidden)
        lengths = torch.tensor(step.lengths, device=hidden.device)
        positions = layer.position[:, None] + torch.arange(length, device=hidden.device)
        valid = None if step.uniform else torch.arange(length, device=hidden.device) < \
            lengths[:, None]
        q, k, log_alpha = self.features(hidden, q, k, positions)
        out, layer.state = linear_attention(q, k, v, log_alpha, layer.state, valid)
        layer.position = layer.position + lengths
        return self.output(hidden, out)


class FoTLlamaSupraAttention(_FoTLlamaLinearAttention):
    """A SUPRA layer: the LLaMA projections plus the feature maps."""

    def __init__(self, config):
        super().__init__(config)
        self.feature_map = nn.Linear(self.head_dim, self.head_dim, bias=True)
        if self.num_kv_heads != self.num_heads:
            self.key_feature_map = nn.Linear(self.head_dim, self.head_dim, bias=True)
        self.rotary = LlamaRotaryEmbedding(config)

    def features(self, hidden, q, k, positions):
        key_map = getattr(self, "key_feature_map", self.feature_map)
        q, k = F.relu(self.feature_map(q)), F.relu(key_map(k))
        if self.config.supra_use_rope:
            cos, sin = self.rotary(q, positions)
            q, k = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
        # SUPRA's fixed decays, computed here: a buffer would not survive loading through a
        # meta-device model, as it is no weight.
        heads = torch.arange(self.num_heads, dtype=torch.float32, device=q.device)
        log_decay = -torch.exp2(-8.0 * (heads + 1) / self.num_heads)
        return q, k, log_decay[None, :, None, None].expand(q.shape[0], -1, q.shape[2], 1)

    def output(self, hidden, attended):
        x = attended.float()
        normed = F.group_norm(x.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim),
                              self.num_heads, eps=GROUP_NORM_EPS)
        normed = normed.view(x.shape[0], x.shape[2], -1).to(attended.dtype)
        return self.o_proj(normed)


class FoTLlamaGatedLinearAttention(_FoTLlamaLinearAttention):
    """A gated linear attention layer: the LLaMA projections, the gate and the output gate."""

    def __init__(self, config):
        super().__init__(config)
        hidden, rank = config.hidden_size, config.gla_gate_rank
        self.gate_down = nn.Linear(hidden, rank, bias=False)
        self.gate_up = nn.Linear(rank, self.num_heads * self.head_dim, bias=True)
        self.ogate = nn.Linear(hidden, hidden, bias=False)
        self.o_norm = LlamaRMSNorm(self.head_dim, eps=HEAD_NORM_EPS)

    def features(self, hidden, q, k, positions):
        del positions  # no RoPE
        logits = self.gate_up(self.gate_down(hidden)).float()
        log_alpha = F.logsigmoid(logits) / self.config.gla_gate_normaliser
        batch, length = hidden.shape[:2]
        return q, k, log_alpha.view(batch, length, self.num_heads, -1).transpose(1, 2)

    def output(self, hidden, attended):
        attended = attended.transpose(1, 2)  # [B, n, H, D]
        gate = F.silu(self.ogate(hidden).float()).view(attended.shape)
        normed = F.rms_norm(attended.float(), self.o_norm.weight.shape,
                            self.o_norm.weight.float(), self.o_norm.variance_epsilon)
        out = (normed.to(attended.dtype).float() * gate).to(attended.dtype)
        return self.o_proj(out.reshape(*attended.shape[:2], -1))


LINEAR_LAYERS = {"supra": FoTLlamaSupraAttention, "gla": FoTLlamaGatedLinearAttention}
