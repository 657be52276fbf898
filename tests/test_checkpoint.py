"""Train checkpoints: sharded round trip, the layout the converters read, retention, a kill
during a save, and the choice of the run to resume."""
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as PS
from helpers import cpu_xla_flags

from EasyLM import checkpoint, run_dirs
from EasyLM.jax_utils import get_jax_mesh
from EasyLM.models.llama import inference_window
from EasyLM.models.llama.llama_model import LLaMAConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_state(mesh, seed=0):
    rng = np.random.default_rng(seed)
    sharded = NamedSharding(mesh, PS("fsdp", "mp"))
    params = {"transformer": {"wte": {"embedding": rng.normal(size=(16, 8))}},
              "lm_head": {"kernel": rng.normal(size=(8, 16))}}
    params = jax.tree_util.tree_map(
        lambda x: jax.device_put(jnp.asarray(x, jnp.float32), sharded), params)
    return {"step": jnp.int32(7), "params": params,
            "opt_state": {"mu": jax.tree_util.tree_map(lambda x: 0.5 * x, params)},
            "skipped_steps": jnp.int32(0)}


def test_round_trip_with_shardings_and_converter_layout(tmp_path):
    mesh = get_jax_mesh("1,4,2")
    state = small_state(mesh)
    saver = checkpoint.TrainCheckpointer(str(tmp_path / "run"))
    config = LLaMAConfig.load_config("debug", vocab_size=16)
    path = saver.save(7, state, config, {"config": {"seed": 1}}, dataset_state={"pos": 3})
    saver.close()
    assert run_dirs.latest_train_checkpoint(str(tmp_path / "run")) == path
    assert checkpoint.read_metadata(path)["config"] == {"seed": 1}
    assert checkpoint.load_dataset_state(path, 0) == {"pos": 3}
    assert checkpoint.load_dataset_state(path, 1) is None

    other = NamedSharding(get_jax_mesh("2,1,4"), PS(None, "mp"))
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=other if x.ndim == 2 else x.sharding), state)
    restored = checkpoint.restore_train_state(path, abstract)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), restored, state)
    assert restored["params"]["lm_head"]["kernel"].sharding == other

    # What convert_easylm_to_hf and load_checkpoint=trainstate_params:: read.
    assert checkpoint.load_llama_config(path).vocab_size == 16
    for kind in ("trainstate", "trainstate_params"):
        params = checkpoint.load_params(f"{kind}::{path}")["params"]
        np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                      state["params"]["lm_head"]["kernel"])


def test_rolling_checkpoints_are_pruned_and_milestones_kept(tmp_path):
    mesh = get_jax_mesh("1,-1,1")
    saver = checkpoint.TrainCheckpointer(
        str(tmp_path), checkpoint.get_default_config({"keep_last": 2}))
    config = LLaMAConfig.load_config("debug", vocab_size=16)
    for step in range(1, 7):
        saver.save(step, small_state(mesh, step), config, {}, milestone=step == 3)
    saver.close()
    kept = [(step, ok) for step, _, ok in run_dirs.list_train_checkpoints(str(tmp_path))]
    assert kept == [(3, True), (5, True), (6, True)]


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from EasyLM import checkpoint
    from EasyLM.models.llama.llama_model import LLaMAConfig
    config = LLaMAConfig.load_config("debug", vocab_size=16)
    saver = checkpoint.TrainCheckpointer(sys.argv[1])
    saver.save(1, {"params": {"w": jnp.arange(10.0)}}, config, {})
    saver.wait()
    big = {"params": {"w": jnp.ones((16, 1024, 1024))}}
    saver.save(2, big, config, {})
    os.kill(os.getpid(), signal.SIGKILL)  # while the background thread writes step 2
