"""TPU lowering of the fused gated linear attention kernel: Pallas through Mosaic.

Mosaic runs a grid's last axis in order on one core and pipelines the HBM->VMEM copies along
it, so the recurrence needs no kernel of its own: the grid is (row, head, chunk), the chunk
axis sequential ("arbitrary"), and the state lives in VMEM scratch across it.

* forward: each step stores the state its chunk starts from (the backward pass reads it),
  writes the chunk's outputs (:func:`EasyLM.linear.kernels.tiles.chunk_outputs`), then moves
  the state past the chunk; the last step stores the final state.
* backward: the chunk axis runs from the row's end; the scratch holds the gradient the
  chunk's end state receives, the step writes the chunk's dq, dk, dv and ``db``
  (:func:`EasyLM.linear.kernels.tiles.chunk_grads`), then moves the gradient to the chunk's
  start; the last step stores the initial state's gradient.

Mosaic wants the last two block dimensions to be (tokens, head size), so this lowering works
on head-major ``[B, H, L, D]`` transposes; one gate per head enters also as ``[B, H, 1, L]``
rows.  The state is kept as ``[Dv, Dk]``, so that the decay of each key dimension scales its
last axis.  Inputs and outputs are the Triton lowering's (:mod:`.triton_lowering`), in the
model's layout.  It has run in the TPU interpreter only (no TPU was available while it was
written).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from EasyLM.linear.kernels import tiles
from EasyLM.linear.kernels.tiles import TN, dot
from FoT.kernels.mosaic_lowering import _head_major, _interpreter, _semantics


class _IO:
    """One chunk's blocks (``refs``: name -> ``[C, D]`` ref) and, with one gate per head, the
    row's gates as a ``[1, L]`` row ``c_row`` (a ``[1, C]`` block would break Mosaic's rule
    that a block's last dimension is a multiple of 128), the chunk starting at ``start``;
    ``states``: the backward's ``h`` and ``dh`` (values, ``[Dv, Dk]``), given whole."""

    def __init__(self, refs, start=0, states=None):
        self.refs, self.start, self.states = refs, start, states

    def load(self, name, start, size, columns=None):
        cols = slice(None) if columns is None else columns
        return self.refs[name][pl.ds(start, size), cols].astype(jnp.float32)

    def gate_row(self, start, size):
        return self.refs["c_row"][:, pl.ds(self.start + start, size)]

    def store(self, name, start, value, columns=None):
        ref = self.refs[name]
        cols = slice(None) if columns is None else columns
        ref[pl.ds(start, value.shape[0]), cols] = value.astype(ref.dtype)

    def state(self, name, columns=None):
        if columns is not None:
            raise ValueError("the Mosaic lowering gives the states whole")
        return self.states[name]

    @staticmethod
    def when(condition, body):
        pl.when(condition)(body)


def _forward_kernel(*refs, plan):
    q_ref, k_ref, v_ref, c_ref, *rest = refs
    c_row = rest.pop(0) if plan.per_head else None
    s0_ref, o_ref, h_ref, final_ref, state_ref = rest
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]

    state = state_ref[...]
    h_ref[...] = state.astype(h_ref.dtype)
    io = _IO(dict(q=q_ref, k=k_ref, v=v_ref, c=c_ref, c_row=c_row, o=o_ref), n * plan.chunk)
    tiles.chunk_outputs(plan, io, state, transposed=True)
    chunk = tiles.Chunk(plan, io)
    written = dot(io.load("v", 0, plan.chunk), tiles.written_keys(plan, io, chunk), TN,
                  plan.dtype)
    state = jnp.exp(chunk.total()) * state + written
    state_ref[...] = state

    @pl.when(n == plan.n_chunks - 1)
    def _():
        final_ref[...] = state


def _backward_kernel(*refs, plan):
    q_ref, k_ref, v_ref, c_ref, *rest = refs
    c_row = rest.pop(0) if plan.per_head else None
    do_ref, h_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, db_ref, dh_ref, ds0_ref, dstate_ref = rest
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _():
        dstate_ref[...] = dfinal_ref[...]

    dstate = dstate_ref[...]
    dh_ref[...] = dstate.astype(dh_ref.dtype)
    io = _IO(dict(q=q_ref, k=k_ref, v=v_ref, c=c_ref, c_row=c_row, do=do_ref, dq=dq_ref,
                  dk=dk_ref, dv=dv_ref, db=db_ref), (plan.n_chunks - 1 - t) * plan.chunk,
             states=dict(h=h_ref[...], dh=dstate))
    tiles.chunk_grads(plan, io, transposed=True)
    chunk = tiles.Chunk(plan, io)
    read = dot(io.load("do", 0, plan.chunk), tiles.decayed_queries(plan, io, chunk), TN,
               plan.dtype)
    dstate = jnp.exp(chunk.total()) * dstate + read
    dstate_ref[...] = dstate

    @pl.when(t == plan.n_chunks - 1)
    def _():
        ds0_ref[...] = dstate


