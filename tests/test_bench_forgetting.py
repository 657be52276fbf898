"""The forgetting attention benchmark's CPU smoke run: the kernel checked and timed in the
Pallas interpreter, cuDNN and fla skipped with their reasons, and the JSON, plot and table
written."""
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
        [sys.executable, "-m", "benchmarks.bench_forgetting", "--smoke", "--variants",
         "pallas,fla", "--fla-path", str(tmp_path / "no_fla_here"), "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "check pallas float32: PASS" in result.stdout
    assert "check pallas bfloat16: PASS" in result.stdout
    [stem] = {name.rsplit(".", 1)[0] for name in os.listdir(tmp_path) if name.endswith(".json")}
    assert stem.startswith("bench_forgetting_cpu_")
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    rows = json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
    pallas, fla = rows
    assert pallas["result"]["fwd+bwd"]["tflops"] > 0
    assert "fla not importable" in fla["result"]["skipped"]
    table = result.stdout.strip().splitlines()
    assert table[-4].startswith("| variant |")
    assert table[-2].startswith("| pallas | 64 | 64 | 2 | 2 |")
    assert table[-1].startswith("| fla |") and "skipped: fla not importable" in table[-1]


@pytest.mark.slow
def test_tile_search_keeps_the_defaults_among_its_candidates(tmp_path):
    """The search's smoke run (interpreted): the defaults are timed first, every stage's best
    is one of the settings it timed, and a failing setting is recorded, not fatal."""
    from benchmarks import tune_forgetting
    from EasyLM.forgetting.kernels.triton_lowering import default_blocks
    results = tune_forgetting.main(["--smoke", "--out", str(tmp_path)])
    [result] = results
    tried = result["tried"]
    assert tried[0]["stage"] == "default" and tried[0]["options"]["block_q"] == min(
        default_blocks("bfloat16", 64).block_q, 64)
    timed = [r for r in tried if "tflops" in r]
    assert result["best_tflops"]["fwd+bwd"] == max(r["tflops"] for r in timed
                                                   if r["stage"] == "dkv")
    assert any(r["options"] == result["best"] for r in timed if r["stage"] == "dkv")
    [name] = os.listdir(tmp_path)
    assert json.loads((tmp_path / name).read_text())["results"][0]["best"] == json.loads(
        json.dumps(result["best"]))


def test_tile_search_rejects_a_malformed_shape():
    from benchmarks import tune_forgetting
    with pytest.raises(SystemExit, match="'4096' is not LxD"):
        tune_forgetting.parse_shapes("4096")
