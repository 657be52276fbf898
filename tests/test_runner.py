"""The JSON runner end to end: flags, misconfigurations caught before compiling, a full
setup_test run converted to Hugging Face, exact resume after SIGKILL, and a two-process pod job
that matches one process."""
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import cpu_xla_flags

from EasyLM import run
from EasyLM.checkpoint import (TrainCheckpointer, load_llama_config, load_params, read_metadata,
                               save_params)
from EasyLM.config import ConfigError
from EasyLM.models.llama import convert_easylm_to_hf, llama_train
from EasyLM.jax_utils import tree_path_name
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule, LLaMAConfig
from EasyLM.run_dirs import latest_train_checkpoint
from FoT.hf.modeling_fot_llama import FoTLlamaForCausalLM
from running_utils.runner_utils import build_config, split_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(REPO, "configs", "setup_test.json")
# setup_test.json made shorter: every step logged, checkpoints every 4 steps.
SHORT = ["--total_steps=24", "--save_model_freq=4", "--train_log_freq=1", "--eval_freq=8",
         "--eval_steps=1", "--train_dataset.json_dataset.seq_length=64",
         "--eval_dataset.json_dataset.seq_length=64"]
# Writers the reference run covers; the other runs skip them (importing them costs seconds).
QUIET = ["--logging.tensorboard=false", "--logging.plot=false"]
# Metrics that measure the machine rather than the run.
TIMING = ("time", "per_second", "tflops", "mfu", "batch_seconds")


def runner_command(workdir, *extra):
    return [sys.executable, "-m", "running_utils.runner", "--config", SETUP, *SHORT,
            "--workdir", str(workdir), *extra]


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache the runs share: a resumed run executes the very program
    the first one compiled, and the suite stays fast."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def cpu_env(cache, devices=1, **extra):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_xla_flags(devices),
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(extra)
    return env


def run_dir_of(workdir):
    runs = sorted(glob.glob(os.path.join(str(workdir), "20*")))
    assert len(runs) == 1, runs
    return runs[0]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def deterministic(record):
    return {k: v for k, v in record.items() if not any(t in k for t in TIMING)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, compilation_cache):
    """One uninterrupted single-process run of the shortened setup_test config."""
    workdir = tmp_path_factory.mktemp("reference")
    result = subprocess.run(runner_command(workdir), env=cpu_env(compilation_cache), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir_of(workdir)


# Flags.

def test_json_then_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"_comment": "ignored", "total_steps": 5, "seed": 3,
                                "optimizer.adamw_optimizer.lr": 1e-4}))
    config = build_config(["--config", str(path), "--total_steps=7", "--pod_job",
                           "--workdir", "/tmp/x", "--optimizer.adamw_optimizer.end_lr", "0.5"])
    runner, train = split_config(config)
    assert runner.pod_job is True and "pod_job" not in train
    assert (train.total_steps, train.seed, train.workdir) == (7, 3, "/tmp/x")
    assert train.optimizer.adamw_optimizer.lr == 1e-4
    assert train.optimizer.adamw_optimizer.end_lr == 0.5


