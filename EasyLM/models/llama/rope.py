"""Rotary position embeddings in the toolkit's native convention (FOT_SPEC section 1).

Native weights rotate consecutive pairs ``(x[2i], x[2i+1])`` by ``pos * inv_freq[i]``, the
"complex" convention of the original LLaMA release.  Hugging Face rotates halves
``(x[i], x[i + d/2])`` and permutes the q/k projection rows to match; the converters undo
that permutation (:func:`hf_to_native_rows` / :func:`native_to_hf_rows`).
"""
import math

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3")


def inverse_frequencies(head_dim, rope_theta=10000.0, rope_scaling=None):
    """``[head_dim / 2]`` float64 inverse frequencies, with optional Llama-3 / linear scaling."""
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not rope_scaling:
        return inv_freq
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if kind == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, and the band in
        # between interpolated smoothly (Llama 3.1's context extension).
        factor = float(rope_scaling["factor"])
        low = float(rope_scaling.get("low_freq_factor", 1.0))
        high = float(rope_scaling.get("high_freq_factor", 4.0))
        original = float(rope_scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return np.where(wavelen > original / low, inv_freq / factor,
                        np.where(wavelen < original / high, inv_freq, interpolated))
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: "
                     f"{SUPPORTED_ROPE_SCALING}")


def apply_rope(x, positions, inv_freq):
    """Rotate ``x [B, L, H, D]`` at integer ``positions [B, L]``; computed in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def apply_rope_as_first(x, positions, inv_freq):
    """Keys rotated as if every token sat at the first position of its row (FOT_SPEC 2.2)."""
    first = jnp.broadcast_to(positions[:, :1], positions.shape)
    return apply_rope(x, first, inv_freq)


def hf_to_native_rows(weight, num_heads):
    """Undo Hugging Face's q/k row permutation: ``[H*D, in]`` half layout -> pair layout."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // num_heads
    return (weight.reshape(num_heads, 2, head_dim // 2, in_dim)
            .transpose(0, 2, 1, 3).reshape(out_dim, in_dim))


def native_to_hf_rows(weight, num_heads):
    """Apply Hugging Face's q/k row permutation: pair layout -> half layout."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, in_dim)
            .transpose(0, 2, 1, 3).reshape(out_dim, in_dim))
