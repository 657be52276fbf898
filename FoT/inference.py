"""FoT memory in windowed inference (FOT_SPEC 5): what every attention layer keeps between
pieces of a long input and how a piece moves tokens through it, independent of the model.

The input is consumed in pieces of at most ``W = last_context_length`` tokens
(:func:`~FoT.hf.windows_fot_llama.plan_windows`, shared with the PyTorch model).  Every layer
keeps a local window of ``W`` un-rotated keys and values (:class:`LayerCache`).  Before a piece
enters, the window's oldest ``evict`` entries leave it; a memory layer moves them into its
memory, keys rotated as if at the window's first position.  Queries and local keys take
positions relative to the window's start.  A :class:`Piece` holds what every layer needs to
know about the current piece.

The model's attention (``LLaMAAttention`` given a cache) applies these steps between its own
projections; :mod:`EasyLM.models.llama.windowed_lm` drives the model piece by piece.
"""
import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """How to run the windowed inference (the PyTorch config fields of the same names)."""
    last_context_length: int
    use_memory: bool = True
    mem_positionals: bool = True
    mem_dtype: Optional[str] = None  # e.g. "bfloat16"; None: the activation dtype
    attention_grouping: Optional[Tuple[int, int]] = None  # (heads, queries) in memory layers
    dtype: str = "float32"  # activations

    def __post_init__(self):
        if self.last_context_length < 1:
            raise ValueError(f"last_context_length must be >= 1, got {self.last_context_length}")
        grouping = self.attention_grouping
        if grouping is not None and (len(grouping) != 2 or min(grouping) < 1):
            raise ValueError(f"attention_grouping must be (heads, queries) >= 1, got {grouping}")


class LayerCache(NamedTuple):
    """One attention layer's state: the local window's keys and values ``[B, W, KV, D]``
    (un-rotated: their positions change as the window slides) and, in a memory layer, the
    memory's ``[B, M, KV, D]`` in the memory dtype (``None`` elsewhere).  Entries past the
    valid ones hold stale values that no query sees."""
    local_k: Any
    local_v: Any
    mem_k: Any = None
    mem_v: Any = None

    @property
    def has_memory(self):
        return self.mem_k is not None


class Piece(NamedTuple):
    """The current piece's place in the stream, the same for every layer: traced int32
    scalars (how many entries of the windows and memories are valid, how many of the piece's
    tokens are real, how many of the newest memory entries memory layers may read) and the
    static options of memory layers."""
    local_length: Any
    memory_length: Any
    num_valid: Any
    memory_limit: Any
    window: int
    mem_positionals: bool = True
    attention_grouping: Optional[Tuple[int, int]] = None

    @property
    def evict(self):
        """Oldest window entries that leave before this piece enters."""
        return jnp.maximum(0, self.local_length + self.num_valid - self.window)

    def query_positions(self, batch, length):
        """``[B, n]``: the piece's positions, after the entries that stay in the window."""
        kept = self.local_length - self.evict
        return jnp.broadcast_to(kept + jnp.arange(length), (batch, length))

    def key_positions(self, batch):
        """``[B, W]``: the window's positions, from 0 at its oldest entry."""
        return jnp.broadcast_to(jnp.arange(self.window), (batch, self.window))

    def local_visible(self, length):
        """``[n, W]``: causal visibility of the slid window to the piece's queries."""
        kept = self.local_length - self.evict
        return jnp.arange(self.window)[None, :] <= (kept + jnp.arange(length))[:, None]

    def slide(self, window, new):
        """``window [B, W, ...]`` after dropping its ``evict`` oldest entries and appending
        ``new [B, n, ...]`` behind the ones that stay."""
        padded = jnp.concatenate([window, jnp.zeros_like(new)], axis=1)
        padded = jax.lax.dynamic_update_slice_in_dim(padded, new, self.local_length, axis=1)
        return jax.lax.dynamic_slice_in_dim(padded, self.evict, self.window, axis=1)

    def remember(self, memory, evicted):
        """``memory [B, M, ...]`` with ``evicted [B, n, ...]`` stored behind its valid entries.
        Only the first ``evict`` of them are real; storing all ``n`` keeps shapes static (the
        rest lands past the valid entries)."""
        return jax.lax.dynamic_update_slice_in_dim(memory, evicted.astype(memory.dtype),
                                                   self.memory_length, axis=1)

    def memory_visible(self, capacity):
        """``[M]``: the memory entries valid after this piece's eviction, at most the newest
        ``memory_limit`` of them."""
        stored = jnp.arange(capacity)
        end = self.memory_length + self.evict
        return (stored < end) & (stored >= end - self.memory_limit)