def test_original_longllama_keys_are_accepted():
    original = {
        "tokenizer.vocab_file": "tokenizers/tiny_sp.model", "train_dataset.type": "json",
        "train_dataset.json_dataset.data_pipeline": "doc_aware_k2",
        "train_dataset.json_dataset.path": "data/tiny_corpus.jsonl",
        "train_dataset.text_processor.fields": "text",
        "train_dataset.json_dataset.batch_size": 4, "train_dataset.json_dataset.seq_length": 512,
        "train_dataset.json_dataset.tokenizer_processes": 1,
        "train_dataset.json_dataset.min_example_length": 0,
        "train_cross_batch_range": 2, "train_cross_batch_stepping": True, "train_log_freq": 1,
        "total_steps": 100, "eval_dataset.type": "json",
        "eval_dataset.json_dataset.min_example_length": 512, "eval_cross_batch_range": 0,
        "eval_cross_batch_stepping": False, "eval_freq": 3, "eval_steps": 10, "dtype": "fp32",
        "mesh_dim": "1,-1,1", "load_llama_config": "debug_fot",
        "update_llama_config": "dict(vocab_size=512, rope_theta=1e6)",
        "load_checkpoint": "", "load_dataset_state": "", "workdir": "./test_workdir",
        "optimizer.type": "adamw", "optimizer.adamw_optimizer.lr": 1.5e-05,
        "optimizer.adamw_optimizer.end_lr": 1.0e-05,
        "optimizer.adamw_optimizer.lr_warmup_steps": 500,
        "optimizer.adamw_optimizer.lr_decay_steps": 250000,
        "optimizer.adamw_optimizer.weight_decay": 0.05, "save_model_freq": 0,
        "save_milestone_freq": 20, "scan_cross_batch": False,
        "flip_sharding_in_cross_batch": False, "seed": 42, "log_all_worker": False,
        "optimizer.accumulate_gradient_steps": 1,
    }
    config = get_default_with(original)
    assert config.train_dataset.json_dataset.seq_length == 512
    for text in ('{"vocab_size": 512, "rope_theta": 1e6}', "{'vocab_size': 512, "
                 "'rope_theta': 1e6}", config.update_llama_config):
        assert llama_train.parse_llama_overrides(text) == {"vocab_size": 512, "rope_theta": 1e6}


def get_default_with(values):
    return llama_train.get_default_config().copy_and_update(values)


@pytest.mark.parametrize("key, close", [("train_dataset.json_dataset.seq_lenght", "seq_length"),
                                        ("total_step", "total_steps"),
                                        ("optimizer.adamw_optimizer.warmup_steps",
                                         "lr_warmup_steps")])
def test_unknown_key_fails_naming_close_keys(tmp_path, key, close):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({key: 1}))
    with pytest.raises(ConfigError, match=close):
        build_config(["--config", str(path)])


# Misconfigurations: each fails before compiling (no run directory yet), naming the key.

MISCONFIGURATIONS = {
    "batch vs packing": ({"train_dataset.json_dataset.data_pipeline": "doc_aware_k3"},
                         r"train_dataset\.json_dataset\.batch_size.*packing"),
    "batch vs data-parallel shards": ({"train_dataset.json_dataset.batch_size": 4},
                                      r"train_dataset\.json_dataset\.batch_size.*shards"),
    "eval batch vs shards": ({"eval_dataset.json_dataset.batch_size": 12},
                             r"eval_dataset\.json_dataset\.batch_size.*shards"),
    "micro-batch vs packing": ({"mesh_dim": "1,1,-1", "optimizer.accumulate_gradient_steps": 8},
                               r"optimizer\.accumulate_gradient_steps"),
    "vocab smaller than tokenizer": ({"update_llama_config": '{"vocab_size": 256}'},
                                     r"vocab_size.*tokenizer"),
    "missing train data": ({"train_dataset.json_dataset.path": "data/missing.jsonl"},
                           r"train_dataset\.json_dataset\.path"),
    "missing eval data": ({"eval_dataset.json_dataset.path": "data/missing.jsonl"},
                          r"eval_dataset\.json_dataset\.path"),
    "missing checkpoint": ({"load_checkpoint": "trainstate::/nonexistent/step_3"},
                           r"load_checkpoint"),
    "bad checkpoint kind": ({"load_checkpoint": "weights::/tmp"}, r"load_checkpoint"),
    "impossible mesh": ({"mesh_dim": "3,-1,1"}, r"mesh_dim"),
    "unknown model": ({"load_llama_config": "9b_FoT"}, r"load_llama_config"),
    "bad model override": ({"update_llama_config": '{"hidden_sise": 64}'},
                           r"update_llama_config"),
    "bad remat policy": ({"update_llama_config": '{"remat_block": "dots_only"}'},
                         r"update_llama_config.*remat_block"),
    "negative loss chunk": ({"loss_chunk_tokens": -1}, r"loss_chunk_tokens"),
}


