"""The linear attention benchmark's CPU smoke run: the kernel (in the Pallas interpreter) and
the chunked form checked against the recurrence and timed, fla skipped with its reason, and the
JSON, plot and table written."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_run_writes_its_files(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_linear", "--smoke", "--variants",
         "pallas,fla-gla", "--fla-path", str(tmp_path / "no_fla_here"), "--out",
         str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "pallas check PASS" in result.stdout
    assert "fla-gla skipped: fla not importable" in result.stdout
    [stem] = {name.rsplit(".", 1)[0] for name in os.listdir(tmp_path) if name.endswith(".json")}
    assert stem.startswith("bench_linear_cpu_")
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    results = json.loads((tmp_path / f"{stem}.json").read_text())["results"]
    [row] = results["pallas"]["shapes"]
    assert row["fwd"]["ms"] > 0 and row["fwd+bwd"]["ms"] > 0
    assert row["fwd"]["first_s"] > 0  # the first call's time: mostly compilation
    assert "[bench_linear] pallas L=64 D=16: fwd " in result.stdout  # progress per shape
    assert results["pallas"]["check"]["errors"]["dlog_alpha"] < 2e-2
    table = result.stdout.strip().splitlines()
    assert table[-3].startswith("| variant |")
    assert table[-1].startswith("| pallas | 16 | 64 | 1 x 2 |")


def test_shapes_must_divide_the_budget():
    from benchmarks import bench_linear
    args = bench_linear.parse_args(["--lengths", "3000"])
    with pytest.raises(SystemExit, match="multiples of L=3000"):
        bench_linear.shapes(args)


def test_a_worker_past_its_timeout_is_reported_and_the_run_still_writes(tmp_path):
    """A killed worker keeps what it finished (nothing here: it is killed while importing) and
    says so; the driver goes on to write its files."""
    from benchmarks import bench_linear
    report = bench_linear.main(["--smoke", "--variants", "chunked", "--no-check", "--timeout",
                                "0.3", "--out", str(tmp_path)])
    result = report["results"]["chunked"]
    assert result["error"] == "timed out after 0.3 s with 0 of 1 shapes done"
    assert result["shapes"] == []
    assert any(name.endswith(".json") for name in os.listdir(tmp_path))


def test_a_check_that_raises_is_recorded_and_the_variant_still_runs():
    """fla-core 0.6.0's simple-GLA backward refuses Triton 3.6 on Hopper: the check says
    what stopped it instead of ending the worker before the forward is timed."""
    from benchmarks import bench_linear

    def refuses(arrays):
        raise RuntimeError("long traceback\nTriton >= 3.4.0 and < 3.7.1 on Hopper GPUs ...")
    arrays = bench_linear.numpy_inputs(bench_linear.SMOKE_CHECK_SHAPE, True, 0.0, seed=1)
    record = bench_linear.check_record(refuses, arrays, per_head=True)
    assert record == dict(error="Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs ...", passed=False)
    exact = bench_linear.check_record(
        lambda a: bench_linear.reference(a, per_head=True), arrays, per_head=True)
    assert exact["passed"] and max(exact["errors"].values()) == 0.0


def test_the_check_runs_at_the_widest_head_size_timed():
    """--kernel-options aimed at 128-wide heads must hold at the check's shape too."""
    from benchmarks import bench_linear
    args = bench_linear.parse_args(["--head-dims", "64,128", "--lengths", "2048"])
    assert bench_linear.check_shape(args, bench_linear.shapes(args)) == dict(
        batch=2, length=512, heads=4, head_dim=128)
    args = bench_linear.parse_args(["--head-dims", "64", "--lengths", "2048"])
    assert bench_linear.check_shape(args, bench_linear.shapes(args))["head_dim"] == 64
