"""The linear attention kernel's settings search: its smoke run in the Pallas interpreter, the
candidates it builds, and its refusal to time an interpreted kernel as if it were compiled."""
import json

import pytest

from benchmarks import tune_linear


def test_candidates_start_from_the_incumbent_and_fit_the_head():
    incumbent = tune_linear.defaults(64)
    assert incumbent == dict(block_v=64, block_k=None, num_warps=(4, 4, 4, 4),
                             num_stages=(2, 1, 2, 1), split_grads=False, grads_block_v=None)
    found = tune_linear.candidates(incumbent, "states", tune_linear.GRIDS, 64)
    assert found[0] == incumbent
    assert {c["block_v"] for c in found} == {32, 64}  # 128 does not divide a 64-wide head
    # key blocks of 64 are the whole 64-wide head (the incumbent's None): not tried apart
    assert {c["block_k"] for c in found} == {None, 32}
    assert " block_k 32 " in tune_linear.describe(
        next(c for c in found if c["block_k"] == 32))
    grads = tune_linear.candidates(incumbent, "grads", tune_linear.GRIDS, 64)
    # Only the grads kernel's (the fourth) warps and stages change.
    assert {(c["num_warps"][:3], c["num_stages"][:3]) for c in grads} == {((4, 4, 4), (2, 1, 2))}
    assert {(c["split_grads"], c["grads_block_v"], c["num_warps"][3], c["num_stages"][3])
            for c in grads} == {
        (split, None, warps, stages) for split in (False, True) for warps in (4, 8)
        for stages in (1, 2)}  # value blocks of 64 are the whole 64-wide head: not tried
    wide = tune_linear.candidates(tune_linear.defaults(128), "grads", tune_linear.GRIDS, 128)
    assert {(c["split_grads"], c["grads_block_v"]) for c in wide} == {
        (split, block) for split in (False, True) for block in (None, 64)}
    assert tune_linear.describe(wide[-1]).endswith(" split grads grads block_v 64")


def test_an_interpreted_kernel_is_not_timed_as_compiled():
    with pytest.raises(SystemExit, match="run it on a GPU"):
        tune_linear.main(["--shapes", "64x32"])


@pytest.mark.slow
def test_smoke_search_writes_the_defaults_and_the_best(tmp_path, capsys):
    [result] = tune_linear.main(["--smoke", "--out", str(tmp_path)])
    assert result["tried"][0]["stage"] == "default"
    assert result["tried"][0]["options"] == tune_linear.defaults(32)
    assert result["default_ms"]["fwd+bwd"] > 0 and result["best_ms"]["fwd+bwd"] > 0
    # The smoke grid tries block_v 16, and two grads kernels of 8 warps in value blocks of
    # 16: both run.
    assert {r["stage"] for r in result["tried"]} >= {"states", "grads"}
    assert not [r for r in result["tried"] if "error" in r]
    if result["best"] != result["default"]:
        assert result["agreement"] < tune_linear.AGREEMENT
    [name] = [p.name for p in tmp_path.iterdir()]
    assert name.startswith("tune_linear_cpu_") and name.endswith(".json")
    assert json.loads((tmp_path / name).read_text())["results"][0]["gates"] == "dim"
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-2].startswith("| dim | 64 | 32 | 1 x 2 | default: block_v 32 ")
    assert table[-1].startswith("| dim | 64 | 32 | 1 x 2 | best: ")