@pytest.mark.parametrize("case", sorted(MISCONFIGURATIONS))
def test_misconfiguration_fails_before_compiling(tmp_path, monkeypatch, case):
    updates, message = MISCONFIGURATIONS[case]
    monkeypatch.chdir(REPO)
    config = build_config(["--config", SETUP, "--workdir", str(tmp_path / "work")])
    config.update_from(updates)
    _, train = split_config(config)
    with pytest.raises(ConfigError, match=message):
        llama_train.main(train)
    assert not os.path.exists(tmp_path / "work")


def test_resume_flag_chooses_the_run(tmp_path):
    old_run = tmp_path / "2024-01-01_00-00-00"
    (old_run / "checkpoints" / "step_8" / "state").mkdir(parents=True)
    config = get_default_with({"workdir": str(tmp_path)})
    assert run.select_run(config.workdir, config.resume) == (
        str(old_run), str(old_run / "checkpoints/step_8"))
    config.resume = False
    fresh, resume_from = run.select_run(config.workdir, config.resume)
    assert resume_from is None and fresh != str(old_run) and os.path.isdir(fresh)


# End to end.

@pytest.mark.slow
def test_setup_test_run_trains_evaluates_checkpoints_and_converts(reference_run, tmp_path):
    logged = records(reference_run)
    losses = [logged[s]["train/loss"] for s in range(1, 25)]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    assert sorted(s for s, r in logged.items() if "eval/loss" in r) == [0, 8, 16, 24]
    assert logged[24]["eval/loss"] < logged[0]["eval/loss"]
    for name in ("config.json", "train.log", "loss_curve.png"):
        assert os.path.exists(os.path.join(reference_run, name)), name
    assert glob.glob(os.path.join(reference_run, "tensorboard", "events.out.tfevents.*"))
    checkpoints = sorted(os.listdir(os.path.join(reference_run, "checkpoints")))
    assert checkpoints == ["step_20", "step_24"]  # keep_last=2

    step_dir = os.path.join(reference_run, "checkpoints", "step_24")
    output = tmp_path / "hf"
    convert_easylm_to_hf.main(["--load_checkpoint", f"trainstate::{step_dir}",
                               "--output_dir", str(output),
                               "--tokenizer_path", os.path.join(REPO, "tokenizers",
                                                                "tiny_sp.model")])
    model = transformers.LlamaForCausalLM.from_pretrained(output).float().eval()
    tokens = np.random.default_rng(0).integers(3, 512, size=(2, 24))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    config = load_llama_config(step_dir)
    variables = load_params(f"trainstate::{step_dir}")
    ours = FlaxLLaMAForCausalLMModule(config).apply(variables, jnp.asarray(tokens)).logits
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_run(reference_run, tmp_path,
                                                             compilation_cache):
    command = runner_command(tmp_path, *QUIET)
    env = cpu_env(compilation_cache)
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:  # kill after step 4's checkpoint
        runs = glob.glob(os.path.join(str(tmp_path), "20*"))
        try:
            if runs and latest_train_checkpoint(runs[0]) and max(records(runs[0])) >= 6:
                break
        except (OSError, ValueError):  # not written yet, or a line half-written
            pass
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    run_dir = run_dir_of(tmp_path)
    assert 24 not in records(run_dir)

    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_dir_of(tmp_path) == run_dir
    with open(os.path.join(run_dir, "train.log")) as f:
        assert "resuming from" in f.read()  # not a fresh start that happens to agree
    resumed, expected = records(run_dir), records(reference_run)
    assert sorted(resumed) == sorted(expected)
    for step in sorted(expected):  # losses, norms, learning rate and the data position
        assert deterministic(resumed[step]) == deterministic(expected[step]), step


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_pod_job_matches_one_process(reference_run, tmp_path, compilation_cache):
    command = runner_command(tmp_path, "--pod_job", "--total_steps=6", *QUIET)
    shared = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2")
    workers = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                env=cpu_env(compilation_cache, JAX_PROCESS_ID=str(i), **shared))
               for i in range(2)]
    try:
        errors = [w.communicate(timeout=600)[1] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    run_dir = run_dir_of(tmp_path)
    pod, expected = records(run_dir), records(reference_run)
    assert sorted(pod) == list(range(7))
    for step in range(1, 7):
        np.testing.assert_allclose(pod[step]["train/loss"], expected[step]["train/loss"],
                                   rtol=1e-5)
        for key in ("train/dataset/dataset_total_tokens", "train/dataset/dataset_example_index",
                    "train/dataset/dataset_file_loc"):
            assert pod[step][key] == expected[step][key], (step, key)
    np.testing.assert_allclose(pod[0]["eval/loss"], expected[0]["eval/loss"], rtol=1e-5)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_4", "step_6"]
    assert not os.path.exists(os.path.join(run_dir, "worker_1"))  # only process 0 logs


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.json"))))
def test_shipped_configs_parse_and_fit_8_devices(path):
    """Every key exists and the batch layout fits an 8-device mesh; paths to the user's own
    model and data are not checked here."""
    _, train = split_config(build_config(["--config", path]))
    train.update_from({"load_checkpoint": "", "load_dataset_state": ""})
    llama_train.validate(train)


# Running the same command again.

@pytest.mark.slow
def test_the_same_command_again_with_a_relative_workdir_resumes(tmp_path, compilation_cache):
    """The README's command run twice with a relative workdir: the second finds the run
    complete and says how to extend it; with total_steps raised it resumes in place."""
    workdir = os.path.relpath(tmp_path, REPO)
    assert not os.path.isabs(workdir)

    def run(*extra):
        result = subprocess.run(runner_command(workdir, "--total_steps=4", *QUIET, *extra),
                                env=cpu_env(compilation_cache), cwd=REPO, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    run()
    run_dir = run_dir_of(tmp_path)
    again = run()
    assert "nothing to train" in again and "--total_steps=8" in again
    run("--total_steps=8")
    assert run_dir_of(tmp_path) == run_dir
    with open(os.path.join(run_dir, "train.log")) as f:
        text = f.read()
    assert "nothing to train" in text and "resuming from" in text
    assert sorted(records(run_dir)) == list(range(9))


@pytest.mark.slow
def test_an_uncaught_exception_lands_in_train_log(tmp_path, monkeypatch):
    def failing_fit(*args, **kwargs):
        raise RuntimeError("the disk is full")

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(run, "fit", failing_fit)
    _, train = split_config(build_config(["--config", SETUP, *SHORT, *QUIET,
                                          "--workdir", str(tmp_path)]))
    with pytest.raises(RuntimeError, match="the disk is full"):
        llama_train.main(train)
    with open(os.path.join(run_dir_of(tmp_path), "train.log")) as f:
        text = f.read()
    assert "Traceback" in text and "RuntimeError: the disk is full" in text


@pytest.mark.slow
def test_weights_that_do_not_fit_the_config_are_refused_before_the_run_starts(tmp_path):
    """setup_test (debug_fot) from a converted model of another size: exit 2 naming the config
    keys and the fields to change, and no run directory."""
    other = LLaMAConfig.load_config("debug_fot", vocab_size=512, hidden_size=64,
                                    num_hidden_layers=3)
    variables = FlaxLLaMAForCausalLMModule(other).init(jax.random.PRNGKey(0),
                                                       jnp.zeros((1, 8), jnp.int32))
    save_params(str(tmp_path / "converted"), variables, other)
    result = subprocess.run(runner_command(tmp_path / "work", "--load_checkpoint",
                                           f"params::{tmp_path / 'converted'}"),
                            env=cpu_env(str(tmp_path / "cache")), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr
    assert "load_llama_config='debug_fot'" in message and "update_llama_config=" in message
    assert "hidden_size 128 (checkpoint: 64)" in message
    assert "num_hidden_layers 2 (checkpoint: 3)" in message
    assert "Traceback" not in message
    assert not os.path.exists(tmp_path / "work")


@pytest.mark.slow
def test_resuming_with_another_model_config_is_refused(tmp_path, monkeypatch):
    other = LLaMAConfig.load_config("debug_fot", vocab_size=512, hidden_size=64)
    params = FlaxLLaMAForCausalLMModule(other).init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 8), jnp.int32))["params"]
    saver = TrainCheckpointer(str(tmp_path / "2024-01-01_00-00-00"))
    saver.save(4, {"step": jnp.int32(4), "params": params}, other, {})
    saver.close()
    monkeypatch.chdir(REPO)
    _, train = split_config(build_config(["--config", SETUP, "--workdir", str(tmp_path)]))
    with pytest.raises(ConfigError, match=r"checkpoint to resume.*--resume=false.*"
                                          r"hidden_size 128 \(checkpoint: 64\)"):
        llama_train.main(train)


