"""What every attention family implements: one Flax module per family, three modes, one result.

A family is a subclass of :class:`AttentionLayer`.  The decoder block builds it as its
``attention`` submodule and calls it the same way in every mode; the base class picks the mode
from the arguments and always returns a :class:`LayerOutput`:

* no ``state``: training or a plain forward over whole rows (:meth:`AttentionLayer.attend`);
* a ``state`` and a :class:`~FoT.inference.Piece`: one window of windowed inference
  (:meth:`AttentionLayer.attend_window`), or one token of decoding when the piece is one
  token wide (:meth:`AttentionLayer.attend_token`, by default the window of one token).

A family declares its inference state by :meth:`AttentionLayer.empty_state`.  The state is a
pytree with a ``memory_capacity`` (entries of memory it holds, 0 for none) and a
``with_memory_capacity(capacity)`` that returns it grown; the windowed model grows the
memories of every layer together and otherwise only passes states from one piece to the next.

The shared projections (``wq``, ``wk``, ``wv``, ``wo``: the parameter tree of a LLaMA layer)
are methods a family calls; a family adds its own parameters by creating more submodules in
its methods.
"""
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from EasyLM.jax_utils import with_logical_constraint
from EasyLM.models.llama.rope import inverse_frequencies


class LayerOutput(NamedTuple):
    """What an attention, a decoder layer and the decoder return in every mode: hidden states
    ``[B, L, hidden]`` and the updated inference state (``None`` outside windowed inference;
    the decoder's: one state per layer)."""
    hidden: Any
    state: Any = None


class StateShape(NamedTuple):
    """What sizes an inference state: rows, local window entries, memory entries (``None``:
    no memory, memory layers run as local ones), and the dtypes of activations and memory."""
    batch: int
    window: int
    memory: Optional[int]
    dtype: Any
    memory_dtype: Any


def dense_layer(features, config, dtype, param_dtype, name):
    """The bias-free projection of every LLaMA weight matrix."""
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.normal(config.initializer_range), name=name)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learnable scale ``kernel``, in float32: the
    decoder's norms and the per-head norms some families apply (their scale shared across
    heads)."""
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("kernel", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * weight.astype(jnp.float32)).astype(self.dtype)


class AttentionLayer(nn.Module):
    """One attention family: subclasses implement :meth:`attend`, :meth:`attend_window`
    (and :meth:`attend_token` where one token differs) and :meth:`empty_state`."""
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # Whether runs of consecutive layers of this family may run as one ``lax.scan`` over
    # their stacked parameters (``scan_layers``).
    scannable = False

    @nn.compact
    def __call__(self, hidden, position_ids, attention_mask=None, state=None, piece=None):
        """``hidden [B, L, hidden]`` at ``position_ids [B, L]``; ``attention_mask [B, L]``
        (or None) marks real tokens of whole rows.  Given a ``state`` and the ``piece`` it
        runs, one step of windowed inference."""
        if state is None:
            return LayerOutput(self.attend(hidden, position_ids, attention_mask))
        step = self.attend_token if hidden.shape[1] == 1 else self.attend_window
        return LayerOutput(*step(hidden, position_ids, state, piece))

    def attend(self, hidden, position_ids, attention_mask):
        """Training / plain forward over whole rows: the output."""
        raise NotImplementedError(f"{type(self).__name__} does not implement attend")

    def attend_window(self, hidden, position_ids, state, piece):
        """One window of windowed inference: ``(output, updated state)``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement attend_window")

    def attend_token(self, hidden, position_ids, state, piece):
        """One token of decoding per row: ``(output, updated state)``."""
        return self.attend_window(hidden, position_ids, state, piece)

    @classmethod
    def empty_state(cls, config, shape):
        """The state of one layer before the first piece, sized by a :class:`StateShape`."""
        raise NotImplementedError(f"{cls.__name__} does not declare its inference state")

    @classmethod
    def projection_parameters(cls, config):
        """Weights of the layer's matmuls, each used once per token (FLOP accounting):
        ``wq``, ``wk``, ``wv``, ``wo``; a family with more adds its own."""
        kv = config.num_key_value_heads * config.head_dim
        return 2 * config.hidden_size * (config.hidden_size + kv)

    # The shared LLaMA projections.

    def project_qkv(self, hidden):
        """Queries ``[B, L, H, D]``, keys and values ``[B, L, KV, D]`` (``wq``, ``wk``,
        ``wv``), split over heads as the logical axes say."""
        cfg = self.config
        batch, length, _ = hidden.shape
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self.dense(heads * head_dim, "wq")(hidden)
        k = self.dense(kv_heads * head_dim, "wk")(hidden)
        v = self.dense(kv_heads * head_dim, "wv")(hidden)
        q = q.reshape(batch, length, heads, head_dim)
        k = k.reshape(batch, length, kv_heads, head_dim)
        v = v.reshape(batch, length, kv_heads, head_dim)
        q = with_logical_constraint(q, "batch", "length", "heads", "head_dim")
        k, v = (with_logical_constraint(x, "batch", "length", "kv_heads", "head_dim")
                for x in (k, v))
        return q, k, v

    def project_out(self, attended):
        """``attended [B, L, H, D]`` back to the residual width (``wo``)."""
        batch, length, heads, head_dim = attended.shape
        attended = with_logical_constraint(attended, "batch", "length", "heads", "head_dim")
        return self.dense(self.config.hidden_size, "wo")(
            attended.reshape(batch, length, heads * head_dim))

    def dense(self, features, name):
        return dense_layer(features, self.config, self.dtype, self.param_dtype, name)

    def inverse_frequencies(self):
        cfg = self.config
        return inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
