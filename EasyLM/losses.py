"""Token-level cross-entropy sums for training and evaluation (FOT_SPEC 4).

``token_sums`` works on full logits.  ``chunked_token_sums`` goes from the final hidden states
and the output-head kernel straight to the sums, one slice of sequence positions at a time,
with a backward pass that recomputes each slice: neither pass holds more than one
``[B, chunk, V]`` float32 logits slice, instead of the ``[B, L, V]`` logits, their float32
copy and log-softmax.

Both return :class:`TokenSums`, whose ``z`` is the sum of ``logsumexp(logits)^2`` over the
counted tokens: the z-loss (PaLM's auxiliary loss, the one SUPRA's uptraining uses), which a
trainer adds to the objective times its coefficient and logs apart from the cross-entropy.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Default of ``Trainer(loss_chunk_tokens=...)`` and of the run flag of the same name.
DEFAULT_LOSS_CHUNK_TOKENS = 8192


class TokenSums(NamedTuple):
    """Sums over the tokens with mask > 0: cross-entropy, correct predictions, tokens
    counted and ``logsumexp(logits)^2`` (the z-loss)."""
    loss: jax.Array
    correct: jax.Array
    count: jax.Array
    z: jax.Array


def token_sums(logits, targets, loss_masks):
    """:class:`TokenSums` of ``logits [B, L, V]`` over tokens with mask > 0."""
    counted = (loss_masks > 0).astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(logits, axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return TokenSums(jnp.sum((lse - target_logits) * counted), jnp.sum(correct * counted),
                     jnp.sum(counted), jnp.sum(lse * lse * counted))


def chunk_length(rows, length, chunk_tokens):
    """Positions per chunk: the largest divisor of ``length`` with ``rows * chunk`` at most
    ``chunk_tokens`` (at least 1)."""
    limit = max(1, min(length, chunk_tokens // max(rows, 1)))
    return max(d for d in range(1, limit + 1) if length % d == 0)


def chunked_token_sums(hidden, head_kernel, targets, loss_masks, chunk_tokens, dtype=None):
    """``token_sums(hidden @ head_kernel, ...)`` without materialising the logits.

    ``hidden [B, L, E]`` are the final (normed) hidden states, ``head_kernel [E, V]`` the
    output projection (the float32 parameter; it is cast to ``dtype``, default the hidden
    states' dtype, inside each chunk so that its gradient accumulates in float32).  Logits
    are accumulated in float32.  Chunks run over sequence positions, so every row (and every
    device holding rows) works on each chunk.
    """
    rows, length, width = hidden.shape
    dtype = dtype or hidden.dtype
    size = chunk_length(rows, length, chunk_tokens)
    count = length // size

    def split(x):
        return jnp.swapaxes(x.reshape((rows, count, size) + x.shape[2:]), 0, 1)

    def chunk_logits(kernel, h):
        return jnp.dot(h.astype(dtype), kernel.astype(dtype),
                       preferred_element_type=jnp.float32)

    def chunk_primal(kernel, h, t, m):
        sums = token_sums(chunk_logits(kernel, h), t, m)
        return sums.loss, sums.correct, sums.z

    # A hand-written VJP: it recomputes the chunk's logits (nothing of size V is saved) and
    # feeds the matmuls of the backward pass ``dtype`` operands; autodiff would promote them
    # to the float32 cotangent of the logits and run float32 matmuls.
    chunk_sums = jax.custom_vjp(chunk_primal)

    def chunk_forward(kernel, h, t, m):
        return chunk_primal(kernel, h, t, m), (kernel, h, t, m)

    def chunk_backward(saved, cotangents):
        kernel, h, t, m = saved
        logits = chunk_logits(kernel, h)
        counted = (m > 0).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        one_hot = jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)
        # d lse^2 / d logits = 2 lse softmax(logits)
        z_scale = 2 * jax.nn.logsumexp(logits, axis=-1) * counted * cotangents[2]
        d_logits = ((probs - one_hot) * (counted * cotangents[0])[..., None]
                    + probs * z_scale[..., None]).astype(dtype)
        d_h = jnp.einsum("bcv,ev->bce", d_logits, kernel.astype(dtype),
                         preferred_element_type=jnp.float32).astype(h.dtype)
        d_kernel = jnp.einsum("bce,bcv->ev", h.astype(dtype), d_logits,
                              preferred_element_type=jnp.float32).astype(kernel.dtype)
        return d_kernel, d_h, None, None

    chunk_sums.defvjp(chunk_forward, chunk_backward)

    def body(totals, xs):
        return tuple(a + b for a, b in zip(totals, chunk_sums(head_kernel, *xs))), None

    zero = jnp.zeros((), jnp.float32)
    targets = targets.astype(jnp.int32)
    (loss_sum, correct, z_sum), _ = jax.lax.scan(
        body, (zero, zero, zero), (split(hidden), split(targets), split(loss_masks)))
    counted = jnp.sum((loss_masks > 0).astype(jnp.float32))
    return TokenSums(loss_sum, jax.lax.stop_gradient(correct), counted, z_sum)
