"""Every command behaves like the runner: a bad input is one line on stderr naming the flag,
exit status 2, before any work and with nothing written; a failure midway leaves no output;
an export's files all have open()'s mode; the evaluations print the paths they wrote."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from EasyLM import cli
from EasyLM.models.llama import convert_easylm_to_hf, convert_hf_to_easylm
from eval import loss_by_position, passkey
from eval import dictionary_lookup, models, window_rules
from running_utils.runner_utils import MEMORY_FRACTION_VARIABLES
from helpers import REPO, TINY_SP, cpu_env
from test_hf_fot import tiny_fot_checkpoint

README = os.path.join(REPO, "README.md")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """``(checkpoint spec, its export, a JSONL file)`` of a tiny FoT model."""
    root = tmp_path_factory.mktemp("cli_model")
    _, _, spec = tiny_fot_checkpoint(root / "ckpt", vocab_size=512)
    convert_easylm_to_hf.convert(spec, str(root / "hf"), tokenizer_path=TINY_SP)
    data = root / "docs.jsonl"
    data.write_text(json.dumps({"text": passkey.FILLER}) + "\n")
    return spec, str(root / "hf"), str(data)


def fake_export(directory, model_type="fot_llama"):
    """What the argument checks look at of an export: the names and config.json."""
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": model_type}, f)
    open(os.path.join(directory, "model.safetensors"), "w").close()
    return str(directory)


def one_line_error(capsys, main, argv):
    """The stderr line of ``main(argv)``, which must exit 2 and write only that line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def entries(directory):
    return sorted(os.listdir(directory))


def evaluation_cases(model, tmp_path):
    spec, hf_dir, data = model
    tmp_path.mkdir()
    bare = fake_export(tmp_path / "bare")  # no tokenizer in it
    plain = fake_export(tmp_path / "plain", model_type="llama")
    (tmp_path / "not_json.jsonl").write_text("text\n")
    (tmp_path / "other_field.jsonl").write_text('{"body": "text"}\n')
    jax_model = ["--load_checkpoint", spec, "--tokenizer", TINY_SP]
    # (command, arguments, the flag the message names, words of the message)
    return [
        (passkey, ["--load_checkpoint", spec, "--tokenizer", "tokenizers/tokenizer.model"],
         "--tokenizer:", "does not exist"),
        (passkey, ["--load_checkpoint", spec, "--tokenizer", README], "--tokenizer:",
         "could not be read"),
        (passkey, ["--load_checkpoint", spec], "--load_checkpoint", "needs --tokenizer"),
        (passkey, ["--load_checkpoint", str(tmp_path / "none"), "--tokenizer", TINY_SP],
         "--load_checkpoint", "no params checkpoint"),
        (passkey, ["--load_checkpoint", str(tmp_path), "--tokenizer", TINY_SP],
         "--load_checkpoint", "no params checkpoint"),
        (passkey, ["--hf_model", str(tmp_path / "none")], "--hf_model:", "does not exist"),
        (passkey, ["--hf_model", str(tmp_path)], "--hf_model:", "has no config.json"),
        (passkey, ["--hf_model", spec.partition("::")[2]], "--hf_model:",
         "it is a toolkit checkpoint"),
        (passkey, ["--load_checkpoint", hf_dir, "--tokenizer", TINY_SP], "--load_checkpoint",
         "it is a Hugging Face model directory"),
        (passkey, ["--hf_model", bare], "--hf_model:", "holds no tokenizer"),
        (passkey, ["--hf_model", hf_dir, "--output_dir", README], "--output_dir:", "is a file"),
        (loss_by_position, jax_model + ["--data", str(tmp_path / "none.jsonl")], "--data:",
         "does not exist"),
        (loss_by_position, jax_model + ["--data", str(tmp_path / "not_json.jsonl")], "--data:",
         "line 1 of"),
        (loss_by_position, jax_model + ["--data", str(tmp_path / "other_field.jsonl")],
         "--data:", "set --text_field"),
        (loss_by_position, jax_model + ["--data", data, "--min_length", "1000"], "--data:",
         "lower --min_length"),
        (loss_by_position, jax_model + ["--data", data, "--min_length", "1025", "--max_length",
                                        "1024"], "--min_length 1025", "is above --max_length"),
        (loss_by_position, ["--hf_model", hf_dir, "--random_tokens", "--context_windows", "2"],
         "--context_windows", "needs a toolkit checkpoint"),
        (dictionary_lookup, jax_model + ["--data", str(tmp_path / "none.jsonl")], "--data:",
         "does not exist"),
        (dictionary_lookup, jax_model + ["--data", data, "--window", "16",
                                         "--last_context_length", "8"], "--window:",
         "pass --last_context_length 16"),
        (window_rules, ["--hf_model", plain, "--data", data], "--hf_model:", "plain LLaMA"),
        (window_rules, ["--hf_model", hf_dir, "--data", str(tmp_path / "none.jsonl")],
         "--data:", "does not exist"),
    ]


