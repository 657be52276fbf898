"""The pretrained-model recipe (README "Extending a pretrained model's context") end to end on
CPU: a tiny random GQA LLaMA with tied embeddings and a byte-level tokenizer, written as a GGUF
file, imported with memory layers, then ``experiments/pretrained_fot.sh`` builds its data from
this checkout's files, trains a few steps, exports and runs every evaluation of the recipe."""
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from test_gguf import random_model, write_gguf

from eval.loss_by_position import loss_by_position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# transformers' reading of a GGUF byte-level tokenizer adds <|endoftext|> when it is missing.
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def byte_symbols():
    """The 256 one-character symbols of a byte-level BPE vocabulary (GPT-2's spelling): bytes
    that print stand for themselves, the others for characters from 256 on."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(
        range(0xAE, 0x100))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def byte_vocabulary():
    tokens = SPECIAL + byte_symbols() + [merge.replace(" ", "") for merge in MERGES]
    types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))
    return tokens, types, MERGES


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
    tokens, _, _ = byte_vocabulary()
    model = random_model(tied=True, vocab_size=len(tokens), max_position_embeddings=256)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, gguf.GGMLQuantizationType.F32, vocabulary=byte_vocabulary())
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "EasyLM.models.llama.convert_hf_to_easylm",
                    "--gguf", str(path), "--output", str(out / "fot_init"), "--mem_layers", "1",
                    "--tokenizer_output", str(out / "tokenizer"), "--hf_output", str(out / "hf")],
                   check=True, cwd=REPO)
    runner = ("--total_steps=4 --train_dataset.json_dataset.batch_size=8 "
              "--train_dataset.json_dataset.seq_length=64 --eval_dataset.json_dataset.batch_size=8 "
              "--eval_dataset.json_dataset.seq_length=64 --dtype=fp32 --eval_freq=2 --eval_steps=1 "
              "--save_model_freq=2 --train_log_freq=1 "
              "--train_dataset.json_dataset.tokenizer_processes=1 "
              "--eval_dataset.json_dataset.tokenizer_processes=1 "
              "--optimizer.adamw_optimizer.lr_warmup_steps=1 "
              "--optimizer.adamw_optimizer.lr_decay_steps=4")
    env = dict(os.environ, PRETRAINED_OUT=str(out), PRETRAINED_WINDOW="64",
               PRETRAINED_DATA_ARGS=f"--roots {REPO} --heldout_fraction 0.3 --min_chars 3000 "
                                    "--max_train_chars 2000000 --max_heldout_chars 600000",
               PRETRAINED_MIX_ARGS="--fraction 0.5 --chunk_chars 3000 --min_chars 1000",
               PRETRAINED_RUNNER_ARGS=runner, PRETRAINED_LENGTHS="512,1024",
               PRETRAINED_TRIALS="1",
               PRETRAINED_EVAL_ARGS="--min_length 1024 --max_length 1024 --max_docs 2 "
                                    "--bucket_size 256",
               PRETRAINED_NATIVE="256",
               PRETRAINED_RETENTION_ARGS="--min_length 256 --max_length 256 --max_docs 2 "
                                         "--bucket_size 64")
    subprocess.run(["bash", "experiments/pretrained_fot.sh", "data", "train", "export", "eval"],
                   check=True, cwd=REPO, env=env)

    mixed = [json.loads(line) for line in open(out / "data" / "train_recall.jsonl")]
    assert any("\n\n" in record["text"] for record in mixed)
    assert max(len(record["text"]) for record in mixed) <= 3000 + 2000  # pieces + statements
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
    for name in ("retention_base", "retention_fot"):
        result = json.loads((out / "eval" / name / "loss_by_position.json").read_text())
        assert result["last_context_length"] == 256
        assert np.isfinite(result["loss_all_tokens"]["with memory"])
