"""Entry point of the fused cross-batch attention kernel: backend choice and custom VJP.

The forward pass saves only the output and the base-2 log-sum-exp of each query; the
backward pass recomputes probabilities tile by tile (FlashAttention-2): a dq kernel per query
tile and a dk/dv kernel per key tile, after ``delta = rowsum(dO * O)``.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from FoT.kernels import mosaic_lowering, triton_lowering
from FoT.kernels.plan import BlockSizes, check_blocks, check_inputs, make_plan
from FoT.kernels.triton_lowering import TritonOptions

BACKENDS = ("triton", "mosaic")
NATIVE_PLATFORM = {"triton": "gpu", "mosaic": "tpu"}
_LOWERINGS = {"triton": triton_lowering, "mosaic": mosaic_lowering}


def flash_cross_batch(q, k_loc, k_mem, v, *, cross_batch_range, cross_batch_stepping=False,
                      dataset_packing=1, backend=None, interpret=None, block_q=None,
                      block_k=None, block_q_dkv=None, block_k_dkv=None, num_warps=None,
                      num_stages=None):
    """Cross-batch attention (FOT_SPEC section 2) on already-rotated inputs, fused.

    Same contract as ``cross_batch_core(..., implementation="reference")`` with the causal
    local mask: ``q [B, L, H, D]``, ``k_loc, k_mem, v [B, L, KV, D]`` (bf16 or float32,
    ``H % KV == 0``, ``D`` in ``plan.SUPPORTED_HEAD_DIMS``, ``L`` a multiple of every block
    size); returns ``[B, L, H, D]`` in ``q.dtype`` and is differentiable in all four inputs.
    Inputs outside those limits raise ``NotImplementedError``, as :func:`check_supported`
    declares beforehand.

    Args:
      backend: ``"triton"`` (Pallas on GPU) or ``"mosaic"`` (Pallas on TPU).  ``None`` picks
        from ``jax.default_backend()``: ``"mosaic"`` on TPU, otherwise ``"triton"`` (so on CPU
        the Triton plan runs in interpret mode).
      interpret: run the kernel in the Pallas interpreter.  ``None`` means: interpret unless
        the chosen backend's hardware is present (on CPU it is always interpreted).
      block_q, block_k: query and key tile of the forward and dq kernels.
      block_q_dkv, block_k_dkv: query and key tile of the dk/dv kernel.  ``None`` takes the
        lowering's default for the input dtype (capped at ``L``).
      num_warps, num_stages: Triton only; an int for all three kernels or a tuple
        ``(forward, dq, dkv)``; ``None`` takes the tuned default for the input dtype.
    """
    backend = pick_backend(backend)
    if interpret is None:
        interpret = jax.default_backend() != NATIVE_PLATFORM[backend]
    check_triton_settings(backend, num_warps, num_stages)
    blocks = choose_blocks(_LOWERINGS[backend].default_blocks(q.dtype), q.shape[1], dict(
        block_q=block_q, block_k=block_k, block_q_dkv=block_q_dkv, block_k_dkv=block_k_dkv))
    plan = make_plan(q, k_loc, k_mem, v, cross_batch_range=cross_batch_range,
                     cross_batch_stepping=cross_batch_stepping,
                     dataset_packing=dataset_packing, blocks=blocks)
    lowering = _Lowering(backend, bool(interpret),
                         TritonOptions.make(q.dtype, num_warps, num_stages))
    return _attention(plan, lowering, q, k_loc, k_mem, v)


def check_supported(length, head_dim, dtype, *, backend=None, interpret=False):
    """The kernel's declaration of what it runs: None when :func:`flash_cross_batch` with
    ``backend`` and its default tiles handles rows of ``length`` tokens and heads of
    ``head_dim`` in ``dtype``; otherwise ``NotImplementedError`` with the reason, so that a
    caller can fall back to another variant.  Without ``interpret`` the backend's hardware
    must be present: elsewhere the kernel only runs in the (slow) Pallas interpreter."""
    backend = pick_backend(backend)
    if not interpret:
        check_compiled(backend, "the cross-batch kernel")
    check_inputs(head_dim, dtype)
    check_blocks(length, choose_blocks(_LOWERINGS[backend].default_blocks(dtype), length, {}))


# The choices both fused kernels (this one and forgetting attention's,
# EasyLM.forgetting.kernels) make the same way.

def pick_backend(backend):
    """``backend`` checked, or for ``None`` the platform's: ``"mosaic"`` on TPU, otherwise
    ``"triton"`` (on CPU the Triton plan runs in the interpreter)."""
    if backend is None:
        return "mosaic" if jax.default_backend() == "tpu" else "triton"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    return backend


def check_compiled(backend, kernel):
    """``NotImplementedError`` unless ``backend``'s hardware is present: elsewhere ``kernel``
    only runs in the (slow) Pallas interpreter."""
    platform = jax.default_backend()
    if platform != NATIVE_PLATFORM[backend]:
        raise NotImplementedError(f"the {backend} lowering of {kernel} compiles for "
                                  f"{NATIVE_PLATFORM[backend]}; on {platform} it only runs in "
                                  f"the Pallas interpreter")


def check_triton_settings(backend, num_warps, num_stages):
    if backend == "mosaic" and (num_warps is not None or num_stages is not None):
        raise ValueError("num_warps and num_stages are Triton settings; the mosaic backend "
                         "takes block sizes only")


def choose_blocks(defaults, length, chosen):
    """The tiles of ``chosen`` (name -> size or None), the lowering's ``defaults``
    (:class:`BlockSizes`, capped at ``length``) where it has none."""
    return BlockSizes(**{name: min(size, length) if chosen.get(name) is None else chosen[name]
                         for name, size in dataclasses.asdict(defaults).items()})


@dataclasses.dataclass(frozen=True)
class _Lowering:
    backend: str
    interpret: bool
    triton: TritonOptions

    def forward(self, plan, *args):
        if self.backend == "triton":
            return triton_lowering.forward(plan, *args, options=self.triton,
                                           interpret=self.interpret)
        return mosaic_lowering.forward(plan, *args, interpret=self.interpret)

    def backward(self, plan, *args):
        if self.backend == "triton":
            return triton_lowering.backward(plan, *args, options=self.triton,
                                            interpret=self.interpret)
        return mosaic_lowering.backward(plan, *args, interpret=self.interpret)


@functools.partial(jax.jit, static_argnums=(0, 1))
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(plan, lowering, q, k_loc, k_mem, v):
    return lowering.forward(plan, q, k_loc, k_mem, v)[0]


def _attention_fwd(plan, lowering, q, k_loc, k_mem, v):
    out, lse = lowering.forward(plan, q, k_loc, k_mem, v)
    return out, (q, k_loc, k_mem, v, out, lse)


def _attention_bwd(plan, lowering, residuals, d_out):
    q, k_loc, k_mem, v, out, lse = residuals
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1,
                    keepdims=True)
    return lowering.backward(plan, q, k_loc, k_mem, v, lse, delta, d_out)


_attention.__wrapped__.defvjp(_attention_fwd, _attention_bwd)
