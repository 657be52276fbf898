"""The oracle of forgetting attention (FoX): materialised float32 logits with the decay bias.

Forgetting attention is causal softmax attention whose logit for query ``i`` and key ``j <= i``
carries the sum of the log forget gates between them:

    s_ij = q_i . k_j / sqrt(D) + (c_i - c_j),   c_t = sum_{u <= t} log f_u

with one gate ``f_u`` in (0, 1) per token and query head.  Every faster variant (blockwise,
Pallas) is tested against :func:`reference_forgetting_attention`; it holds the whole
``[B, H, L, L]`` score tensor, so it is for checking and for short rows only.
"""
import math

import jax
import jax.numpy as jnp
from jax import lax

# Added to the logits of hidden keys: exp() underflows to exactly zero in float32 and a finite
# decay bias added to it never overflows.
MASK_VALUE = -1e30


def check_shapes(q, k, v, log_f):
    """Raises ``ValueError`` naming the disagreement unless ``q [B, L, H, D]``,
    ``k, v [B, L, KV, D]`` with ``H % KV == 0`` and ``log_f [B, L, H]``."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"expected q [B, L, H, D] and k, v [B, L, KV, D] of one shape, got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree in batch, length or head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} "
                         f"key/value heads")
    if log_f.shape != q.shape[:3]:
        raise ValueError(f"log_f must be [B, L, H] = {q.shape[:3]} (one log forget gate per "
                         f"token and query head), got {log_f.shape}")


def cumulative_log_forget(log_f):
    """``c [B, L, H]`` float32: the running sum of the log forget gates along the row."""
    return jnp.cumsum(log_f.astype(jnp.float32), axis=1)


def reference_forgetting_attention(q, k, v, log_f, key_mask=None):
    """Forgetting attention ``[B, L, H, D]`` in ``q.dtype``, computed in float32.

    Args:
      q: queries ``[B, L, H, D]`` (already normalised / rotated as the layer wants).
      k, v: keys and values ``[B, L, KV, D]``; query head ``h`` reads key/value head
        ``h // (H // KV)``.
      log_f: log forget gates ``[B, L, H]`` (``log sigmoid`` of the gate logits, <= 0).
      key_mask: optional ``[B, L]``, true for real tokens; other keys are hidden.
    """
    check_shapes(q, k, v, log_f)
    batch, length, heads, head_dim = q.shape
    group = heads // k.shape[2]
    f32 = jnp.float32
    keys = jnp.repeat(k.astype(f32), group, axis=2)
    values = jnp.repeat(v.astype(f32), group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), keys,
                        precision=lax.Precision.HIGHEST) / math.sqrt(head_dim)
    c = jnp.swapaxes(cumulative_log_forget(log_f), 1, 2)  # [B, H, L]
    # The decay c_i - c_j first: both sums reach thousands along a long row with strong
    # gates, and adding c_i to a score before subtracting c_j would round the pair's decay
    # at that magnitude (2e-5 relative error in the output at 2,048 tokens).
    scores = scores + (c[:, :, :, None] - c[:, :, None, :])
    visible = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if key_mask is not None:
        visible = visible & key_mask.astype(bool)[:, None, None, :]
    scores = jnp.where(visible, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, values, precision=lax.Precision.HIGHEST)
    return out.astype(q.dtype)
