"""Gated linear attention as the recurrence it is: the oracle of every other variant.

For each head, a state ``S [Dk, Dv]`` decays along its key dimension and takes one outer
product per token:

    S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T,        o_t = scale * q_t^T S_t

with ``a_t = log alpha_t <= 0``, given per key dimension (``[B, L, H, Dk]``: gated linear
attention) or once per head (``[B, L, H, 1]``: a decay shared by the head's key dimensions,
as SUPRA's fixed per-head decay).  Everything is float32 and runs one token at a time
(``lax.scan``), so it is slow and exact: the chunked form and the kernels are tested against
it.
"""
import jax.numpy as jnp
from jax import lax


def check_shapes(q, k, v, log_alpha, initial_state=None):
    """``ValueError`` (one line) unless ``q [B, L, H, Dk]``, ``k [B, L, KV, Dk]``,
    ``v [B, L, KV, Dv]`` with ``H % KV == 0``, ``log_alpha [B, L, H, Dk or 1]`` and an
    ``initial_state`` (if any) ``[B, H, Dk, Dv]``."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"linear attention takes q, k, v of shape [B, L, heads, D]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    batch, length, heads, key_dim = q.shape
    if k.shape[:2] != (batch, length) or k.shape[3] != key_dim:
        raise ValueError(f"keys {k.shape} do not match queries {q.shape} (same B, L and Dk)")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"values {v.shape} do not match keys {k.shape} (same B, L and KV)")
    if heads % k.shape[2]:
        raise ValueError(f"{heads} query heads are not a multiple of {k.shape[2]} key/value "
                         f"heads")
    if log_alpha.shape not in ((batch, length, heads, key_dim), (batch, length, heads, 1)):
        raise ValueError(f"log_alpha has shape {log_alpha.shape}; give "
                         f"{(batch, length, heads, key_dim)} (a gate per key dimension) or "
                         f"{(batch, length, heads, 1)} (one per head)")
    if initial_state is not None and initial_state.shape != (batch, heads, key_dim, v.shape[3]):
        raise ValueError(f"initial_state has shape {initial_state.shape}; expected "
                         f"{(batch, heads, key_dim, v.shape[3])}")


def expand_heads(x, heads):
    """``[B, L, KV, D]`` -> ``[B, L, H, D]``: each key/value head serves ``H / KV`` query heads
    (the query heads of a group are consecutive, as in LLaMA's GQA)."""
    return jnp.repeat(x, heads // x.shape[2], axis=2)


def zero_state(q, v):
    return jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)


def scan_linear_attention(q, k, v, log_alpha, *, scale, initial_state=None):
    """``(out [B, L, H, Dv] in q.dtype, final state [B, H, Dk, Dv] float32)`` of the
    recurrence, one token at a time."""
    heads = q.shape[2]
    q32 = q.astype(jnp.float32) * scale
    k32, v32 = (expand_heads(x, heads).astype(jnp.float32) for x in (k, v))
    decay = jnp.exp(jnp.broadcast_to(log_alpha.astype(jnp.float32), q.shape))
    state = zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)

    def step(state, xs):
        q_t, k_t, v_t, decay_t = xs
        state = decay_t[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
        return state, jnp.einsum("bhk,bhkv->bhv", q_t, state,
                                 precision=lax.Precision.HIGHEST)

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q32, k32, v32, decay)]
    state, out = lax.scan(step, state, time_major)
    return jnp.moveaxis(out, 0, 1).astype(q.dtype), state


__all__ = ["check_shapes", "expand_heads", "scan_linear_attention", "zero_state"]
