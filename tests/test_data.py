"""Text processing, JSON-lines and Hugging Face datasets, config validation and exact resume."""
import base64
import contextlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from EasyLM.config import ConfigError  # noqa: E402
from EasyLM.data import DatasetFactory, DocumentError, TextProcessor, process_record  # noqa: E402
from EasyLM.tokenizer import load_tokenizer  # noqa: E402
from helpers import (REPO, TINY_CORPUS, assert_same_batches, batches_after_restore,  # noqa: E402
                     save_batches)
from helpers import TINY_SP as TINY_MODEL  # noqa: E402


class CharTokenizer:
    """One token per character, so expected token ids can be written by hand."""
    bos_token_id, eos_token_id, vocab_size = 1, 2, 256

    def encode(self, text):
        return [ord(c) for c in text]


def ids(text):
    return [ord(c) for c in text]


def process(example, **config):
    tokens, mask, source = TextProcessor(config, CharTokenizer())(example)
    assert tokens.dtype == np.int32 and mask.dtype == np.float32
    return tokens.tolist(), mask.tolist(), source


def test_bracketed_fields_have_no_loss_and_bos_eos_masks():
    tokens, mask, _ = process({"q": "ab", "a": "cd"}, fields="[q],a")
    assert tokens == [1] + ids("abcd") + [2]
    assert mask == [0, 0, 0, 1, 1, 1]
    tokens, mask, _ = process({"text": "xy"}, add_bos_token=False, add_eos_token=False)
    assert (tokens, mask) == (ids("xy"), [1, 1])


def test_subfields_joined_with_separator():
    tokens, mask, _ = process({"t": "ab", "b": "c"}, fields="[t+b]", subfield_separator="|",
                              add_bos_token=False, add_eos_token=False)
    assert (tokens, mask) == (ids("ab|c"), [0, 0, 0, 0])


def test_base64_tokens_and_literal_tokens():
    raw = base64.b64encode(np.array([7, 300, 9], np.int32).tobytes()).decode()
    tokens, mask, _ = process({"ids": raw, "text": "z"}, fields="{ids},<|bos|>,[<|eos|>],[{ids}]",
                              add_bos_token=False, add_eos_token=False)
    assert tokens == [7, 300, 9, 1, 2, 7, 300, 9]
    assert mask == [1, 1, 1, 1, 0, 0, 0, 0]
    assert "not base64" in process_record(TextProcessor({"fields": "{ids}"}, CharTokenizer()),
                                          {"ids": "@@not base64@@"})


def test_prepend_text_goes_before_the_first_text_field_only():
    tokens, _, _ = process({"a": "x", "b": "y"}, fields="<|bos|>,a,b", prepend_text="P:",
                           add_bos_token=False, add_eos_token=False)
    assert tokens == [1] + ids("P:x") + ids("y")


def test_source_name_and_fields_from_example():
    assert process({"text": "a", "source_dataset": "wiki"})[2] == "wiki"
    assert process({"text": "a"}, default_source="misc")[2] == "misc"
    example = {"which": "[x],y", "x": "a", "y": "b"}
    tokens, mask, _ = process(example, fields_from_example="which", add_bos_token=False,
                              add_eos_token=False)
    assert (tokens, mask) == (ids("ab"), [0, 1])


def test_missing_or_bad_fields_are_reported_not_raised():
    processor = TextProcessor({"fields": "text"}, CharTokenizer())
    with pytest.raises(DocumentError, match="missing field 'text'"):
        processor({"title": "x"})
    assert process_record(processor, b'{"title": "x"}') == "missing field 'text'"
    assert process_record(processor, b'{"text": 3}') == "field 'text' is not text"
    assert process_record(processor, b"[1, 2]") == "not a JSON object"
    assert process_record(processor, b'{"text": "caf\xe9"}') == "not valid UTF-8"
    assert process_record(processor, b'{"text": "a"').startswith("malformed JSON")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer({"vocab_file": TINY_MODEL})


def json_config(path, **dataset):
    dataset = {"path": str(path), "seq_length": 32, "batch_size": 4, **dataset}
    return {"type": "json", "json_dataset": dataset}


