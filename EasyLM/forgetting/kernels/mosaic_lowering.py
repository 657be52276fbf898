"""TPU lowering of the forgetting attention kernel: Pallas through Mosaic.

Mosaic pipelines HBM->VMEM copies along the grid, so the tile loops of the GPU lowering become
sequential ("arbitrary") grid axes with float32 accumulators in VMEM scratch: forward and dq
run over (row, head, query tile | key tile), dk/dv over (row, kv head, key tile | head of the
group, query tile).  The skip table is scalar-prefetched into SMEM.  ``pl.when`` runs the body
only for the tiles the GPU lowering's loops visit (from the skip table's bound to the causal
diagonal), and the index maps clamp every other step to a visited tile, so that the pipeline
issues no copy for it.

Mosaic wants the last two block dimensions to be (sequence, head_dim), so this lowering works
on head-major ``[B, heads, L, D]`` transposes; per-query statistics and ``c`` enter as
``[B, H, L, 1]`` columns or ``[B, H, 1, L]`` rows as the tile maths needs them.  Helpers and
compiler settings are the cross-batch kernel's (:mod:`FoT.kernels.mosaic_lowering`).  It has run
in interpret mode only (no TPU was available while it was written).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from EasyLM.forgetting.kernels import tiles
from FoT.kernels import mosaic_lowering as shared
from FoT.kernels.mosaic_lowering import _head_major, _interpreter, _semantics

__all__ = ["backward", "default_blocks", "forward"]


def default_blocks(dtype, head_dim=None):
    """The cross-batch kernel's Mosaic tiles (not measured on a TPU) for every head size."""
    del head_dim
    return shared.default_blocks(dtype)


def _rows(x):
    """``[B, L, H, 1]`` -> ``[B, H, 1, L]``, whose ``[1, block]`` tiles are rows."""
    return jnp.transpose(x, (0, 2, 3, 1))


def _clamp(index, first, last):
    return jnp.minimum(jnp.maximum(index, first), last)


def _key_ranges(plan, b, h, i, start_ref):
    """(start, full_end, masked_end) of query tile ``i`` of row ``b`` and head ``h``."""
    first = start_ref[plan.table_index(b, h, i * plan.blocks.block_q)]
    return plan.key_range(i, plan.blocks.block_q, plan.blocks.block_k, first)


def _query_tile_call(plan, kernel, inputs, outputs, scratch, interpret, name):
    """pallas_call over the forward/dq grid (b, h, i | j).  Its inputs are the skip table, q,
    ``c`` columns, k, v, ``c`` rows, then ``inputs`` and its outputs ``outputs``, which name
    their tiles: "q" for ``[block_q, D]`` and "stat" for ``[block_q, 1]``."""
    block_q, block_k, d = plan.blocks.block_q, plan.blocks.block_k, plan.head_dim

    def query_map(b, h, i, *_):
        return b, h, i, 0

    def key_tile(b, h, i, j, start_ref):
        start, _, masked_end = _key_ranges(plan, b, h, i, start_ref)
        return _clamp(j, start, masked_end - 1)

    def kv_map(b, h, i, j, start_ref):
        return b, plan.kv_head(h), key_tile(b, h, i, j, start_ref), 0

    def c_row_map(b, h, i, j, start_ref):
        return b, h, 0, key_tile(b, h, i, j, start_ref)

    specs = dict(q=pl.BlockSpec((None, None, block_q, d), query_map),
                 stat=pl.BlockSpec((None, None, block_q, 1), query_map))
    kv_spec = pl.BlockSpec((None, None, block_k, d), kv_map)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(plan.batch, plan.num_heads, plan.num_blocks(block_q), plan.num_blocks(block_k)),
        in_specs=[specs["q"], specs["stat"], kv_spec, kv_spec,
                  pl.BlockSpec((None, None, 1, block_k), c_row_map)]
        + [specs[kind] for kind in inputs],
        out_specs=[specs[kind] for kind, _ in outputs],
        scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch])
    return pl.pallas_call(
        functools.partial(kernel, plan=plan), grid_spec=grid_spec,
        out_shape=[shape for _, shape in outputs], compiler_params=_semantics(3, 1),
        interpret=_interpreter(interpret), name=name)


