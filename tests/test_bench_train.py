"""The training benchmark runs the real trainer end to end (here on CPU, tiny model)."""
import json

import pytest

from benchmarks import bench_train

TINY = ["--model", "debug_fot", "--mem-layers", "1", "--vocab-size", "256", "--length", "32",
        "--steps", "2", "--warmup", "1"]


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
