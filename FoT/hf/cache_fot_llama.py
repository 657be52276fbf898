"""State the FoT PyTorch model keeps between windows and generation steps.

Every layer has a *local window*: the un-rotated keys and values of at most
``last_context_length`` (``W``) most recent tokens (they are rotated at use, at positions
relative to the start of the window).  Memory layers also have a *memory*: keys (rotated as
if at position 0) and values of every token that left the local window.  This file is copied
into exported model directories and must import nothing from the toolkit.
"""
import torch

from .windows_fot_llama import plan_windows


def join(first, second):
    """``first`` then ``second`` along the token axis (``first`` may be ``None`` or empty)."""
    if first is None or not first.shape[2]:
        return second
    return torch.cat([first.to(second.dtype), second], dim=2)


class MemoryBuffer:
    """Memory of one memory layer: ``[B, KV, length, D]`` keys and values.

    Without autograd (inference), the tensors have spare room along the token axis, so that
    generation can append one token at a time without copying the memory, and so that
    attention can write the current local keys right after the memory and read both as one
    contiguous view instead of concatenating a copy of a memory that may hold 100k+ tokens.

    With autograd (training), writing in place would overwrite tensors that earlier windows'
    attention saved for backward, so ``append(..., in_place=False)`` builds a new tensor
    (``torch.cat``) and never writes into one that exists; attention then concatenates the
    memory with the local window (:meth:`view`).
    """

    def __init__(self, dtype=None):
        self.dtype = dtype
        self.keys = self.values = None
        self.length = 0

    @property
    def capacity(self):
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, extra, like):
        """Make room for ``length + extra`` tokens shaped like ``like`` ``[B, KV, *, D]``."""
        needed = self.length + extra
        if needed <= self.capacity:
            return
        # Growing by half amortises token-by-token growth during generation.
        capacity = max(needed, self.length + self.length // 2)
        shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
        dtype = self.dtype or like.dtype
        keys = torch.empty(shape, dtype=dtype, device=like.device)
        values = torch.empty(shape, dtype=dtype, device=like.device)
        if self.length:
            keys[:, :, :self.length] = self.keys[:, :, :self.length]
            values[:, :, :self.length] = self.values[:, :, :self.length]
        self.keys, self.values = keys, values

    def view(self):
        """The memory's keys and values ``[B, KV, length, D]`` (``None`` when empty)."""
        if not self.length:
            return None, None
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def append(self, keys, values, in_place=True):
        """Add keys/values after the memory; ``in_place=False`` (autograd) writes into no
        existing tensor."""
        if not in_place:
            dtype = self.dtype or keys.dtype
            keys, values = keys.to(dtype), values.to(dtype)
            if self.length:
                old_keys, old_values = self.view()
                keys, values = torch.cat([old_keys, keys], 2), torch.cat([old_values, values], 2)
            self.keys, self.values, self.length = keys, values, keys.shape[2]
            return
        count = keys.shape[2]
        self.reserve(count, keys)
        self.keys[:, :, self.length:self.length + count] = keys
        self.values[:, :, self.length:self.length + count] = values
        self.length += count

    def with_local(self, keys, values):
        """The memory followed by the local ``keys``/``values``, as ``[B, KV, length + L, D]``.

        Inference only (no autograd): the local keys are written into the spare room."""
        if self.keys.dtype != keys.dtype:
            return (torch.cat([self.keys[:, :, :self.length].to(keys.dtype), keys], dim=2),
                    torch.cat([self.values[:, :, :self.length].to(values.dtype), values], dim=2))
        count = keys.shape[2]
        self.reserve(count, keys)
        # Scratch space past the memory: the next append overwrites it.
        self.keys[:, :, self.length:self.length + count] = keys
        self.values[:, :, self.length:self.length + count] = values
        end = self.length + count
        return self.keys[:, :, :end], self.values[:, :, :end]

    def select_rows(self, index):
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)


class LayerCache:
    """Local window (and memory, for a memory layer) of one decoder layer."""

    def __init__(self, memory=None):
        self.keys = self.values = None
        self.memory = memory

    @property
    def local_length(self):
        return 0 if self.keys is None else self.keys.shape[2]

    def evict(self, count):
        """Remove and return the ``count`` oldest local keys and values (``None`` if 0)."""
        if count == 0:
            return None, None
        old = self.keys[:, :, :count], self.values[:, :, :count]
        self.keys, self.values = self.keys[:, :, count:], self.values[:, :, count:]
        return old

    def advance(self, evict, upcoming, to_memory, in_place):
        """Before a piece: move the ``evict`` oldest local tokens into the memory (keys mapped
        by ``to_memory``); ``upcoming`` tokens are left in this call, to size an in-place
        memory once.  Returns the local keys/values and the memory's keys/values that the
        piece attends to (``None`` where empty).  Attention itself changes no state, so that
        activation checkpointing can run it again."""
        memory = self.memory
        old_keys, old_values = self.evict(evict)
        if memory is not None and old_keys is not None:
            if in_place:
                memory.reserve(self.local_length + evict + upcoming, old_keys)
            memory.append(to_memory(old_keys), old_values, in_place)
        memory_keys, memory_values = (None, None) if memory is None else memory.view()
        return self.keys, self.values, memory_keys, memory_values

    def push(self, keys, values):
        """Append new un-rotated keys/values; return the whole local window."""
        self.keys, self.values = join(self.keys, keys), join(self.values, values)
        return self.keys, self.values

    def select_rows(self, index):
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)
        if self.memory is not None:
            self.memory.select_rows(index)


class FoTCache:
    """``past_key_values`` of the FoT model: one :class:`LayerCache` per layer.

    ``use_memory=False`` gives memory layers no memory, so they act as ordinary local layers
    (the "without memory" baseline of the evaluations).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config, use_memory=True):
        mem_dtype = getattr(torch, config.mem_dtype) if config.mem_dtype else None
        self.window = config.last_context_length
        self.layers = [
            LayerCache(MemoryBuffer(mem_dtype) if use_memory and i in config.mem_layers else None)
            for i in range(config.num_hidden_layers)]
        self.seen_tokens = 0

    @property
    def local_length(self):
        return self.layers[0].local_length

    @property
    def memory_length(self):
        return max((layer.memory.length for layer in self.layers if layer.memory is not None),
                   default=0)

    def get_seq_length(self, layer_idx=0):
        """Tokens consumed so far (what ``generate`` asks to know which inputs are new)."""
        return self.seen_tokens

    def plan(self, num_tokens):
        return plan_windows(self.local_length, num_tokens, self.window)

    def reorder_cache(self, beam_idx):
        for layer in self.layers:
            layer.select_rows(beam_idx)