def _specs(plan, reverse):
    """Block specs over the (row, head, step) grid: chunk blocks of ``[B, H, L, width]``
    arrays, whole ``[1, L]`` gate rows, per-chunk states and whole states."""
    last = plan.n_chunks - 1

    def chunk_of(n):
        return last - n if reverse else n

    def rows(width):
        return pl.BlockSpec((None, None, plan.chunk, width),
                            lambda b, h, n: (b, h, chunk_of(n), 0))

    gate_row = pl.BlockSpec((None, None, 1, plan.length), lambda b, h, n: (b, h, 0, 0))
    state_block = (plan.value_dim, plan.key_dim)
    per_chunk = pl.BlockSpec((None, None, None) + state_block,
                             lambda b, h, n: (b, h, chunk_of(n), 0, 0))
    whole = pl.BlockSpec((None, None) + state_block, lambda b, h, n: (b, h, 0, 0))
    return rows, gate_row, per_chunk, whole


def _gate_rows(plan, c):
    return [jnp.transpose(c, (0, 2, 3, 1))] if plan.per_head else []


def _swap_states(x):
    """``[B, H, N, Dv, Dk]`` <-> ``[B, N, H, Dk, Dv]`` (per-chunk states) and ``[B, H, Dv, Dk]``
    <-> ``[B, H, Dk, Dv]``: between this lowering's layout and the model's."""
    return jnp.transpose(x, (0, 2, 1, 4, 3)) if x.ndim == 5 else jnp.swapaxes(x, 2, 3)


def _call(kernel, plan, reverse, inputs, in_specs, outputs, out_specs, interpret, name):
    return pl.pallas_call(
        functools.partial(kernel, plan=plan), grid=(plan.batch, plan.heads, plan.n_chunks),
        in_specs=in_specs, out_specs=out_specs, out_shape=outputs,
        scratch_shapes=[pltpu.VMEM((plan.value_dim, plan.key_dim), jnp.float32)],
        compiler_params=_semantics(2, 1), interpret=_interpreter(interpret), name=name,
    )(*inputs)


def forward(plan, q, k, v, c, tot, initial_state, *, options, interpret):
    """As :func:`.triton_lowering.forward`: ``(out, h, final)``."""
    del tot, options  # each step sums its chunk's gates itself
    rows, gate_row, per_chunk, whole = _specs(plan, reverse=False)
    b, h, n, dk, dv = plan.batch, plan.heads, plan.n_chunks, plan.key_dim, plan.value_dim
    inputs = ([_head_major(x) for x in (q, k, v, c)] + _gate_rows(plan, c)
              + [_swap_states(initial_state)])
    in_specs = ([rows(dk), rows(dk), rows(dv), rows(c.shape[3])]
                + [gate_row] * plan.per_head + [whole])
    outputs = [jax.ShapeDtypeStruct((b, h, plan.length, dv), q.dtype),
               jax.ShapeDtypeStruct((b, h, n, dv, dk), plan.dtype),
               jax.ShapeDtypeStruct((b, h, dv, dk), jnp.float32)]
    out, states, final = _call(_forward_kernel, plan, False, inputs, in_specs, outputs,
                               [rows(dv), per_chunk, whole], interpret, "linear_forward")
    return _head_major(out), _swap_states(states), _swap_states(final)


def backward(plan, q, k, v, c, tot, h, do, dfinal, *, options, interpret):
    """As :func:`.triton_lowering.backward`: ``(dq, dk, dv, db, d initial state, dh)``."""
    del tot, options
    rows, gate_row, per_chunk, whole = _specs(plan, reverse=True)
    b, heads, n, dk, dv = plan.batch, plan.heads, plan.n_chunks, plan.key_dim, plan.value_dim
    inputs = ([_head_major(x) for x in (q, k, v, c)] + _gate_rows(plan, c)
              + [_head_major(do), _swap_states(h), _swap_states(dfinal)])
    in_specs = ([rows(dk), rows(dk), rows(dv), rows(c.shape[3])]
                + [gate_row] * plan.per_head + [rows(dv), per_chunk, whole])
    shape = (b, heads, plan.length)
    outputs = [jax.ShapeDtypeStruct(shape + (dk,), q.dtype),
               jax.ShapeDtypeStruct(shape + (dk,), k.dtype),
               jax.ShapeDtypeStruct(shape + (dv,), v.dtype),
               jax.ShapeDtypeStruct(shape + (dk,), jnp.float32),
               jax.ShapeDtypeStruct((b, heads, n, dv, dk), plan.dtype),
               jax.ShapeDtypeStruct((b, heads, dv, dk), jnp.float32)]
    out_specs = [rows(dk), rows(dk), rows(dv), rows(dk), per_chunk, whole]
    dq, dk_, dv_, db, dh, ds0 = _call(_backward_kernel, plan, True, inputs, in_specs, outputs,
                                      out_specs, interpret, "linear_backward")
    return (_head_major(dq), _head_major(dk_), _head_major(dv_), _head_major(db),
            _swap_states(ds0), _swap_states(dh))
