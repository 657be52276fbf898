"""GPU lowering of the cross-batch kernel: Pallas through Triton.

Every program is one grid point; the slot and key (or query) tile loops run inside it.
Keys and values enter as whole-array refs (one kv head selected by the block index map), and
each loop step loads the tile it needs at a computed row and offset, so a neighbour row is
read in place: no gathered copy exists.  Loop trip counts come from the plan, so disallowed
slots and tiles above the causal diagonal are never visited.

Layout is the model's ``[B, L, heads, D]``; the saved log-sum-exp and ``delta`` are
``[B, L, H, 1]`` float32 columns.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from FoT.kernels import tiles
from FoT.kernels.indices import index_div, index_rem
from FoT.kernels.plan import BlockSizes, pad_pow2


# Tiles, warps and stages per input itemsize.  The bf16 ones won a sweep on an H200 (see
# docs/kernels.md); float32 tiles are twice the bytes, and the bf16 choice
# with three pipeline stages overflows shared memory, so they are halved (correctness path).
_TUNED = {2: (BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=128),
              (8, 8, 8), (3, 3, 4)),
          4: (BlockSizes(block_q=64, block_k=32, block_q_dkv=32, block_k_dkv=64),
              (4, 4, 4), (2, 2, 2))}


def default_blocks(dtype):
    return _TUNED[jnp.dtype(dtype).itemsize][0]


@dataclasses.dataclass(frozen=True)
class TritonOptions:
    """Warps and software-pipelining stages of the forward, dq and dk/dv kernels."""
    num_warps: tuple
    num_stages: tuple

    @classmethod
    def make(cls, dtype, num_warps=None, num_stages=None):
        """Per-kernel settings from an int (all three kernels), a ``(forward, dq, dkv)``
        tuple, or ``None`` for the tuned defaults of ``dtype``."""
        _, warps, stages = _TUNED[jnp.dtype(dtype).itemsize]

        def per_kernel(value, default):
            if value is None:
                return default
            return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * 3
        return cls(per_kernel(num_warps, warps), per_kernel(num_stages, stages))

    def params(self, kernel):
        return plgpu.CompilerParams(num_warps=self.num_warps[kernel],
                                    num_stages=self.num_stages[kernel])


def _tile(ref, row, start, size, head=None):
    """``size`` positions of one row of a whole-array ref: ``[size, D]`` (or ``[size, 1]``).
    ``head`` is given for ``[B, L, heads, D]`` refs, omitted where the spec squeezed it."""
    positions = pl.ds(pl.multiple_of(start, size), size)
    if head is None:
        return ref[row, positions, :]
    return ref[row, positions, head, :]


def _stat_row(ref, row, start, size, head):
    """``[1, size]`` row of a ``[B, L, H, 1]`` per-query statistic."""
    return ref[row, pl.ds(pl.multiple_of(start, size), size), head, 0][None, :]


def _stream_keys(plan, block_q, block_k, row, q_block, n_slots, k_loc_ref, k_mem_ref, v_ref,
                 visit, carry):
    """Folds ``visit(carry, k, v, mask)`` over every key tile query tile ``q_block`` of
    ``row`` may see: the allowed memory slots (one flattened loop), then the local slot's
    fully visible tiles, then its diagonal tiles."""
    num_k = plan.num_blocks(block_k)

    def memory_step(t, carry):
        slot = 1 + index_div(t, num_k)
        source = plan.neighbour_row(row, slot)
        start = index_rem(t, num_k) * block_k
        return visit(carry, _tile(k_mem_ref, source, start, block_k),
                     _tile(v_ref, source, start, block_k), None)

    def local_step(masked):
        def step(j, carry):
            mask = plan.causal_mask(q_block, j, block_q, block_k) if masked else None
            return visit(carry, _tile(k_loc_ref, row, j * block_k, block_k),
                         _tile(v_ref, row, j * block_k, block_k), mask)
        return step

    full_end, masked_end = plan.local_key_range(q_block, block_q, block_k)
    carry = lax.fori_loop(0, (n_slots - 1) * num_k, memory_step, carry)
    carry = lax.fori_loop(0, full_end, local_step(False), carry)
    return lax.fori_loop(full_end, masked_end, local_step(True), carry)


def _query_tile_grid(plan, block_q):
    """Grid (query tile, row, head), query tiles fastest so that programs running together
    share one row's keys in L2; the longest (last) causal tiles start first."""
    num_q = plan.num_blocks(block_q)
    return (num_q, plan.batch, plan.num_heads), lambda p: num_q - 1 - p


