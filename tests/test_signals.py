"""SIGTERM and SIGINT during training: the run finishes the step, saves a checkpoint there, logs
the line naming it, exits with 128 + the signal's number, and the same command resumes from it
to the very losses and parameters of an uninterrupted run; in a pod job every process stops at
the same step; a second signal exits at once."""
import glob
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from EasyLM import checkpoint, logging_utils, run, run_dirs
from EasyLM.data import DatasetFactory
from EasyLM.jax_utils import MESH_AXES
from EasyLM.models.llama.llama_model import with_cross_batch
from EasyLM.optimizers import get_default_config as optimizer_config
from EasyLM.tokenizer import get_default_config as tokenizer_config
from EasyLM.tokenizer import load_tokenizer
from EasyLM.trainer import LoopSettings, Trainer
from running_utils.runner_utils import help_text

import helpers

# setup_test.json cut short: every step logged, no evaluation, one rolling checkpoint at the
# end, so that a checkpoint before it can only be the one a signal saved.
FLAGS = ["--total_steps=32", "--save_model_freq=1000", "--train_log_freq=1", "--eval_steps=0",
         "--train_dataset.json_dataset.seq_length=64", "--logging.tensorboard=false",
         "--logging.plot=false"]
TOTAL = 32
TIMING = ("time", "per_second", "tflops", "mfu", "batch_seconds")
STOPPED = re.compile(r"stopped by (SIG\w+) at step (\d+) of (\d+)(?: \(checkpointer\."
                     r"save_on_signal=false\))?; running the same command again resumes from "
                     r"(\S+) \(with resume=true, the default\)")


