"""Cross-batch attention: the training-mode attention of a FoT memory layer (FOT_SPEC section 2).

Row ``b`` of a batch attends jointly (one softmax) to its own causal local context and to the
keys/values of the ``C`` previous rows ``(b - c) mod B``, whose keys carry RoPE as if they were
at the first position of their row.  The slot-mask table decides how many of those slots a
row may use.

Three implementations share one interface (:func:`cross_batch_core`):

* ``"reference"`` gathers ``C + 1`` copies of K/V and materialises the
  ``[B, H, L, (C + 1) L]`` scores.  It is the oracle every other variant is tested against.
* ``"blockwise"`` streams key blocks of all slots through an online softmax under
  ``lax.scan`` (rematerialised in the backward pass), so memory is ``O(B H L block)``
  whatever ``C`` is.
* ``"pallas"`` is the fused kernel of :mod:`FoT.kernels`, which reads neighbouring rows'
  keys/values in place.

:func:`check_supported` is each variant's declaration of the inputs it runs, and
:data:`FALLBACK_ORDER` the order in which a caller falls back from one to the next.
:func:`attend` is the one spelling of softmax attention that the reference variant and the
windowed inference of :mod:`FoT.inference` share.  The slot table is in :mod:`FoT.slots`.

:func:`cross_batch_attention` keeps the call shape of the original LongLLaMA FoT code
(un-rotated q/k plus RoPE callbacks and an additive local bias).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from FoT import kernels
from FoT.slots import allowed_slots, slot_sources

IMPLEMENTATIONS = ("reference", "blockwise", "pallas")
# Fastest first.  A caller choosing automatically takes the first variant whose
# check_supported accepts its inputs; the reference accepts everything.
FALLBACK_ORDER = ("pallas", "blockwise", "reference")
# The original code masks with -1e6: large enough that exp() underflows to exactly zero in
# float32, small enough that adding it to a finite bias never overflows.
MASK_VALUE = -1e6
_KERNEL_TAKES_NO_BIAS = ("the pallas cross-batch kernel applies the causal mask itself and "
                         "takes no local_bias; use implementation='blockwise' for padded inputs")


def check_supported(implementation, *, length, head_dim, dtype, padded=False, block_size=512):
    """Whether ``implementation`` runs rows of ``length`` tokens with heads of ``head_dim``
    in ``dtype`` (``padded``: with a ``local_bias``) on this platform: returns None, else
    raises ``NotImplementedError`` saying why.  The kernel counts as supported only where it
    compiles (GPU, TPU), not in the interpreter."""
    if implementation == "pallas":
        if padded:
            raise NotImplementedError(_KERNEL_TAKES_NO_BIAS)
        kernels.check_supported(length, head_dim, dtype)
    elif implementation == "blockwise":
        _check_blockwise(length, block_size)
    elif implementation != "reference":
        raise ValueError(f"unknown cross-batch implementation {implementation!r}; "
                         f"choose one of {IMPLEMENTATIONS}")


def first_supported(order, check):
    """The first name of a fallback ``order`` that ``check(name)`` accepts (returns instead of
    raising ``NotImplementedError``); the last name, which must run every input, otherwise.
    Forgetting attention's variants fall back the same way."""
    for name in order[:-1]:
        try:
            check(name)
        except NotImplementedError:
            continue
        return name
    return order[-1]


def _check_blockwise(length, block_size):
    if length % min(block_size, length) != 0:
        raise NotImplementedError(f"blockwise cross-batch needs the sequence length ({length}) "
                                  f"to be a multiple of its block size ({block_size})")


def _check_shapes(q, k_loc, k_mem, v):
    if q.ndim != 4 or k_loc.shape != k_mem.shape or k_loc.shape != v.shape:
        raise ValueError(f"expected q [B, L, H, D] and k_loc, k_mem, v [B, L, KV, D] of one "
                         f"shape, got {q.shape}, {k_loc.shape}, {k_mem.shape}, {v.shape}")
    if q.shape[:2] != k_loc.shape[:2] or q.shape[3] != k_loc.shape[3]:
        raise ValueError(f"q {q.shape} and k {k_loc.shape} disagree in batch, length or head dim")
    if q.shape[2] % k_loc.shape[2] != 0:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of "
                         f"{k_loc.shape[2]} key/value heads")


