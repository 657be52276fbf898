"""Document-aware batching of token streams (FOT_SPEC section 3), with exact save/restore.

A *token source* is any iterable of ``(tokens, loss_mask, source_name)``, one item per
document.  A pipeline turns it into an endless iterator of ``(batch, metrics)``, the batch a
:class:`FoT.batch.Batch` of this process's rows:

- ``linear``: all documents concatenated, each batch is the next ``B * L`` tokens.
- ``doc_aware``: ``B`` rows that each continue their own documents from batch to batch.
- ``doc_aware_kN``: ``doc_aware`` with ``B / N`` rows of ``N * L`` tokens, each cut into
  ``N`` consecutive rows, so rows ``N*j .. N*j+N-1`` hold one stream (``dataset_packing = N``).
- a ``_pad`` suffix (``doc_aware_pad``, ``doc_aware_k2_pad``) selects pad mode: each
  document's first loss-mask entry is zeroed and the document is right-padded with token 0
  to a multiple of the pipeline's inner row length (``L``, or ``N * L`` for ``kN``).

Multi-host: with ``process_count = P`` a pipeline yields only rows
``process_index * B/P .. (process_index + 1) * B/P - 1`` of the global batch.  Every process
draws the whole document stream in the same order (so the global layout, the metrics and the
source position are identical on every host), but copies tokens only into its own rows:
``doc_aware`` keeps just the token *count* of foreign rows, ``linear`` keeps just the parts
of the stream that fall into its own rows (plus their one look-ahead token).  A state saved by
one process therefore holds only that process's tokens and must be restored by the same
process of an identical layout.

All buffers are numpy arrays; ``get_state()`` returns plain JSON-serialisable data (arrays
as base64 strings) and ``set_state()`` restores it, so a restored pipeline fed with the
documents that follow the last one it drew yields exactly the batches an uninterrupted one
would.  Metrics are global: documents drawn (``dataset_example_index``), tokens emitted
(``dataset_total_tokens``) and, per source, the input tokens of this batch
(``batch_tokens_per_source/<name>``).
"""
import base64
import collections
import re
from typing import NamedTuple

import numpy as np

from FoT.batch import Batch
from FoT.slots import check_whole_groups


def _encode_array(array):
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _decode_array(text, dtype):
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


class _TokenBuffer:
    """A growable FIFO of (token, loss mask) pairs backed by two numpy arrays."""

    def __init__(self, tokens=None, masks=None):
        tokens = np.zeros(0, np.int32) if tokens is None else tokens
        masks = np.zeros(0, np.float32) if masks is None else masks
        capacity = max(1024, 2 * len(tokens))
        self._tokens = np.empty(capacity, np.int32)
        self._masks = np.empty(capacity, np.float32)
        self._start = self._end = 0
        self.append(tokens, masks)

    def __len__(self):
        return self._end - self._start

    def append(self, tokens, masks):
        n = len(tokens)
        if self._end + n > len(self._tokens):
            self._make_room(n)
        self._tokens[self._end:self._end + n] = tokens
        self._masks[self._end:self._end + n] = masks
        self._end += n

    def _make_room(self, n):
        # Moving the live part to the front is amortised O(1) per token; grow only when even
        # that would not fit.
        size = len(self)
        capacity = len(self._tokens)
        if size + n > capacity // 2:
            capacity = max(2 * capacity, 2 * (size + n))
            tokens, masks = np.empty(capacity, np.int32), np.empty(capacity, np.float32)
        else:
            tokens, masks = self._tokens, self._masks
        tokens[:size] = self._tokens[self._start:self._end]
        masks[:size] = self._masks[self._start:self._end]
        self._tokens, self._masks = tokens, masks
        self._start, self._end = 0, size

    def peek(self, n):
        return (self._tokens[self._start:self._start + n],
                self._masks[self._start:self._start + n])

    def drop(self, n):
        self._start += n

    def get_state(self):
        tokens, masks = self.peek(len(self))
        return {"tokens": _encode_array(tokens), "loss_masks": _encode_array(masks)}

    @classmethod
    def from_state(cls, state):
        return cls(_decode_array(state["tokens"], np.int32),
                   _decode_array(state["loss_masks"], np.float32))


