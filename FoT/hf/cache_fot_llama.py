"""State the FoT PyTorch model keeps between windows and generation steps.

Every layer has a *local window* of at most ``local_capacity`` tokens (``last_context_length``
``W`` under the default rule) and memory layers also a *memory*: keys (rotated as if at
position 0, i.e. not rotated) and values of every token that left the local window
(:mod:`windows_fot_llama`: a window always leaves whole, so a token keeps its local position
while it is local).  Two kinds of state:

* :class:`InferenceLayer` (no autograd: evaluation, generation).  Preallocated buffers with
  per-row lengths, so that rows of a batch may hold different numbers of tokens (padding).
  A memory layer keeps one buffer per row, ``[memory | local window]``: memory entries
  un-rotated, local keys rotated at their local position, so that attention reads one
  contiguous slice; an un-rotated copy of the local keys replaces the rotated ones when the
  window moves to memory (no copy of the memory, ever).  A forgetting-attention (FoX) layer
  keeps its window the same way, plus what its decay and kv-shift carry from token to token
  (:class:`ForgettingLayer`).
* :class:`AutogradLayer` (training).  Nothing that attention saved for backward may be written
  again, so the memory grows by concatenation and gradients flow into earlier windows' keys
  and values, as in the cross-batch training model.  All rows hold the same tokens.

This file is copied into exported model directories and must import nothing from the toolkit.
"""
import torch

from .windows_fot_llama import check_rule, local_capacity, plan_windows


def join(first, second):
    """``first`` then ``second`` along the token axis (``first`` may be ``None`` or empty)."""
    if first is None or not first.shape[2]:
        return second
    return torch.cat([first.to(second.dtype), second], dim=2)


def _grown(buffer, capacity):
    """``buffer`` ``[B, KV, *, D]`` with room for ``capacity`` tokens (its content kept)."""
    if buffer.shape[2] >= capacity:
        return buffer
    grown = buffer.new_zeros(buffer.shape[:2] + (capacity,) + buffer.shape[3:])
    grown[:, :, :buffer.shape[2]] = buffer
    return grown


class InferenceLayer:
    """One layer's inference buffers ``[B, KV, capacity, D]`` (see the module docstring).

    ``keys``/``values`` hold, per row, the memory (memory layers only) followed by the local
    window; ``raw_keys`` holds the local window's un-rotated keys (memory layers with RoPE).
    Lengths live in :class:`FoTCache`: they are the same for every layer.
    """

    def __init__(self, has_memory, rotated, dtype):
        self.has_memory, self.rotated, self.dtype = has_memory, rotated, dtype
        self.keys = self.values = self.raw_keys = None

    def reserve(self, like, capacity, local_capacity):
        """Room for ``capacity`` tokens per row (``local_capacity`` without memory), buffers
        shaped like ``like`` ``[B, KV, *, D]``.  A memory buffer gets a local window of spare
        room each time it is (re)allocated: generation then grows it once per window of new
        tokens, by a copy of the memory, and never holds much unused room (decoding reads
        the whole buffer)."""
        if not self.has_memory:
            capacity = local_capacity
        elif self.keys is None or capacity > self.keys.shape[2]:
            capacity += local_capacity
        if self.keys is None:
            shape = like.shape[:2] + (capacity,) + like.shape[3:]
            dtype = self.dtype or like.dtype
            # Zeroed: static decoding reads (masked) entries past the valid ones.
            self.keys = torch.zeros(shape, dtype=dtype, device=like.device)
            self.values = torch.zeros(shape, dtype=dtype, device=like.device)
            if self.has_memory and self.rotated:
                self.raw_keys = like.new_zeros(like.shape[:2] + (local_capacity,) +
                                               like.shape[3:])
            return
        if capacity > self.keys.shape[2]:
            self.keys = _grown(self.keys, capacity)
            self.values = _grown(self.values, capacity)

    def to_memory(self, row, memory_length, local_length):
        """Row ``row``'s local window (``local_length`` tokens after ``memory_length``) becomes
        memory: its keys are put back un-rotated."""
        if self.has_memory and self.rotated and local_length:
            end = memory_length + local_length
            self.keys[row, :, memory_length:end] = self.raw_keys[row, :, :local_length]

    def write(self, row, offset, local_offset, keys, raw_keys, values):
        """Store a piece's keys/values ``[KV, P, D]`` (or ``[B, ...]`` with ``row=None``) at
        ``offset`` (``local_offset`` in the un-rotated copy)."""
        rows = slice(None) if row is None else row
        count = keys.shape[-2]
        self.keys[rows, :, offset:offset + count] = keys
        self.values[rows, :, offset:offset + count] = values
        if self.raw_keys is not None:
            self.raw_keys[rows, :, local_offset:local_offset + count] = raw_keys

    def select_rows(self, index):
        for name in ("keys", "values", "raw_keys"):
            buffer = getattr(self, name)
            if buffer is not None:
                setattr(self, name, buffer.index_select(0, index))