def cross_batch_core(q, k_loc, k_mem, v, *, cross_batch_range, cross_batch_stepping=False,
                     dataset_packing=1, local_bias=None, implementation="reference",
                     mask_value=MASK_VALUE, block_size=512, precision=None, **kernel_options):
    """Cross-batch attention on already-rotated inputs.

    Args:
      q: ``[B, L, H, D]`` queries, RoPE at their own positions.
      k_loc: ``[B, L, KV, D]`` keys, RoPE at their own positions (the row's local context).
      k_mem: ``[B, L, KV, D]`` the same keys rotated as if at the first position of the row
        (what other rows see).
      v: ``[B, L, KV, D]`` values.
      local_bias: optional additive ``[B or 1, 1, L, L]`` bias for the local slot; ``None``
        means the plain causal mask.
      implementation: ``"reference"``, ``"blockwise"`` or ``"pallas"``.
    Returns ``[B, L, H, D]`` in ``q.dtype``.
    """
    _check_shapes(q, k_loc, k_mem, v)
    batch_size = q.shape[0]
    n_slots = allowed_slots(batch_size, cross_batch_range, dataset_packing, cross_batch_stepping)
    if implementation == "reference":
        return _reference(q, k_loc, k_mem, v, cross_batch_range, n_slots, local_bias,
                          mask_value, precision)
    if implementation == "blockwise":
        return _blockwise(q, k_loc, k_mem, v, cross_batch_range, n_slots, local_bias,
                          mask_value, block_size, precision)
    if implementation == "pallas":
        if local_bias is not None:
            raise NotImplementedError(_KERNEL_TAKES_NO_BIAS)
        return kernels.flash_cross_batch(q, k_loc, k_mem, v, cross_batch_range=cross_batch_range,
                                 cross_batch_stepping=cross_batch_stepping,
                                 dataset_packing=dataset_packing, **kernel_options)
    raise ValueError(f"unknown cross-batch implementation {implementation!r}; "
                     f"choose one of {IMPLEMENTATIONS}")


