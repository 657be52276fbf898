"""What every source shares: its keys, the pipeline name read into a spec, position tracking,
skipping and filtering, the start-up check of the data, the pipeline, metrics and resume
state."""
import collections
import itertools
import time

import numpy as np

from EasyLM.config import ConfigDict, ConfigError, Option
from EasyLM.data.skips import SkipReport
from EasyLM.data.text import DocumentError, parse_record
from EasyLM.data.tokenizer_pool import tokenized
from FoT import data_pipeline
from FoT.slots import check_whole_groups


def common_config(**specific):
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
