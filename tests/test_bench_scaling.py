"""The weak-scaling driver runs bench_train on growing device counts (CPU here: host devices
stand in for GPUs), in one process or one process per device, and tabulates the efficiency."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "debug_fot", "--mem-layers", "1", "--length", "32", "--rows-per-gpu", "4",
        "--case", "fast:C=1", "--steps", "2", "--warmup", "1", "--extra", "--vocab-size 256"]


def scaling(tmp_path, processes, gpus):
    out = tmp_path / "rows.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_scaling", *TINY,
                             "--gpus", gpus, "--processes", processes, "--json", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return json.loads(out.read_text()), result.stdout.strip().splitlines()


@pytest.mark.slow
def test_weak_scaling_table(tmp_path):
    rows, lines = scaling(tmp_path, "one", "1,2")
    assert [(r["gpus"], r["devices"], r["batch"]) for r in rows] == [(1, 1, 4), (2, 2, 8)]
    assert [r["processes"] for r in rows] == [1, 1]
    assert lines[-3].startswith("| 1 | 1 | 4 |") and lines[-3].endswith("| 100.0% |")
    second = lines[-2].split("|")
    assert second[1].strip() == "2" and second[-2].strip().endswith("%")


@pytest.mark.slow
def test_one_process_per_gpu_joins_them(tmp_path):
    """The 1-GPU case is the same in either mode (one process): only 2 GPUs run here, and
    without a 1-GPU row the efficiency is not claimed."""
    rows, lines = scaling(tmp_path, "per_gpu", "2")
    assert [(r["gpus"], r["devices"], r["batch"], r["processes"]) for r in rows] == [
        (2, 2, 8, 2)]
    row = lines[-2].split("|")
    assert row[1].strip() == "2" and row[2].strip() == "2" and row[-2].strip() == "-"
