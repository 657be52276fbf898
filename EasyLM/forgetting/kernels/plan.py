"""The tiling plan shared by both lowerings of the fused forgetting attention kernel.

A program owns one query tile (forward, dq) of one row and query head, or one key tile (dk/dv)
of one row and key/value head, and visits the causal tiles it interacts with: key tiles from
the skip table's start to the diagonal, or query tiles from the diagonal to the skip table's
end (:mod:`EasyLM.forgetting.skipping`).  Tiles above the diagonal are never visited.  The
skip tables are kept at one granularity, ``skip_block`` (the largest tile), which every tile
divides, so that the forward and both backward kernels leave out the same (query, key) pairs
whatever their own tiles.

Scores are in base 2, as in the cross-batch kernel (:mod:`FoT.kernels.plan`), whose tile
sizes, causal ranges and masks this plan reuses:
``s2 = q . k * log2(e) / sqrt(D) + (c_i - c_j) * log2(e)``.
"""
import dataclasses
import math

import jax.numpy as jnp

from FoT.kernels.indices import index_div
from FoT.kernels.plan import LOG2_E, BlockSizes, TilingPlan
from FoT.kernels.plan import check_blocks as shared_check_blocks
from FoT.kernels.plan import check_inputs as shared_check_inputs


@dataclasses.dataclass(frozen=True)
class ForgettingPlan:
    """Static description of one kernel call; hashable so it can key jit caches."""
    batch: int
    length: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    blocks: BlockSizes

    @property
    def group(self):
        """Query heads per key/value head: query head ``h`` reads kv head ``h // group``."""
        return self.num_heads // self.num_kv_heads

    @property
    def padded_group(self):
        """``group`` rounded up to a power of two (the width of the dk/dv kernel's per-head
        gate-gradient tile; Triton tensors need power-of-two sizes)."""
        return 1 << (self.group - 1).bit_length()

    @property
    def score_scale(self):
        """Multiplier taking ``q . k`` to base-2 scores."""
        return LOG2_E / math.sqrt(self.head_dim)

    @property
    def grad_scale(self):
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def skip_block(self):
        """Tokens per block of the skip tables: the largest tile, so that every tile lies in
        one skip block."""
        return max(dataclasses.astuple(self.blocks))

    def num_blocks(self, block):
        return self.length // block

    def kv_head(self, head):
        """Key/value head read by query ``head`` (:mod:`FoT.kernels.indices`: Mosaic lowers ``//``
        through a sign test)."""
        return index_div(head, self.group)

    def table_index(self, row, head, position):
        """Index into a flattened ``[B, H, L // skip_block]`` skip table of the skip block
        holding token ``position``."""
        blocks = self.num_blocks(self.skip_block)
        return (row * self.num_heads + head) * blocks + index_div(position, self.skip_block)

    # --- causal ranges (the cross-batch kernel's local slot) ---

    def key_range(self, q_block, block_q, block_k, first_skip_block):
        """For query tile ``q_block``: key tiles ``[start, full_end)`` are visited whole and
        ``[full_end, masked_end)`` straddle the diagonal; ``start`` is the skip table's first
        visited skip block, in key tiles."""
        full_end, masked_end = TilingPlan.local_key_range(q_block, block_q, block_k)
        return first_skip_block * (self.skip_block // block_k), full_end, masked_end

    def query_range(self, k_block, block_q, block_k, end_skip_block):
        """For key tile ``k_block``: query tiles ``[masked_start, full_start)`` straddle the
        diagonal and ``[full_start, end)`` see all of it; ``end`` is the skip table's end, in
        query tiles."""
        first_key = k_block * block_k
        masked_start = index_div(first_key, block_q)
        full_start = index_div(first_key + block_k - 1 + block_q - 1, block_q)
        return masked_start, full_start, end_skip_block * (self.skip_block // block_q)

    causal_mask = staticmethod(TilingPlan.causal_mask)


# The kernel's limits: the cross-batch kernel's (same tile maths), in this kernel's name.
KERNEL = "the forgetting attention kernel"


def check_inputs(head_dim, dtype):
    """Whether the kernel takes heads of ``head_dim`` in ``dtype``: None, or
    ``NotImplementedError`` saying why, so that a caller can fall back to another variant."""
    shared_check_inputs(head_dim, dtype, KERNEL)


def check_blocks(length, blocks):
    """Whether ``blocks`` tiles rows of ``length`` tokens (as :func:`check_inputs`)."""
    shared_check_blocks(length, blocks, KERNEL)


def make_plan(q, k, v, c, blocks):
    """Validates shapes and block sizes and returns the plan; every error names the fix."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, L, H, D] and k, v [B, L, KV, D] of one shape, got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    batch, length, num_heads, head_dim = q.shape
    if k.shape[:2] != (batch, length) or k.shape[3] != head_dim:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree in batch, length or head dim")
    if num_heads % k.shape[2]:
        raise ValueError(f"{num_heads} query heads are not a multiple of {k.shape[2]} "
                         f"key/value heads")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if c.shape != q.shape[:3] or c.dtype != jnp.float32:
        raise ValueError(f"c must be the float32 cumulative log gates [B, L, H] = {q.shape[:3]} "
                         f"(cumulative_log_forget(log_f)), got {c.dtype} {c.shape}")
    check_inputs(head_dim, q.dtype)
    check_blocks(length, blocks)
    return ForgettingPlan(batch, length, num_heads, k.shape[2], head_dim, blocks)
