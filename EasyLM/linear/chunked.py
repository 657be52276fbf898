"""Gated linear attention in chunks: the training form in plain XLA.

The row is cut into chunks of ``C`` tokens.  Across chunks the recurrence of
:mod:`EasyLM.linear.scan` runs once per chunk (a ``lax.scan`` of ``L / C`` steps over
``[Dk, Dv]`` states); inside a chunk every output is a sum of matrix products.  With ``b`` the
running sum of the log gates from the chunk's start (inclusive), token ``i`` of a chunk gets

    o_i = scale * [ (q_i * exp(b_i)) S_before
                    + sum over j <= i in the chunk of (sum_d q_id k_jd exp(b_id - b_jd)) v_j ]

and the chunk leaves ``S_after = exp(b_last) * S_before + sum_j (k_j * exp(b_last - b_j))^T v_j``.

Every exponent this module takes is ``<= 0``, so nothing overflows however strong the gates,
and every exponent is a sum of few terms, so it keeps float32 precision however long the
chunk: chunks are cut into sub-chunks of ``s`` tokens (``subchunk``); running sums run only
inside a sub-chunk, and the decay between two tokens is the rest of the key's sub-chunk, the
whole sub-chunks between and the query's sub-chunk up to the query (:class:`_Gaps`).  A pair
whose key lies in an earlier sub-chunk than its query factors at the start of the query's
sub-chunk, ``exp(b_i - b_j) = exp(b_i - r) * exp(r - b_j)``, both factors at most 1.  Pairs
inside one sub-chunk take the gates of each key dimension explicitly, an ``[s, s, Dk]`` tile
per sub-chunk; that part is rematerialised in the backward pass (``jax.checkpoint``), so
training keeps no ``[s, s, Dk]`` tensors.  Rows whose length is not a
multiple of ``C`` are padded at the end with tokens that neither write nor decay the state
(a row shorter than ``C`` is one chunk of as many sub-chunks as it needs).

Float32 throughout; gradients by autodiff.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from EasyLM.linear.scan import expand_heads, zero_state

DEFAULT_CHUNK_SIZE = 64
DEFAULT_SUBCHUNK = 16
_HIGHEST = lax.Precision.HIGHEST


def check_chunking(chunk_size, subchunk):
    """``ValueError`` (one line) unless both are positive and ``subchunk`` divides
    ``chunk_size``."""
    if chunk_size < 1 or subchunk < 1 or chunk_size % subchunk:
        raise ValueError(f"linear attention chunks: subchunk {subchunk} must divide "
                         f"chunk_size {chunk_size} (both positive)")


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=_HIGHEST)


def chunked_linear_attention(q, k, v, log_alpha, *, scale, chunk_size=DEFAULT_CHUNK_SIZE,
                             subchunk=DEFAULT_SUBCHUNK, initial_state=None):
    """``(out [B, L, H, Dv] in q.dtype, final state [B, H, Dk, Dv] float32)``, as
    :func:`EasyLM.linear.scan.scan_linear_attention` computes them."""
    check_chunking(chunk_size, subchunk)
    batch, length, heads, key_dim = q.shape
    # A row shorter than a chunk is one chunk of the sub-chunks it needs.
    chunk_size = min(chunk_size, -(-length // subchunk) * subchunk)
    value_dim = v.shape[3]
    pad = (-length) % chunk_size
    q32 = q.astype(jnp.float32) * scale
    k32, v32 = (expand_heads(x, heads).astype(jnp.float32) for x in (k, v))
    a = jnp.broadcast_to(log_alpha.astype(jnp.float32), q.shape)
    if pad:  # trailing tokens with k = 0 and log alpha = 0: the state passes them unchanged
        q32, k32, v32, a = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
                            for x in (q32, k32, v32, a))
    n_chunks = (length + pad) // chunk_size

    def chunks(x):  # [B, L, H, D] -> [B, H, N, C, D]
        return x.reshape(batch, n_chunks, chunk_size, heads, -1).transpose(0, 3, 1, 2, 4)

    qc, kc, vc, ac = (chunks(x) for x in (q32, k32, v32, a))
    gaps = _Gaps.of(ac, subchunk)

    # Across chunks: each chunk's own contribution to the state, then one step per chunk.
    written = _einsum("bhncd,bhnce->bhnde", kc * jnp.exp(gaps.to_chunk_end()), vc)
    kept = jnp.exp(gaps.chunk_total())

    def step(state, chunk):
        kept_n, written_n = chunk
        return kept_n[..., None] * state + written_n, state

    state = zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)
    final, before = lax.scan(step, state, (jnp.moveaxis(kept, 2, 0),
                                           jnp.moveaxis(written, 2, 0)))
    before = jnp.moveaxis(before, 0, 2)  # [B, H, N, Dk, Dv]: the state each chunk starts from
    out = _einsum("bhncd,bhnde->bhnce", qc * jnp.exp(gaps.from_chunk_start()), before)
    # Rematerialised in the backward pass: nothing of [s, s, Dk] per token pair is kept.  The
    # chunks of every row and head go in as one axis: XLA's CPU compiler (jax 0.10.2) crashed
    # on the gradient of these products with seven-dimensional intermediates.
    within = jax.checkpoint(functools.partial(_within_chunks, subchunk=subchunk))
    flat = [x.reshape((-1,) + x.shape[3:]) for x in (qc, kc, vc, gaps.local)]
    out = out + within(*flat).reshape(out.shape)

    out = out.transpose(0, 2, 3, 1, 4).reshape(batch, length + pad, heads, value_dim)
    return out[:, :length].astype(q.dtype), final


class _Gaps:
    """The log decays a chunk's pairs need, from sums of few terms: ``local``, the running
    sum inside each sub-chunk ``[..., C, Dk]`` (flattened), and ``totals``, each sub-chunk's
    sum ``[..., S, Dk]``.  A decay between two tokens is the rest of the key's sub-chunk,
    whole sub-chunks between, and the query's sub-chunk up to it; never a difference of two
    running sums over the whole chunk, which would lose precision as they grow."""

    def __init__(self, local, totals, subchunk):
        self.local, self.totals, self.subchunk = local, totals, subchunk

    @classmethod
    def of(cls, log_alpha, subchunk):
        *lead, chunk, dim = log_alpha.shape
        split = log_alpha.reshape(tuple(lead) + (chunk // subchunk, subchunk, dim))
        local = jnp.cumsum(split, axis=-2)
        return cls(local.reshape(log_alpha.shape), local[..., -1, :], subchunk)

    def _per_token(self, per_subchunk):
        """``[..., S, Dk]`` -> ``[..., C, Dk]``: each sub-chunk's value for its tokens."""
        return jnp.repeat(per_subchunk, self.subchunk, axis=-2)

    def _sum_over(self, mask):
        """``sum_K mask[I, K] * totals[K]`` for each ``I``: ``[..., S, Dk]``."""
        return _einsum("ik,...kd->...id", mask.astype(jnp.float32), self.totals)

    def chunk_total(self):
        return jnp.sum(self.totals, axis=-2)

    def from_chunk_start(self):
        """Decay from the chunk's start through each token (inclusive)."""
        n = self.totals.shape[-2]
        earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]
        return self._per_token(self._sum_over(earlier)) + self.local

    def rest_of_subchunk(self):
        """Decay after each token to the end of its sub-chunk."""
        return self._per_token(self.totals) - self.local

    def to_chunk_end(self):
        """Decay after each token to the chunk's end."""
        n = self.totals.shape[-2]
        later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
        return self.rest_of_subchunk() + self._per_token(self._sum_over(later))


