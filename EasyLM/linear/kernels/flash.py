"""Entry point of the fused gated linear attention kernel: limits, preparation, custom VJP.

XLA prepares what the kernels read: queries, keys and values with the keys and values expanded
to the query heads, the row padded to whole chunks with tokens that neither write nor decay
the state, the log gates' running sums inside each sub-chunk and each chunk's total (gates per
key dimension, or once per head: then the kernels take each chunk's decays as one ``[C, C]``
matrix).  The forward pass saves the state each chunk starts from (``[B, L / C, H, Dk, Dv]``,
input dtype).  The backward pass turns the kernels' ``db = q * dq - k * dk`` into the log
gates' gradient chunk by chunk: each chunk's last token also takes ``sum_v dS_end * S_end`` of
the state the chunk leaves, then a reverse running sum inside the chunk.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from EasyLM.linear.kernels import mosaic_lowering, tiles, triton_lowering
from EasyLM.linear.scan import expand_heads, zero_state
from FoT.kernels.flash import (NATIVE_PLATFORM, check_compiled, check_triton_settings,
                               pick_backend)

KERNEL = "the fused linear attention kernel"
SUBCHUNK = 16
SUPPORTED_DIMS = (16, 32, 64, 128, 256)
_LOWERINGS = {"triton": triton_lowering, "mosaic": mosaic_lowering}


def _divides_into_blocks(block, dim):
    """Whether ``block`` is a width the kernel tiles a head of ``dim`` columns by: a power of
    two from 16 that divides ``dim``."""
    return (isinstance(block, int) and not isinstance(block, bool) and block >= 16
            and not block & (block - 1) and not dim % block)


def check_inputs(key_dim, value_dim, dtype, chunk_size, block_v=None, block_k=None):
    """``NotImplementedError`` (one line) unless the kernel takes these settings."""
    for name, dim in (("key", key_dim), ("value", value_dim)):
        if dim not in SUPPORTED_DIMS:
            raise NotImplementedError(f"{KERNEL} takes {name} head sizes {SUPPORTED_DIMS}, "
                                      f"not {dim}")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise NotImplementedError(f"{KERNEL} takes bfloat16 or float32 inputs, not "
                                  f"{jnp.dtype(dtype).name}")
    if chunk_size not in (16, 32, 64, 128):
        raise NotImplementedError(f"{KERNEL} takes chunks of 16, 32, 64 or 128 tokens, not "
                                  f"{chunk_size}")
    for name, block, dim in (("block_v", block_v, "value"), ("block_k", block_k, "key")):
        size = value_dim if dim == "value" else key_dim
        if block is not None and not _divides_into_blocks(block, size):
            raise NotImplementedError(f"{KERNEL}: {name} {block} must be a power of two from "
                                      f"16 that divides the {dim} head size {size}")


def check_grads_block_v(grads_block_v, value_dim):
    """``ValueError`` (one line) unless ``grads_block_v`` is None or a power of two from 16
    that divides the value head size."""
    if grads_block_v is None:
        return
    if not _divides_into_blocks(grads_block_v, value_dim):
        raise ValueError(f"grads_block_v must be None or a power of two from 16 that divides "
                         f"the value head size {value_dim}, not {grads_block_v!r}")


# The Triton lowering's settings where a search found better ones than the generic defaults
# (:func:`generic_block_v`, the settings of :class:`triton_lowering.Options`),
# by (key head size, value head size, input dtype, one gate per head).  Measured on an H100
# (2026-12-07, ``benchmarks.tune_linear --shapes 4096x128 --budget 180``, bf16, GLA's gates,
# 8 rows x 16 heads of 4,096 tokens): 8 warps in the grads kernel is most of it; forward +
# backward 8.11 -> 4.54 ms, the forward 1.30 -> 1.42 ms (the same within the timing's noise
# in the benchmark: 1.37 ms at this shape, against 1.36 before), outputs and gradients
# bit-identical.  Other shapes, float32 (whose 128-wide tiles sit at the shared-memory limit
# below) and one gate per head were not searched and keep the generic defaults.
# block_k 64 (the state's key rows in two blocks: twice the sequential kernels' programs, each
# with half the work per chunk), timed later that day on another H100 beside the settings
# above (``benchmarks.bench_linear --head-dims 128``, 2k-16k tokens, B x H 256 to 32): forward
# 1.452/1.448/1.699/2.047 -> 1.415/1.398/1.544/1.726 ms, forward + backward
# 4.177/4.169/4.519/5.334 -> 4.217/4.060/4.238/4.846 ms; the fewer the rows x heads, the more
# it gains (16% of the forward at 16k, 2 x 16).
TUNED_SETTINGS = {
    (128, 128, "bfloat16", False): dict(block_v=128, block_k=64, num_warps=(8, 4, 8, 8),
                                        num_stages=(2, 1, 3, 2)),
}


def generic_block_v(value_dim):
    """Value columns per program of the sequential kernels where nothing better is known."""
    return min(value_dim, 64)


def default_settings(key_dim, value_dim, dtype, per_head):
    """``block_v``, ``block_k``, ``num_warps``, ``num_stages``, ``split_grads`` and
    ``grads_block_v`` the kernel runs with where the caller gives none (see
    ``TUNED_SETTINGS``)."""
    generic = dataclasses.asdict(triton_lowering.Options())
    settings = dict(block_v=generic_block_v(value_dim), block_k=None,
                    num_warps=tuple(generic["num_warps"]),
                    num_stages=tuple(generic["num_stages"]), split_grads=generic["split_grads"],
                    grads_block_v=generic["grads_block_v"])
    tuned = TUNED_SETTINGS.get((key_dim, value_dim, jnp.dtype(dtype).name, bool(per_head)), {})
    return dict(settings, **tuned)


# Shared memory of the Triton lowering.  Triton keeps there the tiles the chunk kernels work
# on; the grads kernel holds the most: the state the chunk starts from and its end state's
# gradient ([Dk, Dv] each), the chunk's q, k, v and dO ([C, D] each) and, with one gate per
# head, the two [C, C] decay matrices, all in the input dtype (triton_shared_memory counts
# them).  Measured on an H100 (2026-12-07, 227 KiB a block): float32 with 128-wide heads and
# chunks of 64 compiled with a gate per key dimension (counted: 256 KiB; the count is above
# what the GPU has, so Triton keeps less than it counts) and failed with one gate per head
# (counted: 288 KiB, exactly the 294,912 bytes Triton asked for).  Settings counted above the
# largest that compiled are declared unsupported, so that ``auto`` takes the chunked form.
# The count is the single grads kernel's at full width: split_grads and grads_block_v (v, dO
# and the states a block of value columns at a time) hold fewer of these tiles at once, but
# what they need has not been measured, so they are held to the same count.
TRITON_SHARED_MEMORY_LIMIT = 256 * 1024


def triton_shared_memory(key_dim, value_dim, dtype, chunk_size, per_head):
    """Bytes of the tiles the Triton lowering's grads kernel holds (see above)."""
    elements = 2 * key_dim * value_dim + chunk_size * (2 * key_dim + 2 * value_dim)
    if per_head:
        elements += 2 * chunk_size * chunk_size
    return elements * jnp.dtype(dtype).itemsize


