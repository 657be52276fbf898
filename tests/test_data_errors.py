"""Data that cannot train, from a user's side: refused at start-up naming the key and the file
(in the library and through the runner, before any run directory exists), and the broken lines
of good data reported as they are read, rate-limited, with the path as the user gave it."""
import contextlib
import json
import logging
import os
import subprocess
import sys

import pytest

from EasyLM.data import dataset as data
from EasyLM.config import ConfigError
from EasyLM.data import DatasetFactory, SkipReport
from EasyLM.tokenizer import load_tokenizer
from helpers import REPO, SETUP, TINY_SP, cpu_env
from running_utils import runner
from running_utils.runner_utils import MEMORY_FRACTION_VARIABLES

GOOD = json.dumps({"text": "a document with a few words in it"})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer({"vocab_file": TINY_SP})


def load(path, tokenizer, name="train_dataset", text_processor=None, **dataset):
    config = {"type": "json", "json_dataset": {"path": str(path), "seq_length": 16,
                                               "batch_size": 2, **dataset},
              "text_processor": text_processor or {}}
    return DatasetFactory.load_dataset(config, tokenizer, name=name)


# Each case: the file's lines, extra dataset keys, the message expected for data/bad.jsonl.
UNUSABLE = {
    "empty": ([], {}, r"^train_dataset\.json_dataset\.path: data/bad\.jsonl holds no lines$"),
    "blank lines": (["", "  "], {}, r"^train_dataset\.json_dataset\.path: data/bad\.jsonl "
                                    r"holds no lines$"),
    "not JSON": (["not json", '{"text": "unterminated', "[1, 2]"], {},
                 r"^train_dataset\.json_dataset\.path: none of the 3 lines of data/bad\.jsonl "
                 r"is a JSON object \(first: data/bad\.jsonl:1: malformed JSON .*\); give one "
                 r"JSON object per line$"),
    "no text field": (["not json", json.dumps({"body": "words"})], {},
                      r"^train_dataset\.text_processor\.fields='text' does not fit the data of "
                      r"train_dataset\.json_dataset\.path \(data/bad\.jsonl\): none of its 2 "
                      r"lines gives a document \(first: data/bad\.jsonl:2: missing field "
                      r"'text'\); the records have the fields body$"),
    "too short": ([GOOD, json.dumps({"text": 5})], {"min_example_length": 100},
                  r"^train_dataset\.json_dataset\.min_example_length=100 drops every document "
                  r"of train_dataset\.json_dataset\.path \(data/bad\.jsonl\): none of its 2 "
                  r"lines gives 100 tokens \(the longest \d+\); lower it$"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_data_without_a_usable_document_is_refused_naming_the_key_and_the_file(
        case, tmp_path, monkeypatch, tokenizer):
    lines, dataset, message = UNUSABLE[case]
    monkeypatch.chdir(tmp_path)
    os.mkdir("data")
    with open("data/bad.jsonl", "w") as f:
        f.write("".join(line + "\n" for line in lines))
    with pytest.raises(ConfigError, match=message):
        load("data/bad.jsonl", tokenizer, **dataset)


def test_every_file_of_a_glob_or_directory_is_checked_and_named_as_given(tmp_path, monkeypatch,
                                                                        tokenizer):
    monkeypatch.chdir(tmp_path)
    os.makedirs("proj")
    os.makedirs("shards/more")
    (tmp_path / "shards" / "a.jsonl").write_text(GOOD + "\n")
    (tmp_path / "shards" / "more" / "b.jsonl").write_text("")
    for path in ("proj/../shards", "proj/../shards/", "proj/../shards/*/*.jsonl",
                 "shards/a.jsonl,proj/../shards/more/b.jsonl"):
        with pytest.raises(ConfigError, match=r"^train_dataset\.json_dataset\.path: "
                                              r"proj/\.\./shards/more/b\.jsonl holds no lines$"):
            load(path, tokenizer)
    with pytest.raises(ConfigError, match=r"^eval_dataset\.json_dataset\.path: "):
        load("shards", tokenizer, name="eval_dataset")


def test_the_check_reads_each_file_up_to_its_first_usable_document_only(tmp_path, monkeypatch,
                                                                        tokenizer):
    """A file of many GB costs a line or two at start-up; broken starts are bounded."""
    big = tmp_path / "big.jsonl"
    big.write_text("".join([GOOD + "\n"] + ["broken\n"] * 20000))
    small = tmp_path / "small.jsonl"
    small.write_text("broken\n" + GOOD + "\n")
    parsed = []
    parse = data.parse_record
    monkeypatch.setattr(data, "parse_record", lambda payload: parsed.append(payload)
                        or parse(payload))
    load(f"{big},{small}", tokenizer)
    assert len(parsed) == 3
    monkeypatch.setattr(data._DocumentDataset, "CHECK_RECORDS", 5)
    big.write_text("".join(["broken\n"] * 5 + [GOOD + "\n"]))
    with pytest.raises(ConfigError, match=r"none of the first 5 lines of .*big\.jsonl is a JSON"):
        load(big, tokenizer)


def test_short_documents_are_refused_only_when_no_file_has_a_long_one(tmp_path, monkeypatch,
                                                                     tokenizer):
    """A filter for long documents may pass a file of short ones, or a start of short ones."""
    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    short.write_text(GOOD + "\n")
    long.write_text(json.dumps({"text": "many words " * 50}) + "\n")
    load(f"{short},{long}", tokenizer, min_example_length=60)
    with pytest.raises(ConfigError, match=r"min_example_length=60 .*\(.*short\.jsonl\): none "
                                          r"of its 1 lines gives 60 tokens"):
        load(f"{short},{short}", tokenizer, min_example_length=60)
    monkeypatch.setattr(data._DocumentDataset, "CHECK_RECORDS", 5)
    short.write_text((GOOD + "\n") * 5)
    load(short, tokenizer, min_example_length=60)


@pytest.fixture
def in_repo(monkeypatch):
    """The runner in this process, from the repository (setup_test.json's relative paths)."""
    monkeypatch.chdir(REPO)
    for name in MEMORY_FRACTION_VARIABLES:  # runner.main sets one in this process
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("dataset", ["train_dataset", "eval_dataset"])
def test_the_runner_refuses_unusable_data_in_one_line_before_the_run_starts(
        dataset, tmp_path, in_repo, capsys):
    (tmp_path / "proj").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jsonl").write_text("not json\n[1]\n")
    path = f"{tmp_path}/proj/../bad/broken.jsonl"
    workdir = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--config", SETUP, "--workdir", str(workdir),
                     f"--{dataset}.json_dataset.path={path}"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"config error: {dataset}.json_dataset.path: none of the 2 "
                               f"lines of {path} is a JSON object")
    assert not workdir.exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_broken_lines_are_reported_as_read_then_counted_per_reason(processes, tmp_path,
                                                                   monkeypatch, tokenizer):
    """The first few per file when read (one report, whatever the tokenizer processes), the
    counts per reason at the end of the first pass."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("bad")
    lines = []
    for i in range(40):
        lines.append(json.dumps({"text": f"document {i} " * 4}))
        lines.append("broken {" if i % 2 else json.dumps({"title": "no text"}))
    (tmp_path / "bad" / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    path = "proj/../bad/mixed.jsonl"
    os.mkdir("proj")
    dataset = load(path, tokenizer, tokenizer_processes=processes,
                   tokenizer_parallel_batch_size=8, tokenizer_parallel_chunk_size=2)
    with data_log() as log:
        iterator = iter(dataset)
        next(iterator)
        during = list(log)
        while next(iterator)[1]["dataset_pass"] < 1:
            pass
        dataset.close()
    name = "train_dataset.json_dataset"
    shown = [f"{name}: skipped {path}:2: missing field 'text'",
             f"{name}: skipped {path}:4: malformed JSON (Expecting value)",
             f"{name}: skipped {path}:6: missing field 'text'; further skipped lines of this "
             "file are only counted, in the warnings every 100000 lines and at the end of the "
             "first pass"]
    assert during == [("INFO", message) for message in shown[:len(during)]] and during
    assert log == [("INFO", message) for message in shown] + [
        ("WARNING", f"{name}: 20 of 80 lines skipped, missing field 'text': {path}:2, "
                    f"{path}:6, {path}:10, ..."),
        ("WARNING", f"{name}: 20 of 80 lines skipped, malformed JSON (Expecting value): "
                    f"{path}:4, {path}:8, {path}:12, ...")]


def test_a_long_pass_is_summarised_as_it_goes(monkeypatch):
    monkeypatch.setattr(SkipReport, "REPORT_LINES", 4)
    report = SkipReport("d")
    with data_log() as log:
        for line in range(1, 10):
            report.read(f"f:{line}", "bad" if line % 2 else None, "f")
    assert [level for level, _ in log] == ["INFO", "INFO", "WARNING", "INFO", "WARNING"]
    assert log[2][1] == "d: 2 of 4 lines skipped, bad: f:1, f:3"


@contextlib.contextmanager
def data_log():
    """``(level, message)`` of what the ``EasyLM.data`` logger gives in the block, INFO and
    above (captured at the logger: the CLI stops ``EasyLM`` records reaching the root)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append((record.levelname, record.getMessage()))
    logger = logging.getLogger("EasyLM.data")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.slow
def test_a_fresh_clone_journey_broken_data_fails_in_one_line(tmp_path):
    """The runner as a user starts it, with a relative path: status 2, one line, no run."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "proj").mkdir()
    (tmp_path / "bad" / "broken.jsonl").write_text("not json\n[1]\n")
    result = subprocess.run(
        [sys.executable, "-m", "running_utils.runner", "--config", SETUP,
         f"--tokenizer.vocab_file={TINY_SP}",
         f"--eval_dataset.json_dataset.path={REPO}/data/tiny_eval.jsonl",
         "--train_dataset.json_dataset.path=proj/../bad/broken.jsonl", "--workdir=work"],
        cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "config error: train_dataset.json_dataset.path: none of the 2 lines of "
        "proj/../bad/broken.jsonl is a JSON object (first: proj/../bad/broken.jsonl:1: "
        "malformed JSON (Expecting value)); give one JSON object per line"]
    assert not (tmp_path / "work").exists()