""")


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_the_last_good_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_xla_flags(1))
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, run], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    found = [(step, ok) for step, _, ok in run_dirs.list_train_checkpoints(run)]
    assert found == [(1, True), (2, False)]
    assert run_dirs.find_resumable_run(str(tmp_path)) == (None, None)  # not a run name
    latest = run_dirs.latest_train_checkpoint(run)
    restored = checkpoint.restore_train_state(
        latest, {"params": {"w": jax.ShapeDtypeStruct((10,), jnp.float32)}})
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(10.0))
    checkpoint.TrainCheckpointer(run)  # a new life of the run clears the debris
    assert [s for s, _, _ in run_dirs.list_train_checkpoints(run)] == [1]


def test_resume_picks_the_newest_run_with_a_complete_checkpoint(tmp_path):
    workdir = str(tmp_path)
    first = run_dirs.new_run_dir(workdir, now=1_700_000_000)
    os.makedirs(os.path.join(first, "checkpoints", "step_4", "state"))
    second = run_dirs.new_run_dir(workdir, now=1_700_000_000)
    assert second == first + "_1"
    os.makedirs(os.path.join(second, "checkpoints", "step_9", "state.orbax-checkpoint-tmp"))
    assert run_dirs.find_resumable_run(workdir) == (
        first, os.path.join(first, "checkpoints", "step_4"))
    os.makedirs(os.path.join(second, "checkpoints", "step_2", "state"))
    assert run_dirs.find_resumable_run(workdir) == (
        second, os.path.join(second, "checkpoints", "step_2"))


def test_a_relative_workdir_gives_absolute_paths(tmp_path, monkeypatch):
    """Orbax refuses relative paths; the default workdir (./workdir) is relative."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(os.path.join("work", "2024-01-01_00-00-00", "checkpoints", "step_3", "state"))
    run_dir, step_dir = run_dirs.find_resumable_run("work")
    assert run_dir == str(tmp_path / "work" / "2024-01-01_00-00-00")
    assert step_dir == os.path.join(run_dir, "checkpoints", "step_3")


def test_checkpoint_specs_accept_what_runs_and_converters_write(tmp_path):
    mesh = get_jax_mesh("1,-1,1")
    config = LLaMAConfig.load_config("debug", vocab_size=16)
    run = str(tmp_path / "run")
    saver = checkpoint.TrainCheckpointer(run)
    step_dir = saver.save(7, small_state(mesh), config, {})
    saver.close()
    converted = str(tmp_path / "converted")
    checkpoint.save_params(converted, {"params": small_state(mesh)["params"]}, config)
    for spec in (step_dir, f"params::{step_dir}", f"trainstate_params::{step_dir}",
                 f"trainstate::{step_dir}", converted, f"params::{converted}"):
        params = checkpoint.load_params(spec)["params"]
        np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                      small_state(mesh)["params"]["lm_head"]["kernel"])
    assert checkpoint.parse_checkpoint_spec(step_dir) == ("params", step_dir)
    with pytest.raises(FileNotFoundError,
                       match="weights only: use params::" + re.escape(converted)):
        checkpoint.parse_checkpoint_spec(f"trainstate::{converted}")
    # A run directory stands for its newest complete checkpoint (README commands name runs).
    assert checkpoint.parse_checkpoint_spec(run) == ("params", step_dir)
    assert checkpoint.parse_checkpoint_spec(f"trainstate::{run}") == ("trainstate", step_dir)
    with pytest.raises(ValueError, match="prefixed by one of params::"):
        checkpoint.parse_checkpoint_spec(f"weights::{step_dir}")


def test_trained_row_length_also_of_checkpoints_saved_before_it_was_recorded(tmp_path):
    config = LLaMAConfig.load_config("debug", vocab_size=16)
    flags = {"train_dataset.type": "json", "train_dataset.json_dataset.seq_length": 128}
    for name, metadata, expected in (("new", {"train_seq_length": 64, "config": flags}, 64),
                                     ("old", {"config": flags}, 128)):
        saver = checkpoint.TrainCheckpointer(str(tmp_path / name))
        step_dir = saver.save(1, small_state(get_jax_mesh("1,-1,1")), config, metadata)
        saver.close()
        assert inference_window.default_window(step_dir, config) == expected
    converted = str(tmp_path / "converted")
    checkpoint.save_params(converted, {"params": small_state(get_jax_mesh("1,-1,1"))["params"]},
                           config)
    assert inference_window.default_window(converted, config) == config.max_sequence_length == 1024