def _within_chunks(qc, kc, vc, local, subchunk):
    """``sum over j <= i in i's chunk`` of the pair weights times ``v_j``: ``[G, C, Dv]`` for
    ``G`` chunks (``[G, C, D]`` inputs).  ``local``: the log gates' running sums inside each
    sub-chunk (:class:`_Gaps`)."""
    *lead, chunk, key_dim = qc.shape
    n_sub = chunk // subchunk
    split = tuple(lead) + (n_sub, subchunk)
    qs, ks, cs = (x.reshape(split + (x.shape[-1],)) for x in (qc, kc, local))
    vs = vc.reshape(split + (vc.shape[-1],))
    totals = cs[..., -1, :]  # [..., S, Dk]

    # Pairs inside one sub-chunk: each key dimension's decay explicitly, [s, s, Dk] a sub-chunk.
    # A token's pair with itself weighs exactly 1 and takes no gradient: through c_i - c_i it
    # would add and subtract O(1) terms whose rounding swamps the true gradient of strong gates.
    before = jnp.tril(jnp.ones((subchunk, subchunk), bool), -1)[..., None]
    same = jnp.eye(subchunk, dtype=bool)[..., None]
    gaps = cs[..., :, None, :] - cs[..., None, :, :]
    weights = jnp.where(same, 1.0, jnp.exp(jnp.where(before, gaps, -jnp.inf)))
    scores = _einsum("gsid,gsjd,gsijd->gsij", qs, ks, weights)
    out = _einsum("gsij,gsje->gsie", scores, vs)

    # Keys of earlier sub-chunks J < I: the decay (rest of J) + (sub-chunks strictly between)
    # + (I up to the query), split into a key factor and a query factor, both <= 1.
    index = jnp.arange(n_sub)
    between = ((index[None, :, None] < index[None, None, :])
               & (index[None, None, :] < index[:, None, None]))  # [I, J, K]: J < K < I
    spanned = _einsum("ijk,gkd->gijd", between.astype(jnp.float32), totals)
    rest = totals[..., :, None, :] - cs  # [..., J, s, Dk]
    earlier = (index[None, :] < index[:, None])[..., None, None]  # [I, J, 1, 1]
    key_gap = jnp.where(earlier, rest[..., None, :, :, :] + spanned[..., :, :, None, :],
                        -jnp.inf)  # [..., I, J, s, Dk]
    k_hat = ks[..., None, :, :, :] * jnp.exp(key_gap)
    scores = _einsum("gsid,gsjtd->gsijt", qs * jnp.exp(cs), k_hat)
    out = out + _einsum("gsijt,gjte->gsie", scores, vs)
    return out.reshape(tuple(lead) + (chunk, vc.shape[-1]))


__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_SUBCHUNK", "check_chunking",
           "chunked_linear_attention"]
