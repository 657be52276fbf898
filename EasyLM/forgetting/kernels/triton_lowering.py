"""GPU lowering of the forgetting attention kernel: Pallas through Triton.

Every program is one grid point and its tile loop runs inside it.  Keys, values and the
gates' running sums of the tiles it visits are loaded from whole-array refs at computed
positions, and the loop bounds come from the plan: tiles above the causal diagonal and the
block pairs the skip table leaves out are never visited.  The patterns are those of the
cross-batch kernel's Triton lowering (:mod:`FoT.kernels.triton_lowering`), whose helpers and
compiler options this one uses.

Layout is the model's ``[B, L, heads, D]``; ``c``, the saved log-sum-exp, ``delta`` and the
query side's gate gradient are ``[B, L, H, 1]`` float32 columns.  The dk/dv kernel writes the
key side's gate gradient of all heads of its group as one ``[block_k, padded group]`` tile of a
``[B, L, KV, padded group]`` array.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from EasyLM.forgetting.kernels import tiles
# The grid order (query tiles fastest, longest causal tiles first) and the tile loads are the
# cross-batch kernel's; so are the tiles, warps and stages of the shapes this kernel has no
# measured setting for.
from FoT.kernels import triton_lowering as shared
from FoT.kernels.plan import BlockSizes
from FoT.kernels.triton_lowering import _query_tile_grid, _stat_row, _tile, _whole_array

# Tiles, warps and stages per (input itemsize, head size): the best of
# benchmarks/tune_forgetting.py's search at L=4096 on an H200 (2026-12-06, docs/kernels.md).
# float32 (the correctness path) takes the cross-batch kernel's, which the search starts from.
_TUNED = {(2, 64): (BlockSizes(block_q=128, block_k=64, block_q_dkv=32, block_k_dkv=128),
                    (4, 4, 4), (3, 4, 3)),
          (2, 128): (BlockSizes(block_q=64, block_k=64, block_q_dkv=32, block_k_dkv=64),
                     (4, 4, 4), (3, 2, 3))}


def default_blocks(dtype, head_dim=None):
    tuned = _TUNED.get((jnp.dtype(dtype).itemsize, head_dim))
    return tuned[0] if tuned else shared.default_blocks(dtype)


def default_options(dtype, head_dim=None, num_warps=None, num_stages=None):
    """:class:`FoT.kernels.triton_lowering.TritonOptions` of the forward, dq and dk/dv
    kernels: ``num_warps``/``num_stages`` as given (an int or a 3-tuple), else the measured
    setting of ``(dtype, head_dim)``, else the cross-batch kernel's."""
    tuned = _TUNED.get((jnp.dtype(dtype).itemsize, head_dim))
    if tuned is not None:
        num_warps = tuned[1] if num_warps is None else num_warps
        num_stages = tuned[2] if num_stages is None else num_stages
    return shared.TritonOptions.make(dtype, num_warps, num_stages)


__all__ = ["backward", "default_blocks", "default_options", "forward"]


def _flat_table(table):
    """A ``[B, H, n]`` skip table flattened and zero-padded to a power-of-two length (Triton
    tensors must have one)."""
    flat = table.reshape(-1)
    return jnp.pad(flat, (0, (1 << (flat.size - 1).bit_length()) - flat.size))


def _stream_keys(plan, row, head, q_block, key_start_ref, k_ref, v_ref, c_ref, visit, carry):
    """Folds ``visit(carry, k, v, c_k, mask)`` over the key tiles query tile ``q_block``
    visits: the fully visible ones from the skip table's start, then the diagonal ones."""
    block_q, block_k = plan.blocks.block_q, plan.blocks.block_k
    kv_head = plan.kv_head(head)
    first = key_start_ref[plan.table_index(row, head, q_block * block_q)]
    start, full_end, masked_end = plan.key_range(q_block, block_q, block_k, first)

    def step(masked):
        def body(j, carry):
            mask = plan.causal_mask(q_block, j, block_q, block_k) if masked else None
            return visit(carry, _tile(k_ref, row, j * block_k, block_k, kv_head),
                         _tile(v_ref, row, j * block_k, block_k, kv_head),
                         _stat_row(c_ref, row, j * block_k, block_k, head), mask)
        return body

    carry = lax.fori_loop(start, full_end, step(False), carry)
    return lax.fori_loop(full_end, masked_end, step(True), carry)


