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


@pytest.mark.slow
@pytest.mark.parametrize("processes", ["one", "per_gpu"])
def test_weak_scaling_table(tmp_path, processes):
    out = tmp_path / "rows.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_scaling", *TINY,
                             "--gpus", "1,2", "--processes", processes, "--json", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["gpus"], r["devices"], r["batch"]) for r in rows] == [(1, 1, 4), (2, 2, 8)]
    assert [r["processes"] for r in rows] == ([1, 1] if processes == "one" else [1, 2])
    lines = result.stdout.strip().splitlines()
    assert lines[-3].startswith("| 1 | 1 | 4 |") and lines[-3].endswith("| 100.0% |")
    second = lines[-2].split("|")
    assert second[1].strip() == "2" and second[-2].strip().endswith("%")