def _visit_key_tiles(plan, start_ref, visit):
    """Runs ``visit(mask)`` where grid step (i, j) is a key tile the query tile visits."""
    b, h, i, j = (pl.program_id(a) for a in range(4))
    start, full_end, masked_end = _key_ranges(plan, b, h, i, start_ref)

    @pl.when((j >= start) & (j < full_end))
    def _():
        visit(None)

    @pl.when((j >= full_end) & (j < masked_end))
    def _():
        visit(plan.causal_mask(i, j, plan.blocks.block_q, plan.blocks.block_k))


def _last_key_step(plan):
    return pl.program_id(3) == plan.num_blocks(plan.blocks.block_k) - 1


def _forward_kernel(start_ref, q_ref, c_q_ref, k_ref, v_ref, c_k_ref, o_ref, lse_ref, m_ref,
                    l_ref, acc_ref, *, plan):
    @pl.when(pl.program_id(3) == 0)
    def _():
        m_ref[...], l_ref[...], acc_ref[...] = tiles.init_softmax(*acc_ref.shape)

    def visit(mask):
        m_ref[...], l_ref[...], acc_ref[...] = tiles.softmax_step(
            (m_ref[...], l_ref[...], acc_ref[...]), q_ref[...], k_ref[...], v_ref[...],
            c_q_ref[...], c_k_ref[...], plan.score_scale, mask)

    _visit_key_tiles(plan, start_ref, visit)

    @pl.when(_last_key_step(plan))
    def _():
        out, lse = tiles.finish_softmax((m_ref[...], l_ref[...], acc_ref[...]))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _dq_kernel(start_ref, q_ref, c_q_ref, k_ref, v_ref, c_k_ref, do_ref, lse_ref, delta_ref,
               dq_ref, dc_ref, dq_acc, dc_acc, *, plan):
    @pl.when(pl.program_id(3) == 0)
    def _():
        dq_acc[...] = jnp.zeros_like(dq_acc)
        dc_acc[...] = jnp.zeros_like(dc_acc)

    def visit(mask):
        dq_acc[...], dc_acc[...] = tiles.dq_step(
            (dq_acc[...], dc_acc[...]), q_ref[...], k_ref[...], v_ref[...], do_ref[...],
            lse_ref[...], delta_ref[...], c_q_ref[...], c_k_ref[...], plan.score_scale, mask)

    _visit_key_tiles(plan, start_ref, visit)

    @pl.when(_last_key_step(plan))
    def _():
        dq_ref[...] = (dq_acc[...] * plan.grad_scale).astype(dq_ref.dtype)
        dc_ref[...] = dc_acc[...]


def forward(plan, key_start, q, k, v, c, *, interpret):
    """``(out [B, L, H, D], lse [B, L, H, 1])``; ``c`` is ``[B, L, H, 1]``."""
    block_q, d = plan.blocks.block_q, plan.head_dim
    q_h, k_h, v_h, c_h = (_head_major(x) for x in (q, k, v, c))
    out, lse = _query_tile_call(
        plan, _forward_kernel, [],
        [("q", jax.ShapeDtypeStruct(q_h.shape, q.dtype)),
         ("stat", jax.ShapeDtypeStruct(c_h.shape, jnp.float32))],
        [(block_q, 1), (block_q, 1), (block_q, d)], interpret, "forgetting_fwd",
    )(key_start.reshape(-1), q_h, c_h, k_h, v_h, _rows(c))
    return _head_major(out), _head_major(lse)


def backward(plan, key_start, query_end, q, k, v, c, lse, delta, do, *, interpret):
    """``(dq, dk, dv, dc_query [B, L, H], dc_key [B, L, H])``."""
    block_q, d = plan.blocks.block_q, plan.head_dim
    q_h, k_h, v_h, c_h, lse_h, delta_h, do_h = (
        _head_major(x) for x in (q, k, v, c, lse, delta, do))
    dq, dc_query = _query_tile_call(
        plan, _dq_kernel, ["q", "stat", "stat"],
        [("q", jax.ShapeDtypeStruct(q_h.shape, q.dtype)),
         ("stat", jax.ShapeDtypeStruct(c_h.shape, jnp.float32))],
        [(block_q, d), (block_q, 1)], interpret, "forgetting_dq",
    )(key_start.reshape(-1), q_h, c_h, k_h, v_h, _rows(c), do_h, lse_h, delta_h)
    dk, dv, dc_key = _dkv_call(plan, query_end, q_h, k_h, v_h, c_h, _rows(c), do_h, _rows(lse),
                               _rows(delta), interpret)
    return (_head_major(dq), _head_major(dk), _head_major(dv), _head_major(dc_query)[..., 0],
            _head_major(dc_key)[..., 0])


