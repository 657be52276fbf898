"""Linear attention families (``supra``, ``gla``): layers of the LLaMA decoder whose context is
a recurrent state instead of a window of keys and values.

Both compute, per head, ``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`` and ``o_t = q_t^T S_t /
sqrt(d)`` (:mod:`EasyLM.linear`; ``linear_implementation`` picks the variant, ``auto``: the
fused kernel on a GPU, else the chunked form; ``linear_chunk_size`` tokens a chunk).  They
differ in the feature map, the decay and the output:

* ``supra`` (SUPRA, Mercat et al. 2024: a pretrained softmax layer turned recurrent, all its
  weights kept): queries and keys through ``phi(x) = ReLU(W x + b)``, a new ``[D, D]`` map
  shared by the heads (``feature_map``; keys get their own, ``key_feature_map``, under GQA),
  then RoPE (``supra_use_rope``); a fixed decay per head,
  ``gamma_h = exp(-2^(-8 (h + 1) / H))``; the heads' outputs normalised by a GroupNorm of one
  group per head without affine parameters (what takes the place of the softmax's
  denominator), then ``wo``.  The feature maps start as the identity (``W = I``, ``b = 0``),
  so an uptrained model starts from ``ReLU`` of its pretrained queries and keys.
* ``gla`` (gated linear attention, Yang et al. 2024): no RoPE, no feature map; a decay per
  key dimension from the token, ``log alpha_t = log_sigmoid(gate_up(gate_down(x))) /
  gla_gate_normaliser`` (``gate_down`` of rank ``gla_gate_rank``, no bias; ``gate_up`` with
  a bias); the output ``wo [RMSNorm_head(o) * swish(ogate x)]``.  Queries, keys and values
  are the LLaMA layer's ``wq``/``wk``/``wv`` (key and value width = head size), where the
  authors' GLA uses keys of half the width: a documented departure that keeps every LLaMA
  projection in place.

Padding (``attention_mask``) leaves the state as it was.  Windowed inference carries the
state ``[B, H, D, D]`` (float32) and the number of tokens read, whatever the window: the
layer's context is the whole stream, and its positions (SUPRA's RoPE) count from the row's
start.  A row starts afresh only at its first piece.
"""
from typing import Any, NamedTuple

import flax.linen as nn
import numpy as np
import jax
import jax.numpy as jnp

from EasyLM.linear import linear_attention, resolve_implementation
from EasyLM.models.llama.attention.interface import AttentionLayer, RMSNorm
from EasyLM.models.llama.rope import apply_rope

# torch.nn.GroupNorm's epsilon (SUPRA's normalisation) and the GLA output norm's.
GROUP_NORM_EPS = 1e-5
HEAD_NORM_EPS = 1e-5


class LinearState(NamedTuple):
    """One linear layer's inference state: ``S [B, H, D, D]`` float32 and the tokens each row
    has read ``[B]`` int32 (the next token's position).  No memory."""
    state: Any
    position: Any

    @property
    def memory_capacity(self):
        return 0

    def with_memory_capacity(self, capacity):
        return self


def supra_log_decay(num_heads):
    """``log gamma_h = -2^(-8 (h + 1) / H)`` for ``h < H``: SUPRA's fixed decays, from
    ``exp(-2^(-8/H))`` for the first head (the fastest) to ``exp(-1/256)``."""
    h = jnp.arange(num_heads, dtype=jnp.float32)
    return -jnp.exp2(-8.0 * (h + 1) / num_heads)


