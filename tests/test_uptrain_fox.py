"""The FoX uptraining recipe (docs/forgetting.md, ``experiments/uptrain_fox.sh``) end to end on
CPU, as the page's cpu block runs it: a tiny random GQA LLaMA (Hugging Face) converted
to FoX, trained a few steps on this checkout's files and evaluated by position against its
base model; and the ``position`` report it ends with.  (The GGUF import of the model stage is
``experiments.get_smollm2``'s, which tests/test_pretrained_recipe.py runs.)"""
import json
import os

import numpy as np
import pytest
from helpers import REPO

from EasyLM.checkpoint import load_llama_config
from experiments import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NATIVE, LONG, BUCKET = 128, 512, 64  # the tiny model's context, the long documents, buckets


def loss_result(curve, counts, bucket_size=2, num_docs=1):
    return dict(model="m", bucket_size=bucket_size, num_docs=num_docs,
                bucket_starts=[bucket_size * i for i in range(len(curve))], with_memory=curve,
                tokens_per_bucket=counts)


def test_the_position_report_splits_the_loss_at_a_bucket_boundary(tmp_path, capsys):
    paths = [tmp_path / "long.json", tmp_path / "short.json"]
    paths[0].write_text(json.dumps(loss_result([1.0, 2.0, 4.0, 8.0], [1, 2, 2, 2], num_docs=2)))
    paths[1].write_text(json.dumps(loss_result([3.0, 5.0], [1, 2])))
    out = tmp_path / "out"
    report.main(["position", "--split", "4", "--labels", "long docs,short docs",
                 "--output_dir", str(out), *map(str, paths)])
    assert (out / "position_loss.md").read_text() == (
        "| model | documents | loss before 4 | loss from 4 |\n| --- | --- | --- | --- |\n"
        "| long docs | 2 | 1.6667 | 6.0000 |\n| short docs | 1 | 4.3333 | - |\n")
    assert (out / "position_loss.png").read_bytes()[:8] == PNG_MAGIC
    for argv, message in [(["--split", "3"], "--split 3 is not a multiple of the results' "
                                             "bucket size 2"),
                          ([], "position needs it"),
                          (["--split", "4", "--labels", "one"], "--labels names 1 models for 2")]:
        with pytest.raises(SystemExit):
            report.main(["position", *argv, "--output_dir", str(out), *map(str, paths)])
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error


def test_the_tokens_report_follows_a_runs_checkpoints(tmp_path, capsys):
    """Each checkpoint's tokens are its step times its run's batch (config.json); a model that
    is no checkpoint is a reference line; the loss is taken within the first --spans tokens."""
    run = tmp_path / "run" / "2026-12-06_00-00-00"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "train_dataset.type": "json", "train_dataset.json_dataset.batch_size": 4,
        "train_dataset.json_dataset.seq_length": 8}))
    paths = []
    for name, model, curve in [("late", f"trainstate::{run}/checkpoints/step_20", [2.0, 4.0]),
                               ("base", "hf_base", [1.0, 3.0]),
                               ("early", f"{run}/checkpoints/step_10", [5.0, 7.0])]:
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(dict(loss_result(curve, [1, 3]), model=model)))
    out = tmp_path / "out"
    report.main(["tokens", "--spans", "2,4", "--output_dir", str(out), *map(str, paths)])
    assert (out / "token_loss.md").read_text() == (
        "| model | training tokens | loss within 2 | loss within 4 |\n"
        "| --- | --- | --- | --- |\n| hf_base | - | 1.0000 | 2.5000 |\n"
        "| step_10 | 320 | 5.0000 | 6.5000 |\n| step_20 | 640 | 2.0000 | 3.5000 |\n")
    assert (out / "token_loss.png").read_bytes()[:8] == PNG_MAGIC
    (run / "config.json").unlink()
    for argv, message in [(["--spans", "3"], "multiple of the results' bucket size"),
                          ([], "tokens needs it"),
                          (["--spans", "2"], "cannot read its run's")]:
        with pytest.raises(SystemExit):
            report.main(["tokens", *argv, "--output_dir", str(out), *map(str, paths)])
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error


# As docs/forgetting.md's cpu block names it.  That block runs the whole script on the page's
# random tiny LLaMA (GQA; context NATIVE): the run these tests read.
PAGE_OUT = "runs/uptrain_cpu"


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_on_a_tiny_pretrained_gqa_model(docs_page_run):
    checkout, done = docs_page_run(os.path.join(REPO, "docs", "forgetting.md"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    out = checkout / PAGE_OUT
    init = load_llama_config(str(out / "fox_init"))
    assert init.attention_type == "forgetting" and init.mem_layers == ()
    assert init.forgetting_use_rope and init.forgetting_kv_shift
    assert list((out / "fox").glob("*/checkpoints/step_4"))
    results = {path.parent.name: json.loads(path.read_text())
               for path in (out / "eval" / "fox").glob("*/loss_by_position.json")}
    assert sorted(results) == ["base_long", "base_native", "fox_long", "fox_native",
                               "init_native"]
    for name, result in results.items():
        length = LONG if name.endswith("long") else NATIVE
        assert result["num_docs"] == 2 and sum(result["tokens_per_bucket"]) == 2 * (length - 1)
        assert np.isfinite(result["with_memory"]).all(), name
        assert np.isfinite(result["loss_all_tokens"]["with memory"]), name
    # The base model's window is its native context; the FoX model reads the whole document.
    assert results["base_long"]["last_context_length"] == NATIVE
    assert results["fox_long"]["last_context_length"] == LONG
    # Before training the converted model computes what the base model did; training moved it.
    np.testing.assert_allclose(results["init_native"]["with_memory"],
                               results["base_native"]["with_memory"], rtol=1e-4)
    assert results["fox_native"]["with_memory"] != results["init_native"]["with_memory"]
    table = (out / "eval" / "fox" / "report" / "position_loss.md").read_text()
    for label in (f"base on {NATIVE}", f"FoX init on {NATIVE}", f"FoX on {LONG}"):
        assert f"| {label} | 2 |" in table
    assert (out / "eval" / "fox" / "report" / "position_loss.png").read_bytes()[:8] == PNG_MAGIC
