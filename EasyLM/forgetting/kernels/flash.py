"""Entry point of the fused forgetting attention kernel: backend choice and custom VJP.

The kernel takes the gates as ``c``, their float32 running sum along the row
(:func:`EasyLM.forgetting.reference.cumulative_log_forget`), and returns the gradient ``dc``;
differentiating the caller's ``jnp.cumsum`` turns it into the log gates' gradient (a reverse
running sum).  The forward pass saves the output and the base-2 log-sum-exp; the backward pass
recomputes probabilities tile by tile (FlashAttention-2): after ``delta = rowsum(dO * O)`` a dq
kernel per query tile also sums ``dS`` over each query's keys (``dc_query``), and a dk/dv kernel
per key tile sums ``-dS`` over each key's queries, per query head (``dc_key``).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from EasyLM.forgetting.kernels import mosaic_lowering, triton_lowering
from EasyLM.forgetting.kernels.plan import KERNEL, check_blocks, check_inputs, make_plan
from EasyLM.forgetting.skipping import check_skip_threshold, skip_ranges
from FoT.kernels.flash import (NATIVE_PLATFORM, check_compiled, check_triton_settings,
                               choose_blocks, pick_backend)

_LOWERINGS = {"triton": triton_lowering, "mosaic": mosaic_lowering}


def flash_forgetting_attention(q, k, v, c, *, skip_threshold=None, backend=None, interpret=None,
                               block_q=None, block_k=None, block_q_dkv=None, block_k_dkv=None,
                               num_warps=None, num_stages=None):
    """Forgetting attention ``[B, L, H, D]`` in ``q.dtype``, fused; differentiable in ``q``,
    ``k``, ``v`` and ``c``.

    ``q [B, L, H, D]``, ``k, v [B, L, KV, D]`` (bf16 or float32, ``H % KV == 0``, ``D`` in
    ``FoT.kernels.plan.SUPPORTED_HEAD_DIMS``, ``L`` a multiple of every block size), ``c [B, L, H]``
    float32: the running sum of the log forget gates along the row.  Every key up to the query
    is visible (no padding mask).  Inputs outside those limits raise ``NotImplementedError``,
    as :func:`check_supported` declares beforehand.

    Args:
      skip_threshold: ``None`` visits every causal tile pair; ``eps`` in (0, 1) skips the block
        pairs whose weights are all provably below ``eps`` (:mod:`EasyLM.forgetting.skipping`
        gives the bound and the output's error).
      backend: ``"triton"`` (Pallas on GPU) or ``"mosaic"`` (Pallas on TPU).  ``None`` picks
        ``"mosaic"`` on TPU, otherwise ``"triton"`` (so on CPU the Triton plan is interpreted).
      interpret: run the kernel in the Pallas interpreter.  ``None``: interpret unless the
        chosen backend's hardware is present.
      block_q, block_k: query and key tile of the forward and dq kernels.
      block_q_dkv, block_k_dkv: query and key tile of the dk/dv kernel.  ``None`` takes the
        lowering's default for the input dtype (capped at ``L``).
      num_warps, num_stages: Triton only; an int for all three kernels or a tuple
        ``(forward, dq, dkv)``; ``None`` takes the defaults for the input dtype.
    """
    backend = pick_backend(backend)
    if interpret is None:
        interpret = jax.default_backend() != NATIVE_PLATFORM[backend]
    check_triton_settings(backend, num_warps, num_stages)
    check_skip_threshold(skip_threshold)
    blocks = _blocks(backend, q.dtype, q.shape[3], q.shape[1], dict(
        block_q=block_q, block_k=block_k, block_q_dkv=block_q_dkv, block_k_dkv=block_k_dkv))
    plan = make_plan(q, k, v, c, blocks)
    lowering = _Lowering(backend, bool(interpret),
                         triton_lowering.default_options(q.dtype, q.shape[3], num_warps,
                                                         num_stages))
    return _attention(plan, lowering, skip_threshold, q, k, v, c)


def check_supported(length, head_dim, dtype, *, backend=None, interpret=False):
    """The kernel's declaration of what it runs: None when :func:`flash_forgetting_attention`
    with ``backend`` and its default tiles handles rows of ``length`` tokens and heads of
    ``head_dim`` in ``dtype``; otherwise ``NotImplementedError`` with the reason, so that a
    caller can fall back to another variant.  Without ``interpret`` the backend's hardware must
    be present: elsewhere the kernel only runs in the (slow) Pallas interpreter."""
    backend = pick_backend(backend)
    if not interpret:
        check_compiled(backend, KERNEL)
    check_inputs(head_dim, dtype)
    check_blocks(length, _blocks(backend, dtype, head_dim, length, {}))


def _blocks(backend, dtype, head_dim, length, chosen):
    return choose_blocks(_LOWERINGS[backend].default_blocks(dtype, head_dim), length, chosen)


@dataclasses.dataclass(frozen=True)
class _Lowering:
    backend: str
    interpret: bool
    triton: object  # FoT.kernels.triton_lowering.TritonOptions

    def _options(self):
        if self.backend == "triton":
            return dict(options=self.triton, interpret=self.interpret)
        return dict(interpret=self.interpret)

    def forward(self, plan, *args):
        return _LOWERINGS[self.backend].forward(plan, *args, **self._options())

    def backward(self, plan, *args):
        return _LOWERINGS[self.backend].backward(plan, *args, **self._options())


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(plan, lowering, skip_threshold, q, k, v, c):
    return _attention_fwd(plan, lowering, skip_threshold, q, k, v, c)[0]


def _attention_fwd(plan, lowering, skip_threshold, q, k, v, c):
    key_start, query_end = skip_ranges(q, k, c, skip_threshold, plan.skip_block)
    out, lse = lowering.forward(plan, key_start, q, k, v, c[..., None])
    return out, (q, k, v, c, out, lse, key_start, query_end)


def _attention_bwd(plan, lowering, skip_threshold, residuals, d_out):
    del skip_threshold  # the tables saved by the forward pass say what it skipped
    q, k, v, c, out, lse, key_start, query_end = residuals
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1,
                    keepdims=True)
    dq, dk, dv, dc_query, dc_key = lowering.backward(plan, key_start, query_end, q, k, v,
                                                     c[..., None], lse, delta, d_out)
    # dc_query vanishes in exact arithmetic (a shift of one query's logits leaves its softmax
    # unchanged) but not in ours: delta comes from the output as stored, and that rounding
    # reaches dc_key of every key the query reads.  With dc_query added, the running sum that
    # gives each gate's gradient cancels it except over the pairs the gate decays, as the
    # reference's autodiff does.
    return dq, dk, dv, dc_query + dc_key


_attention.__wrapped__.defvjp(_attention_fwd, _attention_bwd)
