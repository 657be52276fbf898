"""The runner's command line without training: --help, --print_config, range checks before
compiling, the GPU memory key applied before JAX starts, and the out-of-memory message."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.errors import JaxRuntimeError

from EasyLM.config import ConfigError
from EasyLM.models.llama import llama_train
from running_utils import runner
from running_utils.runner_utils import (MEMORY_FRACTION_VARIABLES, apply_gpu_memory_fraction,
                                        build_config, get_default_config, out_of_memory_error,
                                        out_of_memory_message, split_config)

from helpers import REPO, SETUP



@pytest.fixture
def clean_environment(monkeypatch):
    """runner.main sets the memory variable in this process; undone after the test."""
    for name in MEMORY_FRACTION_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    runner.main(["--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    for flag, meaning in [("--total_steps=10000", "optimizer updates of the whole run"),
                          ("--optimizer.adamw_optimizer.lr=0.0001", "peak learning rate"),
                          ("--train_dataset.json_dataset.batch_size=8", "rows per step"),
                          ("--gpu_memory_fraction=0.95", "share of each GPU's memory"),
                          ("--checkpointer.keep_last=2", "rolling")]:
        at = lines.index(f"  {flag}")
        assert meaning in lines[at + 1], (flag, lines[at + 1])
    described = get_default_config().describe()
    assert all(described.values()), [key for key, meaning in described.items() if not meaning]
    assert all(f"  --{key}=" in text for key in described)
    runner.main(["-h"])
    assert capsys.readouterr().out == text


def test_print_config_prints_the_resolved_flat_config_and_exits(tmp_path, capsys):
    workdir = tmp_path / "work"
    runner.main(["--config", SETUP, "--total_steps=7", "--workdir", str(workdir),
                 "--print_config"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["total_steps"] == 7 and printed["load_llama_config"] == "debug_fot"
    assert printed["optimizer.adamw_optimizer.lr"] == build_config(["--config", SETUP])[
        "optimizer"]["adamw_optimizer"]["lr"]
    assert not workdir.exists()
    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(printed))  # itself a config file
    assert build_config(["--config", str(path)]).flatten() == printed


def test_negative_learning_rate_stops_the_runner_before_compiling(tmp_path, monkeypatch, capsys,
                                                                 clean_environment):
    monkeypatch.chdir(REPO)
    workdir = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--config", SETUP, "--workdir", str(workdir),
                     "--optimizer.adamw_optimizer.lr=-1e-3"])
    assert exit_.value.code == 2
    assert "optimizer.adamw_optimizer.lr=-0.001 must be > 0" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize("key, value", [
    ("total_steps", 0), ("train_log_freq", 0), ("eval_freq", -1), ("save_model_freq", -5),
    ("optimizer.adamw_optimizer.end_lr", -1e-5),
    ("optimizer.adamw_optimizer.lr_warmup_steps", -1),
    ("optimizer.adamw_optimizer.weight_decay", -0.1),
    ("optimizer.adamw_optimizer.clip_gradient", -1.0),
    ("train_dataset.json_dataset.batch_size", 0), ("train_dataset.json_dataset.seq_length", 0),
    ("train_dataset.json_dataset.min_example_length", -1),
    ("checkpointer.keep_last", -1), ("peak_flops_per_device", -1.0),
])
def test_impossible_values_name_the_key(key, value):
    _, train = split_config(build_config(["--config", SETUP, f"--{key}={value}"]))
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}={value}"):
        llama_train.validate(train)


def test_gpu_memory_fraction_range_is_checked():
    for value in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="gpu_memory_fraction"):
            split_config(build_config([f"--gpu_memory_fraction={value}"]))


def test_gpu_memory_fraction_leaves_a_value_from_the_environment_alone():
    environ = {}
    apply_gpu_memory_fraction(0.95, environ)
    assert environ == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
    for name in MEMORY_FRACTION_VARIABLES:  # JAX refuses both names at once
        environ = {name: ".5"}
        apply_gpu_memory_fraction(0.95, environ)
        assert environ == {name: ".5"}
    environ = {}
    apply_gpu_memory_fraction(0.0, environ)  # JAX's own default
    assert environ == {}


@pytest.mark.slow
def test_gpu_memory_fraction_is_set_before_jax_starts_its_backend():
    """The runner imports JAX (through llama_train); the variable only counts if it is in the
    environment when the backend starts, which training does first."""
    script = textwrap.dedent("""
        import json, os, sys
        from jax._src import xla_bridge
        from EasyLM.models.llama import llama_train
        from running_utils import runner

        def record(config):
            print(json.dumps([xla_bridge.backends_are_initialized(),
                              os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")]))

        llama_train.main = record
        runner.main(sys.argv[1:])
    """)
    env = {k: v for k, v in os.environ.items() if k not in MEMORY_FRACTION_VARIABLES}
    result = subprocess.run([sys.executable, "-c", script, "--gpu_memory_fraction=0.9"],
                            env=dict(env, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [False, "0.9"]


XLA_OOM = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.50GiB.\n"
           "BufferAssignment OOM Debugging.\nBufferAssignment stats:\n" + "allocation 0\n" * 50)


def test_out_of_memory_message_names_what_to_change():
    try:
        try:
            raise JaxRuntimeError(XLA_OOM)
        except JaxRuntimeError as oom:
            raise RuntimeError("while running the train step") from oom
    except RuntimeError as error:
        found = out_of_memory_error(error)
    assert isinstance(found, JaxRuntimeError)
    assert out_of_memory_error(JaxRuntimeError("INVALID_ARGUMENT: bad shapes")) is None
    assert out_of_memory_error(ValueError("out of memory")) is None

    config = build_config(["--config", SETUP])
    message = out_of_memory_message(found, config, environ={})
    assert "Out of memory while trying to allocate 12.50GiB" in message
    for key in ("remat_block", "train_dataset.json_dataset.batch_size=8",
                "optimizer.accumulate_gradient_steps=1", "loss_chunk_tokens=8192",
                "gpu_memory_fraction=0.95"):
        assert key in message, key
    assert "BufferAssignment" not in message and len(message.splitlines()) <= 8


def test_runner_turns_an_out_of_memory_error_into_the_message(monkeypatch, capsys,
                                                               clean_environment):
    def run_out_of_memory(config):
        raise JaxRuntimeError(XLA_OOM)

    monkeypatch.setattr(llama_train, "main", run_out_of_memory)
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--config", SETUP])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("out of device memory:") and "remat_block" in err
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95" in err  # what the runner set