class ForgettingLayer(InferenceLayer):
    """A forgetting-attention (FoX) layer's inference buffers: the local window's keys and
    values as attention reads them (kv-shifted, normalised; rotated at their local position
    with RoPE), each entry's cumulative log forget gate ``decay`` ``[B, H, capacity]``
    (float32), and per row the running sum ``decay_sum`` ``[B, H]`` and the un-shifted key
    and value of the row's last token ``[B, KV, D]`` (what the next token's kv-shift reads).
    """

    def __init__(self, rotated, dtype, num_heads):
        super().__init__(False, rotated, dtype)
        self.num_heads = num_heads
        self.decay = self.decay_sum = self.previous_keys = self.previous_values = None

    def reserve(self, like, capacity, local_capacity):
        super().reserve(like, capacity, local_capacity)
        if self.decay is None:
            batch, kv_heads, _, head_dim = like.shape
            self.decay = torch.zeros(batch, self.num_heads, local_capacity,
                                     dtype=torch.float32, device=like.device)
            self.decay_sum = self.decay.new_zeros(batch, self.num_heads)
            self.previous_keys = like.new_zeros(batch, kv_heads, head_dim)
            self.previous_values = like.new_zeros(batch, kv_heads, head_dim)

    def to_memory(self, row, memory_length, local_length):
        """A FoX layer has no memory: the leaving window is forgotten, and the next one starts
        afresh (no decay summed yet, no previous token to shift from), as a training row
        does."""
        if local_length:
            for state in (self.decay_sum, self.previous_keys, self.previous_values):
                state[row] = 0

    def enter(self, row, offset, keys, values, decay, raw_keys, raw_values):
        """Store a piece's entries (``[KV, P, D]`` and ``decay`` ``[H, P]``, or with a batch
        axis and ``row=None``) at ``offset`` of the window; its last token's sum and
        un-shifted key and value are the row's running ones."""
        rows = slice(None) if row is None else row
        self.write(row, offset, offset, keys, None, values)
        self.decay[rows, :, offset:offset + decay.shape[-1]] = decay
        self.decay_sum[rows] = decay[..., -1]
        self.previous_keys[rows] = raw_keys[..., -1, :]
        self.previous_values[rows] = raw_values[..., -1, :]

    def select_rows(self, index):
        super().select_rows(index)
        for name in ("decay", "decay_sum", "previous_keys", "previous_values"):
            buffer = getattr(self, name)
            if buffer is not None:
                setattr(self, name, buffer.index_select(0, index))


class LinearLayer:
    """A linear attention (SUPRA, GLA) layer's inference state: ``state`` ``[B, H, D, D]``
    (float32) and the tokens each row has read, ``position`` ``[B]``.  No window, no memory:
    a leaving window changes nothing, the state reads on."""

    has_memory = rotated = False

    def __init__(self, num_heads):
        self.num_heads = num_heads
        self.state = self.position = None

    def reserve(self, like, capacity, local_capacity):
        if self.state is None:
            batch, _, _, head_dim = like.shape
            self.state = torch.zeros(batch, self.num_heads, head_dim, head_dim,
                                     dtype=torch.float32, device=like.device)
            self.position = torch.zeros(batch, dtype=torch.long, device=like.device)

    def to_memory(self, row, memory_length, local_length):
        pass

    def select_rows(self, index):
        if self.state is not None:
            self.state = self.state.index_select(0, index)
            self.position = self.position.index_select(0, index)


class AutogradLayer:
    """Local window (un-rotated keys) and memory of one layer under autograd."""

    def __init__(self, has_memory, dtype):
        self.keys = self.values = None
        self.memory_keys = self.memory_values = None
        self.has_memory, self.dtype = has_memory, dtype

    def advance(self, evict, to_memory):
        """Before a piece: the ``evict`` oldest local tokens (all or none) leave the window,
        into the memory (keys mapped by ``to_memory``) in a memory layer.  Returns the local
        and memory keys/values the piece attends to (``None`` where empty); attention itself
        changes no state, so that activation checkpointing can run it again."""
        if evict:
            old_keys, old_values = self.keys[:, :, :evict], self.values[:, :, :evict]
            self.keys, self.values = self.keys[:, :, evict:], self.values[:, :, evict:]
            if self.has_memory:
                dtype = self.dtype or old_keys.dtype
                self.memory_keys = join(self.memory_keys, to_memory(old_keys).to(dtype))
                self.memory_values = join(self.memory_values, old_values.to(dtype))
        return self.keys, self.values, self.memory_keys, self.memory_values

    def push(self, keys, values):
        self.keys, self.values = join(self.keys, keys), join(self.values, values)

    def select_rows(self, index):
        for name in ("keys", "values", "memory_keys", "memory_values"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index))


