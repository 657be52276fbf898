"""FoT memory in windowed inference (FOT_SPEC 5): what every attention layer keeps between
pieces of a long input and how a piece moves tokens through it, independent of the model.

The input is consumed in pieces that :func:`~FoT.hf.windows_fot_llama.plan_windows` cuts
(shared with the PyTorch model), under the window rule of :class:`MemoryOptions`.  Every layer
keeps a local window of un-rotated keys and values, sized for the most tokens the rule keeps
local (:class:`LayerCache`).  Before a piece enters, the plan may evict the whole window; a
memory layer moves the evicted entries into its memory, keys rotated as if at the window's
first position.  Queries and local keys take positions relative to the window's start, which
a token keeps for as long as it stays local.  A :class:`Piece` holds what every layer needs to
know about the current piece, per batch row: rows of a batch hold streams of their own
lengths, each at its own place in its plan.

The model's attention families (:mod:`EasyLM.models.llama.attention`) apply these steps
between their own projections; :mod:`EasyLM.models.llama.windowed_lm` drives the model piece by
piece.
"""
import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import jax.numpy as jnp

from FoT.hf.windows_fot_llama import check_rule, local_capacity


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """How to run the windowed inference (the PyTorch config fields of the same names)."""
    last_context_length: int
    use_memory: bool = True
    mem_positionals: bool = True
    mem_dtype: Optional[str] = None  # e.g. "bfloat16"; None: the activation dtype
    attention_grouping: Optional[Tuple[int, int]] = None  # (heads, queries) in memory layers
    dtype: str = "float32"  # activations
    window_rule: str = "aligned"  # FoT.hf.windows_fot_llama: "aligned" or "longllama"
    # "longllama": most tokens in the local window (the original's max_position_embeddings);
    # None: last_context_length
    local_window_limit: Optional[int] = None

    def __post_init__(self):
        if self.last_context_length < 1:
            raise ValueError(f"last_context_length must be >= 1, got {self.last_context_length}")
        grouping = self.attention_grouping
        if grouping is not None and (len(grouping) != 2 or min(grouping) < 1):
            raise ValueError(f"attention_grouping must be (heads, queries) >= 1, got {grouping}")
        check_rule(self.window_rule)

    @property
    def local_capacity(self):
        """Size of the local window buffers: the most tokens the rule keeps local."""
        return local_capacity(self.last_context_length, self.window_rule, self.local_window_limit)


class LayerCache(NamedTuple):
    """One attention layer's state: the local window's keys and values ``[B, W, KV, D]``
    (un-rotated, at positions from 0 at the window's first entry) and, in a memory layer,
    the memory's ``[B, M, KV, D]`` in the memory dtype (``None`` elsewhere).  Entries past
    each row's valid ones hold stale values that no query sees."""
    local_k: Any
    local_v: Any
    mem_k: Any = None
    mem_v: Any = None

    @property
    def has_memory(self):
        return self.mem_k is not None

    @property
    def memory_capacity(self):
        """Memory entries the buffers hold (0 without a memory)."""
        return self.mem_k.shape[1] if self.has_memory else 0

    def with_memory_capacity(self, capacity):
        """The cache with its memory buffers grown to ``capacity`` entries (new entries are
        zeros, past every row's valid ones); a cache without a memory is returned as is."""
        if capacity <= self.memory_capacity or not self.has_memory:
            return self
        extra = ((0, 0), (0, capacity - self.memory_capacity), (0, 0), (0, 0))
        return self._replace(mem_k=jnp.pad(self.mem_k, extra), mem_v=jnp.pad(self.mem_v, extra))


class Piece(NamedTuple):
    """The current piece's place in every row's stream, the same for every layer: traced
    int32 vectors ``[B]`` (valid entries of the row's window and memory, real tokens at the
    front of the row's piece, and the window entries that leave it before the piece enters:
    all or none, as planned), a traced scalar (how many of the newest memory entries memory
    layers may read), the window buffers' size and the static options of memory layers."""
    local_length: Any
    memory_length: Any
    num_valid: Any
    evict: Any
    memory_limit: Any
    window: int
    mem_positionals: bool = True
    attention_grouping: Optional[Tuple[int, int]] = None

    @property
    def kept(self):
        """``[B]``: window entries that stay (all or none)."""
        return self.local_length - self.evict

    def query_positions(self, batch, length):
        """``[B, n]``: the piece's positions, after the entries that stay in the window."""
        return jnp.broadcast_to(self.kept[:, None] + jnp.arange(length), (batch, length))

    def key_positions(self, batch):
        """``[B, W]``: the window's positions, from 0 at its first entry."""
        return jnp.broadcast_to(jnp.arange(self.window), (batch, self.window))

    def local_visible(self, length):
        """``[B, n, W]``: causal visibility of the window, after the piece entered, to the
        piece's queries."""
        queries = self.kept[:, None] + jnp.arange(length)
        return jnp.arange(self.window)[None, None, :] <= queries[:, :, None]

    def enter(self, window, new):
        """``window [B, W, ...]`` with each row's real entries of ``new [B, n, ...]`` written
        behind the entries that stay."""
        return _write(window, new, self.kept, self.num_valid)

    def remember(self, memory, evicted):
        """``memory [B, M, ...]`` with each row's first ``evict`` entries of ``evicted
        [B, W, ...]`` (the window before the piece) stored behind its valid entries."""
        return _write(memory, evicted.astype(memory.dtype), self.memory_length, self.evict)

    def memory_visible(self, capacity):
        """``[B, M]``: the memory entries valid after this piece's eviction, at most the newest
        ``memory_limit`` of them."""
        stored = jnp.arange(capacity)[None, :]
        end = (self.memory_length + self.evict)[:, None]
        return (stored < end) & (stored >= end - self.memory_limit)


def _write(buffer, values, start, count):
    """``buffer [B, S, ...]`` with ``values[b, :count[b]]`` at ``start[b]`` onwards.  The
    other values are aimed past the buffer and dropped, so no write moves or spills into
    valid entries, whatever the buffer's size."""
    offsets = jnp.arange(values.shape[1])[None, :]
    slots = jnp.where(offsets < count[:, None], start[:, None] + offsets, buffer.shape[1])
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values, mode="drop")
