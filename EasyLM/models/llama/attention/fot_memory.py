"""FoT memory layers (family ``fot_memory``): the layers of ``mem_layers``.

Training with ``cross_batch_range > 0`` runs cross-batch attention (FOT_SPEC 2): each row also
attends to the keys and values of the previous rows, through one of the variants of
:mod:`FoT.cross_batch` (reference, blockwise, Pallas kernel; :func:`resolve_cross_batch_
implementation`) with every device attending for its own rows (:mod:`FoT.sharded`).  With
``cross_batch_range == 0`` a memory layer is an ordinary causal layer.

Windowed inference (FOT_SPEC 5) keeps, besides the local window, a memory of the evicted
windows' keys and values (:class:`~FoT.inference.LayerCache` with ``mem_k``/``mem_v``); the
piece's queries attend over memory and window in one softmax.  Without a memory (inference
with ``use_memory=False``) the layer runs as an ordinary local one.
"""
import jax
import jax.numpy as jnp

from EasyLM.models.llama.attention.softmax import SoftmaxAttention, enter_window, padding_bias
from EasyLM.models.llama.rope import apply_rope, apply_rope_as_first
from FoT.cross_batch import FALLBACK_ORDER, attend, first_supported
from FoT.cross_batch import check_supported as check_cross_batch_support
from FoT.inference import LayerCache
from FoT.sharded import sharded_cross_batch


def resolve_cross_batch_implementation(config, length, dtype=jnp.float32, padded=False):
    """The cross-batch variant a memory layer runs on rows of ``length`` tokens in ``dtype``
    (``padded``: with a padding mask).

    ``auto`` walks :data:`~FoT.cross_batch.FALLBACK_ORDER` (on CPU only the reference;
    ``scan_cross_batch`` puts blockwise first) and takes the first variant whose declaration,
    :func:`FoT.cross_batch.check_supported`, accepts the inputs.  An explicit choice is kept;
    only padded rows, which the kernel cannot take, move it down the same order.
    """
    configured = config.cross_batch_implementation
    if configured == "auto":
        order = FALLBACK_ORDER if jax.default_backend() in ("gpu", "tpu") else ("reference",)
        if config.scan_cross_batch:
            order = ("blockwise",) + tuple(name for name in order if name != "blockwise")
    elif padded:
        order = FALLBACK_ORDER[FALLBACK_ORDER.index(configured):]
    else:
        return configured
    return first_supported(order, lambda name: check_cross_batch_support(
        name, length=length, head_dim=config.head_dim, dtype=dtype, padded=padded,
        block_size=config.cross_batch_block_size))


class FoTMemoryAttention(SoftmaxAttention):
    """A memory layer: cross-batch attention in training, memory + window in inference."""
    # Memory layers run unrolled, each on its own, under ``scan_layers`` too.
    scannable = False

    def attend(self, hidden, position_ids, attention_mask):
        cfg = self.config
        if cfg.cross_batch_range == 0:
            return super().attend(hidden, position_ids, attention_mask)
        q, k, v = self.project_qkv(hidden)
        inv_freq = self.inverse_frequencies()
        q_rot = apply_rope(q, position_ids, inv_freq)
        k_rot = apply_rope(k, position_ids, inv_freq)
        bias = padding_bias(attention_mask, hidden.shape[1])
        k_mem = apply_rope_as_first(k, position_ids, inv_freq)
        implementation = resolve_cross_batch_implementation(cfg, q.shape[1], q.dtype,
                                                            padded=bias is not None)
        # Each device attends for its own rows (FoT.sharded); flip_sharding_in_cross_batch
        # asks for the all-to-all over heads instead of the halo of neighbouring rows.
        out = sharded_cross_batch(q_rot, k_rot, k_mem, v, cross_batch_range=cfg.cross_batch_range,
                                  cross_batch_stepping=cfg.cross_batch_stepping,
                                  dataset_packing=cfg.dataset_packing, local_bias=bias,
                                  implementation=implementation,
                                  block_size=cfg.cross_batch_block_size,
                                  layout="heads" if cfg.flip_sharding_in_cross_batch else "auto")
        return self.project_out(out)

    def attend_window(self, hidden, position_ids, state, piece):
        """FOT_SPEC 5 for one layer: the piece's queries over the local window (after the
        planned eviction and the piece's entry) and the memory, in the same softmax."""
        if not state.has_memory:
            return super().attend_window(hidden, position_ids, state, piece)
        q, k, v = self.project_qkv(hidden)
        inv_freq = self.inverse_frequencies()
        positional = piece.mem_positionals
        q, keys, values, visible, key_positions, entered = enter_window(
            q, k, v, position_ids, state, piece, inv_freq, positional)
        # An eviction takes the whole window as it was before the piece.
        evicted_k = state.local_k
        if positional:
            evicted_k = apply_rope_as_first(evicted_k, key_positions, inv_freq)
        mem_k = piece.remember(state.mem_k, evicted_k)
        mem_v = piece.remember(state.mem_v, state.local_v)
        batch, length = q.shape[:2]
        capacity = mem_k.shape[1]
        keys = jnp.concatenate([mem_k.astype(keys.dtype), keys], axis=1)
        values = jnp.concatenate([mem_v.astype(values.dtype), values], axis=1)
        memory_visible = jnp.broadcast_to(piece.memory_visible(capacity)[:, None],
                                          (batch, length, capacity))
        visible = jnp.concatenate([memory_visible, visible], axis=2)
        out = attend(q, keys, values, visible, chunks=piece.attention_grouping)
        return self.project_out(out), entered._replace(mem_k=mem_k, mem_v=mem_v)

    @classmethod
    def empty_state(cls, config, shape):
        local = super().empty_state(config, shape)
        if shape.memory is None:
            return local
        memory = (shape.batch, shape.memory, config.num_key_value_heads, config.head_dim)
        return LayerCache(local.local_k, local.local_v, jnp.zeros(memory, shape.memory_dtype),
                          jnp.zeros(memory, shape.memory_dtype))