@contextlib.contextmanager
def capture_data_warnings(caplog):
    """Records of the ``EasyLM.data`` logger, captured at the logger itself (the CLI stops
    ``EasyLM`` records reaching the root logger)."""
    data_logger = logging.getLogger("EasyLM.data")
    propagate, data_logger.propagate = data_logger.propagate, False
    data_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="EasyLM.data"):
            yield
    finally:
        data_logger.removeHandler(caplog.handler)
        data_logger.propagate = propagate


def test_malformed_lines_are_skipped_counted_and_reported_once_per_reason(tmp_path, tokenizer,
                                                                          caplog):
    good = ["first good document", "second good one", "third"]
    path = tmp_path / "mixed.jsonl"
    no_text = json.dumps({"title": "no text field"}).encode()
    path.write_bytes(b"\n".join([
        json.dumps({"text": good[0]}).encode(),
        b'{"text": "unterminated',
        no_text,
        b"",
        json.dumps({"text": good[1]}).encode(),
        b'{"text": "caf\xe9 latin-1"}',
        json.dumps({"text": good[2]}).encode(),
        no_text, no_text, no_text,
    ]) + b"\n")
    dataset = DatasetFactory.load_dataset(
        json_config(path, batch_size=1, seq_length=4), tokenizer)
    start = dataset.get_state_dict()
    expected = np.concatenate([[1] + tokenizer.encode(text) + [2] for text in good])
    with capture_data_warnings(caplog):
        batches = [batch for (batch, _), _ in zip(dataset, range(3 * len(expected) // 4))]
        _, metrics = next(iter(dataset))
        first_passes = [r.getMessage() for r in caplog.records]
        # Reading the same lines again (as every evaluation does) reports nothing new.
        dataset.load_state_dict(start)
        for _ in zip(dataset, range(5)):
            pass
        dataset.close()
    stream = np.concatenate([batch["input_tokens"].ravel() for batch in batches])
    np.testing.assert_array_equal(stream[:len(expected)], expected)
    np.testing.assert_array_equal(stream[len(expected):2 * len(expected)], expected)
    assert metrics["dataset_pass"] >= 2
    assert 6 * metrics["dataset_pass"] <= metrics["dataset_skipped_lines"]
    assert metrics["dataset_skipped_lines"] <= 6 * metrics["dataset_pass"] + 6
    name = "dataset.json_dataset: "
    assert first_passes == [
        f"{name}1 of 9 lines skipped, malformed JSON (Unterminated string starting at): {path}:2",
        f"{name}4 of 9 lines skipped, missing field 'text': {path}:3, {path}:8, {path}:9, ...",
        f"{name}1 of 9 lines skipped, not valid UTF-8: {path}:6"]
    assert [r.getMessage() for r in caplog.records] == first_passes


def test_wrong_text_field_fails_at_start_naming_the_key_and_the_fields(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"title": f"t{i}", "text": "words"}) + "\n"
                            for i in range(300)))

    def load(**text_processor):
        return DatasetFactory.load_dataset({**json_config(path), "text_processor": text_processor},
                                           tokenizer, name="train_dataset")
    with pytest.raises(ConfigError, match=r"^train_dataset\.text_processor\.fields='body' .*"
                                          r"missing field 'body'.* fields text, title$"):
        load(fields="body")
    with pytest.raises(ConfigError, match=r"train_dataset\.text_processor\.fields_from_example"):
        load(fields_from_example="spec")
    # Data that has the field, with a few lines that lack it, is not a config error.
    path.write_text("".join(json.dumps({"title": "x"}) + "\n" for _ in range(5))
                    + json.dumps({"body": "words"}) + "\n")
    batch, _ = next(iter(load(fields="body")))
    assert batch["loss_masks"].sum() > 0


def test_short_documents_are_filtered(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "a much longer text"]))
    dataset = DatasetFactory.load_dataset(json_config(path, min_example_length=5), tokenizer)
    _, metrics = next(iter(dataset))
    assert metrics["dataset_filtered_examples"] >= 1
    assert metrics["dataset_filtered_examples"] == metrics["dataset_pass"] + 1