def check_shared_memory(key_dim, value_dim, dtype, chunk_size, per_head):
    """``NotImplementedError`` (one line, naming what to change) when the compiled Triton
    lowering would need more shared memory than a GPU block has."""
    needed = triton_shared_memory(key_dim, value_dim, dtype, chunk_size, per_head)
    if needed > TRITON_SHARED_MEMORY_LIMIT:
        gates = "one gate per head" if per_head else "a gate per key dimension"
        raise NotImplementedError(
            f"{KERNEL} on a GPU needs about {needed // 1024} KiB of shared memory for "
            f"{jnp.dtype(dtype).name} heads of {key_dim}x{value_dim}, chunks of {chunk_size} "
            f"and {gates} (at most {TRITON_SHARED_MEMORY_LIMIT // 1024} KiB compile); use "
            f"bfloat16 inputs or smaller chunks, or the chunked form")


def check_supported(key_dim, value_dim, dtype, chunk_size, *, per_head=False, backend=None,
                    interpret=False):
    """None when :func:`fused_linear_attention` runs these settings on this platform, else
    ``NotImplementedError`` saying why (so that a caller falls back).  Without ``interpret``
    the kernel counts only where it compiles (a GPU), and the Triton lowering only within its
    shared memory (:func:`check_shared_memory`).  ``per_head``: one gate per head."""
    backend = pick_backend(backend)
    check_inputs(key_dim, value_dim, dtype, chunk_size)
    if not interpret:
        check_compiled(backend, KERNEL)
        if backend == "triton":
            check_shared_memory(key_dim, value_dim, dtype, chunk_size, per_head)


