"""The training benchmark runs the real trainer end to end (here on CPU, tiny model), its
cases start JAX with the runner's device-memory setting, and its driver imports no JAX."""
import json
import os
import subprocess
import sys

import pytest
from helpers import cpu_xla_flags

from benchmarks import bench_train, device_memory
from running_utils import runner_utils
from running_utils.runner_utils import MEMORY_FRACTION_VARIABLES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--model", "debug_fot", "--mem-layers", "1", "--vocab-size", "256", "--length", "32",
        "--steps", "2", "--warmup", "1"]


@pytest.mark.slow
def test_throughput_length_and_loss_check_parts(tmp_path, capsys):
    out = tmp_path / "results.json"
    status = bench_train.main(TINY + [
        "--parts", "throughput,max_length,check", "--paths", "fast",
        "--cases", "fast:C=2,batch=8,remat=dots_and_attention_saveable",
        "--lengths", "32,64", "--max-length-batch", "8", "--check-steps", "3",
        "--check-batch", "8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    results = json.loads(out.read_text())
    throughput = [r for r in results if r.get("part") is None]
    lengths = [r for r in results if r.get("part") == "max_length"]
    checks = [r for r in results if r.get("part") == "check"]
    verdict = [r for r in results if r.get("part") == "check_verdict"]
    assert len(throughput) == 1 and "error" not in throughput[0]
    row = throughput[0]
    assert row["tokens_per_s"] == pytest.approx(8 * 32 / (row["step_ms"] / 1e3))
    assert row["cross_batch_resolved"] == "reference"  # auto on CPU
    assert [r["length"] for r in lengths] == [32, 64] and all("error" not in r for r in lengths)
    assert [r["path"] for r in checks] == ["slow", "fast"]
    assert all(len(r["losses"]) == 3 for r in checks)
    assert verdict[0]["passed"] and verdict[0]["max_rel_diff"] < 1e-2
    assert "| fast | 2 | 8 | 32 |" in printed and "loss check: PASS" in printed


def test_bad_case_specs_fail_with_the_key():
    with pytest.raises(SystemExit, match="unknown key 'batchsize'"):
        bench_train.main(TINY + ["--parts", "throughput", "--cases", "fast:batchsize=8"])
    with pytest.raises(SystemExit, match="unknown path 'quick'"):
        bench_train.main(TINY + ["--parts", "throughput", "--cases", "quick:C=1"])


def case_environments(monkeypatch, capsys, argv, gpu_total_gib=80.0):
    """``(the environment each case's subprocess got, the printed report)`` of a run whose
    cases are not run, on a GPU of ``gpu_total_gib``."""
    environments = []

    def record(case, args):
        environments.append(args.case_environment)
        return [(0, 'RESULT {"error": "not run"}', "")]

    monkeypatch.setattr(device_memory, "device_total_gib", lambda: gpu_total_gib)
    monkeypatch.setattr(bench_train, "run_workers", record)
    status = bench_train.main(TINY + ["--parts", "throughput", "--cases",
                                      "fast:C=1;slow:C=1"] + argv)
    assert status == 0 and len(environments) == 2
    return environments, capsys.readouterr().out


def memory_variables(env):
    return {name: env[name] for name in MEMORY_FRACTION_VARIABLES if name in env}


@pytest.fixture
def no_memory_variables(monkeypatch):
    for name in MEMORY_FRACTION_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_cases_get_the_runners_default_memory_fraction(monkeypatch, capsys,
                                                       no_memory_variables):
    environments, printed = case_environments(monkeypatch, capsys, [])
    fraction = f"{runner_utils.get_default_config().gpu_memory_fraction:g}"
    for env in environments:
        assert memory_variables(env) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": fraction}
    setting = (f"device memory XLA_PYTHON_CLIENT_MEM_FRACTION={fraction} (the runner's "
               f"default gpu_memory_fraction)")
    assert printed.startswith(f"bench_train: {setting}\n")
    header = next(line for line in printed.splitlines() if line.startswith("# bench_train"))
    assert setting in header


def test_a_memory_fraction_in_the_environment_stays(monkeypatch, capsys, no_memory_variables):
    for name in MEMORY_FRACTION_VARIABLES:
        with monkeypatch.context() as patch:
            patch.setenv(name, ".5")
            environments, printed = case_environments(patch, capsys, [])
        assert [memory_variables(env) for env in environments] == [{name: ".5"}] * 2
        assert f"device memory {name}=.5 (set in the environment)" in printed


def test_memory_gib_caps_the_cases_over_the_environment(monkeypatch, capsys,
                                                        no_memory_variables):
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", ".5")  # JAX refuses both names at once
    environments, printed = case_environments(monkeypatch, capsys, ["--memory-gib", "60"])
    assert [memory_variables(env) for env in environments] == [
        {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.7500"}] * 2
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.7500 (--memory-gib 60 of 80.0 GiB)" in printed
    with pytest.raises(SystemExit, match="--memory-gib 60: nvidia-smi did not report"):
        case_environments(monkeypatch, capsys, ["--memory-gib", "60"], gpu_total_gib=None)


def test_benchmark_drivers_import_no_jax():
    """They set the memory variable for the processes that start JAX, and GPU machines
    need not have what the CPU install has beyond requirements.txt (no mlxu)."""
    script = ("import sys, benchmarks.bench_train, benchmarks.bench_attention; "
              "print(sorted(m for m in ('jax', 'flax', 'optax', 'torch', 'mlxu') "
              "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[]"]


def test_json_keeps_the_cases_finished_before_a_cut(tmp_path, monkeypatch):
    """The file is rewritten after every case: a run killed mid-way keeps what it measured."""
    out = tmp_path / "results.json"
    args = bench_train.parse_args(TINY + ["--json", str(out)])
    args.case_environment, args.finished, args.profile = dict(os.environ), [], None

    def fake_run(case, args):
        if case["batch"] == 16:
            raise KeyboardInterrupt  # the run is killed during its second case
        return [(0, "RESULT " + json.dumps(
            {"step_ms": 10.0, "tokens_per_s": 1.0, "mfu": 0.5, "peak_gib": 1.0,
             "final_loss": 5.0, "attention_resolved": "xla",
             "cross_batch_resolved": "reference"}), "")]

    monkeypatch.setattr(bench_train, "run_workers", fake_run)
    bench_train.in_subprocess(bench_train.base_case(args, "fast", C=4, batch=8), args)
    with pytest.raises(KeyboardInterrupt):
        bench_train.in_subprocess(bench_train.base_case(args, "fast", C=4, batch=16), args)
    saved = json.loads(out.read_text())
    assert [(r["batch"], r["step_ms"]) for r in saved] == [(8, 10.0)]


@pytest.mark.slow
def test_processes_joined_by_jax_distributed_train_as_one(tmp_path):
    """``--processes 2``: each case runs as two processes of this host joined through
    ``jax.distributed`` (on a GPU host, one per GPU), each feeding its block of the same global
    batch; the losses are the one-process run's on as many devices, and the halo and
    all-to-all layouts of the sharded memory layers agree too."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_xla_flags(2))
    whole = dict(env, XLA_FLAGS=cpu_xla_flags(4))
    runs = {}
    for name, environment, argv in (
            ("one", whole, []), ("two", env, ["--processes", "2"]),
            ("two_heads", env, ["--processes", "2", "--cases", "fast:C=2,batch=8,flip=true"])):
        out = tmp_path / f"{name}.json"
        command = [sys.executable, "-m", "benchmarks.bench_train", *TINY, "--steps", "3",
                   "--parts", "throughput", "--cases", "fast:C=2,batch=8", "--json", str(out),
                   *argv]
        result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = json.loads(out.read_text())[0]
    for name, row in runs.items():
        assert "error" not in row, (name, row)
        assert row["devices"] == 4 and row["processes"] == (1 if name == "one" else 2)
    assert runs["two_heads"]["flip"] is True
    for name in ("two", "two_heads"):
        assert runs[name]["losses"] == pytest.approx(runs["one"]["losses"], rel=1e-4), name


def test_the_attention_column_names_every_family_the_model_runs():
    """A linear or forgetting model's table row says which of its implementations ran (on a
    CPU the chunked and blockwise forms: the kernels need a GPU), not only the softmax one."""
    from EasyLM.models.llama.llama_model import LLaMAConfig
    assert bench_train.resolved_attention(LLaMAConfig.load_config("debug"), 256) == "xla"
    assert bench_train.resolved_attention(LLaMAConfig.load_config("debug_gla"), 256) == (
        "gla:chunked")
    assert bench_train.resolved_attention(LLaMAConfig.load_config("debug_supra"), 256) == (
        "supra:chunked")
    assert bench_train.resolved_attention(LLaMAConfig.load_config("debug_fox"), 256) == (
        "forgetting:blockwise")
    hybrid = LLaMAConfig.load_config("debug_gla", mem_layers=(1,))
    assert bench_train.resolved_attention(hybrid, 256) == "xla+gla:chunked"
