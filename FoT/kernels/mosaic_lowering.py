"""TPU lowering of the cross-batch kernel: Pallas through Mosaic.

Mosaic pipelines HBM->VMEM copies along the grid, so the loops of the GPU lowering become
grid axes: forward and dq run over (row, head, query tile | slot, key tile) and dk/dv over
(row, kv head, key tile | head of the group, reader slot, query tile), the axes after ``|``
sequential ("arbitrary") with float32 accumulators in VMEM scratch.  The slot tables are
scalar-prefetched into SMEM; the block index maps compute the neighbour row from them, and
``pl.when`` skips the body of disallowed slots and of tiles beyond the causal diagonal.  A
skipped step's index map repeats the block of the last visited step, so the pipeline issues
no copy for it.

Mosaic wants the last two block dimensions to be (sequence, head_dim), so this lowering
works on head-major ``[B, heads, L, D]`` transposes of its inputs.  It has run in interpret
mode only (no TPU was available while it was written).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from FoT.kernels import tiles
from FoT.kernels.plan import BlockSizes

# jax releases before the rename call it TPUCompilerParams.
_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def _head_major(x):
    return jnp.swapaxes(x, 1, 2)


def default_blocks(dtype):
    """128-row tiles fill the MXU; not tuned on hardware."""
    del dtype
    return BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128)


def _interpreter(interpret):
    """The TPU interpreter (rather than the generic one) keeps Mosaic's semantics: scratch
    starts as NaN and every block copy the index maps ask for is simulated."""
    return pltpu.InterpretParams() if interpret else False


def _semantics(parallel, sequential):
    return _CompilerParams(dimension_semantics=("parallel",) * parallel
                           + ("arbitrary",) * sequential)


def _visited_key_tile(plan, q_block, slot, k_block, n_slots):
    """(slot, key tile, last local tile) whose data forward/dq grid step (slot, k_block) uses.
    Steps that are skipped map to the step visited just before them."""
    block_q, block_k = plan.blocks.block_q, plan.blocks.block_k
    last_local = plan.local_key_range(q_block, block_q, block_k)[1] - 1
    used = jnp.minimum(slot, n_slots - 1)
    tile = jnp.where(used == slot, k_block, plan.num_blocks(block_k) - 1)
    tile = jnp.where(used == 0, jnp.minimum(tile, last_local), tile)
    return used, tile, last_local


def _query_tile_specs(plan):
    """Block specs of the forward/dq grid (b, h, i, slot, j): the query-side tiles and the
    local keys, memory keys and values of the visited step."""
    d, block_q, block_k = plan.head_dim, plan.blocks.block_q, plan.blocks.block_k

    def q_map(b, h, i, *_):
        return b, h, i, 0

    def k_loc_map(b, h, i, c, j, slots_ref):
        used, kb, last_local = _visited_key_tile(plan, i, c, j, slots_ref[b])
        return b, plan.kv_head(h), jnp.where(used == 0, kb, last_local), 0

    def k_mem_map(b, h, i, c, j, slots_ref):
        used, kb, _ = _visited_key_tile(plan, i, c, j, slots_ref[b])
        # During the local slot, prefetch the first memory tile.
        return (plan.neighbour_row(b, jnp.maximum(used, 1)), plan.kv_head(h),
                jnp.where(used == 0, 0, kb), 0)

    def v_map(b, h, i, c, j, slots_ref):
        used, kb, _ = _visited_key_tile(plan, i, c, j, slots_ref[b])
        return plan.neighbour_row(b, used), plan.kv_head(h), kb, 0

    def spec(size, width, index_map):
        return pl.BlockSpec((None, None, size, width), index_map)

    return dict(q=spec(block_q, d, q_map), stat=spec(block_q, 1, q_map),
                keys=[spec(block_k, d, m) for m in (k_loc_map, k_mem_map, v_map)])


def _visit(plan, i, c, j, n_slots, k_loc_ref, k_mem_ref, visit):
    """Runs ``visit(k_ref, mask)`` if grid step (c, j) of query tile ``i`` is visible."""
    full_end, masked_end = plan.local_key_range(i, plan.blocks.block_q, plan.blocks.block_k)

    @pl.when((c == 0) & (j < full_end))
    def _():
        visit(k_loc_ref, None)

    @pl.when((c == 0) & (j >= full_end) & (j < masked_end))
    def _():
        visit(k_loc_ref, plan.causal_mask(i, j, plan.blocks.block_q, plan.blocks.block_k))

    @pl.when((c > 0) & (c < n_slots))
    def _():
        visit(k_mem_ref, None)


def _last_step(plan):
    c, j = pl.program_id(3), pl.program_id(4)
    return (c == plan.num_slots - 1) & (j == plan.num_blocks(plan.blocks.block_k) - 1)


def _forward_kernel(slots_ref, q_ref, k_loc_ref, k_mem_ref, v_ref, o_ref, lse_ref, m_ref, l_ref,
                    acc_ref, *, plan):
    b, i, c, j = (pl.program_id(a) for a in (0, 2, 3, 4))

    @pl.when((c == 0) & (j == 0))
    def _():
        m_ref[...], l_ref[...], acc_ref[...] = tiles.init_softmax(*acc_ref.shape)

    def visit(k_ref, mask):
        carry = (m_ref[...], l_ref[...], acc_ref[...])
        m_ref[...], l_ref[...], acc_ref[...] = tiles.softmax_step(
            carry, q_ref[...], k_ref[...], v_ref[...], plan.score_scale, mask)

    _visit(plan, i, c, j, slots_ref[b], k_loc_ref, k_mem_ref, visit)

    @pl.when(_last_step(plan))
    def _():
        out, lse = tiles.finish_softmax((m_ref[...], l_ref[...], acc_ref[...]))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _dq_kernel(slots_ref, q_ref, k_loc_ref, k_mem_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               acc_ref, *, plan):
    b, i, c, j = (pl.program_id(a) for a in (0, 2, 3, 4))

    @pl.when((c == 0) & (j == 0))
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def visit(k_ref, mask):
        acc_ref[...] = tiles.dq_step(acc_ref[...], q_ref[...], k_ref[...], v_ref[...],
                                     do_ref[...], lse_ref[...], delta_ref[...],
                                     plan.score_scale, mask)

    _visit(plan, i, c, j, slots_ref[b], k_loc_ref, k_mem_ref, visit)

    @pl.when(_last_step(plan))
    def _():
        dq_ref[...] = (acc_ref[...] * plan.grad_scale).astype(dq_ref.dtype)


def _query_tile_call(plan, kernel, extra_inputs, outputs, scratch, interpret, name):
    """pallas_call over the forward/dq grid.  Inputs are q, k_loc, k_mem, v then
    ``extra_inputs``, and ``extra_inputs``/``outputs`` name their tiles: "q" for
    ``[block_q, D]`` and "stat" for ``[block_q, 1]``."""
    specs = _query_tile_specs(plan)
    block_q, block_k = plan.blocks.block_q, plan.blocks.block_k
    grid = (plan.batch, plan.num_heads, plan.num_blocks(block_q), plan.num_slots,
            plan.num_blocks(block_k))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=grid,
        in_specs=[specs["q"]] + specs["keys"] + [specs[s] for s in extra_inputs],
        out_specs=[specs[kind] for kind, _ in outputs],
        scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch])
    call = pl.pallas_call(
        functools.partial(kernel, plan=plan), grid_spec=grid_spec,
        out_shape=[shape for _, shape in outputs], compiler_params=_semantics(3, 2),
        interpret=_interpreter(interpret), name=name)
    return lambda *args: call(jnp.asarray(plan.slot_table()), *args)


def forward(plan, q, k_loc, k_mem, v, *, interpret):
    block_q, d = plan.blocks.block_q, plan.head_dim
    q, k_loc, k_mem, v = (_head_major(x) for x in (q, k_loc, k_mem, v))
    outputs = [("q", jax.ShapeDtypeStruct(q.shape, q.dtype)),
               ("stat", jax.ShapeDtypeStruct(q.shape[:3] + (1,), jnp.float32))]
    out, lse = _query_tile_call(plan, _forward_kernel, [], outputs,
                                [(block_q, 1), (block_q, 1), (block_q, d)], interpret,
                                "cross_batch_fwd")(q, k_loc, k_mem, v)
    return _head_major(out), _head_major(lse)


def backward(plan, q, k_loc, k_mem, v, lse, delta, do, *, interpret):
    blocks, d = plan.blocks, plan.head_dim
    lse_rows, delta_rows = (jnp.transpose(x, (0, 2, 3, 1)) for x in (lse, delta))
    q, k_loc, k_mem, v, lse, delta, do = (
        _head_major(x) for x in (q, k_loc, k_mem, v, lse, delta, do))
    [dq] = _query_tile_call(plan, _dq_kernel, ["q", "stat", "stat"],
                            [("q", jax.ShapeDtypeStruct(q.shape, q.dtype))],
                            [(blocks.block_q, d)], interpret, "cross_batch_dq",
                            )(q, k_loc, k_mem, v, do, lse, delta)
    dk_loc, dk_mem, dv = _dkv_call(plan, q, k_loc, k_mem, v, do, lse_rows, delta_rows,
                                   interpret)
    return tuple(_head_major(x) for x in (dq, dk_loc, dk_mem, dv))


def _dkv_kernel(last_ref, q_ref, k_loc_ref, k_mem_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_loc_ref, dk_mem_ref, dv_ref, dk_loc_acc, dk_mem_acc, dv_acc, *, plan):
    """Grid (r, kv head, key tile | g, slot c, query tile i): slot 0 is row r's own causal
    queries (dk_loc), slot c > 0 the queries of row (r + c) mod B if it reads r (dk_mem)."""
    block_q, block_k = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv
    r, k_block, g, c, i = (pl.program_id(a) for a in (0, 2, 3, 4, 5))
    num_q = plan.num_blocks(block_q)

    @pl.when((g == 0) & (c == 0) & (i == 0))
    def _():
        for acc in (dk_loc_acc, dk_mem_acc, dv_acc):
            acc[...] = jnp.zeros_like(acc)

    def visit(k_ref, dk_acc, mask):
        dk_acc[...], dv_acc[...] = tiles.dkv_step(
            (dk_acc[...], dv_acc[...]), q_ref[...], k_ref[...], v_ref[...], do_ref[...],
            lse_ref[...], delta_ref[...], plan.score_scale, mask)

    masked_start, full_start = plan.local_query_range(k_block, block_q, block_k)

    @pl.when((c == 0) & (i >= masked_start) & (i < full_start))
    def _():
        visit(k_loc_ref, dk_loc_acc,
              plan.causal_mask(i, k_block, block_q, block_k, key_major=True))

    @pl.when((c == 0) & (i >= full_start))
    def _():
        visit(k_loc_ref, dk_loc_acc, None)

    @pl.when((c > 0) & (last_ref[r * plan.num_slots + c] == c))
    def _():
        visit(k_mem_ref, dk_mem_acc, None)

    @pl.when((g == plan.group - 1) & (c == plan.num_slots - 1) & (i == num_q - 1))
    def _():
        dk_loc_ref[...] = (dk_loc_acc[...] * plan.grad_scale).astype(dk_loc_ref.dtype)
        dk_mem_ref[...] = (dk_mem_acc[...] * plan.grad_scale).astype(dk_mem_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dkv_call(plan, q, k_loc, k_mem, v, do, lse_rows, delta_rows, interpret):
    """dk/dv pass; ``lse_rows``/``delta_rows`` are ``[B, H, 1, L]`` so that their tiles are
    the ``[1, block_q]`` rows of the key-major tile maths."""
    block_q, block_k, d = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv, plan.head_dim
    num_q = plan.num_blocks(block_q)

    def query_side_map(r, h, kb, g, c, i, last_ref):
        used = last_ref[r * plan.num_slots + c]
        masked_start = plan.local_query_range(kb, block_q, block_k)[0]
        # A skipped slot repeats the last tile of the slot visited before it.
        tile = jnp.where(used == c, i, num_q - 1)
        tile = jnp.where(c == 0, jnp.maximum(i, masked_start), tile)
        return plan.reader_row(r, used), h * plan.group + g, tile, 0

    def key_map(r, h, kb, *_):
        return r, h, kb, 0

    def stat_map(*ids):
        row, head, tile, _ = query_side_map(*ids)
        return row, head, 0, tile

    query_spec = pl.BlockSpec((None, None, block_q, d), query_side_map)
    stat_spec = pl.BlockSpec((None, None, 1, block_q), stat_map)
    key_spec = pl.BlockSpec((None, None, block_k, d), key_map)
    grid = (plan.batch, plan.num_kv_heads, plan.num_blocks(block_k), plan.group,
            plan.num_slots, num_q)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=grid,
        in_specs=[query_spec, key_spec, key_spec, key_spec, query_spec, stat_spec, stat_spec],
        out_specs=[key_spec] * 3,
        scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32)] * 3)
    kv_shape = jax.ShapeDtypeStruct(k_loc.shape, k_loc.dtype)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan), grid_spec=grid_spec,
        out_shape=[kv_shape] * 3, compiler_params=_semantics(3, 3),
        interpret=_interpreter(interpret), name="cross_batch_dkv",
    )(jnp.asarray(plan.last_reader_slot().reshape(-1)), q, k_loc, k_mem, v, do, lse_rows,
      delta_rows)