def _group(q, num_kv_heads):
    b, l, h, d = q.shape
    return q.reshape(b, l, num_kv_heads, h // num_kv_heads, d)


def _causal_allowed(length, key_offset=0, key_len=None):
    key_len = length if key_len is None else key_len
    return (jnp.arange(length)[:, None] >= key_offset + jnp.arange(key_len)[None, :])


def _reference(q, k_loc, k_mem, v, cross_batch_range, n_slots, local_bias, mask_value,
               precision):
    batch_size, length = q.shape[:2]
    num_slots = cross_batch_range + 1
    # Slot 0 is the row itself: no gather, so that a sharded batch (C = 0 in ordinary layers,
    # or one device's rows) partitions without collecting other rows.
    keys, values = k_loc[:, None], v[:, None]  # [B, S, L, KV, D]
    if cross_batch_range > 0:
        others = slot_sources(batch_size, cross_batch_range)[:, 1:]
        keys = jnp.concatenate([keys, k_mem[others]], axis=1)
        values = jnp.concatenate([values, v[others]], axis=1)
    flat = (batch_size, num_slots * length) + k_loc.shape[2:]
    # Within a slot: the local slot is causal (or left to the bias), the others all visible.
    local = _causal_allowed(length) if local_bias is None else jnp.ones((length, length), bool)
    within = jnp.ones((num_slots, length, length), bool).at[0].set(local)
    slot_ok = np.arange(num_slots)[None, :] < np.asarray(n_slots)[:, None]  # [B, S]
    visible = (slot_ok[:, None, :, None] & jnp.swapaxes(within, 0, 1)[None]).reshape(
        batch_size, length, num_slots * length)
    bias = None
    if local_bias is not None:
        local_bias = local_bias[:, 0].astype(jnp.float32)
        bias = jnp.concatenate([local_bias, jnp.zeros(local_bias.shape[:2] + (
            cross_batch_range * length,), jnp.float32)], axis=-1)
    return attend(q, keys.reshape(flat), values.reshape(flat), visible, bias=bias,
                  mask_value=mask_value, precision=precision)


def attend(q, keys, values, visible, *, bias=None, decay=None, chunks=None,
           mask_value=MASK_VALUE, precision=None):
    """Softmax attention of ``q [B, n, H, D]`` over ``keys, values [B, S, KV, D]`` (query
    head ``h`` reads key head ``h // (H / KV)``): one float32 softmax per query.

    ``visible`` (bool, broadcastable to ``[B, n, S]``) says which keys each query sees; the
    others score ``mask_value``.  ``bias`` (broadcastable to ``[B, n, S]``) is added to the
    scores before that, and so is, per head, ``decay = (query_c [B, n, H], key_c [B, S, H])``
    (float32): ``query_c[b, i, h] - key_c[b, j, h]``, forgetting attention's decay (the
    cumulative log forget gates of query and key), formed per block of queries so that no
    ``[B, H, n, S]`` bias is held.  ``chunks = (heads, queries)`` computes that many heads and
    queries at a time, bounding the scores' memory (FOT_SPEC 5's ``attention_grouping``).
    Returns ``[B, n, H, D]`` in ``q.dtype``.
    """
    batch, length, num_heads, head_dim = q.shape
    group = num_heads // keys.shape[2]
    head_chunk, query_chunk = chunks or (num_heads, length)
    per_head = []
    for h0 in range(0, num_heads, head_chunk):
        h1 = min(h0 + head_chunk, num_heads)
        if h0 % group == 0 and h1 % group == 0:  # whole key heads: slices, no copies
            shared, kv = group, slice(h0 // group, h1 // group)
        else:
            shared, kv = 1, np.arange(h0, h1) // group
        k_h, v_h = keys[:, :, kv], values[:, :, kv]
        q_h = q[:, :, h0:h1].reshape(batch, length, (h1 - h0) // shared, shared, head_dim)

        def query_block(i0, size, q_h=q_h, k_h=k_h, v_h=v_h):
            q_c = lax.dynamic_slice_in_dim(q_h, i0, size, axis=1)
            scores = jnp.einsum("bqkgd,bskd->bkgqs", q_c, k_h, precision=precision,
                                preferred_element_type=jnp.float32) / math.sqrt(head_dim)
            if bias is not None:
                scores = scores + _query_rows(bias, i0, size)[:, None, None]
            if decay is not None:
                scores = scores + _head_decay(decay, h0, h1, shared, i0, size)
            scores = jnp.where(_query_rows(visible, i0, size)[:, None, None], scores,
                               mask_value)
            probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
            out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_h, precision=precision,
                             preferred_element_type=jnp.float32)
            return out.reshape(batch, size, h1 - h0, head_dim)

        whole = length // query_chunk * query_chunk
        parts = []
        if whole == query_chunk:
            parts.append(query_block(0, query_chunk))
        elif whole:
            # One block after another (lax.map): independent blocks written as a Python
            # loop may all be scheduled at once, and the scores' memory is then not bounded.
            blocks = lax.map(lambda i0: query_block(i0, query_chunk),
                             jnp.arange(0, whole, query_chunk))
            parts.append(jnp.moveaxis(blocks, 0, 1).reshape(batch, whole, h1 - h0, head_dim))
        if whole < length:
            parts.append(query_block(whole, length - whole))
        per_head.append(jnp.concatenate(parts, axis=1))
    return jnp.concatenate(per_head, axis=2).astype(q.dtype)


def _head_decay(decay, h0, h1, shared, start, size):
    """``[B, KV', G, size, S]`` (the scores' layout): ``query_c - key_c`` of heads ``h0:h1``,
    grouped ``shared`` query heads to a key head, for ``size`` queries from ``start``."""
    query_c, key_c = (c[:, :, h0:h1].astype(jnp.float32) for c in decay)
    query_c = lax.dynamic_slice_in_dim(query_c, start, size, axis=1)

    def heads_first(c):  # [B, T, heads] -> [B, KV', G, T]
        batch, length = c.shape[:2]
        return jnp.moveaxis(c.reshape(batch, length, (h1 - h0) // shared, shared), 1, 3)

    return heads_first(query_c)[..., :, None] - heads_first(key_c)[..., None, :]


def _query_rows(table, start, size):
    """``size`` rows from ``start`` (traced or not) of a ``[..., n or 1, S]`` table, as
    ``[B or 1, rows or 1, S]``."""
    table = jnp.asarray(table)
    table = table.reshape((1,) * (3 - table.ndim) + table.shape)
    return table if table.shape[1] == 1 else lax.dynamic_slice_in_dim(table, start, size, 1)


def _blockwise(q, k_loc, k_mem, v, cross_batch_range, n_slots, local_bias, mask_value,
               block_size, precision):
    batch_size, length, num_heads, head_dim = q.shape
    num_kv = k_loc.shape[2]
    _check_blockwise(length, block_size)
    block = min(block_size, length)
    blocks_per_slot = length // block
    qg = _group(q, num_kv)
    scale = 1.0 / math.sqrt(head_dim)
    n_slots = jnp.asarray(n_slots)
    rows = jnp.arange(batch_size)

    def attend_block(carry, step):
        m, l, acc = carry
        slot, blk = step // blocks_per_slot, step % blocks_per_slot
        start = blk * block
        src = (rows - slot) % batch_size
        k_own = lax.dynamic_slice_in_dim(k_loc, start, block, axis=1)
        k_other = jnp.take(lax.dynamic_slice_in_dim(k_mem, start, block, axis=1), src, axis=0)
        keys = jnp.where(slot == 0, k_own, k_other)
        values = jnp.take(lax.dynamic_slice_in_dim(v, start, block, axis=1), src, axis=0)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg, keys, precision=precision,
                       preferred_element_type=jnp.float32) * scale
        if local_bias is None:
            local_ok = _causal_allowed(length, start, block)[None, None, None]
            local_s = jnp.where(local_ok, s, mask_value)
        else:
            bias = lax.dynamic_slice_in_dim(local_bias, start, block, axis=3)
            local_s = s + bias.astype(jnp.float32)[:, :, None]
        other_s = jnp.where((slot < n_slots)[:, None, None, None, None], s, mask_value)
        s = jnp.where(slot == 0, local_s, other_s)
        m_new = jnp.maximum(m, s.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * correction + p.sum(axis=-1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), values, precision=precision,
                        preferred_element_type=jnp.float32)
        acc = acc * correction[..., None] + pv
        return (m_new, l, acc), None

    stats_shape = (batch_size, num_kv, num_heads // num_kv, length)
    init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(stats_shape + (head_dim,), jnp.float32))
    steps = jnp.arange((cross_batch_range + 1) * blocks_per_slot)
    (_, l, acc), _ = lax.scan(jax.checkpoint(attend_block), init, steps)
    out = acc / l[..., None]  # [B, KV, G, L, D]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch_size, length, num_heads, head_dim)
    return out.astype(q.dtype)


def cross_batch_attention(query, key, value, bias, min_value, cross_batch_range,
                          cross_batch_stepping, dataset_packing, pos_encode_as_first,
                          pos_encode, broadcast_dropout=True, dropout_rng=None,
                          dropout_rate=0.0, deterministic=False, dtype=None, precision=None,
                          implementation="reference", **options):
    """The original LongLLaMA FoT call shape, on un-rotated ``[B, L, H, D]`` inputs.

    ``pos_encode_as_first(xk=key)`` returns keys rotated as if first in their row;
    ``pos_encode(xq=query, xk=key)`` returns ``(query, key)`` rotated at their positions;
    ``bias`` ``[B, 1, L, L]`` is added to the local slot's scores (``None``: causal, as the
    pallas kernel requires); masked slots get ``min_value``.  Dropout is not supported (FoT
    training does not use it).
    """
    del broadcast_dropout, dropout_rng, deterministic
    if dropout_rate > 0.0:
        raise ValueError("cross_batch_attention does not implement attention dropout")
    if cross_batch_range <= 0:
        raise ValueError("cross_batch_attention needs cross_batch_range >= 1; with 0 a memory "
                         "layer is ordinary causal attention")
    if dtype is not None:
        query, key, value = (x.astype(dtype) for x in (query, key, value))
    k_mem = pos_encode_as_first(xk=key)
    q_loc, k_loc = pos_encode(xq=query, xk=key)
    return cross_batch_core(q_loc, k_loc, k_mem, value, cross_batch_range=cross_batch_range,
                            cross_batch_stepping=cross_batch_stepping,
                            dataset_packing=dataset_packing, local_bias=bias,
                            implementation=implementation, mask_value=min_value,
                            precision=precision, **options)
