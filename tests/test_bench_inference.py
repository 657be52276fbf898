"""benchmarks/bench_inference.py on a tiny model (CPU): both frameworks run, every PyTorch
decode path generates the eager path's greedy tokens, the JSON has every row."""
import json

import pytest

from benchmarks import bench_inference


@pytest.mark.slow
def test_bench_inference_tiny(tmp_path, capsys):
    out = tmp_path / "torch.json"
    bench_inference.main(["--tiny", "--lengths", "160", "--batch_sizes", "1,2",
                          "--decode_tokens", "70", "--json", str(out)])
    result = json.load(open(out))
    rows = result["rows"]
    assert result["greedy_check"] == {"batch 1": True, "batch 2": True}
    assert [(r["mode"], r["batch"]) for r in rows] == [
        ("eager", 1), ("graph", 1), ("eager", 2), ("graph", 2)]
    # 70 steps cross a window boundary (window 64): a window moves to memory meanwhile
    assert all(r["greedy"] == f"{72 * r['batch']}/{72 * r['batch']}"
               for r in rows if r["mode"] == "graph")
    assert all(r["memory_tokens"] == 128 + 64 for r in rows)
    bench_inference.main(["--tiny", "--framework", "jax", "--lengths", "160",
                          "--batch_sizes", "2", "--decode_tokens", "3", "--json",
                          str(tmp_path / "jax.json")])
    (row,) = json.load(open(tmp_path / "jax.json"))["rows"]
    assert row["framework"] == "jax" and row["memory_tokens"] == 128 and row["decode_ms"] > 0
    assert "prefill tok/s" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_inference_jax_linear_model(tmp_path, capsys):
    """A GLA model without memory layers decodes after inputs of any length (on the GPU the
    rows then show whether its decoding time and memory stay flat)."""
    out = tmp_path / "gla.json"
    bench_inference.main(["--tiny", "--framework", "jax", "--attention_type", "gla",
                          "--mem_layers", "", "--lengths", "96,300", "--batch_sizes", "1",
                          "--decode_tokens", "2", "--json", str(out)])
    rows = json.load(open(out))["rows"]
    assert [r["length"] for r in rows] == [96, 300]
    assert all(r["decode_ms"] > 0 and len(r["tokens"][0]) == 4 for r in rows)
    assert "attention gla, memory layers []" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_inference.main(["--tiny", "--attention_type", "gla"])
