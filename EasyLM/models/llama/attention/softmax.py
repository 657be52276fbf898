"""Ordinary causal softmax attention (family ``softmax``): every LLaMA layer that is not a
memory layer.

Training runs the XLA reference or cuDNN's fused kernel (:func:`causal_attention`, chosen by
``attention_implementation``).  Windowed inference keeps a local window of un-rotated keys and
values (:class:`~FoT.inference.LayerCache` without a memory) and attends over it as
:mod:`FoT.inference` plans.
"""
import jax
import jax.numpy as jnp

from EasyLM.models.llama.attention.interface import AttentionLayer
from EasyLM.models.llama.rope import apply_rope
from FoT.cross_batch import MASK_VALUE, attend, cross_batch_core
from FoT.inference import LayerCache

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def resolve_attention_implementation(config, dtype):
    """The implementation ``attention_implementation`` stands for with inputs of ``dtype``."""
    if config.attention_implementation != "auto":
        return config.attention_implementation
    # cuDNN's fused attention takes half-precision inputs only.
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


def padding_bias(attention_mask, length):
    """Additive ``[B, 1, L, L]`` causal + key-padding bias, or ``None`` for plain causal."""
    if attention_mask is None:
        return None
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(allowed, 0.0, MASK_VALUE).astype(jnp.float32)


def causal_attention(q, k, v, bias=None, implementation="xla"):
    """Ordinary causal self-attention ``[B, L, H, D]`` (GQA allowed).

    ``"xla"`` is the reference: cross-batch attention with no other rows.  ``"cudnn"`` is the
    fused kernel behind ``jax.nn.dot_product_attention``.
    """
    if implementation == "cudnn":
        mask = None if bias is None else bias > -1.0
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=bias is None,
                                            implementation="cudnn")
    return cross_batch_core(q, k, k, v, cross_batch_range=0, local_bias=bias)


def enter_window(q, k, v, query_positions, state, piece, inv_freq, positional):
    """FOT_SPEC 5's local part: the piece's keys and values written into the window (after the
    planned eviction), rotated with the queries when ``positional``.  Returns ``(queries, keys,
    values, visibility [B, n, W], key positions [B, W], the state with the new window)``."""
    batch, length = q.shape[:2]
    local_k, local_v = piece.enter(state.local_k, k), piece.enter(state.local_v, v)
    keys, values, visible = local_k, local_v, piece.local_visible(length)
    key_positions = piece.key_positions(batch)
    if positional:
        q = apply_rope(q, query_positions, inv_freq)
        keys = apply_rope(keys, key_positions, inv_freq)
    return (q, keys, values, visible, key_positions,
            state._replace(local_k=local_k, local_v=local_v))


class SoftmaxAttention(AttentionLayer):
    """Causal attention over the row (training) or over the local window (inference)."""
    scannable = True

    def attend(self, hidden, position_ids, attention_mask):
        q, k, v = self.project_qkv(hidden)
        inv_freq = self.inverse_frequencies()
        q_rot = apply_rope(q, position_ids, inv_freq)
        k_rot = apply_rope(k, position_ids, inv_freq)
        bias = padding_bias(attention_mask, hidden.shape[1])
        out = causal_attention(q_rot, k_rot, v, bias,
                               resolve_attention_implementation(self.config, self.dtype))
        return self.project_out(out)

    def attend_window(self, hidden, position_ids, state, piece):
        q, k, v = self.project_qkv(hidden)
        q, keys, values, visible, _, state = enter_window(
            q, k, v, position_ids, state, piece, self.inverse_frequencies(), positional=True)
        return self.project_out(attend(q, keys, values, visible)), state

    @classmethod
    def empty_state(cls, config, shape):
        local = (shape.batch, shape.window, config.num_key_value_heads, config.head_dim)
        return LayerCache(jnp.zeros(local, shape.dtype), jnp.zeros(local, shape.dtype))