@pytest.mark.slow
def test_bad_evaluation_inputs_fail_in_one_line_naming_the_flag(model, tmp_path, capsys):
    for command, argv, flag, words in evaluation_cases(model, tmp_path / "inputs"):
        if "--output_dir" not in argv:
            argv = argv + ["--output_dir", str(tmp_path / "out")]
        line = one_line_error(capsys, command.main, argv)
        assert f"error: {flag}" in line and words in line, (command.__name__, line)
        assert not (tmp_path / "out").exists()


def test_an_evaluation_takes_its_share_of_the_gpu_before_jax_starts(tmp_path, monkeypatch,
                                                                     capsys):
    """``--gpu_memory_fraction`` of every evaluation sets JAX's variable when the flags are
    checked (before the backend starts); one already in the environment wins, as with the
    runner."""
    for name in MEMORY_FRACTION_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    export = fake_export(tmp_path / "hf")
    shutil.copy(TINY_SP, os.path.join(export, "tokenizer.model"))
    parser = argparse.ArgumentParser()
    models.add_model_arguments(parser)
    args = parser.parse_args(["--hf_model", export, "--gpu_memory_fraction", "0.3"])
    models.tokenizer_from_args(args)
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.3"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    models.tokenizer_from_args(parser.parse_args(["--hf_model", export,
                                                  "--gpu_memory_fraction", "0.2"]))
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    models.tokenizer_from_args(parser.parse_args(["--hf_model", export]))  # no flag: JAX's own
    assert not any(name in os.environ for name in MEMORY_FRACTION_VARIABLES)
    for bad in ("0", "1.5", "half"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--hf_model", export, "--gpu_memory_fraction", bad])
        assert exit_.value.code == 2
        assert "argument --gpu_memory_fraction:" in capsys.readouterr().err


def test_bad_converter_inputs_fail_in_one_line_naming_the_flag(model, tmp_path, capsys):
    spec, hf_dir, _ = model
    checkpoint = spec.partition("::")[2]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    out = str(tmp_path / "out")
    export = ["--load_checkpoint", spec, "--output_dir"]
    cases = [
        (convert_easylm_to_hf, export + [out, "--tokenizer_path", "tokenizers/nope.model"],
         "--tokenizer_path:", "does not exist"),
        (convert_easylm_to_hf, export + [out, "--tokenizer_path", os.path.join(REPO, "data")],
         "--tokenizer_path:", "holds none of"),
        (convert_easylm_to_hf, ["--load_checkpoint", out, "--output_dir", out],
         "--load_checkpoint", "no params checkpoint"),
        (convert_easylm_to_hf, export + [README], "--output_dir:", "is a file"),
        (convert_easylm_to_hf, export + [str(tmp_path / "taken")], "--output_dir:",
         "does not hold a Hugging Face model"),
        (convert_easylm_to_hf, export + [os.path.dirname(checkpoint)], "--output_dir:",
         "holds the checkpoint"),
        (convert_hf_to_easylm, ["--hf_model", str(tmp_path / "none"), "--output", out],
         "--hf_model:", "does not exist"),
        (convert_hf_to_easylm, ["--hf_model", str(tmp_path), "--output", out], "--hf_model:",
         "has no config.json"),
        (convert_hf_to_easylm, ["--hf_model", hf_dir, "--output", out, "--mem_layers", "7"],
         "--mem_layers:", "out of range"),
        (convert_hf_to_easylm, ["--hf_model", hf_dir, "--output", checkpoint], "--output:",
         "already exists"),
        (convert_hf_to_easylm, ["--hf_model", hf_dir, "--output", f"{README}/ckpt"],
         "--output:", "is a file"),
    ]
    before = entries(tmp_path)
    for command, argv, flag, words in cases:
        line = one_line_error(capsys, command.main, argv)
        assert f"error: {flag}" in line and words in line, (command.__name__, line)
        assert entries(tmp_path) == before
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_an_unreadable_tokenizer_fails_before_the_weights_are_read(model, tmp_path,
                                                                   monkeypatch, capsys):
    spec, _, _ = model
    reads = []
    monkeypatch.setattr(convert_easylm_to_hf, "load_params", lambda *args: reads.append(args))
    line = one_line_error(capsys, convert_easylm_to_hf.main, [
        "--load_checkpoint", spec, "--output_dir", str(tmp_path / "exported"),
        "--tokenizer_path", README])
    assert "error: --tokenizer_path:" in line and "could not be read" in line
    assert reads == [] and entries(tmp_path) == []


def test_a_corrupt_weights_file_is_a_one_line_error_and_leaves_no_output(model, tmp_path,
                                                                        capsys):
    _, hf_dir, _ = model
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    (broken / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(SystemExit) as exit_:
        convert_hf_to_easylm.main(["--hf_model", str(broken), "--output", str(tmp_path / "ck")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_.value.code == 2 and len(errors) == 1
    assert "--hf_model:" in errors[0] and "could not be read" in errors[0]
    assert entries(tmp_path) == ["broken"]


def half_written(name):
    """A writer that leaves half a file in its directory, then fails."""
    def write(*args):
        directory = next(a for a in args if isinstance(a, str) and os.path.isdir(a))
        with open(os.path.join(directory, name), "w") as f:
            f.write("half")
        raise OSError("disk full")
    return write


def test_a_failure_midway_leaves_no_output_and_an_earlier_export_whole(model, tmp_path,
                                                                       monkeypatch):
    spec, hf_dir, _ = model
    out = tmp_path / "exported"
    argv = ["--load_checkpoint", spec, "--output_dir", str(out), "--tokenizer_path", TINY_SP]
    monkeypatch.setattr(convert_easylm_to_hf, "write_safetensors",
                        half_written("model.safetensors"))
    with pytest.raises(OSError, match="disk full"):
        convert_easylm_to_hf.main(argv)
    assert entries(tmp_path) == []
    monkeypatch.undo()
    convert_easylm_to_hf.main(argv)
    exported = {name: (out / name).read_bytes() for name in entries(out)}
    monkeypatch.setattr(convert_easylm_to_hf, "write_safetensors",
                        half_written("model.safetensors"))
    with pytest.raises(OSError, match="disk full"):  # over the earlier export
        convert_easylm_to_hf.main(argv)
    assert {name: (out / name).read_bytes() for name in entries(out)} == exported
    assert entries(tmp_path) == ["exported"]
    monkeypatch.setattr(convert_hf_to_easylm, "save_params", half_written("llama_config.json"))
    with pytest.raises(OSError, match="disk full"):
        convert_hf_to_easylm.main(["--hf_model", hf_dir, "--output", str(tmp_path / "ck")])
    assert entries(tmp_path) == ["exported"]


def test_written_files_have_the_mode_open_gives(model, tmp_path):
    spec, hf_dir, _ = model
    umask = os.umask(0)
    os.umask(umask)
    convert_easylm_to_hf.main(["--load_checkpoint", spec, "--output_dir",
                               str(tmp_path / "hf"), "--tokenizer_path", TINY_SP])
    convert_hf_to_easylm.main(["--hf_model", hf_dir, "--output", str(tmp_path / "ck")])
    modes = {os.path.relpath(os.path.join(root, name), tmp_path):
             oct(os.stat(os.path.join(root, name)).st_mode & 0o777)
             for root, _, names in os.walk(tmp_path) for name in names}
    assert "hf/model.safetensors" in modes and "ck/llama_config.json" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


class PlantedAnswerModel:
    """Answers every passkey: the evaluation's outputs without a model to run."""
    last_context_length = 32

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompt, max_new_tokens):
        text = self.tokenizer.decode(list(prompt[0]))
        key = text.split("The pass key is ")[1].split(".")[0]
        return np.asarray([self.tokenizer.encode(f" {key}.")[:max_new_tokens]])


def test_evaluations_write_whole_results_and_print_their_paths(model, tmp_path, monkeypatch,
                                                               capsys):
    _, hf_dir, _ = model
    from EasyLM.tokenizer import load_tokenizer
    tokenizer = load_tokenizer({"vocab_file": TINY_SP})
    monkeypatch.setattr(passkey, "model_from_args",
                        lambda args, use_memory: (PlantedAnswerModel(tokenizer), tokenizer))
    out = tmp_path / "results"
    out.mkdir()
    (out / "other.json").write_text("kept")
    argv = ["--hf_model", hf_dir, "--lengths", "60", "--depths", "0.5", "--trials", "1",
            "--output_dir", str(out)]
    passkey.main(argv)
    printed = capsys.readouterr().out.splitlines()
    written = [str(out / "passkey.json"), str(out / "passkey.png")]
    assert [f"wrote {path}" for path in written] == printed[-2:]
    assert entries(out) == ["other.json", "passkey.json", "passkey.png"]
    result = (out / "passkey.json").read_text()
    (out / "passkey.json").write_text("earlier")

    def half_a_plot(path, *args):
        open(path, "w").write("half")
        raise OSError("disk full")

    monkeypatch.setattr(passkey, "accuracy_heatmap", half_a_plot)
    with pytest.raises(OSError, match="disk full"):
        passkey.main(argv)
    assert "wrote" not in capsys.readouterr().out
    assert (out / "passkey.json").read_text() == "earlier"  # neither file replaced
    assert entries(out) == ["other.json", "passkey.json", "passkey.png"]
    assert json.loads(result)["accuracy"] == [[1.0]]


def test_write_files_leaves_no_temporary_file_or_new_directory_behind(tmp_path, capsys):
    def fail(path):
        open(path, "w").close()
        raise OSError("disk full")

    with pytest.raises(OSError):
        cli.write_files(str(tmp_path / "new"), {"a.json": cli.json_writer({}), "b.png": fail})
    assert entries(tmp_path) == [] and capsys.readouterr().out == ""


@pytest.mark.slow
def test_the_issue_command_fails_in_one_line(model):
    spec, _, _ = model
    result = subprocess.run(
        [sys.executable, "-m", "eval.passkey", "--load_checkpoint", spec, "--tokenizer",
         "tokenizers/tokenizer.model", "--output_dir", "unused"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].endswith("error: --tokenizer: tokenizers/tokenizer.model does not exist")
    assert not os.path.exists(os.path.join(REPO, "unused"))
