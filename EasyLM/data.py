"""Training data: text processing, JSON-lines and Hugging Face sources, and ``DatasetFactory``.

``DatasetFactory.load_dataset(config, tokenizer, process_index, process_count, name)`` returns
a dataset the trainer iterates for ``(batch, metrics)`` (this process's rows, see
``FoT.data_pipeline``).  Documents flow as

    records (raw JSON lines or HF examples, each with the position just after it)
      -> TextProcessor, in-process or in a spawn pool (``tokenizer_processes``), in order
      -> skip bad records (counted; one warning per reason), drop short ones
         (``min_example_length``)
      -> the configured pipeline (``linear`` / ``doc_aware`` / ``doc_aware_kN``)

Both sources loop over their data forever, counting passes.  Resume is exact: the saved state
holds the position just after the last document the pipeline *consumed* (documents that a
tokenizer pool prepared ahead are read again after a restore) plus the pipeline's buffers.
A dataset has one live iterator: ``iter(dataset)`` (again) continues from the current state,
so call it after ``load_state_dict``; ``close()`` stops the tokenizer processes.

With several hosts, every host reads and tokenizes the whole stream (so the global batch
layout is exact) and keeps only its own rows; each host saves and restores its own state.
Tokenizer processes are started with 'spawn' (forking a process that runs JAX threads can
deadlock), so a script using ``tokenizer_processes > 1`` needs the usual
``if __name__ == "__main__":`` guard.
"""
import base64
import binascii
import collections
import itertools
import json
import logging
import multiprocessing
import os
import time

import fsspec
import numpy as np

from EasyLM.config import ConfigDict, ConfigError, Option
from FoT import data_pipeline
from FoT.slots import check_whole_groups

logger = logging.getLogger(__name__)


class DocumentError(ValueError):
    """An example the text processor cannot use (e.g. a configured field is missing)."""