class _SourceSegments:
    """Which source each not-yet-emitted token of a stream came from, as run lengths."""

    def __init__(self, runs=()):
        self._runs = collections.deque([name, count] for name, count in runs)

    def add(self, name, count):
        if count == 0:
            return
        if self._runs and self._runs[-1][0] == name:
            self._runs[-1][1] += count
        else:
            self._runs.append([name, count])

    def take(self, count, totals):
        """Remove the next ``count`` tokens, adding them per source into ``totals``."""
        while count > 0:
            run = self._runs[0]
            used = min(count, run[1])
            totals[run[0]] = totals.get(run[0], 0) + used
            count -= used
            run[1] -= used
            if run[1] == 0:
                self._runs.popleft()

    def get_state(self):
        return [list(run) for run in self._runs]


def _as_document(item):
    tokens, loss_mask, source = item
    tokens = np.asarray(tokens, dtype=np.int32)
    loss_mask = np.asarray(loss_mask, dtype=np.float32)
    if tokens.shape != loss_mask.shape or tokens.ndim != 1:
        raise ValueError(f"document from source {source!r}: tokens {tokens.shape} and loss mask "
                         f"{loss_mask.shape} must be 1-D of the same length")
    return tokens, loss_mask, source


class _Pipeline:
    """Shared plumbing: token source, row split between processes, counters and state."""

    kind = None

    def __init__(self, token_source, batch_size, seq_len, process_index, process_count,
                 group_rows=1):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        check_whole_groups(batch_size, group_rows, process_count, "processes")
        self.token_source = token_source
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = batch_size // process_count
        self._source_iterator = None
        self._docs_drawn = 0
        self._batches = 0

    def __iter__(self):
        return self

    def _draw(self):
        if self._source_iterator is None:
            self._source_iterator = iter(self.token_source)
        item = next(self._source_iterator)
        self._docs_drawn += 1
        return item

    def _metrics(self, per_source):
        metrics = {"dataset_example_index": self._docs_drawn,
                   "dataset_total_tokens": self._batches * self.batch_size * self.seq_len}
        for name, count in per_source.items():
            metrics[f"batch_tokens_per_source/{name}"] = count
        return metrics

    def _layout(self):
        return {"kind": self.kind, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "process_index": self.process_index, "process_count": self.process_count}

    def get_state(self):
        return {"layout": self._layout(), "docs_drawn": self._docs_drawn,
                "batches": self._batches}

    def set_state(self, state):
        if state["layout"] != self._layout():
            raise ValueError(f"pipeline state was saved with layout {state['layout']} but this "
                             f"pipeline has {self._layout()}; resume with the same pipeline, "
                             "batch size, sequence length and process split")
        self._docs_drawn = state["docs_drawn"]
        self._batches = state["batches"]


