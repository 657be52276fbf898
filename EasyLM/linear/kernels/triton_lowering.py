"""GPU lowering of the fused gated linear attention kernel: Pallas through Triton.

Four kernels, two sequential along the row and two parallel over its chunks:

* ``states`` (one program per row, head and block of the state: ``block_k`` of its key rows
  by ``block_v`` of its value columns, each block's recurrence independent of the others')
  runs the recurrence once per chunk and stores the state each chunk starts from,
  ``h [B, N, H, Dk, Dv]`` in the input dtype, and the final state (float32).
* ``outputs`` (one program per chunk, row and head) computes the chunk's outputs from the
  state it starts from and its own tokens (:func:`EasyLM.linear.kernels.tiles.chunk_outputs`).
* ``dstates`` (per row, head and block of the state) runs the recurrence of the state's gradient
  backwards and stores the gradient each chunk's end receives, and the initial state's.
* ``grads`` (per chunk, row and head) computes dq, dk, dv and ``db = q * dq - k * dk``
  (:func:`EasyLM.linear.kernels.tiles.chunk_grads`); with ``Options.split_grads``, two kernels
  do instead, one for dq and one for dk and dv (each holds fewer tiles: wide heads), their
  ``db`` summed in XLA.  With ``Options.grads_block_v``, each program (of either) takes the
  value columns that many at a time, in a loop: v, dO, dv and the states' columns one block
  at a time, reading each block of the states where it is used, dq and dk summed over the
  blocks (wide value heads); ``None``, all at once, the states read whole.

Inputs are the model's ``[B, L, H, D]`` layout, the keys and values already expanded to the
query heads, the row padded to whole chunks, entering as whole-array refs that each program
reads at computed positions.  ``c [B, L, H, Dk or 1]`` is the running sum of the log gates
inside each sub-chunk and ``tot [B, N, H, Dk or 1]`` each chunk's sum.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from EasyLM.linear.kernels import tiles
from EasyLM.linear.kernels.tiles import TN, dot
from FoT.kernels.triton_lowering import _whole_array


@dataclasses.dataclass(frozen=True)
class Options:
    """Warps and pipeline stages of the states, outputs, dstates and grads kernels (the
    grads kernel's apply to both halves when ``split_grads``); ``grads_block_v``: value
    columns per step of the grads kernels' loop over them (``None``: all at once)."""
    num_warps: tuple = (4, 4, 4, 4)
    num_stages: tuple = (2, 1, 2, 1)
    split_grads: bool = False
    grads_block_v: int | None = None

    def params(self, kernel):
        return plgpu.CompilerParams(num_warps=self.num_warps[kernel],
                                    num_stages=self.num_stages[kernel])


class _IO:
    """One chunk of one row and head of whole-array ``[B, L, H, D]`` refs (``refs``: name ->
    ref), at positions relative to the chunk's first token ``start``.  ``keys``: the key
    columns (a ``pl.ds``) that q, k and gates per key dimension are read at (None: all)."""

    def __init__(self, refs, row, head, start, chunk=None, keys=None):
        self.refs, self.row, self.head, self.start, self.chunk = refs, row, head, start, chunk
        self.keys = keys

    def load(self, name, start, size, columns=None):
        if columns is None and self.keys is not None and name in ("q", "k", "c"):
            columns = self.keys if self.refs[name].shape[3] > 1 else None
        cols = slice(None) if columns is None else columns
        return self.refs[name][self.row, pl.ds(self.start + start, size), self.head,
                               cols].astype(jnp.float32)

    def gate_row(self, start, size):
        return self.refs["c"][self.row, pl.ds(self.start + start, size), self.head, 0][None, :]

    def store(self, name, start, value, columns=None):
        ref = self.refs[name]
        cols = slice(None) if columns is None else columns
        ref[self.row, pl.ds(self.start + start, value.shape[0]), self.head, cols] = (
            value.astype(ref.dtype))

    def state(self, name, columns=None):
        """``[Dk, Dv]`` (or ``columns``) of ``h`` or ``dh`` ``[B, N, H, Dk, Dv]`` at the
        chunk ``chunk``, in their dtype."""
        cols = slice(None) if columns is None else columns
        return self.refs[name][self.row, self.chunk, self.head, :, cols]

    @staticmethod
    def when(condition, body):
        pl.when(condition)(body)


def _state_block(plan):
    """The key rows and value columns (``pl.ds`` each) of the state this program of a
    sequential kernel runs, and the columns of the gates' chunk sums ``tot`` they decay by."""
    block, row, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    key_blocks = plan.key_dim // plan.key_block
    rows = pl.ds(block % key_blocks * plan.key_block, plan.key_block)
    columns = pl.ds(block // key_blocks * plan.block_v, plan.block_v)
    gates = slice(None) if plan.per_head else rows
    return row, head, rows, columns, gates


def _states_kernel(k_ref, v_ref, c_ref, tot_ref, s0_ref, h_ref, final_ref, *, plan):
    row, head, rows, columns, gates = _state_block(plan)

    def body(n, state):
        h_ref[row, n, head, rows, columns] = state.astype(h_ref.dtype)
        io = _IO(dict(k=k_ref, v=v_ref, c=c_ref), row, head, n * plan.chunk, keys=rows)
        keys = tiles.written_keys(plan, io, tiles.Chunk(plan, io))
        written = dot(keys, io.load("v", 0, plan.chunk, columns), TN, plan.dtype)
        return jnp.exp(tot_ref[row, n, head, gates])[:, None] * state + written

    final_ref[row, head, rows, columns] = lax.fori_loop(
        0, plan.n_chunks, body, s0_ref[row, head, rows, columns])


def _outputs_kernel(q_ref, k_ref, v_ref, c_ref, h_ref, o_ref, *, plan):
    n, row, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    io = _IO(dict(q=q_ref, k=k_ref, v=v_ref, c=c_ref, o=o_ref), row, head, n * plan.chunk)
    tiles.chunk_outputs(plan, io, h_ref[row, n, head, :, :])


def _dstates_kernel(q_ref, do_ref, c_ref, tot_ref, dfinal_ref, dh_ref, ds0_ref, *, plan):
    row, head, rows, columns, gates = _state_block(plan)

    def body(t, dstate):
        n = plan.n_chunks - 1 - t
        dh_ref[row, n, head, rows, columns] = dstate.astype(dh_ref.dtype)
        io = _IO(dict(q=q_ref, do=do_ref, c=c_ref), row, head, n * plan.chunk, keys=rows)
        queries = tiles.decayed_queries(plan, io, tiles.Chunk(plan, io))
        read = dot(queries, io.load("do", 0, plan.chunk, columns), TN, plan.dtype)
        return jnp.exp(tot_ref[row, n, head, gates])[:, None] * dstate + read

    ds0_ref[row, head, rows, columns] = lax.fori_loop(
        0, plan.n_chunks, body, dfinal_ref[row, head, rows, columns])


def _grads_kernel(*refs, plan, part, block_v):
    """``part`` "all": dq, dk, dv and db; "dq": dq and db (no dh); "dkdv": dk, dv, db (no h).
    ``block_v``: :attr:`Options.grads_block_v`."""
    n, row, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    names = dict(all=("q", "k", "v", "c", "h", "do", "dh", "dq", "dk", "dv", "db"),
                 dq=("q", "k", "v", "c", "h", "do", "dq", "db"),
                 dkdv=("q", "k", "v", "c", "do", "dh", "dk", "dv", "db"))[part]
    io = _IO(dict(zip(names, refs)), row, head, n * plan.chunk, chunk=n)
    tiles.chunk_grads(plan, io, part=part, block_v=block_v)


def _sequential_grid(plan):
    blocks = (plan.value_dim // plan.block_v) * (plan.key_dim // plan.key_block)
    return (blocks, plan.batch, plan.heads)


def _chunk_grid(plan):
    return (plan.n_chunks, plan.batch, plan.heads)


def _call(kernel, plan, grid, inputs, outputs, options, index, interpret, name, **static):
    return pl.pallas_call(
        functools.partial(kernel, plan=plan, **static), grid=grid,
        in_specs=[_whole_array(x.shape) for x in inputs],
        out_specs=[_whole_array(o.shape) for o in outputs],
        out_shape=outputs, compiler_params=None if interpret else options.params(index),
        interpret=interpret, name=name)(*inputs)


def _state_shapes(plan):
    """The per-chunk states (or their gradients) in the input dtype: they only enter matmuls,
    which round them to it; the recurrence itself runs in float32.  The final state (or the
    initial state's gradient) is float32."""
    b, h, dk, dv = plan.batch, plan.heads, plan.key_dim, plan.value_dim
    return (jax.ShapeDtypeStruct((b, plan.n_chunks, h, dk, dv), plan.dtype),
            jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32))


def forward(plan, q, k, v, c, tot, initial_state, *, options, interpret):
    """``(out [B, L, H, Dv], chunk start states h, final state)``."""
    h, final = _call(_states_kernel, plan, _sequential_grid(plan),
                     [k, v, c, tot, initial_state], list(_state_shapes(plan)), options, 0,
                     interpret, "linear_states")
    (out,) = _call(_outputs_kernel, plan, _chunk_grid(plan), [q, k, v, c, h],
                   [jax.ShapeDtypeStruct(v.shape, q.dtype)], options, 1, interpret,
                   "linear_outputs")
    return out, h, final


def backward(plan, q, k, v, c, tot, h, do, dfinal, *, options, interpret):
    """``(dq, dk, dv, db [B, L, H, Dk] float32, d initial state, dh)``: ``db = q * dq - k *
    dk``, ``dh [B, N, H, Dk, Dv]`` the gradient each chunk's end state receives."""
    dh, ds0 = _call(_dstates_kernel, plan, _sequential_grid(plan), [q, do, c, tot, dfinal],
                    list(_state_shapes(plan)), options, 2, interpret, "linear_dstates")
    dq_shape, dk_shape, dv_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    db_shape = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    block_v = options.grads_block_v
    if not options.split_grads:
        dq, dk, dv, db = _call(_grads_kernel, plan, _chunk_grid(plan), [q, k, v, c, h, do, dh],
                               [dq_shape, dk_shape, dv_shape, db_shape], options, 3, interpret,
                               "linear_grads", part="all", block_v=block_v)
        return dq, dk, dv, db, ds0, dh
    dq, db_q = _call(_grads_kernel, plan, _chunk_grid(plan), [q, k, v, c, h, do],
                     [dq_shape, db_shape], options, 3, interpret, "linear_grads_dq", part="dq",
                     block_v=block_v)
    dk, dv, db_k = _call(_grads_kernel, plan, _chunk_grid(plan), [q, k, v, c, do, dh],
                         [dk_shape, dv_shape, db_shape], options, 3, interpret,
                         "linear_grads_dkdv", part="dkdv", block_v=block_v)
    return dq, dk, dv, db_q + db_k, ds0, dh
