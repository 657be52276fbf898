"""Forgetting attention (FoX: softmax attention with a forget gate): the implementations.

:func:`forgetting_attention` is the one entry point layers call.  Variants (``implementation``):

* ``"reference"``: materialised float32 logits (:mod:`EasyLM.forgetting.reference`), the oracle
  every other variant is tested against.
* ``"blockwise"``: query blocks times key blocks in plain XLA, memory bounded by one block pair,
  recomputing scores in the backward pass (:mod:`EasyLM.forgetting.blockwise`); takes a key mask.
* ``"pallas"``: the fused kernel (:mod:`EasyLM.forgetting.kernels`), Triton on GPU and Mosaic
  on TPU; no key mask.

:func:`check_supported` is each variant's declaration of the inputs it runs,
:data:`FALLBACK_ORDER` the order in which a caller falls back from one to the next, and
:func:`resolve_implementation` the rule a layer applies to its configured choice.  With
``skip_threshold`` the blockwise and Pallas variants leave out block pairs whose weights are
provably negligible (:mod:`EasyLM.forgetting.skipping`); the reference computes every pair.
"""
from EasyLM.forgetting import kernels
from EasyLM.forgetting.blockwise import (DEFAULT_BLOCK_SIZE, blockwise_forgetting_attention,
                                         check_blockwise)
from EasyLM.forgetting.reference import (check_shapes, cumulative_log_forget,
                                         reference_forgetting_attention)
from EasyLM.forgetting.skipping import check_skip_threshold
from FoT.cross_batch import first_supported

IMPLEMENTATIONS = ("reference", "blockwise", "pallas")
# Fastest first; a caller choosing automatically takes the first that accepts its inputs.  The
# reference accepts everything.
FALLBACK_ORDER = ("pallas", "blockwise", "reference")
_KERNEL_TAKES_NO_MASK = ("the pallas forgetting attention kernel applies the causal mask itself "
                         "and takes no key_mask; use implementation='blockwise' (or 'auto') for "
                         "padded inputs")


def _check_name(implementation, allowed=IMPLEMENTATIONS):
    if implementation not in allowed:
        raise ValueError(f"unknown forgetting attention implementation {implementation!r}; "
                         f"choose one of {allowed}")


def check_supported(implementation, *, length, head_dim, dtype, padded=False,
                    block_size=DEFAULT_BLOCK_SIZE, skip_threshold=None):
    """Whether ``implementation`` runs rows of ``length`` tokens with heads of ``head_dim`` in
    ``dtype`` (``padded``: with a key mask) on this platform: returns None, else raises
    ``NotImplementedError`` saying why.  The kernel counts as supported only where it compiles
    (GPU, TPU), not in the interpreter."""
    _check_name(implementation)
    if implementation == "pallas":
        if padded:
            raise NotImplementedError(_KERNEL_TAKES_NO_MASK)
        kernels.check_supported(length, head_dim, dtype)
    elif implementation == "blockwise":
        check_blockwise(length, block_size, padded=padded, skip_threshold=skip_threshold)


def resolve_implementation(configured, *, length, head_dim, dtype, padded,
                           block_size=DEFAULT_BLOCK_SIZE, skip_threshold=None):
    """The variant a layer runs on rows of ``length`` tokens in ``dtype`` (``padded``: with a
    key mask) when ``configured`` (``"auto"`` or one of :data:`IMPLEMENTATIONS`).

    ``auto`` walks :data:`FALLBACK_ORDER` to the first variant whose :func:`check_supported`
    accepts the inputs: the kernel on GPU and TPU where it takes them, else blockwise where the
    block size divides the length, else the reference.  An explicit choice is kept; only padded
    rows, which the kernel cannot take, move it down the same order.
    """
    _check_name(configured, ("auto",) + IMPLEMENTATIONS)
    if configured == "auto":
        order = FALLBACK_ORDER
    elif padded:
        order = FALLBACK_ORDER[FALLBACK_ORDER.index(configured):]
    else:
        return configured
    return first_supported(order, lambda name: check_supported(
        name, length=length, head_dim=head_dim, dtype=dtype, padded=padded,
        block_size=block_size, skip_threshold=skip_threshold))


def forgetting_attention(q, k, v, log_f, key_mask=None, implementation="auto", *,
                         block_size=DEFAULT_BLOCK_SIZE, skip_threshold=None, **kernel_options):
    """Forgetting attention ``[B, L, H, D]`` in ``q.dtype``: ``q [B, L, H, D]``,
    ``k, v [B, L, KV, D]``, ``log_f [B, L, H]`` (log forget gates), ``key_mask [B, L]`` or None.

    Args:
      implementation: ``"auto"`` (:func:`resolve_implementation`) or one of
        :data:`IMPLEMENTATIONS`.
      block_size: the blockwise variant's block (it must divide ``L``, or exceed it).
      skip_threshold: ``None``, or ``eps`` in (0, 1): the blockwise and Pallas variants may
        skip block pairs whose attention weights are all below ``eps``, which moves each output
        by at most ``L * eps * (max v - min v)`` (:mod:`EasyLM.forgetting.skipping`).
      kernel_options: tiles, backend, interpreter and Triton settings of the Pallas kernel
        (:func:`EasyLM.forgetting.kernels.flash_forgetting_attention`); other variants ignore
        them.
    """
    check_shapes(q, k, v, log_f)
    check_skip_threshold(skip_threshold)
    if implementation == "auto":
        implementation = resolve_implementation(
            "auto", length=q.shape[1], head_dim=q.shape[3], dtype=q.dtype,
            padded=key_mask is not None, block_size=block_size, skip_threshold=skip_threshold)
    _check_name(implementation)
    if implementation == "reference":
        return reference_forgetting_attention(q, k, v, log_f, key_mask)
    if implementation == "blockwise":
        return blockwise_forgetting_attention(q, k, v, log_f, key_mask, block_size=block_size,
                                              skip_threshold=skip_threshold)
    if key_mask is not None:
        raise NotImplementedError(_KERNEL_TAKES_NO_MASK)
    return kernels.flash_forgetting_attention(q, k, v, cumulative_log_forget(log_f),
                                              skip_threshold=skip_threshold, **kernel_options)


__all__ = ["DEFAULT_BLOCK_SIZE", "FALLBACK_ORDER", "IMPLEMENTATIONS",
           "blockwise_forgetting_attention", "check_supported", "cumulative_log_forget",
           "forgetting_attention", "reference_forgetting_attention", "resolve_implementation"]
