"""Blockwise forgetting attention: the kernel's walk over tiles, in plain XLA on any backend.

Each query block runs an online softmax over the key blocks from the skip table's start to
the causal diagonal (a ``lax.fori_loop`` inside a ``lax.map`` over query blocks), so memory
holds one ``[B, H, block, block]`` score tile at a time and the blocks above the diagonal
cost nothing.  A ``jax.custom_vjp`` saves only the output and the log-sum-exp and
recomputes the scores in the backward pass, by query block (dq and the query side of the
gates' gradient) and by key block (dk, dv and the key side); autodiff through the loops would
keep every step's accumulators instead.

The per-tile maths is the fused kernel's (:mod:`EasyLM.forgetting.kernels.tiles`), mapped over
rows and heads.  Unlike the kernel it takes a ``key_mask``.  With ``skip_threshold`` it leaves
out a block pair where every row and head of the batch can (:mod:`EasyLM.forgetting.skipping`).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from EasyLM.forgetting.kernels import tiles
from EasyLM.forgetting.kernels.plan import BlockSizes, ForgettingPlan
from EasyLM.forgetting.reference import check_shapes, cumulative_log_forget
from EasyLM.forgetting.skipping import check_skip_threshold, skip_ranges

DEFAULT_BLOCK_SIZE = 512


def check_blockwise(length, block_size, *, padded=False, skip_threshold=None):
    """Whether the blockwise variant runs rows of ``length`` tokens in blocks of
    ``block_size`` (``padded``: with a key mask); raises ``NotImplementedError`` saying why."""
    if length % min(block_size, length):
        raise NotImplementedError(f"blockwise forgetting attention needs the sequence length "
                                  f"({length}) to be a multiple of its block size "
                                  f"({block_size}); pick a block size dividing it")
    if padded and skip_threshold is not None:
        raise NotImplementedError("block skipping bounds a weight by the query's own key, "
                                  "which a key mask may hide: pass skip_threshold=None with "
                                  "a key_mask")


def blockwise_forgetting_attention(q, k, v, log_f, key_mask=None, *,
                                   block_size=DEFAULT_BLOCK_SIZE, skip_threshold=None):
    """Forgetting attention ``[B, L, H, D]`` in ``q.dtype``; the reference's contract
    (:func:`EasyLM.forgetting.reference.reference_forgetting_attention`), in blocks of
    ``min(block_size, L)`` tokens, which must divide ``L``.  A query that sees no key at all
    (every key up to it masked) gets an undefined output."""
    check_shapes(q, k, v, log_f)
    check_skip_threshold(skip_threshold)
    length = q.shape[1]
    check_blockwise(length, block_size, padded=key_mask is not None,
                    skip_threshold=skip_threshold)
    block = min(block_size, length)
    batch, _, heads, head_dim = q.shape
    plan = ForgettingPlan(batch, length, heads, k.shape[2], head_dim, BlockSizes(*(block,) * 4))
    visible = (jnp.ones((batch, length), bool) if key_mask is None
               else key_mask.astype(bool))
    return _attention(plan, skip_threshold, key_mask is not None, q, k, v,
                      cumulative_log_forget(log_f), visible)


def _per_head(step, score_scale):
    """``step`` of the tile maths on ``[B, H, ...]`` stacks of tiles (``operands`` a tuple)."""
    def one(carry, operands, mask):
        return step(carry, *operands, score_scale, mask)
    return jax.vmap(jax.vmap(one))


def _block(x, index, size, axis=2):
    return lax.dynamic_slice_in_dim(x, index * size, size, axis)


def _rows(column):
    """``[..., n, 1]`` -> ``[..., 1, n]``: the key-major tiles take per-query values as rows."""
    return jnp.swapaxes(column, -1, -2)


def _mask(plan, padded, visible, i, j, diagonal, key_major=False):
    """Which pairs of query block ``i`` and key block ``j`` are visible, broadcast to the
    ``[B, H, ...]`` tiles (None: all of them)."""
    block = plan.skip_block
    mask = plan.causal_mask(i, j, block, block, key_major) if diagonal else None
    if padded:
        keys = _block(visible, j, block, axis=1)  # [B, block]
        keys = keys[:, None, :, None] if key_major else keys[:, None, None, :]
        mask = keys if mask is None else mask & keys
    if mask is None:
        return None
    return jnp.broadcast_to(mask, (plan.batch, plan.num_heads, block, block))


def _head_major(q, k, v, c):
    """``q, k, v`` as ``[B, heads, L, D]`` and ``c`` as ``[B, H, L, 1]`` columns."""
    return (jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
            jnp.swapaxes(c, 1, 2)[..., None])


def _key_tiles(plan, x, j):
    """Key block ``j`` of a ``[B, KV, L, D]`` array, repeated for each query head."""
    return jnp.repeat(_block(x, j, plan.skip_block), plan.group, axis=1)


def _model_layout(blocks):
    """``[n, B, heads, block, ...]`` (one entry per block) -> ``[B, L, heads, ...]``."""
    n, batch, heads, block = blocks.shape[:4]
    whole = jnp.moveaxis(blocks, 0, 2).reshape((batch, heads, n * block) + blocks.shape[4:])
    return jnp.swapaxes(whole, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(plan, skip_threshold, padded, q, k, v, c, visible):
    return _attention_fwd(plan, skip_threshold, padded, q, k, v, c, visible)[0]


def _attention_fwd(plan, skip_threshold, padded, q, k, v, c, visible):
    block, num_blocks = plan.skip_block, plan.num_blocks(plan.skip_block)
    key_start, query_end = skip_ranges(q, k, c, skip_threshold, block)
    # One loop serves every row and head: a pair is skipped where all of them can skip it.
    first, end = jnp.min(key_start, axis=(0, 1)), jnp.max(query_end, axis=(0, 1))
    qh, kh, vh, ch = _head_major(q, k, v, c)
    step = _per_head(tiles.softmax_step, plan.score_scale)
    stat = (plan.batch, plan.num_heads, block, 1)

    def query_block(i):
        q_i, c_i = _block(qh, i, block), _block(ch, i, block)

        def visit(j, carry, diagonal=False):
            operands = (q_i, _key_tiles(plan, kh, j), _key_tiles(plan, vh, j), c_i,
                        _rows(_block(ch, j, block)))
            return step(carry, operands, _mask(plan, padded, visible, i, j, diagonal))

        carry = (jnp.full(stat, -jnp.inf, jnp.float32), jnp.zeros(stat, jnp.float32),
                 jnp.zeros(q_i.shape, jnp.float32))
        carry = visit(i, lax.fori_loop(first[i], i, visit, carry), diagonal=True)
        return jax.vmap(jax.vmap(tiles.finish_softmax))(carry)

    out, lse = lax.map(query_block, jnp.arange(num_blocks))
    out = _model_layout(out).astype(q.dtype)
    return out, (q, k, v, c, visible, out, _model_layout(lse), first, end)


def _attention_bwd(plan, skip_threshold, padded, residuals, d_out):
    del skip_threshold  # first and end say what the forward pass skipped
    q, k, v, c, visible, out, lse, first, end = residuals
    block, num_blocks = plan.skip_block, plan.num_blocks(plan.skip_block)
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1,
                    keepdims=True)
    qh, kh, vh, ch = _head_major(q, k, v, c)
    doh, lse_h, delta_h = (jnp.swapaxes(x, 1, 2) for x in (d_out, lse, delta))

    dq_step = _per_head(tiles.dq_step, plan.score_scale)

    def dq_block(i):
        q_i, c_i, do_i = (_block(x, i, block) for x in (qh, ch, doh))
        lse_i, delta_i = _block(lse_h, i, block), _block(delta_h, i, block)

        def visit(j, carry, diagonal=False):
            operands = (q_i, _key_tiles(plan, kh, j), _key_tiles(plan, vh, j), do_i, lse_i,
                        delta_i, c_i, _rows(_block(ch, j, block)))
            return dq_step(carry, operands, _mask(plan, padded, visible, i, j, diagonal))

        carry = (jnp.zeros(q_i.shape, jnp.float32), jnp.zeros(c_i.shape, jnp.float32))
        dq, dc = visit(i, lax.fori_loop(first[i], i, visit, carry), diagonal=True)
        return dq * plan.grad_scale, dc

    dkv_step = _per_head(tiles.dkv_step, plan.score_scale)

    def dkv_block(j):
        k_j, v_j, c_j = _key_tiles(plan, kh, j), _key_tiles(plan, vh, j), _block(ch, j, block)

        def visit(i, carry, diagonal=False):
            operands = (_block(qh, i, block), k_j, v_j, _block(doh, i, block),
                        _rows(_block(lse_h, i, block)), _rows(_block(delta_h, i, block)),
                        _rows(_block(ch, i, block)), c_j)
            mask = _mask(plan, padded, visible, i, j, diagonal, key_major=True)
            return dkv_step(carry, operands, mask)

        carry = (jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(k_j.shape, jnp.float32),
                 jnp.zeros(c_j.shape, jnp.float32))
        dk, dv, dc = lax.fori_loop(j + 1, end[j], visit, visit(j, carry, diagonal=True))
        # Per query head so far; the group's heads share one key/value head.
        group = (plan.batch, plan.num_kv_heads, plan.group) + dk.shape[2:]
        return (dk.reshape(group).sum(2) * plan.grad_scale, dv.reshape(group).sum(2), dc)

    dq, dc_query = lax.map(dq_block, jnp.arange(num_blocks))
    dk, dv, dc_key = lax.map(dkv_block, jnp.arange(num_blocks))
    # As in the fused kernel (EasyLM.forgetting.kernels.flash): dc_query is zero but for the
    # rounding of delta, which it cancels from dc_key.
    dc = (_model_layout(dc_query) + _model_layout(dc_key))[..., 0]
    return (_model_layout(dq).astype(q.dtype), _model_layout(dk).astype(k.dtype),
            _model_layout(dv).astype(v.dtype), dc, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