def fused_linear_attention(q, k, v, log_alpha, *, scale=None, chunk_size=64,
                           initial_state=None, backend=None, interpret=None, block_v=None,
                           block_k=None, num_warps=None, num_stages=None, split_grads=None,
                           grads_block_v=None):
    """``(out [B, L, H, Dv] in q.dtype, final state [B, H, Dk, Dv] float32)`` as
    :func:`EasyLM.linear.scan.scan_linear_attention` computes them, fused; differentiable in
    ``q``, ``k``, ``v``, ``log_alpha`` and ``initial_state``.

    Args:
      q, k, v, log_alpha, initial_state: as :func:`EasyLM.linear.linear_attention` takes
        them (``log_alpha`` per key dimension or per head, ``<= 0``).
      chunk_size: tokens per chunk (16, 32, 64 or 128); sub-chunks are 16 tokens.
      backend: ``"triton"`` (Pallas on GPU) or ``"mosaic"`` (Pallas on TPU); ``None``:
        ``"mosaic"`` on TPU, else ``"triton"``.  interpret: run in the Pallas interpreter;
        ``None``: unless the backend's hardware is present.
      block_v: value columns per program of the two sequential kernels (``None``: the
        defaults, :func:`default_settings`: all, or 64 for heads wider than 64, except where a
        search found better ones, ``TUNED_SETTINGS``).  block_k: the state's key rows per
        program of those kernels, a power of two from 16 that divides the key head size
        (``None``: the defaults, all of them unless tuned): more, smaller programs, for rows
        x heads too few to fill the GPU.
      num_warps, num_stages: Triton settings, an int for all four kernels (states, outputs,
        dstates, grads) or a 4-tuple (``None``: the defaults).  split_grads: the backward's
        per-chunk work in two kernels, dq apart from dk and dv (``None``: the defaults, one
        kernel).  grads_block_v: that work
        (either kernel's) takes the value columns this many at a time, a power of two from 16
        that divides the value head size (``None``: all at once).  block_v and block_k,
        too, are the Triton lowering's alone.
    """
    backend = pick_backend(backend)
    check_triton_settings(backend, num_warps, num_stages)
    if backend == "mosaic" and split_grads:
        raise ValueError("split_grads is a setting of the Triton lowering; the mosaic backend "
                         "computes each chunk's gradients in one kernel")
    if backend == "mosaic" and block_k is not None:
        raise ValueError("block_k is a setting of the Triton lowering; the mosaic backend "
                         "runs each head's whole state in one program")
    if backend == "mosaic" and grads_block_v is not None:
        raise ValueError("grads_block_v is a setting of the Triton lowering; the mosaic "
                         "backend computes each chunk's gradients with its states whole")
    if interpret is None:
        interpret = jax.default_backend() != NATIVE_PLATFORM[backend]
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[3]
    per_head = log_alpha.shape[3] == 1
    if backend == "triton":
        defaults = default_settings(key_dim, value_dim, q.dtype, per_head)
        block_v, block_k, num_warps, num_stages, split_grads = (
            defaults[name] if given is None else given
            for name, given in (("block_v", block_v), ("block_k", block_k),
                                ("num_warps", num_warps), ("num_stages", num_stages),
                                ("split_grads", split_grads)))
    elif block_v is None:
        block_v = generic_block_v(value_dim)
    check_inputs(key_dim, value_dim, q.dtype, chunk_size, block_v, block_k)
    check_grads_block_v(grads_block_v, value_dim)
    if scale is None:
        scale = 1.0 / math.sqrt(key_dim)
    padded = -(-length // chunk_size) * chunk_size
    if backend == "triton" and not interpret:
        check_shared_memory(key_dim, value_dim, q.dtype, chunk_size, per_head)
    plan = tiles.Plan(batch=batch, length=padded, heads=heads, key_dim=key_dim,
                                value_dim=value_dim, chunk=chunk_size, sub=SUBCHUNK,
                                block_v=block_v, scale=float(scale), dtype=jnp.dtype(q.dtype),
                                per_head=per_head, block_k=block_k)
    options = triton_lowering.Options(**{
        name: (value,) * 4 if isinstance(value, int) else tuple(value)
        for name, value in (("num_warps", num_warps), ("num_stages", num_stages))
        if value is not None}, **({} if split_grads is None else dict(split_grads=split_grads)),
        grads_block_v=grads_block_v)
    k, v = (expand_heads(x, heads).astype(q.dtype) for x in (k, v))
    log_alpha = log_alpha.astype(jnp.float32)
    state = zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q, k, v, log_alpha = (jnp.pad(x, pad) for x in (q, k, v, log_alpha))
    out, final = _fused(_Static(plan, options, _LOWERINGS[backend], bool(interpret)), q, k, v,
                        log_alpha, state)
    return out[:, :length], final


@dataclasses.dataclass(frozen=True)
class _Static:
    plan: object
    options: object
    lowering: object
    interpret: bool


def _gate_sums(plan, log_alpha):
    """``c``: running sums of the log gates inside each sub-chunk ``[B, L, H, Dk]``;
    ``tot``: each chunk's sum ``[B, N, H, Dk]``."""
    b, length, h, d = log_alpha.shape
    split = log_alpha.reshape(b, length // plan.sub, plan.sub, h, d)
    c = jnp.cumsum(split, axis=2)
    per_chunk = c[:, :, -1].reshape(b, plan.n_chunks, plan.n_sub, h, d)
    return c.reshape(log_alpha.shape), jnp.sum(per_chunk, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static, q, k, v, log_alpha, state):
    return _forward(static, q, k, v, log_alpha, state)[0]


def _forward(static, q, k, v, log_alpha, state):
    c, tot = _gate_sums(static.plan, log_alpha)
    out, h, final = static.lowering.forward(static.plan, q, k, v, c, tot, state,
                                            options=static.options,
                                            interpret=static.interpret)
    return (out, final), (q, k, v, c, tot, h, final)


def _backward(static, residuals, cotangents):
    q, k, v, c, tot, h, final = residuals
    dout, dfinal = cotangents
    plan = static.plan
    dq, dk, dv, db, ds0, dh = static.lowering.backward(
        plan, q, k, v, c, tot, h, dout.astype(q.dtype), dfinal.astype(jnp.float32),
        options=static.options, interpret=static.interpret)
    # Each chunk's gates act on the state it leaves through their sum: its last token takes
    # sum_v dS_end * S_end, and the reverse running sum stays inside the chunk.  Summed along
    # the whole row instead, the pairs q * dq and k * dk add and subtract would cancel over
    # many chunks, and with strong gates their rounding would swamp the result.
    after = jnp.concatenate([h[:, 1:].astype(jnp.float32), final[:, None]], axis=1)
    boundary = jnp.sum(dh.astype(jnp.float32) * after, axis=-1)  # [B, N, H, Dk]
    b, length, heads, dim = db.shape
    db = db.reshape(b, plan.n_chunks, plan.chunk, heads, dim).at[:, :, -1].add(boundary)
    if plan.per_head:
        db = jnp.sum(db, axis=-1, keepdims=True)
    dlog_alpha = lax.cumsum(db, axis=2, reverse=True).reshape(b, length, heads, -1)
    return dq, dk, dv, dlog_alpha, ds0


_fused.defvjp(_forward, _backward)

__all__ = ["SUPPORTED_DIMS", "TRITON_SHARED_MEMORY_LIMIT", "check_inputs", "check_shared_memory",
           "check_supported", "fused_linear_attention", "triton_shared_memory"]
