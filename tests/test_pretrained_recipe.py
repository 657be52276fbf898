"""The pretrained-model recipe (README "Extending a pretrained model's context") end to end on
CPU: a tiny random GQA LLaMA with tied embeddings and a byte-level tokenizer, written as a GGUF
file, imported with memory layers, then ``experiments/pretrained_fot.sh`` builds its data from
this checkout's files, trains a few steps, exports and runs every evaluation of the recipe."""
import itertools
import json
import os
import re
import subprocess

import numpy as np
import pytest
from helpers import REPO
from tiny_pretrained import CORPUS_ARGS, runner_args, write_tiny_pretrained

from eval.loss_by_position import loss_by_position
from experiments import recall_data


def recall_pattern(templates):
    """A regex matching a whole line made from any of ``templates``."""
    fields = dict(thing=r"[a-z ]+", name=r"[A-Z][a-z]+", value=r"\d{3,7}")
    parts = [re.escape(t).replace(r"\{", "{").replace(r"\}", "}").format(**fields)
             for t in templates]
    return re.compile("^(" + "|".join(parts) + ")$")


class _FakeModel:
    """Per-token losses that depend on the position only, for the all-tokens mean."""
    last_context_length = 4

    def without_memory(self):
        return self

    def token_losses(self, tokens):
        return np.arange(tokens.shape[1] - 1, dtype=np.float64)[None]


def test_the_all_tokens_loss_is_the_mean_over_every_token_of_every_document():
    docs = [np.zeros(6, np.int32), np.zeros(11, np.int32)]
    *_, beyond, overall = loss_by_position(_FakeModel(), docs, bucket_size=4, progress=False)
    every = np.concatenate([np.arange(5), np.arange(10)])
    assert overall["with memory"] == pytest.approx(every.mean())
    assert beyond["with memory"] == pytest.approx(np.concatenate([np.arange(3, 5),
                                                                   np.arange(3, 10)]).mean())


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_on_a_tiny_pretrained_gqa_model(tmp_path):
    out = tmp_path / "run"
    write_tiny_pretrained(out, max_position_embeddings=256)
    env = dict(os.environ, PRETRAINED_OUT=str(out), PRETRAINED_WINDOW="64",
               PRETRAINED_DATA_ARGS=CORPUS_ARGS,
               PRETRAINED_MIX_ARGS="--fraction 0.5 --chunk_chars 3000 --min_chars 1000",
               PRETRAINED_RECALL_STYLE="question",
               PRETRAINED_RUNNER_ARGS=runner_args(64), PRETRAINED_LENGTHS="512,1024",
               PRETRAINED_TRIALS="1",
               PRETRAINED_EVAL_ARGS="--min_length 1024 --max_length 1024 --max_docs 2 "
                                    "--bucket_size 256",
               PRETRAINED_NATIVE="256",
               PRETRAINED_PROBE_ARGS="--chars 1500 --num_docs 2 --min_facts 2 --max_facts 2",
               PRETRAINED_RETENTION_ARGS="--min_length 256 --max_length 256 --max_docs 2 "
                                         "--bucket_size 64")
    subprocess.run(["bash", "experiments/pretrained_fot.sh", "data", "train", "export", "eval"],
                   check=True, cwd=REPO, env=env)

    mixed = [json.loads(line) for line in open(out / "data" / "train_recall.jsonl")]
    assert any("\n\n" in record["text"] for record in mixed)
    assert max(len(record["text"]) for record in mixed) <= 3000 + 2000  # pieces + facts
    # PRETRAINED_RECALL_STYLE=question: the facts come back as questions and answers only
    endings = [record["text"].rstrip("\n").rsplit("\n\n", 1)[-1].split("\n")
               for record in mixed]
    assert any(all(recall_pattern(recall_data.QUESTIONS).match(x) for x in lines)
               for lines in endings)
    assert not any(all(recall_pattern(recall_data.STATEMENTS).match(x) for x in lines)
                   for lines in endings)
    assert list((out / "fot").glob("*/checkpoints/step_4"))
    assert (out / "exported" / "config.json").exists()
    for name in ("passkey_base", "passkey_fot", "passkey_fot_hf", "passkey_fot_no_memory"):
        result = json.loads((out / "eval" / name / "passkey.json").read_text())
        assert result["lengths"] == [512, 1024]
        assert np.asarray(result["accuracy"]).shape == (2, 5)
        assert len(result["results"]) == 10
        assert (out / "eval" / name / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    loss = json.loads((out / "eval" / "loss_fot" / "loss_by_position.json").read_text())
    assert set(loss["loss_past_first_window"]) >= {f"reads {m} window" + "s" * (m > 1)
                                                    for m in (1, 4, 16, 64)}
    assert all(np.isfinite(v) for v in loss["loss_past_first_window"].values())
    for name, style in itertools.product(("base", "fot"), ("repeat", "question")):
        probe = json.loads((out / "eval" / f"recall_{name}_{style}" / "recall_probe.json")
                           .read_text())
        assert probe["recall_style"] == style and probe["documents"] == 2
        for variant in ("with memory", "without memory"):
            assert 0 <= probe["scores"][variant]["digit_accuracy"] <= 1
            assert np.isfinite(probe["scores"][variant]["loss"])
    for name in ("retention_base", "retention_fot"):
        result = json.loads((out / "eval" / name / "loss_by_position.json").read_text())
        assert result["last_context_length"] == 256
        assert np.isfinite(result["loss_all_tokens"]["with memory"])