@pytest.mark.slow
def test_export_of_a_run_windows_by_its_rows_and_takes_long_inputs(reference_run, tmp_path):
    """The exported local window is the trained row length (64 here, not debug_fot's 1024),
    and neither the tokenizer nor generate() warns about an input past 1024 tokens."""
    step_dir = latest_train_checkpoint(reference_run)
    assert read_metadata(step_dir)["train_seq_length"] == 64
    output = tmp_path / "hf"
    convert_easylm_to_hf.main(["--load_checkpoint", step_dir, "--output_dir", str(output),
                               "--tokenizer_path", os.path.join(REPO, "tokenizers",
                                                                "tiny_sp.model")])
    model = FoTLlamaForCausalLM.from_pretrained(output).eval()
    assert model.config.last_context_length == 64
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    transformers_log = logging.getLogger("transformers")
    transformers_log.addHandler(handler)
    try:
        tokenizer = transformers.LlamaTokenizer.from_pretrained(output)
        ids = tokenizer("The grass is green. " * 240, return_tensors="pt").input_ids
        assert ids.shape[1] > 1024
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=2, do_sample=False)
    finally:
        transformers_log.removeHandler(handler)
    assert out.shape[1] == ids.shape[1] + 2
    assert not [w for w in warnings if "length" in w], warnings


