"""The tiling plan shared by both lowerings of the fused cross-batch attention kernel.

Both the GPU (Triton) and the TPU (Mosaic) lowering walk the same tiles: a program owns one
query tile (forward, dq) or one key tile (dk/dv) of one batch row and head, and visits the
key (or query) tiles it interacts with.  Everything that decides *which* tiles those are
lives here, once: block sizes and their validation, the slot table ``n_b``, the neighbour
row ``(b - c) mod B`` feeding slot ``c``, the rows that read a given row's memory keys in
the backward pass, and the causal ranges of the local slot.  The per-tile maths is in
:mod:`FoT.kernels.tiles`.

Scores are kept in base 2: ``s2 = (q . k) * log2(e) / sqrt(D)``, so that the softmax uses
``exp2``; the saved log-sum-exp is ``log2(sum(exp2(s2)))`` in the same units.
"""
import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from FoT.kernels.indices import index_div, index_min, index_rem
from FoT.slots import allowed_slots

SUPPORTED_HEAD_DIMS = (64, 128)
# Inputs of 16 or 32 bits; the score tiles are float32 whatever they are.
SUPPORTED_ITEMSIZES = (2, 4)
LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes.  The forward and dq kernels hold a ``block_q`` query tile and stream
    ``block_k`` key tiles; the dk/dv kernel holds a ``block_k_dkv`` key tile and streams
    ``block_q_dkv`` query tiles."""
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int


@dataclasses.dataclass(frozen=True)
class TilingPlan:
    """Static description of one kernel call; hashable so it can key jit caches."""
    batch: int
    length: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    cross_batch_range: int
    allowed: tuple  # n_b per row (slot 0 included), from slots.allowed_slots
    blocks: BlockSizes

    @property
    def group(self):
        """Query heads per key/value head: query head ``h`` reads kv head ``h // group``."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_slots(self):
        return self.cross_batch_range + 1

    @property
    def score_scale(self):
        """Multiplier taking ``q . k`` to base-2 scores."""
        return LOG2_E / math.sqrt(self.head_dim)

    @property
    def grad_scale(self):
        return 1.0 / math.sqrt(self.head_dim)

    def num_blocks(self, block):
        return self.length // block

    # --- index arithmetic (works on Python ints and traced int32 scalars) ---

    def kv_head(self, head):
        """Key/value head read by query ``head`` (:mod:`FoT.kernels.indices`: indices are
        non-negative, and Mosaic lowers ``//`` through a sign test)."""
        return index_div(head, self.group)

    def neighbour_row(self, row, slot):
        """Row whose memory keys/values fill ``slot`` of ``row``: ``(row - slot) mod B``."""
        # Adding a multiple of B that is >= C keeps the dividend non-negative, so rem is mod.
        wrap = self.batch * -(-self.cross_batch_range // self.batch)
        return index_rem(row - slot + wrap, self.batch)

    def reader_row(self, row, slot):
        """Row reading ``row``'s memory keys/values through its ``slot``: ``(row + slot) mod B``."""
        return index_rem(row + slot, self.batch)

    def slot_table(self):
        """``n_b`` as int32, padded to a power-of-two length."""
        return pad_pow2(np.asarray(self.allowed, np.int32))

    def reader_slots(self):
        """``[B, C]`` table and ``[B]`` counts: for memory row ``r``, the slots ``c >= 1`` through
        which row ``(r + c) mod B`` reads it (``c < n_{(r+c) mod B}``), in increasing order."""
        width = max(self.cross_batch_range, 1)
        table = np.zeros((self.batch, width), np.int32)
        counts = np.zeros(self.batch, np.int32)
        for r in range(self.batch):
            slots = [c for c in range(1, self.num_slots)
                     if c < self.allowed[(r + c) % self.batch]]
            table[r, :len(slots)] = slots
            counts[r] = len(slots)
        return table, counts

    def last_reader_slot(self):
        """``[B, C + 1]``: for memory row ``r`` and slot ``c``, the largest ``c' <= c`` that is
        either the local slot 0 or a reader slot of ``r``.  A grid that steps through every slot
        uses it to skip slots nobody reads while pointing at an already fetched tile."""
        table, counts = self.reader_slots()
        last = np.zeros((self.batch, self.num_slots), np.int32)
        for r in range(self.batch):
            readers = set(table[r, :counts[r]].tolist())
            for c in range(1, self.num_slots):
                last[r, c] = c if c in readers else last[r, c - 1]
        return last

    # --- causal ranges of the local slot ---

    @staticmethod
    def local_key_range(q_block, block_q, block_k):
        """For query tile ``q_block``: key tiles ``[0, full_end)`` are entirely visible and
        ``[full_end, masked_end)`` straddle the diagonal; later ones are skipped."""
        first_query = q_block * block_q
        full_end = index_div(first_query + 1, block_k)
        masked_end = index_div(first_query + block_q + block_k - 1, block_k)
        return full_end, masked_end

    def local_query_range(self, k_block, block_q, block_k):
        """For key tile ``k_block``: query tiles before ``masked_start`` see none of it,
        ``[masked_start, full_start)`` straddle the diagonal, later ones see all of it."""
        first_key = k_block * block_k
        masked_start = index_div(first_key, block_q)
        full_start = index_div(first_key + block_k - 1 + block_q - 1, block_q)
        return masked_start, index_min(full_start, self.num_blocks(block_q))

    @staticmethod
    def causal_mask(q_block, k_block, block_q, block_k, key_major=False):
        """Which (query, key) pairs of two tiles are visible; ``[block_q, block_k]``, or
        ``[block_k, block_q]`` when ``key_major``."""
        shape = (block_k, block_q) if key_major else (block_q, block_k)
        q_axis, k_axis = (1, 0) if key_major else (0, 1)
        queries = q_block * block_q + lax.broadcasted_iota(np.int32, shape, q_axis)
        keys = k_block * block_k + lax.broadcasted_iota(np.int32, shape, k_axis)
        return queries >= keys


def pad_pow2(values):
    """Zero-pads a 1-D table to a power-of-two length (Triton tensors must have one)."""
    size = 1 << max(len(values) - 1, 0).bit_length()
    return np.concatenate([values, np.zeros(size - len(values), values.dtype)])


# The kernel's limits.  Both checks return None or raise NotImplementedError saying why, so
# that a caller able to run another variant can catch it and fall back.

def check_inputs(head_dim, dtype, kernel="the cross-batch kernel"):
    """Whether ``kernel`` (this one, or another sharing its tile maths) takes heads of
    ``head_dim`` in ``dtype``."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(f"{kernel} supports head dims {SUPPORTED_HEAD_DIMS}, got "
                                  f"{head_dim}; use implementation='blockwise' for other sizes")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize not in SUPPORTED_ITEMSIZES:
        raise NotImplementedError(f"{kernel} takes 16- or 32-bit floats, got {dtype}")


def check_blocks(length, blocks, kernel="the cross-batch kernel"):
    """Whether ``blocks`` tiles rows of ``length`` tokens."""
    for name, size in dataclasses.asdict(blocks).items():
        if size < 16 or size & (size - 1):
            raise NotImplementedError(f"{name}={size} must be a power of two >= 16")
        if length % size != 0:
            raise NotImplementedError(f"{kernel} needs the sequence length ({length}) to be a "
                                      f"multiple of {name}={size}; pad the sequence or pick a "
                                      f"block size dividing it")


def make_plan(q, k_loc, k_mem, v, *, cross_batch_range, cross_batch_stepping, dataset_packing,
              blocks):
    """Validates shapes and block sizes and returns the plan; every error names the fix."""
    if q.ndim != 4 or k_loc.shape != k_mem.shape or k_loc.shape != v.shape:
        raise ValueError(f"expected q [B, L, H, D] and k_loc, k_mem, v [B, L, KV, D] of one "
                         f"shape, got {q.shape}, {k_loc.shape}, {k_mem.shape}, {v.shape}")
    batch, length, num_heads, head_dim = q.shape
    num_kv = k_loc.shape[2]
    if k_loc.shape[:2] != (batch, length) or k_loc.shape[3] != head_dim:
        raise ValueError(f"q {q.shape} and k {k_loc.shape} disagree in batch, length or head dim")
    if num_heads % num_kv != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv} kv heads")
    if len({q.dtype, k_loc.dtype, k_mem.dtype, v.dtype}) != 1:
        raise ValueError(f"q, k_loc, k_mem and v must share one dtype, got {q.dtype}, "
                         f"{k_loc.dtype}, {k_mem.dtype}, {v.dtype}")
    check_inputs(head_dim, q.dtype)
    check_blocks(length, blocks)
    n = allowed_slots(batch, cross_batch_range, dataset_packing, cross_batch_stepping)
    return TilingPlan(batch, length, num_heads, num_kv, head_dim, cross_batch_range,
                      tuple(int(x) for x in n), blocks)
