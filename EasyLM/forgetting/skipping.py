"""Block skipping for forgetting attention: which (query block, key block) pairs can be left out.

With strongly decaying gates most of a long row's attention weights are vanishingly small; the
forgetting transformer's authors skip the blocks where they all are (adaptive computation
pruning).  A pair is skipped only where every weight in it is *provably* below ``eps``:

* a weight is at most ``exp(s_ij - s_ii)``, since query ``i`` also sees its own key and the
  softmax denominator is at least ``exp(s_ii)``;
* ``|q . k| / sqrt(D) <= Bqk = max|q| max|k| / sqrt(D)`` over the row and head, so
  ``s_ij - s_ii <= (c_i - c_j) + 2 Bqk``;
* over a block pair ``c_i - c_j <= max(c over the query block) - min(c over the key block)``
  (with ``log f <= 0`` that is ``c`` at the block's first query minus ``c`` at its last key).

Renormalising over the visited keys, every output coordinate then moves by at most
``n_skipped * eps * (max v - min v)``, with ``n_skipped < L`` keys skipped for that query:
within ``2 L eps max|v|`` of the exact output.  The skipped set is the same in the forward and
both backward passes, so the gradients are exact for the approximated function.

Skipped pairs are described by two monotone tables (one visiting loop bound per program):
``key_start[b, h, i]``, the first key block query block ``i`` visits, and ``query_end[b, h, j]``,
one past the last query block that visits key block ``j``.  The diagonal block pair is never
skipped (its bound is at least ``exp(2 Bqk) >= 1 > eps``).
"""
import math

import jax.numpy as jnp
from jax import lax


def check_skip_threshold(skip_threshold):
    """``None`` (no skipping) or a float in (0, 1); anything else raises ``ValueError``."""
    if skip_threshold is None:
        return
    if not isinstance(skip_threshold, (int, float)) or not 0.0 < skip_threshold < 1.0:
        raise ValueError(f"skip_threshold is the attention weight below which a block pair may "
                         f"be skipped: a number in (0, 1) such as 1e-6, or None to visit "
                         f"every block; got {skip_threshold!r}")


def no_skipping(batch, heads, num_blocks):
    """The tables that visit every causal block pair."""
    shape = (batch, heads, num_blocks)
    return (jnp.zeros(shape, jnp.int32),
            jnp.broadcast_to(jnp.full((num_blocks,), num_blocks, jnp.int32), shape))


def skip_ranges(q, k, c, skip_threshold, block):
    """``(key_start, query_end)``, int32 ``[B, H, L // block]``, for blocks of ``block`` tokens:
    query block ``i`` of row ``b`` and head ``h`` visits key blocks ``key_start[b, h, i]``
    to ``i``; key block ``j`` is visited by query blocks ``j`` to ``query_end[b, h, j] - 1``.

    ``q [B, L, H, D]``, ``k [B, L, KV, D]``, ``c [B, L, H]`` (float32 cumulative log gates).
    ``skip_threshold=None`` visits every causal pair.  The bound is evaluated in float32.
    """
    batch, length, heads, head_dim = q.shape
    num_blocks = length // block
    if skip_threshold is None:
        return no_skipping(batch, heads, num_blocks)
    f32 = jnp.float32
    q_norm = jnp.max(jnp.linalg.norm(q.astype(f32), axis=-1), axis=1)  # [B, H]
    k_norm = jnp.repeat(jnp.max(jnp.linalg.norm(k.astype(f32), axis=-1), axis=1),
                        heads // k.shape[2], axis=1)
    logit_bound = 2.0 * q_norm * k_norm / math.sqrt(head_dim)
    blocks = jnp.swapaxes(c.astype(f32), 1, 2).reshape(batch, heads, num_blocks, block)
    log_weight_bound = (blocks.max(-1)[..., :, None] - blocks.min(-1)[..., None, :]
                        + logit_bound[..., None, None])  # [B, H, query block, key block]
    below_diagonal = jnp.tril(jnp.ones((num_blocks, num_blocks), bool), -1)
    negligible = (log_weight_bound < math.log(skip_threshold)) & below_diagonal
    # Each query block skips the leading run of negligible key blocks.  Taking the smallest
    # start of the query blocks after it makes the starts non-decreasing (skipping less, never
    # more), so that the pairs a key block's program skips are a suffix of its query blocks:
    # both backward loops then leave out exactly the pairs the forward loop left out.
    start = jnp.sum(jnp.cumprod(negligible.astype(jnp.int32), axis=-1), axis=-1)
    start = lax.cummin(start, axis=2, reverse=True)
    end = jnp.sum(start[..., :, None] <= jnp.arange(num_blocks), axis=2, dtype=jnp.int32)
    return start.astype(jnp.int32), end


def skipped_fraction(key_start):
    """Share of the causal block pairs below the diagonal that ``key_start`` skips."""
    num_blocks = key_start.shape[-1]
    below = num_blocks * (num_blocks - 1) / 2
    return float(jnp.sum(key_start)) / (below * key_start[..., 0].size) if below else 0.0