class TextProcessor:
    """Turns one example (a dict of fields) into ``(tokens, loss_mask, source_name)``.

    ``fields`` is a comma list; each entry is a text field, ``a+b`` (fields joined by
    ``subfield_separator``), ``{name}`` (base64 of raw tokens of ``base64_token_dtype``),
    ``{name:mask}`` (the same, with a per-token loss mask: base64 of one uint8 per token,
    0 = no loss), or a literal ``<|bos|>`` / ``<|eos|>``; ``[entry]`` gives its tokens loss
    mask 0.
    ``prepend_text`` goes before the first text field.  BOS (mask 0) and EOS (mask 1)
    wrap the document when enabled."""

    @staticmethod
    def get_default_config(updates=None):
        config = ConfigDict(
            fields=Option("text", "comma list of text fields, 'a+b' (joined), '{name}' (base64 "
                          "tokens), '{name:mask}' (base64 tokens with a base64 uint8 loss mask "
                          "per token), '<|bos|>' / '<|eos|>'; '[entry]' has no loss"),
            fields_from_example=Option("", "name of an example field holding that example's "
                                       "fields spec (instead of fields)"),
            subfield_separator=Option(" ", "text between the parts of an 'a+b' field"),
            add_bos_token=Option(True, "start each document with BOS (no loss)"),
            add_eos_token=Option(True, "end each document with EOS (with loss)"),
            prepend_text=Option("", "text put before the first text field"),
            base64_token_dtype=Option("i4", "numpy dtype of the tokens in '{name}' fields"),
            source_field=Option("source_dataset", "example field naming its source, for the "
                                "per-source metrics"),
            default_source=Option("other", "source name of examples without source_field"),
        )
        return config.copy_and_update(updates)

    def __init__(self, config, tokenizer, name="text_processor"):
        self.config = self.get_default_config(config)
        self.name = name  # the config prefix named in error messages
        if not self.config.fields and not self.config.fields_from_example:
            raise ConfigError(f"set {name}.fields (e.g. 'text') or {name}.fields_from_example")
        self.tokenizer = tokenizer
        self._parsed = {}

    def _fields(self, spec):
        """``[(kind, name, mask)]`` with kind ``bos``, ``eos``, ``base64`` or ``text``; a
        ``base64`` name may be ``tokens:mask``."""
        if spec not in self._parsed:
            fields = []
            for field in spec.split(","):
                masked = field.startswith("[") and field.endswith("]")
                field = field[1:-1] if masked else field
                if field in ("<|bos|>", "<|eos|>"):
                    kind = field[2:-2]
                elif field.startswith("{") and field.endswith("}"):
                    kind, field = "base64", field[1:-1]
                else:
                    kind = "text"
                fields.append((kind, field, 0.0 if masked else 1.0))
            self._parsed[spec] = fields
        return self._parsed[spec]

    def _field(self, example, name):
        if name not in example:
            raise DocumentError(f"missing field '{name}'")
        return example[name]

    def _base64(self, example, field, dtype):
        text = self._field(example, field)  # a missing field is not a decoding error
        try:
            raw = base64.b64decode(text, validate=True)
            return np.frombuffer(raw, dtype=dtype)
        except (binascii.Error, TypeError, ValueError) as error:
            raise DocumentError(f"field '{field}' is not base64 of {np.dtype(dtype).name} "
                                f"({error})") from None

    def _tokens(self, example, kind, field, prefix):
        if kind == "bos":
            return [self.tokenizer.bos_token_id]
        if kind == "eos":
            return [self.tokenizer.eos_token_id]
        if kind == "base64":
            return self._base64(example, field.partition(":")[0],
                                self.config.base64_token_dtype)
        parts = [self._field(example, name) for name in field.split("+")]
        if not all(isinstance(part, str) for part in parts):
            raise DocumentError(f"field '{field}' is not text")
        return self.tokenizer.encode(prefix + self.config.subfield_separator.join(parts))

    def __call__(self, example):
        spec = (self._field(example, self.config.fields_from_example)
                if self.config.fields_from_example else self.config.fields)
        tokens, masks = [], []
        if self.config.add_bos_token:
            tokens.append([self.tokenizer.bos_token_id])
            masks.append([0.0])
        prefix = self.config.prepend_text
        for kind, field, mask in self._fields(spec):
            piece = self._tokens(example, kind, field, prefix)
            prefix = "" if kind == "text" else prefix
            tokens.append(piece)
            mask_field = field.partition(":")[2] if kind == "base64" else ""
            if mask_field:
                per_token = self._base64(example, mask_field, np.uint8)
                if len(per_token) != len(piece):
                    raise DocumentError(f"field '{mask_field}' has {len(per_token)} loss-mask "
                                        f"entries for {len(piece)} tokens")
                masks.append(mask * (per_token > 0).astype(np.float32))
            else:
                masks.append(np.full(len(piece), mask, np.float32))
        if self.config.add_eos_token:
            tokens.append([self.tokenizer.eos_token_id])
            masks.append([1.0])
        source = str(example.get(self.config.source_field) or self.config.default_source)
        return (np.concatenate(tokens).astype(np.int32),
                np.concatenate(masks).astype(np.float32), source)