@pytest.mark.slow
def test_trainable_parameters_train_alone_and_resume(tmp_path, compilation_cache):
    """--optimizer.trainable through the runner: the log says how many parameters train, the
    others keep their values from checkpoint to checkpoint, and a resumed run restores the
    optimizer state that holds moments for the trained ones only."""
    pattern = "h/[01]/attention/"

    def run(steps):
        result = subprocess.run(
            runner_command(tmp_path, *QUIET, f"--optimizer.trainable={pattern}",
                           f"--total_steps={steps}", "--eval_freq=0"),
            env=cpu_env(compilation_cache), cwd=REPO, capture_output=True, text=True,
            timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    def params(step):
        variables = load_params(f"trainstate::{run_dir}/checkpoints/step_{step}")
        return {tree_path_name(path): np.asarray(leaf) for path, leaf in
                jax.tree_util.tree_flatten_with_path(variables["params"])[0]}

    run(8)
    run_dir = run_dir_of(tmp_path)
    first, second = params(4), params(8)
    run(12)  # resumes from step 8
    third = params(12)
    trained = {name for name in first if re.search(pattern, name)}
    assert len(trained) == 8 and len(first) > len(trained)
    for name in first:
        if name in trained:
            assert not np.array_equal(first[name], second[name]), name
            assert not np.array_equal(second[name], third[name]), name
        else:
            np.testing.assert_array_equal(first[name], second[name], err_msg=name)
            np.testing.assert_array_equal(second[name], third[name], err_msg=name)
    with open(os.path.join(run_dir, "train.log")) as f:
        text = f.read()
    assert re.search(r"training \d+ of \d+ parameters \(optimizer.trainable\)", text)
    assert "resuming from" in text