def test_config_errors_name_the_key(tmp_path, tokenizer):
    def load(path=TINY_CORPUS, **dataset):
        return DatasetFactory.load_dataset(json_config(path, **dataset), tokenizer,
                                           name="train_dataset")
    with pytest.raises(ConfigError, match=r"train_dataset\.json_dataset\.path: .*does not exist"):
        load(path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match=r"train_dataset\.json_dataset\.path: .* matches no"):
        load(path=str(tmp_path / "*.jsonl"))
    with pytest.raises(ConfigError, match=r"train_dataset\.json_dataset\.batch_size 6 .* packing "
                                          r"factor 4"):
        load(batch_size=6, data_pipeline="doc_aware_k4")
    with pytest.raises(ConfigError, match=r"train_dataset\.json_dataset\.data_pipeline: unknown"):
        load(data_pipeline="doc_awar")
    with pytest.raises(ConfigError, match="tokenizer_procesess"):
        load(tokenizer_procesess=2)
    with pytest.raises(ConfigError, match=r"train_dataset\.type"):
        DatasetFactory.load_dataset({"type": "csv"}, tokenizer, name="train_dataset")


def test_paths_comma_glob_directory_and_process_rows(tmp_path, tokenizer):
    lines = open(TINY_CORPUS).readlines()
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text("".join(lines[10 * i:10 * i + 10]))
    one_file = tmp_path / "all.jsonl"
    one_file.write_text("".join(lines[:30]))
    reference = [b for b, _ in zip(DatasetFactory.load_dataset(json_config(one_file), tokenizer),
                                   range(5))]
    parts = ",".join(str(tmp_path / f"part{i}.jsonl") for i in range(3))
    for path in [parts, str(tmp_path / "part*.jsonl")]:
        dataset = DatasetFactory.load_dataset(json_config(path), tokenizer)
        for (batch, _), (expected, _) in zip(dataset, reference):
            np.testing.assert_array_equal(batch["input_tokens"], expected["input_tokens"])
    local = DatasetFactory.load_dataset(json_config(one_file, data_pipeline="doc_aware_k2"),
                                        tokenizer, process_index=1, process_count=2)
    full = DatasetFactory.load_dataset(json_config(one_file, data_pipeline="doc_aware_k2"),
                                       tokenizer)
    assert (local.batch_size, local.local_batch_size, local.dataset_packing) == (4, 2, 2)
    for (batch, _), (expected, _), _ in zip(local, full, range(5)):
        np.testing.assert_array_equal(batch["target_tokens"], expected["target_tokens"][2:])


def resume_batches(cases_file, out_file):
    """Child side: a fresh dataset restored from each saved state yields the next batches."""
    tokenizer = load_tokenizer({"vocab_file": TINY_MODEL})
    with open(cases_file) as f:
        cases = json.load(f)
    batches_per_case = []
    for case in cases:
        dataset = DatasetFactory.load_dataset(case["config"], tokenizer)
        dataset.load_state_dict(json.loads(case["state"]))
        batches_per_case.append([batch for _, (batch, _) in zip(range(case["count"]), dataset)])
    save_batches(out_file, batches_per_case)


@pytest.mark.slow
def test_json_dataset_resumes_in_new_process_across_passes(tmp_path, tokenizer):
    data = tmp_path / "shards"
    data.mkdir()
    lines = open(TINY_CORPUS).readlines()[:24]
    for i in range(3):
        (data / f"shard{i}.jsonl").write_text("".join(lines[8 * i:8 * i + 8]))
    cases, expected, count = [], [], 6
    for pipeline in ["doc_aware_k2", "linear"]:
        # Small tokenizer batches keep the pool's read-ahead well past the consumed documents.
        config = json_config(data, seq_length=64, batch_size=4, data_pipeline=pipeline,
                             tokenizer_processes=2, tokenizer_parallel_batch_size=4,
                             tokenizer_parallel_chunk_size=2)
        dataset = DatasetFactory.load_dataset(config, tokenizer)
        batches, states = [], []
        iterator = iter(dataset)
        def step():
            batches.append(next(iterator))
            states.append(json.dumps(dataset.get_state_dict()))
        while not batches or batches[-1][1]["dataset_pass"] < 1:
            step()
        boundary = len(batches) - 1
        for _ in range(count + 2):
            step()
        dataset.close()
        for saved in (boundary - 3, boundary + 1):
            cases.append({"config": config, "state": states[saved], "count": count})
            expected.append(batches[saved + 1:saved + 1 + count])
    assert all(len(batches) == count for batches in expected)
    resumed = batches_after_restore(__file__, cases, tmp_path)
    assert_same_batches(resumed, expected, [f"case {i}" for i in range(len(cases))])