def runner(workdir, *extra):
    return [sys.executable, "-m", "running_utils.runner", "--config", helpers.SETUP, *FLAGS,
            "--workdir", str(workdir), *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A compilation cache the runs share: the resumed run executes the program the first one
    compiled, and the runs stay fast."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def env(cache, **extra):
    return helpers.cpu_env(1, JAX_COMPILATION_CACHE_DIR=cache,
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


def run_dir_of(workdir):
    runs = glob.glob(os.path.join(str(workdir), "20*"))
    assert len(runs) == 1, runs
    return runs[0]


def records(run_dir):
    return {r["step"]: r for r in logging_utils.read_metrics(
        os.path.join(run_dir, logging_utils.METRICS_FILE))}


def deterministic(record):
    return {k: v for k, v in record.items() if not any(t in k for t in TIMING)}


def train_log(run_dir):
    with open(os.path.join(run_dir, "train.log")) as f:
        return f.read()


def wait_for_step(workdir, step, processes):
    """Block until a run under ``workdir`` has logged ``step``."""
    deadline = time.time() + 300
    while time.time() < deadline:
        assert all(p.poll() is None for p in processes), "the run ended before the signal"
        logs = glob.glob(os.path.join(str(workdir), "20*", "train.log"))
        if logs and f"step {step}/{TOTAL} |" in train_log(os.path.dirname(logs[0])):
            return
        time.sleep(0.02)
    pytest.fail(f"no step {step} within 300 s")


def final_params(run_dir, total=TOTAL):
    return checkpoint.load_params(os.path.join(run_dir, "checkpoints", f"step_{total}"))


def assert_same_params(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def stopped_line(run_dir, name, total=TOTAL):
    """``(step, checkpoint)`` of the line the run logged when it stopped for ``name``."""
    match = STOPPED.search(train_log(run_dir))
    assert match, train_log(run_dir)[-2000:]
    assert match.group(1) == name and int(match.group(3)) == total
    return int(match.group(2)), match.group(4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """An uninterrupted run of :data:`FLAGS`."""
    workdir = tmp_path_factory.mktemp("reference")
    result = subprocess.run(runner(workdir), env=env(cache), cwd=helpers.REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir_of(workdir)


@pytest.mark.slow
def test_sigterm_saves_the_step_exits_143_and_the_command_resumes_exactly(
        reference, tmp_path, cache):
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(runner(tmp_path / "work"), env=env(cache),
                                   cwd=helpers.REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        wait_for_step(tmp_path / "work", 3, [process])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 128 + signal.SIGTERM
    assert "Traceback" not in (tmp_path / "stderr").read_text()
    run_dir = run_dir_of(tmp_path / "work")
    step, resume_from = stopped_line(run_dir, "SIGTERM")
    assert 3 <= step < TOTAL and resume_from == os.path.join(run_dir, "checkpoints",
                                                             f"step_{step}")
    assert run_dirs.is_complete(resume_from)
    assert checkpoint.read_metadata(resume_from)["step"] == step
    assert max(records(run_dir)) == step  # the stopping step is logged, nothing after it

    result = subprocess.run(runner(tmp_path / "work"), env=env(cache), cwd=helpers.REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {resume_from}" in train_log(run_dir)
    resumed, expected = records(run_dir), records(reference)
    assert sorted(resumed) == sorted(expected)
    for s in expected:
        assert deterministic(resumed[s]) == deterministic(expected[s]), s
    assert_same_params(final_params(run_dir), final_params(reference))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_job(workdir, cache):
    """The two processes of a pod job of :data:`FLAGS`, started."""
    shared = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2")
    return [subprocess.Popen(runner(workdir, "--pod_job"), cwd=helpers.REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=env(cache, JAX_PROCESS_ID=str(i), **shared))
            for i in range(2)]


def finish(workers):
    try:
        errors = [w.communicate(timeout=600)[1] for w in workers]
    finally:
        for w in workers:
            w.kill()
    return [w.returncode for w in workers], "".join(e[-3000:] for e in errors)


@pytest.mark.slow
def test_a_signal_to_one_process_of_a_pod_job_stops_all_at_the_same_step(
        reference, tmp_path, cache):
    workers = pod_job(tmp_path, cache)
    wait_for_step(tmp_path, 3, workers)
    workers[1].send_signal(signal.SIGTERM)  # process 0 gets none
    codes, errors = finish(workers)
    assert codes == [128 + signal.SIGTERM] * 2, errors
    run_dir = run_dir_of(tmp_path)
    step, resume_from = stopped_line(run_dir, "SIGTERM")
    assert 3 <= step < TOTAL and run_dirs.is_complete(resume_from)
    for process in (0, 1):  # each process saved its data position, at the same step
        assert checkpoint.load_dataset_state(resume_from, process) is not None

    codes, errors = finish(pod_job(tmp_path, cache))
    assert codes == [0, 0], errors
    resumed, expected = records(run_dir), records(reference)
    assert sorted(resumed) == sorted(expected)
    for s in range(1, TOTAL + 1):
        np.testing.assert_allclose(resumed[s]["train/loss"], expected[s]["train/loss"],
                                   rtol=1e-5)
        assert (resumed[s]["train/dataset/dataset_total_tokens"]
                == expected[s]["train/dataset/dataset_total_tokens"]), s


def test_the_first_signal_sets_a_flag_and_the_handlers_are_restored():
    handlers = [signal.getsignal(s) for s in run.StopSignals.SIGNALS]
    with run.StopSignals(Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                              MESH_AXES)) as signals:
        assert not signals.requested()
        signal.raise_signal(signal.SIGTERM)
        assert signals.requested() and signals.signum == signal.SIGTERM
    assert [signal.getsignal(s) for s in run.StopSignals.SIGNALS] == handlers


SECOND_SIGNAL = """
import os, signal
from EasyLM.jax_utils import get_jax_mesh
from EasyLM.run import StopSignals
with StopSignals(get_jax_mesh("1,1,1")) as signals:
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.requested() and signals.signum == signal.SIGTERM
    print("first signal: a flag", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    print("still running after the second", flush=True)
"""


@pytest.mark.slow
def test_a_second_signal_exits_at_once():
    result = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], env=helpers.cpu_env(),
                            cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGINT, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["first signal: a flag"]


# In-process: a real SIGINT after a given step, to the loop of a small model.

@pytest.fixture(scope="module")
def tiny():
    """``(trainer, llama config, data maker)``: a small FoT model (a memory layer, C=2 with
    stepping over doc_aware_k2 rows) on one device, compiled once for the runs below."""
    base = helpers.tiny_config(vocab_size=512, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=None, mem_layers=(0,))
    llama = with_cross_batch(base, 2, True, 2)
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * 3)
    trainer = Trainer(mesh, llama, optimizer_config({"adamw_optimizer.lr": 3e-3,
                                                     "adamw_optimizer.lr_warmup_steps": 2}))
    tokenizer = load_tokenizer(tokenizer_config({"vocab_file": helpers.TINY_SP}))
    data = DatasetFactory.get_default_config({
        "type": "json", "json_dataset.path": helpers.TINY_CORPUS,
        "json_dataset.data_pipeline": "doc_aware_k2", "json_dataset.batch_size": 8,
        "json_dataset.seq_length": 32})
    return trainer, llama, lambda: DatasetFactory.load_dataset(data, tokenizer)


@pytest.fixture
def easylm_log(monkeypatch):
    """The handlers and level :func:`EasyLM.run.train` gives the ``EasyLM`` logger, undone."""
    logger = logging.getLogger("EasyLM")
    monkeypatch.setattr(logger, "handlers", [])
    level = logger.level
    yield
    for handler in logger.handlers:
        handler.close()
    logger.setLevel(level)


def train_in_process(tiny, workdir, sigint_after=None, save_model_freq=1000,
                     save_on_signal=True, total=6):
    """:func:`EasyLM.run.train` of ``tiny`` under ``workdir`` (resuming its run), raising
    SIGINT in this process after its ``sigint_after``-th step; the run directory."""
    trainer, llama, data = tiny
    run_dir, resume_from = run.select_run(str(workdir))
    settings = LoopSettings(total_steps=total, log_freq=1, save_model_freq=save_model_freq,
                            show_progress=False)
    steps = 0

    def train_step(state, batch):
        nonlocal steps
        steps += 1
        out = Trainer.train_step(trainer, state, batch)
        if steps == sigint_after:
            signal.raise_signal(signal.SIGINT)
        return out

    trainer.train_step = train_step
    try:
        run.train(trainer, llama, data(), settings, run_dir=run_dir, resume_from=resume_from,
                  start=run.StartFrom(seed=0), run_config={},
                  logging_config=logging_utils.get_default_config(
                      {"tensorboard": False, "plot": False}),
                  checkpointer_config=checkpoint.get_default_config(
                      {"save_on_signal": save_on_signal}))
    finally:
        del trainer.train_step
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("save_on_signal", [True, False])
def test_sigint_stops_after_the_step_and_the_same_run_resumes_exactly(
        tiny, tmp_path, easylm_log, save_on_signal):
    """Saving on: the checkpoint of the stopping step; off: the last periodic one (step 2)."""
    reference = train_in_process(tiny, tmp_path / "reference", save_model_freq=2)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(run.Stopped) as stopped:
        train_in_process(tiny, tmp_path / "work", sigint_after=3, save_model_freq=2,
                         save_on_signal=save_on_signal)
    assert stopped.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler
    run_dir = run_dir_of(tmp_path / "work")
    assert max(records(run_dir)) == 3
    step, resume_from = stopped_line(run_dir, "SIGINT", total=6)
    assert step == 3 and ("save_on_signal=false" in train_log(run_dir)) != save_on_signal
    saved = os.path.join(run_dir, "checkpoints", "step_3" if save_on_signal else "step_2")
    assert resume_from == saved and run_dirs.is_complete(saved)
    assert run_dirs.is_complete(os.path.join(run_dir, "checkpoints", "step_3")) == \
        save_on_signal

    train_in_process(tiny, tmp_path / "work", save_model_freq=2)
    assert f"resuming from {saved}" in train_log(run_dir)
    resumed, expected = records(run_dir), records(reference)
    assert sorted(resumed) == sorted(expected)
    for s in expected:
        assert deterministic(resumed[s]) == deterministic(expected[s]), s
    assert_same_params(final_params(run_dir, 6), final_params(reference, 6))


def test_help_names_the_setting():
    assert "--checkpointer.save_on_signal=true" in help_text()

