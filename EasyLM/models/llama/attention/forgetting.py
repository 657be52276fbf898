"""Forgetting attention (family ``forgetting``): the attention of the Forgetting Transformer
(FoX; Lin et al., ICLR 2025) as a layer of the LLaMA decoder.

Every query head ``h`` has a forget gate per token, ``f_t = sigmoid(w_h . x_t + b_h)``
(``fgate``, from the attention's normed input ``x``, in float32).  With ``c`` the running sum
of ``log f`` along the row, query ``i``'s logit for key ``j <= i`` gains ``c_i - c_j``: a key's
weight decays by the product of the gates since it was written.  The maths is
:mod:`EasyLM.forgetting`; ``forgetting_implementation`` picks its variant (``auto``: the
first of its fallback order that takes the rows, the Pallas kernel on GPU).  FoX layers run
without RoPE unless ``forgetting_use_rope``.

The parts of the authors' "Pro" block, each switched by the config:

* ``forgetting_kv_shift``: ``k'_t = a_t k_{t-1} + (1 - a_t) k_t`` with ``a_t = sigmoid(kshift
  x_t)`` per key/value head and ``k_{-1} = 0`` at a row's start; the same for ``v``
  (``vshift``).  The authors' shift gates have no bias; ours have one, initialised 0 (a fresh
  model starts as theirs), because uptraining a pretrained LLaMA must start with the shift
  off: weight 0 and a very negative bias make ``a_t`` negligible for every input, which no
  bias-free gate can (weight 0 gives ``a_t = 1/2``).
* ``forgetting_qk_norm``: RMS norm of every query and key head (``q_norm``, ``k_norm``; one
  scale ``[head_dim]`` shared by the heads, as in the authors' code).
* ``forgetting_output_gate``: ``o = wo [RMSNorm_head(attention) * sigmoid(ogate x)]``.

One layer computes, in this order: ``wq``/``wk``/``wv`` -> key/value shift -> QK-norm ->
RoPE -> forgetting attention -> output norm times gate -> ``wo``.

Windowed inference keeps the local window's keys and values (after shift and norm, before
RoPE) as softmax layers do, plus each entry's ``c``, the row's running ``c`` and, with the
shift, the last token's un-shifted key and value (:class:`ForgettingCache`).  A row whose
window starts over (its first piece, or after an eviction) starts its decay and shift afresh,
as every training row does: a FoX layer's context is its window.  A piece's queries attend in
blocks of :data:`WINDOW_QUERY_BLOCK`, so a window of 16k tokens never holds ``[B, H, n, W]``
scores.
"""
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from EasyLM.forgetting import (cumulative_log_forget, forgetting_attention,
                               resolve_implementation)
from EasyLM.jax_utils import with_logical_constraint
from EasyLM.models.llama.attention.interface import AttentionLayer, RMSNorm
from EasyLM.models.llama.attention.softmax import enter_window
from EasyLM.models.llama.rope import apply_rope
from FoT.cross_batch import attend

# The authors' RMSNorm epsilon of the per-head norms (QK-norm, output norm).
HEAD_NORM_EPS = 1e-5
# Queries per block of a window's attention: the scores of one block, [B, H, 512, W] float32,
# are what a piece holds at a time (256 MiB for 8 heads over a 16k window).
WINDOW_QUERY_BLOCK = 512
# Uptraining: the shift gates' bias.  sigmoid(-10) = 4.5e-5 of the previous token's key and
# value: invisible in the logits, yet a gradient (proportional to it) far above Adam's epsilon,
# so training can open the shift.
UPTRAINING_KV_SHIFT_BIAS = -10.0
# Uptraining: the forget gates' decay over the whole native context (max_sequence_length *
# softplus(-bias)) that :func:`default_forget_gate_bias` stays below.
UPTRAINING_TOTAL_DECAY = 1e-3
NOT_UPTRAINABLE = ("cannot start as the pretrained model: its RMS norm rescales every query, "
                   "key or output head by that head's own size, which no initial weight "
                   "undoes; uptrain without it")


class ForgettingCache(NamedTuple):
    """One FoX layer's state: the window's keys and values ``[B, W, KV, D]`` (after shift and
    QK-norm, un-rotated), each entry's cumulative log forget ``c`` ``[B, W, H]`` (float32),
    the row's ``c`` after its last token ``[B, H]`` and, with ``forgetting_kv_shift``, that
    token's un-shifted key and value ``[B, KV, D]`` (else ``None``).  No memory."""
    local_k: Any
    local_v: Any
    local_c: Any
    row_c: Any
    previous_k: Any = None
    previous_v: Any = None

    @property
    def memory_capacity(self):
        return 0

    def with_memory_capacity(self, capacity):
        return self