class LinearPipeline(_Pipeline):
    """All documents in one stream; batch ``n`` is stream tokens ``[n*B*L, (n+1)*B*L]``."""

    kind = "linear"

    def __init__(self, token_source, batch_size, seq_len, process_index=0, process_count=1):
        super().__init__(token_source, batch_size, seq_len, process_index, process_count)
        self._period = batch_size * seq_len
        self._offset = process_index * self.local_batch_size * seq_len
        self._needed = self.local_batch_size * seq_len + 1
        # Tokens of this process's windows (its rows plus one look-ahead token) are kept;
        # with one process the windows overlap by that token and cover the whole stream.
        self._window = min(self._needed, self._period)
        self._drawn_tokens = 0
        self._segments = _SourceSegments()
        self._buffer = _TokenBuffer()

    def _keep(self, tokens, loss_mask, start):
        """Append the parts of a document at stream positions ``start...`` in our windows."""
        if self._offset == 0 and self._window == self._period:
            self._buffer.append(tokens, loss_mask)
            return
        end = start + len(tokens)
        window = max(0, (start - self._offset) // self._period)
        while True:
            window_start = window * self._period + self._offset
            if window_start >= end:
                return
            lo, hi = max(start, window_start), min(end, window_start + self._window)
            if lo < hi:
                self._buffer.append(tokens[lo - start:hi - start], loss_mask[lo - start:hi - start])
            window += 1

    def __next__(self):
        # Draw until the whole global batch (and its look-ahead) exists, so that every
        # process has drawn the same documents after each batch.
        batch_end = (self._batches + 1) * self._period + 1
        while self._drawn_tokens < batch_end:
            tokens, loss_mask, source = _as_document(self._draw())
            self._keep(tokens, loss_mask, self._drawn_tokens)
            self._segments.add(source, len(tokens))
            self._drawn_tokens += len(tokens)
        tokens, masks = self._buffer.peek(self._needed)
        rows = (self.local_batch_size, self.seq_len)
        # Copies: the views would change as the buffer is refilled.
        batch = Batch(input_tokens=tokens[:-1].reshape(rows).copy(),
                      target_tokens=tokens[1:].reshape(rows).copy(),
                      loss_masks=masks[1:].reshape(rows).copy())
        self._buffer.drop(self._window)
        per_source = {}
        self._segments.take(self._period, per_source)
        self._batches += 1
        return batch, self._metrics(per_source)

    def get_state(self):
        return {**super().get_state(), "drawn_tokens": self._drawn_tokens,
                "segments": self._segments.get_state(), "buffer": self._buffer.get_state()}

    def set_state(self, state):
        super().set_state(state)
        self._drawn_tokens = state["drawn_tokens"]
        self._segments = _SourceSegments(state["segments"])
        self._buffer = _TokenBuffer.from_state(state["buffer"])


class DocAwareDataPipeline(_Pipeline):
    """``B`` rows, each continuing its own documents; a row draws new whole documents only
    when fewer than ``L + 1`` of its tokens are left."""

    kind = "doc_aware"
    packing = 1

    def __init__(self, token_source, batch_size, seq_len, pad=False, process_index=0,
                 process_count=1):
        super().__init__(token_source, batch_size, seq_len, process_index, process_count,
                         group_rows=self.packing)
        self.pad = pad
        self._slots = batch_size // self.packing
        self._slot_len = seq_len * self.packing
        local_slots = self._slots // process_count
        self._local = range(process_index * local_slots, (process_index + 1) * local_slots)
        self._pending = [0] * self._slots
        self._segments = [_SourceSegments() for _ in range(self._slots)]
        self._buffers = {slot: _TokenBuffer() for slot in self._local}

    def _padded(self, tokens, loss_mask):
        length = -(-len(tokens) // self._slot_len) * self._slot_len
        padded_tokens = np.zeros(length, np.int32)
        padded_mask = np.zeros(length, np.float32)
        padded_tokens[:len(tokens)] = tokens
        padded_mask[1:len(tokens)] = loss_mask[1:]
        return padded_tokens, padded_mask

    def _fill(self, slot):
        buffer = self._buffers.get(slot)
        while self._pending[slot] <= self._slot_len:
            item = self._draw()
            if buffer is None:
                # A foreign row: only its length matters for when it draws next.
                length, source = len(item[0]), item[2]
                if self.pad:
                    length = -(-length // self._slot_len) * self._slot_len
            else:
                tokens, loss_mask, source = _as_document(item)
                if self.pad:
                    tokens, loss_mask = self._padded(tokens, loss_mask)
                buffer.append(tokens, loss_mask)
                length = len(tokens)
            self._pending[slot] += length
            self._segments[slot].add(source, length)

    def __next__(self):
        width = self._slot_len
        rows = len(self._local)
        inputs = np.empty((rows, width), np.int32)
        targets = np.empty((rows, width), np.int32)
        masks = np.empty((rows, width), np.float32)
        per_source = {}
        for slot in range(self._slots):
            self._fill(slot)
            self._pending[slot] -= width
            self._segments[slot].take(width, per_source)
            buffer = self._buffers.get(slot)
            if buffer is not None:
                row = slot - self._local.start
                tokens, loss_mask = buffer.peek(width + 1)
                inputs[row] = tokens[:-1]
                targets[row] = tokens[1:]
                masks[row] = loss_mask[1:]
                buffer.drop(width)
        self._batches += 1
        shape = (rows * self.packing, self.seq_len)
        batch = Batch(input_tokens=inputs.reshape(shape), target_tokens=targets.reshape(shape),
                      loss_masks=masks.reshape(shape))
        return batch, self._metrics(per_source)

    def _layout(self):
        return {**super()._layout(), "packing": self.packing, "pad": self.pad}

    def get_state(self):
        return {**super().get_state(), "pending": list(self._pending),
                "segments": [segments.get_state() for segments in self._segments],
                "buffers": [self._buffers[slot].get_state() for slot in self._local]}

    def set_state(self, state):
        super().set_state(state)
        self._pending = list(state["pending"])
        self._segments = [_SourceSegments(runs) for runs in state["segments"]]
        self._buffers = {slot: _TokenBuffer.from_state(buffer)
                         for slot, buffer in zip(self._local, state["buffers"])}


class KPackingDAPipeline(DocAwareDataPipeline):
    """``doc_aware`` with ``B / k`` rows of ``k * L`` tokens, each cut into ``k`` rows."""

    def __init__(self, token_source, batch_size, seq_len, k, pad=False, process_index=0,
                 process_count=1):
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"packing factor k must be an integer >= 1, got {k!r}")
        self.packing = int(k)
        super().__init__(token_source, batch_size, seq_len, pad, process_index, process_count)


_PIPELINE_NAME = re.compile(r"(linear|doc_aware)(?:_k([1-9][0-9]*))?(_pad)?")
PIPELINE_NAMES_HELP = ("'linear', 'doc_aware', 'doc_aware_kN' (N >= 1), optionally with the "
                       "suffix '_pad' for pad mode ('doc_aware_pad', 'doc_aware_k2_pad')")


class PipelineSpec(NamedTuple):
    """What a pipeline name says: ``"doc_aware_k2_pad" -> ("doc_aware", 2, True)``."""
    kind: str  # "linear" or "doc_aware"
    packing: int  # rows per document stream (the N of doc_aware_kN): the model's dataset_packing
    pad: bool  # pad mode


def parse_pipeline_name(name):
    """The :class:`PipelineSpec` of a pipeline name; ``ValueError`` for unknown names.  The one
    reader of a name: a run reads it once and hands the spec to the data, the model config
    and the checks."""
    match = _PIPELINE_NAME.fullmatch(name or "")
    if match is None or (match.group(1) == "linear" and (match.group(2) or match.group(3))):
        raise ValueError(f"unknown data pipeline {name!r}; expected {PIPELINE_NAMES_HELP}")
    kind, k, pad = match.groups()
    return PipelineSpec(kind, int(k or 1), bool(pad))


def dataset_packing_for(name):
    """Rows per document stream that a pipeline name implies (``doc_aware_k2`` -> 2)."""
    return parse_pipeline_name(name).packing


def make_pipeline(spec, token_source, batch_size, seq_len, process_index=0, process_count=1):
    """The pipeline that ``spec`` (a :class:`PipelineSpec` or a pipeline name) selects, over
    ``token_source``."""
    if not isinstance(spec, PipelineSpec):
        spec = parse_pipeline_name(spec)
    split = {"process_index": process_index, "process_count": process_count}
    if spec.kind == "linear":
        return LinearPipeline(token_source, batch_size, seq_len, **split)
    if spec.packing == 1:
        return DocAwareDataPipeline(token_source, batch_size, seq_len, spec.pad, **split)
    return KPackingDAPipeline(token_source, batch_size, seq_len, spec.packing, spec.pad, **split)