def parse_record(payload):
    """The example of a raw JSON line (or an example dict itself); DocumentError if none."""
    try:
        example = json.loads(payload.decode("utf-8")) if isinstance(payload, bytes) else payload
    except UnicodeDecodeError:
        raise DocumentError("not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise DocumentError(f"malformed JSON ({error.msg})") from None
    if not isinstance(example, dict):
        raise DocumentError("not a JSON object")
    return example


def process_record(processor, payload):
    """``(tokens, loss_mask, source)`` for a raw JSON line or an example dict, or a string
    saying why it must be skipped."""
    try:
        return processor(parse_record(payload))
    except DocumentError as error:
        return str(error)


class SkipReport:
    """Skipped lines of the first pass, reported as they are read and counted per reason.

    Each of the first ``LINES_PER_FILE`` skipped lines of a file is logged (INFO, with the
    run's progress lines) when it is read, its location spelt as the path was given; the
    later ones are only counted.  Every ``REPORT_LINES`` lines read and at the end of the
    first pass come the warnings: one per reason, with its count and first locations.  The
    report lives in the main process (tokenizer processes return reasons, not messages), so
    each line is reported once; it is not part of the saved state, so after a restore the
    lines read from there on are reported afresh."""

    LOCATIONS = 3
    LINES_PER_FILE = 3
    # Also report after this many lines, so a long first pass is reported as it goes.
    REPORT_LINES = 100_000

    def __init__(self, name):
        self.name = name
        self.lines = 0  # read since the last report
        self._reasons = {}  # reason -> [count, first locations]
        self._shown = collections.Counter()  # file -> its skipped lines logged when read

    def read(self, where, reason=None, file=None):
        """One line of ``file`` (any key naming it) read, skipped for ``reason`` unless it
        is None."""
        self.lines += 1
        if reason is not None:
            self._show(where, reason, file)
            entry = self._reasons.setdefault(reason, [0, []])
            entry[0] += 1
            if len(entry[1]) < self.LOCATIONS:
                entry[1].append(where)
        if self.lines >= self.REPORT_LINES:
            self.warn()

    def _show(self, where, reason, file):
        self._shown[file] += 1
        shown = self._shown[file]
        if shown <= self.LINES_PER_FILE:
            last = ("" if shown < self.LINES_PER_FILE else
                    "; further skipped lines of this file are only counted, in the warnings "
                    f"every {self.REPORT_LINES} lines and at the end of the first pass")
            logger.info("%s: skipped %s: %s%s", self.name, where, reason, last)

    def warn(self):
        """One warning per reason seen since the last report."""
        for reason, (count, locations) in self._reasons.items():
            more = ", ..." if count > len(locations) else ""
            logger.warning("%s: %d of %d lines skipped, %s: %s%s", self.name, count, self.lines,
                           reason, ", ".join(locations), more)
        self.lines, self._reasons = 0, {}


_worker_processor = None
WORKER_START_SECONDS = 120


def _start_worker(processor):
    global _worker_processor
    _worker_processor = processor


def _process_in_worker(payload):
    return process_record(_worker_processor, payload)


def tokenized(records, processor, processes, batch_size, chunk_size):
    """``(position, where, outcome)`` for each ``(position, where, payload)``, in input order.

    With several processes, batches of ``batch_size`` records are mapped in a pool while
    the previous batch is consumed; 'spawn' keeps the workers clear of JAX's threads."""
    if processes <= 1:
        for position, where, payload in records:
            yield position, where, process_record(processor, payload)
        return
    pool = multiprocessing.get_context("spawn").Pool(
        processes, initializer=_start_worker, initargs=(processor,))
    try:
        # A worker that cannot start is replaced by the pool forever; fail instead.
        pool.apply_async(os.getpid).get(timeout=WORKER_START_SECONDS)
    except multiprocessing.TimeoutError:
        pool.terminate()
        raise RuntimeError(
            f"tokenizer processes did not start within {WORKER_START_SECONDS} s; a script that "
            "sets tokenizer_processes > 1 must run its code under "
            "'if __name__ == \"__main__\":' (workers are spawned)") from None
    in_flight = collections.deque()

    def submit():
        batch = list(itertools.islice(records, batch_size))
        if batch:
            payloads = [payload for _, _, payload in batch]
            in_flight.append((batch, pool.map_async(_process_in_worker, payloads, chunk_size)))
    try:
        submit()
        while in_flight:
            batch, outcomes = in_flight.popleft()
            submit()
            for (position, where, _), outcome in zip(batch, outcomes.get()):
                yield position, where, outcome
    finally:
        pool.terminate()


def _common_config(**specific):
    """Keys every dataset source shares (names as in the original LongLLaMA configs)."""
    return ConfigDict(
        seq_length=Option(1024, "tokens per row"),
        batch_size=Option(8, "rows per step, global (over all processes)"),
        data_pipeline=Option("linear", "how documents fill rows: "
                             f"{data_pipeline.PIPELINE_NAMES_HELP}"),
        min_example_length=Option(0, "drop documents of fewer tokens; 0 keeps every document"),
        tokenizer_processes=Option(1, "processes tokenizing in parallel; 1 = in the main "
                                   "process"),
        tokenizer_parallel_chunk_size=Option(32, "records per task sent to a tokenizer "
                                             "process"),
        tokenizer_parallel_batch_size=Option(1024, "records read ahead and tokenized at a time "
                                             "by the tokenizer processes"),
        throughput_average_window_size=Option(200, "batches averaged in the "
                                              "dataset_batch_seconds metric"),
        **specific,
    )


def read_pipeline(source, prefix):
    """The :class:`FoT.data_pipeline.PipelineSpec` of ``source.data_pipeline``, ``source``
    being a dataset source's config that messages name ``prefix``."""
    try:
        return data_pipeline.parse_pipeline_name(source.data_pipeline)
    except ValueError as error:
        raise ConfigError(f"{prefix}.data_pipeline: {error}") from None


class _DocumentDataset:
    """Position tracking, skipping, filtering, pipeline, metrics and state of a source.

    Subclasses provide ``_initial_position()`` and ``_records(position)``: an endless
    generator of ``(position_after_record, where, payload)``, ``position`` a small dict with
    at least ``pass`` (and ``file_index`` where there are files); and ``_parts()``: the
    ``(records from its start, name)`` of each part of the data (each file), for the start-up
    check ``_check_data()`` that they call once they can read.  ``RECORDS`` names the
    records in messages."""

    RECORDS = "lines"
    # Records of each part of the data read, at most, at start-up to find a usable document:
    # a bound, so that data that is mostly broken at its start is refused too.
    CHECK_RECORDS = 1000

    def __init__(self, config, tokenizer, text_processor, process_index, process_count, name,
                 pipeline_spec):
        self.config = config
        self.prefix = name
        self._tokenizer = tokenizer
        self._text_processor = text_processor
        self.process_index = process_index
        self.process_count = process_count
        self.pipeline_spec = pipeline_spec or read_pipeline(config, name)
        self._validate()
        self._position = None
        self._counters = {"skipped_lines": 0, "filtered_examples": 0}
        # First-pass lines beyond the furthest position read are reported; lines read again
        # (each evaluation restarts its data) are not.
        self._skips = SkipReport(name)
        self._furthest = None
        self._pipeline_state = None
        self._pipeline = None
        self._documents = None

    def _validate(self):
        config, name = self.config, self.prefix
        if config.seq_length < 1 or config.batch_size < 1:
            raise ConfigError(f"{name}.seq_length and {name}.batch_size must be >= 1")
        try:
            check_whole_groups(config.batch_size, self.pipeline_spec.packing, self.process_count,
                               "processes")
        except ValueError as error:
            raise ConfigError(f"{name}.batch_size {config.batch_size} with {name}.data_pipeline "
                              f"'{config.data_pipeline}': {error}") from None
        if config.tokenizer_processes < 1:
            raise ConfigError(f"{name}.tokenizer_processes must be >= 1")

    def _long_enough(self, tokens):
        return len(tokens) >= self.config.min_example_length

    def _check_data(self):
        """Refuse, before anything runs, data that cannot train: a part that is empty or
        broken (see ``_check_records``), or parts whose documents are all too short."""
        short = [self._check_records(records, name) for records, name in self._parts()]
        if all(short):
            raise short[0]

    def _check_records(self, records, name):
        """Refuse part ``name`` of the data (a file, or the whole dataset) when its first
        records give no document: it is empty, or they are not JSON objects or lack the text
        processor's fields.  ``records`` (from the start of ``name``) are read until the first
        usable document, at most ``CHECK_RECORDS`` of them, and judged as the reader judges
        them, so a file of many GB costs a few lines.  Returns the error to give when every
        document of the part (all of it read) is shorter than min_example_length: another part
        may have long ones, and a filter for rare long documents may pass only short ones
        first, so that is an error only when no part gives a usable document."""
        processor, key = self._text_processor, f"{self.prefix}.path"
        count, first, fields, longest = 0, {}, set(), None
        try:
            for _, where, payload in itertools.islice(records, self.CHECK_RECORDS):
                count += 1
                try:
                    example = parse_record(payload)
                except DocumentError as error:
                    first.setdefault("broken", f"{where}: {error}")
                    continue
                try:
                    tokens = processor(example)[0]
                except DocumentError as error:
                    first.setdefault("unfit", f"{where}: {error}")
                    fields.update(example)
                    continue
                if self._long_enough(tokens):
                    return None
                longest = max(longest or 0, len(tokens))
        finally:
            records.close()
        ended = count < self.CHECK_RECORDS
        span = f"{'' if ended else 'first '}{count} {self.RECORDS}"
        if longest is not None:
            if not ended:
                return None
            minimum = self.config.min_example_length
            return ConfigError(
                f"{self.prefix}.min_example_length={minimum} drops every document of {key} "
                f"({name}): none of its {span} gives {minimum} tokens (the longest "
                f"{longest}); lower it")
        if "unfit" in first:
            fields_key = "fields_from_example" if processor.config.fields_from_example else "fields"
            raise ConfigError(
                f"{processor.name}.{fields_key}={processor.config[fields_key]!r} does not fit "
                f"the data of {key} ({name}): none of its {span} gives a document (first: "
                f"{first['unfit']}); the records have the fields {', '.join(sorted(fields))}")
        if count:
            raise ConfigError(f"{key}: none of the {span} of {name} is a JSON object (first: "
                              f"{first['broken']}); give one JSON object per line")
        raise ConfigError(f"{key}: {name} holds no {self.RECORDS}")

    def _documents_from(self, position):
        """Documents for the pipeline; keeps ``self._position`` just after the last one drawn."""
        records = tokenized(self._records(position), self._text_processor,
                            self.config.tokenizer_processes,
                            self.config.tokenizer_parallel_batch_size,
                            self.config.tokenizer_parallel_chunk_size)
        empty_passes, last_pass = 0, position["pass"]
        try:
            for position, where, outcome in records:
                if position["pass"] != last_pass:
                    self._skips.warn()  # the first pass is over: report all it skipped
                    empty_passes, last_pass = empty_passes + 1, position["pass"]
                    if empty_passes > 1:
                        raise ValueError(f"{self.prefix}: a whole pass over the data gave no "
                                         "usable document (see the warnings above)")
                self._position = position
                skipped = isinstance(outcome, str)
                self._counters["skipped_lines"] += skipped
                if position["pass"] == 0 and (self._furthest is None
                                              or tuple(position.values()) > self._furthest):
                    self._furthest = tuple(position.values())
                    self._skips.read(where, outcome if skipped else None,
                                     position.get("file_index"))
                if skipped:
                    continue
                if not self._long_enough(outcome[0]):
                    self._counters["filtered_examples"] += 1
                else:
                    empty_passes = 0
                    yield outcome
        finally:
            records.close()

    def __iter__(self):
        state = self.get_state_dict()
        self.close()
        self._position = state["position"]
        self._counters = dict(state["counters"])
        self._documents = self._documents_from(self._position)
        self._pipeline = data_pipeline.make_pipeline(
            self.pipeline_spec, self._documents, self.config.batch_size,
            self.config.seq_length, self.process_index, self.process_count)
        if state["pipeline"] is not None:
            self._pipeline.set_state(state["pipeline"])
        return self._batches(self._pipeline)

    def _batches(self, pipeline):
        seconds = collections.deque(maxlen=self.config.throughput_average_window_size)
        while True:
            start = time.perf_counter()
            batch, metrics = next(pipeline)
            seconds.append(time.perf_counter() - start)
            metrics["dataset_example_index"] += self.config.get("example_index_at_start", 0)
            metrics["dataset_total_tokens"] += self.config.get("tokens_count_at_start", 0)
            metrics.update({f"dataset_{key}": value for key, value in self._position.items()})
            metrics.update({f"dataset_{key}": value for key, value in self._counters.items()})
            metrics["dataset_batch_seconds"] = float(np.mean(seconds))
            yield batch, metrics

    def close(self):
        """Stop the live iterator and its tokenizer processes; the state is kept."""
        if self._pipeline is not None:
            self._pipeline_state = self._pipeline.get_state()
        if self._documents is not None:
            self._documents.close()
        self._documents = self._pipeline = None
        self._skips.warn()

    def get_state_dict(self):
        """Where the stream stands, as plain JSON-serialisable data."""
        if self._pipeline is not None:
            pipeline = self._pipeline.get_state()
        else:
            pipeline = self._pipeline_state
        return {"position": dict(self._position or self._initial_position()),
                "counters": dict(self._counters), "pipeline": pipeline}

    def load_state_dict(self, state):
        self.close()
        self._position = dict(state["position"])
        self._counters = dict(state["counters"])
        self._pipeline_state = state["pipeline"]

    @property
    def seq_length(self):
        return self.config.seq_length

    @property
    def batch_size(self):
        return self.config.batch_size

    @property
    def local_batch_size(self):
        return self.config.batch_size // self.process_count

    @property
    def dataset_packing(self):
        return self.pipeline_spec.packing

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def text_processor(self):
        return self._text_processor

    @property
    def vocab_size(self):
        return self._tokenizer.vocab_size


def _resolve_files(path, key):
    """``(filesystem, path, shown name)`` of every file a path, comma list, glob or directory
    names, local or fsspec URL, in a fixed order."""
    if not path:
        raise ConfigError(f"{key} is empty; give a JSON-lines file, comma list, glob or directory")
    files = []
    for part in (p.strip() for p in path.split(",")):
        fs, fs_path = fsspec.core.url_to_fs(part)
        if any(char in part for char in "*?["):
            matches = sorted(fs.glob(fs_path))
        elif fs.isdir(fs_path):
            matches = sorted(f for f in fs.find(fs_path)
                             if f.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")))
        elif fs.exists(fs_path):
            matches = [fs_path]
        else:
            raise ConfigError(f"{key}: {part} does not exist")
        if not matches:
            raise ConfigError(f"{key}: {part} matches no JSON-lines file")
        files += [(fs, match, _as_given(part, fs_path, match, fs)) for match in matches]
    return files


def _fixed_part(path):
    """``path`` up to the last '/' before its first glob character; all of it (without a
    trailing '/') when it has none."""
    magic = [i for i in map(path.find, "*?[") if i >= 0]
    return path[:path.rfind("/", 0, min(magic)) + 1] if magic else path.rstrip("/")


def _as_given(part, fs_path, match, fs):
    """The name of ``match``, a file that ``part`` of the path names (``fs_path`` is
    ``part`` as fsspec spells it), in the user's spelling: a relative path stays relative and
    its ``..`` stays, so a message shows the path the user wrote."""
    root, given = _fixed_part(fs_path), _fixed_part(part)
    return given + match[len(root):] if match.startswith(root) else fs.unstrip_protocol(match)


class JsonDataset(_DocumentDataset):
    """JSON lines (one example per line) from files read in order, forever."""

    @staticmethod
    def get_default_config(updates=None):
        config = _common_config(
            path=Option("", "JSON-lines file, comma list, glob or directory; local or "
                        "fsspec URL"),
            start_seek_loc=Option(0, "byte offset to start at in the first file"),
            example_index_at_start=Option(0, "added to the dataset_example_index metric"),
            tokens_count_at_start=Option(0, "added to the dataset_total_tokens metric"),
        )
        return config.copy_and_update(updates)

    def __init__(self, config, tokenizer, text_processor, process_index=0, process_count=1,
                 name="json_dataset", pipeline_spec=None):
        super().__init__(self.get_default_config(config), tokenizer, text_processor,
                         process_index, process_count, name, pipeline_spec)
        self._files = _resolve_files(self.config.path, f"{name}.path")
        self._check_data()

    def _parts(self):
        # Every file: one that is empty or broken would otherwise be found only when read.
        return ((self._file_records(0, file_index), shown)
                for file_index, (_, _, shown) in enumerate(self._files))

    def _initial_position(self):
        offset = self.config.start_seek_loc
        line = 0
        if offset:
            fs, path, _ = self._files[0]
            with fs.open(path, "rb", compression="infer") as f:
                line = f.read(offset).count(b"\n")
        return {"pass": 0, "file_index": 0, "file_loc": offset, "line": line}

    def _records(self, position):
        pass_, file_index = position["pass"], position["file_index"]
        offset, line = position["file_loc"], position["line"]
        if file_index >= len(self._files):
            raise ValueError(f"{self.prefix}: the saved position is in file {file_index} but "
                             f"{self.config.path} now names only {len(self._files)} file(s)")
        while True:
            from_start, read_any = file_index == 0 and offset == 0, False
            for file_index in range(file_index, len(self._files)):
                for record in self._file_records(pass_, file_index, offset, line):
                    read_any = True
                    yield record
                offset = line = 0
            if from_start and not read_any:
                raise ValueError(f"{self.prefix}.path: {self.config.path} holds no lines")
            pass_, file_index = pass_ + 1, 0

    def _file_records(self, pass_, file_index, offset=0, line=0):
        """The records of the non-blank lines of one file, from byte ``offset`` (just after
        line ``line``) to its end."""
        fs, path, shown = self._files[file_index]
        with fs.open(path, "rb", compression="infer") as f:
            f.seek(offset)
            for raw in iter(f.readline, b""):
                offset += len(raw)
                line += 1
                if raw.strip():
                    yield ({"pass": pass_, "file_index": file_index, "file_loc": offset,
                            "line": line}, f"{shown}:{line}", raw.rstrip(b"\r\n"))


class HuggingfaceDataset(_DocumentDataset):
    """A ``datasets`` dataset (``load_dataset`` or a ``save_to_disk`` directory), forever;
    with ``shuffle`` each pass uses the seed ``seed + pass``."""

    RECORDS = "examples"

    @staticmethod
    def get_default_config(updates=None):
        config = _common_config(
            path=Option("", "dataset name, builder ('json', 'parquet') or save_to_disk "
                        "directory"),
            name=Option("", "dataset configuration name"),
            split=Option("train", "split to read"),
            data_files=Option("", "comma list, for builders such as 'json'"),
            cache_dir=Option("", "Hugging Face datasets cache; '' = its default"),
            streaming=Option(False, "read without downloading the whole dataset first"),
            shuffle=Option(False, "shuffle each pass with the seed seed + pass"),
            seed=Option(42, "shuffle seed of the first pass"),
            shuffle_buffer_size=Option(10000, "examples in the shuffle buffer (streaming "
                                       "only)"),
        )
        return config.copy_and_update(updates)

    def __init__(self, config, tokenizer, text_processor, process_index=0, process_count=1,
                 name="huggingface_dataset", pipeline_spec=None):
        super().__init__(self.get_default_config(config), tokenizer, text_processor,
                         process_index, process_count, name, pipeline_spec)
        self._dataset = self._load()
        self._check_data()

    def _load(self):
        import datasets

        config = self.config
        if not config.path:
            raise ConfigError(f"{self.prefix}.path is empty; give a dataset name, a builder such "
                              "as 'json' with data_files, or a save_to_disk directory")
        if os.path.isdir(config.path) and any(os.path.exists(os.path.join(config.path, f))
                                              for f in ("state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(config.path)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[config.split]
            return dataset.to_iterable_dataset() if config.streaming else dataset
        data_files = ([f.strip() for f in config.data_files.split(",")] if config.data_files
                      else None)
        try:
            return datasets.load_dataset(
                config.path, config.name or None, split=config.split or None,
                data_files=data_files, streaming=config.streaming,
                cache_dir=config.cache_dir or None)
        except FileNotFoundError as error:
            raise ConfigError(f"{self.prefix}.path / {self.prefix}.data_files: {error}") from None

    def _initial_position(self):
        return {"pass": 0, "row": 0}

    def _parts(self):
        return [(self._first_records(), self.config.path)]

    def _first_records(self):
        # Unshuffled: any records show the fields, and shuffling a whole dataset costs.
        for row, example in enumerate(self._dataset):
            yield {"pass": 0, "row": row + 1}, f"{self.config.path} row {row}", example

    def _records(self, position):
        pass_, row = position["pass"], position["row"]
        while True:
            dataset = self._dataset
            if self.config.shuffle:
                seed = self.config.seed + pass_
                dataset = (dataset.shuffle(seed=seed, buffer_size=self.config.shuffle_buffer_size)
                           if self.config.streaming else dataset.shuffle(seed=seed))
            for example in dataset.skip(row) if row else dataset:
                yield {"pass": pass_, "row": row + 1}, f"{self.config.path} row {row}", example
                row += 1
            if row == 0:
                raise ValueError(f"{self.prefix}.path: {self.config.path} holds no examples")
            pass_, row = pass_ + 1, 0


class DatasetFactory:
    """Builds the configured dataset; ``type`` is ``json`` or ``huggingface``."""

    @staticmethod
    def get_default_config(updates=None):
        config = ConfigDict(
            type=Option("huggingface", "data source: 'json' (json_dataset.*) or 'huggingface' "
                        "(huggingface_dataset.*)"),
            text_processor=TextProcessor.get_default_config(),
            huggingface_dataset=HuggingfaceDataset.get_default_config(),
            json_dataset=JsonDataset.get_default_config(),
        )
        return config.copy_and_update(updates)

    @classmethod
    def load_dataset(cls, config, tokenizer, process_index=0, process_count=1, name="dataset",
                     pipeline_spec=None):
        """The dataset ``config`` describes; ``name`` (e.g. ``train_dataset``) prefixes the
        config keys named in error messages.  ``pipeline_spec``: its ``data_pipeline`` as
        the run read it (:func:`read_pipeline`); read here when not given."""
        config = cls.get_default_config(config)
        text_processor = TextProcessor(config.text_processor, tokenizer, f"{name}.text_processor")
        split = {"process_index": process_index, "process_count": process_count,
                 "pipeline_spec": pipeline_spec}
        if config.type == "json":
            return JsonDataset(config.json_dataset, tokenizer, text_processor,
                               name=f"{name}.json_dataset", **split)
        if config.type == "huggingface":
            return HuggingfaceDataset(config.huggingface_dataset, tokenizer, text_processor,
                                      name=f"{name}.huggingface_dataset", **split)
        raise ConfigError(f"{name}.type: unknown dataset type {config.type!r}; "
                          "use 'json' or 'huggingface'")