def shift(x, previous, gate):
    """``a_t x_{t-1} + (1 - a_t) x_t`` for ``x [B, L, KV, D]``, ``x_{-1} = previous
    [B, KV, D]`` and the gate ``a [B, L, KV]`` (float32); computed in float32."""
    before = jnp.concatenate([previous[:, None].astype(x.dtype), x[:, :-1]], axis=1)
    a = gate[..., None]
    return (a * before.astype(jnp.float32) + (1 - a) * x.astype(jnp.float32)).astype(x.dtype)


def last_real(x, num_valid, otherwise):
    """``x[b, num_valid[b] - 1]`` of ``x [B, n, ...]``, or ``otherwise[b]`` for a row without
    real tokens in the piece."""
    index = jnp.maximum(num_valid - 1, 0).reshape((-1,) + (1,) * (x.ndim - 1))
    last = jnp.take_along_axis(x, index, axis=1)[:, 0]
    has_tokens = (num_valid > 0).reshape((-1,) + (1,) * (x.ndim - 2))
    return jnp.where(has_tokens, last, otherwise).astype(x.dtype)


class ForgettingAttention(AttentionLayer):
    """Forgetting attention over the row (training) or over the local window (inference)."""
    scannable = True

    def attend(self, hidden, position_ids, attention_mask):
        cfg = self.config
        q, k, v = self.project_qkv(hidden)
        if cfg.forgetting_kv_shift:
            before_row = jnp.zeros((k.shape[0],) + k.shape[2:], k.dtype)
            k, v = self.shift_kv(hidden, k, v, before_row, before_row)
        q, k = self.normalise_qk(q, k)
        if cfg.forgetting_use_rope:
            inv_freq = self.inverse_frequencies()
            q, k = apply_rope(q, position_ids, inv_freq), apply_rope(k, position_ids, inv_freq)
        implementation = resolve_implementation(
            cfg.forgetting_implementation, length=q.shape[1], head_dim=cfg.head_dim,
            dtype=q.dtype, padded=attention_mask is not None)
        out = forgetting_attention(q, k, v, self.log_forget(hidden), key_mask=attention_mask,
                                   implementation=implementation)
        return self.output(out, hidden)

    def attend_window(self, hidden, position_ids, state, piece):
        cfg = self.config
        fresh = piece.kept == 0  # [B]: rows whose window starts over
        q, k, v = self.project_qkv(hidden)
        if cfg.forgetting_kv_shift:
            previous_k, previous_v = (jnp.where(fresh[:, None, None], 0, x).astype(x.dtype)
                                      for x in (state.previous_k, state.previous_v))
            state = state._replace(previous_k=last_real(k, piece.num_valid, previous_k),
                                   previous_v=last_real(v, piece.num_valid, previous_v))
            k, v = self.shift_kv(hidden, k, v, previous_k, previous_v)
        q, k = self.normalise_qk(q, k)
        start = jnp.where(fresh[:, None], 0.0, state.row_c)
        c = start[:, None] + cumulative_log_forget(self.log_forget(hidden))
        q, keys, values, visible, _, state = enter_window(
            q, k, v, position_ids, state, piece, self.inverse_frequencies(),
            positional=cfg.forgetting_use_rope)
        local_c = piece.enter(state.local_c, c)
        blocks = None
        if q.shape[1] > WINDOW_QUERY_BLOCK:
            blocks = (cfg.num_attention_heads, WINDOW_QUERY_BLOCK)
        out = attend(q, keys, values, visible, decay=(c, local_c), chunks=blocks)
        state = state._replace(local_c=local_c, row_c=last_real(c, piece.num_valid, start))
        return self.output(out, hidden), state

    @classmethod
    def empty_state(cls, config, shape):
        local = (shape.batch, shape.window, config.num_key_value_heads, config.head_dim)
        heads = config.num_attention_heads
        previous = (shape.batch, config.num_key_value_heads, config.head_dim)
        shifts = ((jnp.zeros(previous, shape.dtype), jnp.zeros(previous, shape.dtype))
                  if config.forgetting_kv_shift else (None, None))
        return ForgettingCache(jnp.zeros(local, shape.dtype), jnp.zeros(local, shape.dtype),
                               jnp.zeros((shape.batch, shape.window, heads), jnp.float32),
                               jnp.zeros((shape.batch, heads), jnp.float32), *shifts)

    @classmethod
    def projection_parameters(cls, config):
        hidden = config.hidden_size
        extra = hidden * config.num_attention_heads  # fgate
        if config.forgetting_kv_shift:
            extra += 2 * hidden * config.num_key_value_heads
        if config.forgetting_output_gate:
            extra += hidden * hidden
        return super().projection_parameters(config) + extra

    # The family's own parameters.

    def gate_logits(self, hidden, features, name):
        """Float32 logits ``[B, L, features]`` of a gate with a bias (kernel
        ``N(0, initializer_range)``, bias 0, as the authors initialise their gates)."""
        dense = nn.Dense(features, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=nn.initializers.normal(self.config.initializer_range),
                         bias_init=nn.initializers.zeros, name=name)
        return dense(hidden).astype(jnp.float32)

    def log_forget(self, hidden):
        """``log f`` ``[B, L, H]`` float32."""
        log_f = jax.nn.log_sigmoid(self.gate_logits(hidden, self.config.num_attention_heads,
                                                    "fgate"))
        return with_logical_constraint(log_f, "batch", "length", "heads")

    def shift_kv(self, hidden, k, v, previous_k, previous_v):
        """Keys and values shifted towards the previous token's (``previous_*``: the token
        before the first of ``k``, ``v``)."""
        kv_heads = self.config.num_key_value_heads
        k = shift(k, previous_k, jax.nn.sigmoid(self.gate_logits(hidden, kv_heads, "kshift")))
        v = shift(v, previous_v, jax.nn.sigmoid(self.gate_logits(hidden, kv_heads, "vshift")))
        return k, v

    def normalise_qk(self, q, k):
        if not self.config.forgetting_qk_norm:
            return q, k
        return self.head_norm("q_norm")(q), self.head_norm("k_norm")(k)

    def output(self, attended, hidden):
        """``attended [B, L, H, D]``, normed and gated with ``forgetting_output_gate``, back
        to the residual width."""
        if self.config.forgetting_output_gate:
            gate = jax.nn.sigmoid(self.dense(self.config.hidden_size, "ogate")(hidden)
                                  .astype(jnp.float32)).reshape(attended.shape)
            normed = self.head_norm("o_norm")(attended).astype(jnp.float32)
            attended = (normed * gate).astype(attended.dtype)
        return self.project_out(attended)

    def head_norm(self, name):
        return RMSNorm(HEAD_NORM_EPS, self.dtype, self.param_dtype, name=name)