def group_norm_heads(x):
    """Each head's vector ``[..., H, D]`` normalised to mean 0 and variance 1 (a GroupNorm of
    one group per head, no affine parameters), in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)).astype(x.dtype)


def _identity(key, shape, dtype):
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class _LinearAttention(AttentionLayer):
    """What both linear families share: the recurrent maths in every mode."""
    scannable = True
    # FLOP accounting (EasyLM.flops): a state per head instead of scores over the row.
    recurrent = True

    def attend(self, hidden, position_ids, attention_mask):
        return self.run(hidden, position_ids, attention_mask, None)[0]

    def attend_window(self, hidden, position_ids, state, piece):
        del position_ids  # window positions; this layer counts from the row's start
        fresh = piece.local_length == 0  # [B]: the row's first piece
        start = jnp.where(fresh, 0, state.position)
        previous = jnp.where(fresh[:, None, None, None], 0.0, state.state)
        width = hidden.shape[1]
        positions = start[:, None] + jnp.arange(width)[None, :]
        real = jnp.arange(width)[None, :] < piece.num_valid[:, None]
        out, new_state = self.run(hidden, positions, real, previous)
        return out, LinearState(new_state, start + piece.num_valid)

    @classmethod
    def empty_state(cls, config, shape):
        heads, head_dim = config.num_attention_heads, config.head_dim
        return LinearState(jnp.zeros((shape.batch, heads, head_dim, head_dim), jnp.float32),
                           jnp.zeros((shape.batch,), jnp.int32))

    def run(self, hidden, positions, mask, initial_state):
        """``(output [B, L, hidden], state after the last token)``."""
        q, k, v, log_alpha = self.inputs(hidden, positions)
        cfg = self.config
        # One token (decoding) runs the recurrence's single step.
        implementation = ("scan" if hidden.shape[1] == 1 else
                          resolve_implementation(cfg.linear_implementation,
                                                 chunk_size=cfg.linear_chunk_size,
                                                 key_dim=q.shape[3], value_dim=v.shape[3],
                                                 dtype=q.dtype,
                                                 per_head=log_alpha.shape[3] == 1))
        out, state = linear_attention(
            q, k, v, log_alpha, key_mask=mask, implementation=implementation,
            chunk_size=cfg.linear_chunk_size, initial_state=initial_state, return_state=True)
        return self.output(out, hidden), state

    def inputs(self, hidden, positions):
        """``q, k, v`` and the log decay ``[B, L, H, D or 1]`` (float32)."""
        raise NotImplementedError

    def output(self, attended, hidden):
        raise NotImplementedError


class SupraAttention(_LinearAttention):
    """SUPRA: a softmax layer's projections through a ReLU feature map, decayed per head."""

    def inputs(self, hidden, positions):
        cfg = self.config
        q, k, v = self.project_qkv(hidden)
        query_map = self.feature_map("feature_map")
        own_keys = cfg.num_key_value_heads != cfg.num_attention_heads
        key_map = self.feature_map("key_feature_map") if own_keys else query_map
        q, k = query_map(q), key_map(k)
        if cfg.supra_use_rope:
            inv_freq = self.inverse_frequencies()
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        log_decay = supra_log_decay(cfg.num_attention_heads)[None, None, :, None]
        return q, k, v, jnp.broadcast_to(log_decay, q.shape[:3] + (1,))

    def feature_map(self, name):
        dense = nn.Dense(self.config.head_dim, use_bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, kernel_init=_identity,
                         bias_init=nn.initializers.zeros, name=name)
        return lambda x: jax.nn.relu(dense(x))

    def output(self, attended, hidden):
        return self.project_out(group_norm_heads(attended))

    @classmethod
    def projection_parameters(cls, config):
        # The feature maps act on every query head and every key head of each token: in
        # FLOPs, their D x D weights count once per head they map.
        heads = config.num_attention_heads + config.num_key_value_heads
        return super().projection_parameters(config) + heads * config.head_dim ** 2


class GatedLinearAttention(_LinearAttention):
    """Gated linear attention: a data-dependent decay per key dimension, an RMS-normed and
    swish-gated output."""

    def inputs(self, hidden, positions):
        del positions  # no RoPE
        cfg = self.config
        q, k, v = self.project_qkv(hidden)
        down = nn.Dense(cfg.gla_gate_rank, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(cfg.initializer_range),
                        name="gate_down")
        up = nn.Dense(cfg.num_attention_heads * cfg.head_dim, use_bias=True, dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.normal(cfg.initializer_range),
                      bias_init=nn.initializers.zeros, name="gate_up")
        logits = up(down(hidden)).astype(jnp.float32).reshape(q.shape)
        return q, k, v, jax.nn.log_sigmoid(logits) / cfg.gla_gate_normaliser

    def output(self, attended, hidden):
        gate = jax.nn.swish(self.dense(self.config.hidden_size, "ogate")(hidden)
                            .astype(jnp.float32)).reshape(attended.shape)
        normed = RMSNorm(HEAD_NORM_EPS, self.dtype, self.param_dtype, name="o_norm")(attended)
        return self.project_out((normed.astype(jnp.float32) * gate).astype(attended.dtype))

    @classmethod
    def projection_parameters(cls, config):
        hidden, rank = config.hidden_size, config.gla_gate_rank
        gates = hidden * rank + rank * config.num_attention_heads * config.head_dim
        return super().projection_parameters(config) + gates + hidden * hidden


def uptraining_feature_maps(config):
    """The parameters a SUPRA layer adds to a pretrained softmax layer (``{name: {"kernel",
    "bias"}}`` float32 arrays): feature maps starting as the identity, so that the uptrained
    layer starts from ``ReLU`` of the pretrained queries and keys (and SUPRA's decay and
    normalisation)."""
    maps = ["feature_map"]
    if config.num_key_value_heads != config.num_attention_heads:
        maps.append("key_feature_map")
    d = config.head_dim
    return {name: {"kernel": np.eye(d, dtype=np.float32), "bias": np.zeros(d, np.float32)}
            for name in maps}


# Families the converter cannot start from a pretrained softmax layer, and why.
NOT_FROM_PRETRAINED = {
    "gla": "gated linear attention is trained from scratch here: its gates, output norm and "
           "output gate have no setting that continues a pretrained softmax layer; uptrain "
           "to 'supra' instead",
}
