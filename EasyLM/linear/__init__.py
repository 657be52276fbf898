"""Gated linear attention: the implementations behind the linear attention families (SUPRA,
gated linear attention).

:func:`linear_attention` is the one entry point layers call.  It computes, per head,

    S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T,        o_t = scale * q_t^T S_t

with ``a_t = log alpha_t <= 0`` per key dimension or per head (:mod:`EasyLM.linear.scan`).
Variants (``implementation``):

* ``"scan"``: the recurrence one token at a time, float32 (:mod:`EasyLM.linear.scan`), the
  oracle every other variant is tested against.
* ``"chunked"``: chunkwise parallel in plain XLA, every exponent non-positive
  (:mod:`EasyLM.linear.chunked`): the training form wherever the kernel does not run.
* ``"pallas"``: the same chunkwise form fused into Pallas kernels (:mod:`EasyLM.linear.kernels`;
  Triton lowering, GPU), forward and backward.

:func:`check_supported` is each variant's declaration, :data:`FALLBACK_ORDER` the order a
caller falls back in and :func:`resolve_implementation` the rule a layer applies to its
configured choice.  Padding (``key_mask``) is exact in every variant: a masked token neither
writes to the state nor decays it.
"""
import math

import jax.numpy as jnp

from EasyLM.linear.chunked import (DEFAULT_CHUNK_SIZE, DEFAULT_SUBCHUNK, check_chunking,
                                   chunked_linear_attention)
from EasyLM.linear import kernels
from EasyLM.linear.scan import check_shapes, scan_linear_attention
from FoT.cross_batch import first_supported

IMPLEMENTATIONS = ("scan", "chunked", "pallas")
# Fastest first; a caller choosing automatically takes the first that accepts its inputs.
FALLBACK_ORDER = ("pallas", "chunked", "scan")


def _check_name(implementation, allowed=IMPLEMENTATIONS):
    if implementation not in allowed:
        raise ValueError(f"unknown linear attention implementation {implementation!r}; choose "
                         f"one of {allowed}")


def check_supported(implementation, *, chunk_size=DEFAULT_CHUNK_SIZE,
                    subchunk=DEFAULT_SUBCHUNK, key_dim=None, value_dim=None, dtype=None,
                    per_head=False):
    """None when ``implementation`` runs with these settings on this platform, else
    ``NotImplementedError`` saying why.  ``scan`` and ``chunked`` take any length, head size,
    dtype and padding; ``pallas`` runs on a GPU (not in the interpreter) with the head sizes,
    dtypes and chunks :func:`EasyLM.linear.kernels.check_supported` lists, within its shared
    memory (which ``per_head``, one gate per head, changes), and needs them given."""
    _check_name(implementation)
    if implementation == "chunked":
        try:
            check_chunking(chunk_size, subchunk)
        except ValueError as e:
            raise NotImplementedError(str(e)) from None
    elif implementation == "pallas":
        if subchunk != kernels.SUBCHUNK:
            raise NotImplementedError(f"the fused linear attention kernel takes sub-chunks of "
                                      f"{kernels.SUBCHUNK} tokens, not {subchunk}")
        if key_dim is None or value_dim is None or dtype is None:
            raise NotImplementedError("the fused linear attention kernel's support depends on "
                                      "the head sizes and dtype; none were given")
        kernels.check_supported(key_dim, value_dim, dtype, chunk_size, per_head=per_head)


def resolve_implementation(configured, *, chunk_size=DEFAULT_CHUNK_SIZE,
                           subchunk=DEFAULT_SUBCHUNK, key_dim=None, value_dim=None, dtype=None,
                           per_head=False):
    """The variant a layer runs when configured with ``configured`` (``"auto"`` or one of
    :data:`IMPLEMENTATIONS`): ``auto`` takes the first of :data:`FALLBACK_ORDER` that
    :func:`check_supported` accepts (the kernel on a GPU, else the chunked form); an explicit
    choice is kept."""
    _check_name(configured, ("auto",) + IMPLEMENTATIONS)
    if configured != "auto":
        return configured
    return first_supported(FALLBACK_ORDER, lambda name: check_supported(
        name, chunk_size=chunk_size, subchunk=subchunk, key_dim=key_dim, value_dim=value_dim,
        dtype=dtype, per_head=per_head))


def linear_attention(q, k, v, log_alpha, key_mask=None, implementation="auto", *, scale=None,
                     chunk_size=DEFAULT_CHUNK_SIZE, subchunk=DEFAULT_SUBCHUNK,
                     initial_state=None, return_state=False, **kernel_options):
    """Gated linear attention ``[B, L, H, Dv]`` in ``q.dtype``.

    Args:
      q: ``[B, L, H, Dk]``; k: ``[B, L, KV, Dk]``; v: ``[B, L, KV, Dv]`` (``H % KV == 0``).
      log_alpha: log gates ``<= 0``, ``[B, L, H, Dk]`` (per key dimension) or ``[B, L, H, 1]``
        (per head).
      key_mask: ``[B, L]`` bool or None: False marks padding, which leaves the state as it was.
      implementation: ``"auto"`` (:func:`resolve_implementation`) or one of
        :data:`IMPLEMENTATIONS`.
      scale: multiplies the queries; ``None``: ``1 / sqrt(Dk)``.
      chunk_size, subchunk: the chunked variant's chunk and sub-chunk (``subchunk`` divides
        ``chunk_size``).
      initial_state: ``[B, H, Dk, Dv]`` float32 state before the first token (None: zeros).
      return_state: also return the state after the last token.
      kernel_options: passed to :func:`EasyLM.linear.kernels.fused_linear_attention` by the
        ``pallas`` variant (``interpret``, ``block_v``, ``block_k``, ``num_warps``,
        ``num_stages``, ``split_grads``, ``grads_block_v``).
    """
    check_shapes(q, k, v, log_alpha, initial_state)
    if implementation == "auto":
        implementation = resolve_implementation(
            "auto", chunk_size=chunk_size, subchunk=subchunk, key_dim=q.shape[3],
            value_dim=v.shape[3], dtype=q.dtype, per_head=log_alpha.shape[3] == 1)
    _check_name(implementation)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    if key_mask is not None:
        real = key_mask[:, :, None, None]
        k = jnp.where(real, k, 0).astype(k.dtype)
        log_alpha = jnp.where(real, log_alpha, 0).astype(log_alpha.dtype)
    if implementation == "scan":
        out, state = scan_linear_attention(q, k, v, log_alpha, scale=scale,
                                           initial_state=initial_state)
    elif implementation == "pallas":
        if subchunk != kernels.SUBCHUNK:
            raise ValueError(f"the fused linear attention kernel takes sub-chunks of "
                             f"{kernels.SUBCHUNK} tokens, not {subchunk}")
        out, state = kernels.fused_linear_attention(
            q, k, v, log_alpha, scale=scale, chunk_size=chunk_size,
            initial_state=initial_state, **kernel_options)
    else:
        out, state = chunked_linear_attention(q, k, v, log_alpha, scale=scale,
                                              chunk_size=chunk_size, subchunk=subchunk,
                                              initial_state=initial_state)
    return (out, state) if return_state else out


__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_SUBCHUNK", "FALLBACK_ORDER", "IMPLEMENTATIONS",
           "check_supported", "chunked_linear_attention", "linear_attention",
           "resolve_implementation", "scan_linear_attention"]