def default_forget_gate_bias(max_sequence_length):
    """The uptraining forget-gate bias ``B``: the smallest tenth above the ``B`` whose total
    decay over ``max_sequence_length`` tokens, ``length * softplus(-B)``, is
    :data:`UPTRAINING_TOTAL_DECAY`, so a converted model attends as the pretrained one did
    over its native context (14.6 for 2048 tokens)."""
    exact = -math.log(math.expm1(UPTRAINING_TOTAL_DECAY / max_sequence_length))
    return math.ceil(exact * 10) / 10


def uptraining_gates(config, forget_gate_bias, kv_shift_bias=UPTRAINING_KV_SHIFT_BIAS):
    """The parameters a FoX layer adds to a pretrained softmax layer (``{name: {"kernel",
    "bias"}}`` float32 arrays), set so that it computes what that layer did: forget gates
    fixed at ``sigmoid(forget_gate_bias)`` (weight 0) and, with ``forgetting_kv_shift``, shift
    gates at ``sigmoid(kv_shift_bias)`` (weight 0)."""
    if config.forgetting_qk_norm or config.forgetting_output_gate:
        raise ValueError(f"forgetting_qk_norm / forgetting_output_gate: {NOT_UPTRAINABLE}")
    hidden, heads = config.hidden_size, config.num_attention_heads
    gates = {"fgate": (heads, forget_gate_bias)}
    if config.forgetting_kv_shift:
        gates.update(kshift=(config.num_key_value_heads, kv_shift_bias),
                     vshift=(config.num_key_value_heads, kv_shift_bias))
    return {name: {"kernel": np.zeros((hidden, features), np.float32),
                   "bias": np.full((features,), bias, np.float32)}
            for name, (features, bias) in gates.items()}