def _dkv_kernel(end_ref, q_ref, k_ref, v_ref, c_k_ref, c_q_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dc_ref, dk_acc, dv_acc, dc_acc, *, plan):
    """Grid (b, kv head, key tile | g, query tile i): the queries of head ``kv * group + g``
    from the diagonal to the skip table's end; dk and dv sum over the group, the gate
    gradient is written per head."""
    block_q, block_k = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv
    b, kv, k_block, g, i = (pl.program_id(a) for a in range(5))
    last_query_step = i == plan.num_blocks(block_q) - 1
    masked_start, full_start, end = _query_ranges(plan, b, kv, k_block, g, end_ref)

    @pl.when((g == 0) & (i == 0))
    def _():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when(i == 0)
    def _():
        dc_acc[...] = jnp.zeros_like(dc_acc)

    def visit(mask):
        dk_acc[...], dv_acc[...], dc_acc[...] = tiles.dkv_step(
            (dk_acc[...], dv_acc[...], dc_acc[...]), q_ref[...], k_ref[...], v_ref[...],
            do_ref[...], lse_ref[...], delta_ref[...], c_q_ref[...], c_k_ref[...],
            plan.score_scale, mask)

    @pl.when((i >= masked_start) & (i < full_start))
    def _():
        visit(plan.causal_mask(i, k_block, block_q, block_k, key_major=True))

    @pl.when((i >= full_start) & (i < end))
    def _():
        visit(None)

    @pl.when(last_query_step)
    def _():
        dc_ref[...] = dc_acc[...]

    @pl.when((g == plan.group - 1) & last_query_step)
    def _():
        dk_ref[...] = (dk_acc[...] * plan.grad_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _query_ranges(plan, b, kv, k_block, g, end_ref):
    """(masked_start, full_start, end) of key tile ``k_block`` for head ``kv * group + g``."""
    block_q, block_k = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv
    head = kv * plan.group + g
    end = end_ref[plan.table_index(b, head, k_block * block_k)]
    return plan.query_range(k_block, block_q, block_k, end)


def _dkv_call(plan, query_end, q, k, v, c_cols, c_rows, do, lse_rows, delta_rows, interpret):
    """dk/dv pass on head-major inputs; ``*_rows`` are ``[B, H, 1, L]``."""
    block_q, block_k, d = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv, plan.head_dim

    def query_tile(b, kv, kb, g, i, end_ref):
        masked_start, _, end = _query_ranges(plan, b, kv, kb, g, end_ref)
        return _clamp(i, masked_start, end - 1)

    def query_map(b, kv, kb, g, i, end_ref):
        return b, kv * plan.group + g, query_tile(b, kv, kb, g, i, end_ref), 0

    def row_map(b, kv, kb, g, i, end_ref):
        return b, kv * plan.group + g, 0, query_tile(b, kv, kb, g, i, end_ref)

    def key_map(b, kv, kb, *_):
        return b, kv, kb, 0

    def key_column_map(b, kv, kb, g, *_):
        return b, kv * plan.group + g, kb, 0

    query_spec = pl.BlockSpec((None, None, block_q, d), query_map)
    row_spec = pl.BlockSpec((None, None, 1, block_q), row_map)
    key_spec = pl.BlockSpec((None, None, block_k, d), key_map)
    column_spec = pl.BlockSpec((None, None, block_k, 1), key_column_map)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(plan.batch, plan.num_kv_heads, plan.num_blocks(block_k), plan.group,
              plan.num_blocks(block_q)),
        in_specs=[query_spec, key_spec, key_spec, column_spec, row_spec, query_spec, row_spec,
                  row_spec],
        out_specs=[key_spec, key_spec, column_spec],
        scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32)] * 2
        + [pltpu.VMEM((block_k, 1), jnp.float32)])
    kv_shape = jax.ShapeDtypeStruct(k.shape, k.dtype)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan), grid_spec=grid_spec,
        out_shape=[kv_shape, kv_shape, jax.ShapeDtypeStruct(c_cols.shape, jnp.float32)],
        compiler_params=_semantics(3, 2), interpret=_interpreter(interpret),
        name="forgetting_dkv",
    )(query_end.reshape(-1), q, k, v, c_cols, c_rows, do, lse_rows, delta_rows)