def test_huggingface_dataset_local_json_with_shuffle_and_resume(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(open(TINY_CORPUS).readlines()[:20]))
    hf = {"path": "json", "data_files": str(path), "cache_dir": str(tmp_path / "cache"),
          "seq_length": 32, "batch_size": 4, "data_pipeline": "doc_aware_k2"}

    def load(**updates):
        return DatasetFactory.load_dataset(
            {"type": "huggingface", "huggingface_dataset": {**hf, **updates}}, tokenizer)

    # Without shuffling, the HF source gives the same batches as the JSON-lines reader.
    json_dataset = DatasetFactory.load_dataset(
        json_config(path, seq_length=32, data_pipeline="doc_aware_k2"), tokenizer)
    for (batch, _), (expected, _), _ in zip(load(streaming=True), json_dataset, range(5)):
        np.testing.assert_array_equal(batch["input_tokens"], expected["input_tokens"])

    dataset = load(shuffle=True, seed=3)
    iterator = iter(dataset)
    batches = [next(iterator) for _ in range(10)]
    state = json.loads(json.dumps(dataset.get_state_dict()))
    batches += [next(iterator) for _ in range(5)]
    restored = load(shuffle=True, seed=3)
    restored.load_state_dict(state)
    for (batch, _), (expected, _) in zip(restored, batches[10:]):
        np.testing.assert_array_equal(batch["loss_masks"], expected["loss_masks"])
        np.testing.assert_array_equal(batch["input_tokens"], expected["input_tokens"])
    with pytest.raises(ConfigError, match="huggingface_dataset.path is empty"):
        load(path="")


if __name__ == "__main__":
    resume_batches(sys.argv[1], sys.argv[2])


@pytest.mark.slow
def test_closing_a_pooled_stream_lets_the_workers_finish_what_they_hold(tmp_path):
    """Closing the stream (an evaluation resetting its dataset) stops the tokenizer processes
    only once the batch in flight is done: a worker killed while it writes its result can leave
    the pool waiting forever for the rest of the message (a runner hung so under load)."""
    from EasyLM.data.tokenizer_pool import tokenized
    from helpers import MarkingProcessor

    records = ((n, "line", json.dumps({"n": n}).encode()) for n in range(40))
    stream = tokenized(records, MarkingProcessor(tmp_path, 0.5), processes=2, batch_size=4,
                       chunk_size=1)
    assert [next(stream)[2] for _ in range(2)] == [0, 1]
    stream.close()  # batch 4-7 is being processed
    started = sorted(p.name[6:] for p in tmp_path.glob("start_*"))
    finished = sorted(p.name[4:] for p in tmp_path.glob("end_*"))
    assert set(started) >= {"4", "5"} and started == finished
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_a_pooled_stream_left_open_does_not_hold_up_the_interpreters_exit(tmp_path):
    """A script that never closes its stream: at exit multiprocessing stops the pool before the
    stream is finalized, and closing it must not then wait for batches that cannot come."""
    script = tmp_path / "left_open.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from EasyLM.data.tokenizer_pool import tokenized\n"
        "from helpers import MarkingProcessor\n"
        "if __name__ == '__main__':\n"
        "    records = ((n, 'line', json.dumps({'n': n}).encode()) for n in range(40))\n"
        f"    stream = tokenized(records, MarkingProcessor({str(tmp_path)!r}, 0.5), 2, 4, 1)\n"
        "    print(next(stream)[2])\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=40)
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stderr[-2000:]