class FoTCache:
    """``past_key_values`` of the FoT model.

    ``use_memory=False`` gives memory layers no memory, so they act as ordinary local layers
    (the "without memory" baseline of the evaluations).  The cache takes the inference or the
    autograd form on first use, from whether autograd is on; it keeps that form (a model
    with FoX layers has the inference form only).  ``local_lengths``/``memory_lengths`` are
    per row (python ints); ``seen_tokens`` counts the input columns consumed, padding
    included (what ``generate`` slices inputs by).
    ``static_decode``: one-token steps through :class:`StaticDecoder` (``None``: on CUDA when
    ``config.decode_graphs``, replayed as a CUDA graph; ``True`` also elsewhere, without a
    graph; ``False``: never; never with FoX layers).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config, use_memory=True, static_decode=None):
        self.mem_dtype = getattr(torch, config.mem_dtype) if config.mem_dtype else None
        self.window = config.last_context_length
        self.rule = getattr(config, "window_rule", "aligned")
        self.local_limit = getattr(config, "local_window_limit", None)
        check_rule(self.rule)
        self.local_capacity = local_capacity(self.window, self.rule, self.local_limit)
        self.memory_layers = [use_memory and i in config.mem_layers
                              for i in range(config.num_hidden_layers)]
        self.rotated = [not memory or config.mem_positionals for memory in self.memory_layers]
        forgetting = config.forgetting_layers()
        self.forgetting_layers = [i in forgetting for i in range(config.num_hidden_layers)]
        linear = config.linear_layers() if hasattr(config, "linear_layers") else {}
        self.linear_layers = [i in linear for i in range(config.num_hidden_layers)]
        for i in forgetting:
            self.rotated[i] = config.forgetting_use_rope
        self.num_heads = config.num_attention_heads
        self.static_decode = static_decode
        self.decoder = self.rope = None
        self.layers = None
        self.autograd = None
        self.local_lengths = self.memory_lengths = None
        self.seen_tokens = 0

    def start(self, batch, autograd):
        """Take the inference or autograd form for ``batch`` rows (on first use)."""
        if self.layers is None:
            self.autograd = autograd
            if autograd and self.eager_only:
                raise ValueError("forgetting-attention (FoX) and linear attention layers run "
                                 "without autograd only: call the model under "
                                 "torch.no_grad() (training in PyTorch is not supported for "
                                 "models with such layers)")
            if autograd:
                self.layers = [AutogradLayer(memory, self.mem_dtype)
                               for memory in self.memory_layers]
            else:
                self.layers = [
                    LinearLayer(self.num_heads) if linear
                    else ForgettingLayer(rotated, self.mem_dtype, self.num_heads) if forgetting
                    else InferenceLayer(memory, rotated, self.mem_dtype)
                    for memory, rotated, forgetting, linear in zip(
                        self.memory_layers, self.rotated, self.forgetting_layers,
                        self.linear_layers)]
            self.local_lengths, self.memory_lengths = [0] * batch, [0] * batch
        elif autograd != self.autograd:
            raise ValueError("a FoTCache filled with autograd off cannot be continued with it "
                             "on, nor the reverse: start a new cache")
        if batch != len(self.local_lengths):
            raise ValueError(f"the cache holds {len(self.local_lengths)} rows, got a batch of "
                             f"{batch}")

    @property
    def eager_only(self):
        """Whether some layer runs only window by window under no_grad (FoX and linear
        layers: no autograd form, no chunked prefill, no static decoding step)."""
        return any(self.forgetting_layers) or any(self.linear_layers)

    def rows_alike(self):
        """Whether every row holds as many local and memory tokens (one slice serves all)."""
        return len(set(self.local_lengths)) == 1 and len(set(self.memory_lengths)) == 1

    def move_to_memory(self, row, count):
        """Count row ``row``'s ``count`` oldest local tokens as memory (none is kept where no
        layer has memory)."""
        self.local_lengths[row] -= count
        if any(self.memory_layers):
            self.memory_lengths[row] += count

    @property
    def local_length(self):
        """Local tokens of a cache whose rows are all alike (else a ``ValueError``)."""
        return self._same(self.local_lengths)

    @property
    def memory_length(self):
        return self._same(self.memory_lengths)

    @staticmethod
    def _same(values):
        if not values:
            return 0
        if len(set(values)) > 1:
            raise ValueError(f"rows hold different numbers of tokens: {values}")
        return values[0]

    def get_seq_length(self, layer_idx=0):
        """Input columns consumed so far (what ``generate`` asks to know which are new)."""
        return self.seen_tokens

    def plan(self, row, num_tokens):
        return plan_windows(self.local_lengths[row], num_tokens, self.window, self.rule,
                            self.local_limit)

    def reorder_cache(self, beam_idx):
        if self.layers is None:
            return
        self.decoder = None  # its graph reads the old buffers
        for layer in self.layers:
            layer.select_rows(beam_idx)
        index = beam_idx.tolist()
        self.local_lengths = [self.local_lengths[i] for i in index]
        self.memory_lengths = [self.memory_lengths[i] for i in index]