def _forward_kernel(slots_ref, q_ref, k_loc_ref, k_mem_ref, v_ref, o_ref, lse_ref, *, plan,
                    q_block_of):
    blocks = plan.blocks
    q_block, row = q_block_of(pl.program_id(0)), pl.program_id(1)
    q = q_ref[...]

    def visit(carry, k, v, mask):
        return tiles.softmax_step(carry, q, k, v, plan.score_scale, mask)

    carry = _stream_keys(plan, blocks.block_q, blocks.block_k, row, q_block, slots_ref[row],
                         k_loc_ref, k_mem_ref, v_ref, visit,
                         tiles.init_softmax(blocks.block_q, plan.head_dim))
    out, lse = tiles.finish_softmax(carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(slots_ref, q_ref, k_loc_ref, k_mem_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, plan, q_block_of):
    blocks = plan.blocks
    q_block, row = q_block_of(pl.program_id(0)), pl.program_id(1)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def visit(dq, k, v, mask):
        return tiles.dq_step(dq, q, k, v, do, lse, delta, plan.score_scale, mask)

    dq = _stream_keys(plan, blocks.block_q, blocks.block_k, row, q_block, slots_ref[row],
                      k_loc_ref, k_mem_ref, v_ref, visit,
                      jnp.zeros((blocks.block_q, plan.head_dim), jnp.float32))
    dq_ref[...] = (dq * plan.grad_scale).astype(dq_ref.dtype)


def _dkv_kernel(reader_slots_ref, reader_counts_ref, q_ref, k_loc_ref, k_mem_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_loc_ref, dk_mem_ref, dv_ref, *, plan):
    """One key tile of one row and kv head: first its own (causal) queries, giving dk_loc,
    then the queries of every row that reads it as memory, giving dk_mem; dv sums both."""
    block_q, block_k = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv
    num_q = plan.num_blocks(block_q)
    k_block, row, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    v = v_ref[...]
    zeros = jnp.zeros((block_k, plan.head_dim), jnp.float32)

    def fold_queries(carry, k, reader, head, q_lo, q_hi, masked):
        def step(i, carry):
            start = i * block_q
            mask = (plan.causal_mask(i, k_block, block_q, block_k, key_major=True)
                    if masked else None)
            return tiles.dkv_step(
                carry, _tile(q_ref, reader, start, block_q, head), k, v,
                _tile(do_ref, reader, start, block_q, head),
                _stat_row(lse_ref, reader, start, block_q, head),
                _stat_row(delta_ref, reader, start, block_q, head), plan.score_scale, mask)
        return lax.fori_loop(q_lo, q_hi, step, carry)

    k_loc = k_loc_ref[...]
    masked_start, full_start = plan.local_query_range(k_block, block_q, block_k)

    def local_head(g, carry):
        head = kv_head * plan.group + g
        carry = fold_queries(carry, k_loc, row, head, masked_start, full_start, True)
        return fold_queries(carry, k_loc, row, head, full_start, num_q, False)

    dk_loc, dv = lax.fori_loop(0, plan.group, local_head, (zeros, zeros))
    dk_loc_ref[...] = (dk_loc * plan.grad_scale).astype(dk_loc_ref.dtype)

    k_mem = k_mem_ref[...]
    num_readers = reader_counts_ref[row]
    width = max(plan.cross_batch_range, 1)

    def memory_reader(t, carry):
        g, j = index_div(t, num_readers), index_rem(t, num_readers)
        reader = plan.reader_row(row, reader_slots_ref[row * width + j])
        return fold_queries(carry, k_mem, reader, kv_head * plan.group + g, 0, num_q, False)

    dk_mem, dv = lax.fori_loop(0, plan.group * num_readers, memory_reader, (zeros, dv))
    dk_mem_ref[...] = (dk_mem * plan.grad_scale).astype(dk_mem_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _whole_rows(plan, head_of):
    """Block spec of a whole ``[B, L, heads, D]`` array with one head picked by ``head_of``."""
    shape = (plan.batch, plan.length, None, plan.head_dim)
    return pl.BlockSpec(shape, lambda *ids: (0, 0, head_of(*ids), 0))


def _whole_array(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def forward(plan, q, k_loc, k_mem, v, *, options, interpret):
    grid, q_block_of = _query_tile_grid(plan, plan.blocks.block_q)
    block_q, d = plan.blocks.block_q, plan.head_dim
    kv_of = lambda p, b, h: plan.kv_head(h)  # noqa: E731
    q_spec = pl.BlockSpec((None, block_q, None, d), lambda p, b, h: (b, q_block_of(p), h, 0))
    lse_spec = pl.BlockSpec((None, block_q, None, 1), lambda p, b, h: (b, q_block_of(p), h, 0))
    slots = jnp.asarray(plan.slot_table())
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan, q_block_of=q_block_of),
        grid=grid,
        in_specs=[_whole_array(slots.shape), q_spec] + [_whole_rows(plan, kv_of)] * 3,
        out_specs=[q_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(q.shape[:3] + (1,), jnp.float32)],
        compiler_params=options.params(0), interpret=interpret, name="cross_batch_fwd",
    )(slots, q, k_loc, k_mem, v)


def backward(plan, q, k_loc, k_mem, v, lse, delta, do, *, options, interpret):
    blocks, d = plan.blocks, plan.head_dim
    grid, q_block_of = _query_tile_grid(plan, blocks.block_q)
    kv_of = lambda p, b, h: plan.kv_head(h)  # noqa: E731
    q_spec = pl.BlockSpec((None, blocks.block_q, None, d), lambda p, b, h: (b, q_block_of(p), h, 0))
    lse_spec = pl.BlockSpec((None, blocks.block_q, None, 1),
                            lambda p, b, h: (b, q_block_of(p), h, 0))
    slots = jnp.asarray(plan.slot_table())
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan, q_block_of=q_block_of),
        grid=grid,
        in_specs=([_whole_array(slots.shape), q_spec] + [_whole_rows(plan, kv_of)] * 3
                  + [q_spec, lse_spec, lse_spec]),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=options.params(1), interpret=interpret, name="cross_batch_dq",
    )(slots, q, k_loc, k_mem, v, do, lse, delta)

    table, counts = plan.reader_slots()
    reader_slots, reader_counts = (jnp.asarray(pad_pow2(x.reshape(-1))) for x in (table, counts))
    kv_spec = pl.BlockSpec((None, blocks.block_k_dkv, None, d), lambda j, r, h: (r, j, h, 0))
    kv_shape = jax.ShapeDtypeStruct(k_loc.shape, k_loc.dtype)
    dk_loc, dk_mem, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid=(plan.num_blocks(blocks.block_k_dkv), plan.batch, plan.num_kv_heads),
        in_specs=[_whole_array(reader_slots.shape), _whole_array(reader_counts.shape),
                  _whole_array(q.shape), kv_spec, kv_spec, kv_spec, _whole_array(do.shape),
                  _whole_array(lse.shape), _whole_array(delta.shape)],
        out_specs=[kv_spec] * 3,
        out_shape=[kv_shape] * 3,
        compiler_params=options.params(2), interpret=interpret, name="cross_batch_dkv",
    )(reader_slots, reader_counts, q, k_loc, k_mem, v, do, lse, delta)
    return dq, dk_loc, dk_mem, dv