def _forward_kernel(key_start_ref, q_ref, c_q_ref, k_ref, v_ref, c_ref, o_ref, lse_ref, *,
                    plan, q_block_of):
    q_block, row, head = q_block_of(pl.program_id(0)), pl.program_id(1), pl.program_id(2)
    q, c_q = q_ref[...], c_q_ref[...]

    def visit(carry, k, v, c_k, mask):
        return tiles.softmax_step(carry, q, k, v, c_q, c_k, plan.score_scale, mask)

    carry = _stream_keys(plan, row, head, q_block, key_start_ref, k_ref, v_ref, c_ref, visit,
                         tiles.init_softmax(plan.blocks.block_q, plan.head_dim))
    out, lse = tiles.finish_softmax(carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(key_start_ref, q_ref, c_q_ref, k_ref, v_ref, c_ref, do_ref, lse_ref, delta_ref,
               dq_ref, dc_ref, *, plan, q_block_of):
    q_block, row, head = q_block_of(pl.program_id(0)), pl.program_id(1), pl.program_id(2)
    q, c_q, do, lse, delta = q_ref[...], c_q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def visit(carry, k, v, c_k, mask):
        return tiles.dq_step(carry, q, k, v, do, lse, delta, c_q, c_k, plan.score_scale, mask)

    dq, dc = _stream_keys(plan, row, head, q_block, key_start_ref, k_ref, v_ref, c_ref, visit,
                          (jnp.zeros((plan.blocks.block_q, plan.head_dim), jnp.float32),
                                  jnp.zeros((plan.blocks.block_q, 1), jnp.float32)))
    dq_ref[...] = (dq * plan.grad_scale).astype(dq_ref.dtype)
    dc_ref[...] = dc


def _dkv_kernel(query_end_ref, q_ref, k_ref, v_ref, c_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, dc_ref, *, plan):
    """One key tile of one row and kv head, over the queries of each head of its group in
    turn: dk and dv sum over the group, the gate gradient is kept per head."""
    block_q, block_k = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv
    k_block, row, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first_key = k_block * block_k
    k, v = k_ref[...], v_ref[...]
    head_of_column = lax.broadcasted_iota(jnp.int32, (block_k, plan.padded_group), 1)

    def group_head(g, carry):
        dk, dv, dc_heads = carry
        head = kv_head * plan.group + g
        c_k = _tile(c_ref, row, first_key, block_k, head)
        end = query_end_ref[plan.table_index(row, head, first_key)]
        masked_start, full_start, end = plan.query_range(k_block, block_q, block_k, end)

        def step(masked):
            def body(i, carry):
                start = i * block_q
                mask = (plan.causal_mask(i, k_block, block_q, block_k, key_major=True)
                        if masked else None)
                return tiles.dkv_step(
                    carry, _tile(q_ref, row, start, block_q, head), k, v,
                    _tile(do_ref, row, start, block_q, head),
                    _stat_row(lse_ref, row, start, block_q, head),
                    _stat_row(delta_ref, row, start, block_q, head),
                    _stat_row(c_ref, row, start, block_q, head), c_k, plan.score_scale, mask)
            return body

        carry = (dk, dv, jnp.zeros((block_k, 1), jnp.float32))
        carry = lax.fori_loop(masked_start, full_start, step(True), carry)
        dk, dv, dc = lax.fori_loop(full_start, end, step(False), carry)
        return dk, dv, jnp.where(head_of_column == g, dc, dc_heads)

    zeros = jnp.zeros((block_k, plan.head_dim), jnp.float32)
    dk, dv, dc_heads = lax.fori_loop(
        0, plan.group, group_head,
        (zeros, zeros, jnp.zeros((block_k, plan.padded_group), jnp.float32)))
    dk_ref[...] = (dk * plan.grad_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dc_ref[...] = dc_heads


def _whole_rows(plan, heads, width):
    """Block spec of a whole ``[B, L, heads, width]`` array."""
    return _whole_array((plan.batch, plan.length, heads, width))


def _query_tile_specs(plan, q_block_of):
    """Block specs of the forward/dq grid: the ``[block_q, D]`` query-side tiles, their
    ``[block_q, 1]`` statistics, and the whole key, value and ``c`` arrays."""
    block_q, d = plan.blocks.block_q, plan.head_dim

    def index(p, b, h):
        return b, q_block_of(p), h, 0

    return dict(q=pl.BlockSpec((None, block_q, None, d), index),
                stat=pl.BlockSpec((None, block_q, None, 1), index),
                kv=_whole_rows(plan, plan.num_kv_heads, d),
                c=_whole_rows(plan, plan.num_heads, 1))


def forward(plan, key_start, q, k, v, c, *, options, interpret):
    """``(out [B, L, H, D], lse [B, L, H, 1])``; ``c`` is ``[B, L, H, 1]``."""
    grid, q_block_of = _query_tile_grid(plan, plan.blocks.block_q)
    specs = _query_tile_specs(plan, q_block_of)
    table = _flat_table(key_start)
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan, q_block_of=q_block_of),
        grid=grid,
        in_specs=[_whole_array(table.shape), specs["q"], specs["stat"], specs["kv"],
                  specs["kv"], specs["c"]],
        out_specs=[specs["q"], specs["stat"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(c.shape, jnp.float32)],
        compiler_params=options.params(0), interpret=interpret, name="forgetting_fwd",
    )(table, q, c, k, v, c)


def backward(plan, key_start, query_end, q, k, v, c, lse, delta, do, *, options, interpret):
    """``(dq, dk, dv, dc_query [B, L, H], dc_key [B, L, H])``."""
    blocks, d = plan.blocks, plan.head_dim
    grid, q_block_of = _query_tile_grid(plan, blocks.block_q)
    specs = _query_tile_specs(plan, q_block_of)
    table = _flat_table(key_start)
    dq, dc_query = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan, q_block_of=q_block_of),
        grid=grid,
        in_specs=[_whole_array(table.shape), specs["q"], specs["stat"], specs["kv"],
                  specs["kv"], specs["c"], specs["q"], specs["stat"], specs["stat"]],
        out_specs=[specs["q"], specs["stat"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(c.shape, jnp.float32)],
        compiler_params=options.params(1), interpret=interpret, name="forgetting_dq",
    )(table, q, c, k, v, c, do, lse, delta)

    table = _flat_table(query_end)
    kv_spec = pl.BlockSpec((None, blocks.block_k_dkv, None, d), lambda j, r, h: (r, j, h, 0))
    dc_spec = pl.BlockSpec((None, blocks.block_k_dkv, None, plan.padded_group),
                           lambda j, r, h: (r, j, h, 0))
    kv_shape = jax.ShapeDtypeStruct(k.shape, k.dtype)
    dk, dv, dc_key = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid=(plan.num_blocks(blocks.block_k_dkv), plan.batch, plan.num_kv_heads),
        in_specs=[_whole_array(table.shape), _whole_array(q.shape), kv_spec, kv_spec,
                  _whole_array(c.shape), _whole_array(do.shape), _whole_array(lse.shape),
                  _whole_array(delta.shape)],
        out_specs=[kv_spec, kv_spec, dc_spec],
        out_shape=[kv_shape, kv_shape,
                   jax.ShapeDtypeStruct(k.shape[:3] + (plan.padded_group,), jnp.float32)],
        compiler_params=options.params(2), interpret=interpret, name="forgetting_dkv",
    )(table, q, k, v, c, do, lse, delta)
    dc_key = dc_key[..., :plan.group].reshape(c.shape[:3])
    return dq, dk, dv, dc_query[..., 0], dc_key
