"""Evaluations end to end on a tiny model (JAX checkpoint and exported HF directory), and their
scoring on planted answers."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from eval import loss_by_position, passkey, window_rules
from eval.models import encode
from EasyLM import checkpoint
from EasyLM.models.llama import convert_easylm_to_hf
from EasyLM.models.llama.windowed_lm import WindowedLM
from EasyLM.tokenizer import load_tokenizer
from FoT.hf.modeling_fot_llama import FoTLlamaForCausalLM
from test_hf_fot import TINY_SP, tiny_fot_checkpoint

LENGTHS, DEPTHS = [200, 260], [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_model")
    _, _, spec = tiny_fot_checkpoint(root / "ckpt", vocab_size=512)
    convert_easylm_to_hf.convert(spec, str(root / "hf"), tokenizer_path=TINY_SP,
                                 last_context_length=32)
    return spec, str(root / "hf")


@pytest.fixture(scope="module")
def run_checkpoint(tiny_model, tmp_path_factory):
    """The tiny model saved the way a run saves it (``RUN/checkpoints/step_3/state``), by a run
    on rows of 32 tokens."""
    spec, _ = tiny_model
    params = checkpoint.load_params(spec)["params"]
    state = {"step": jnp.int32(3), "params": jax.tree_util.tree_map(jnp.asarray, params)}
    saver = checkpoint.TrainCheckpointer(str(tmp_path_factory.mktemp("run")))
    step_dir = saver.save(3, state, checkpoint.load_llama_config(spec.partition("::")[2]),
                          {"train_seq_length": 32})
    saver.close()
    return step_dir


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer({"vocab_file": TINY_SP})


class PlantedAnswerModel:
    """Reads the passkey out of the prompt: what a perfect model would answer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompt, max_new_tokens):
        text = self.tokenizer.decode(list(prompt[0]))
        key = text.split("The pass key is ")[1].split(".")[0]
        return np.asarray([encode(self.tokenizer, f" {key}.", bos=False)[:max_new_tokens]])


def test_passkey_scoring_and_prompts(tokenizer):
    assert passkey.is_correct(" 12345. Remember", 12345)
    assert not passkey.is_correct(" 1234 5", 12345) and not passkey.is_correct("none", 12345)
    assert not passkey.is_correct(" 123456", 12345)
    for depth in (0.0, 1.0):
        ids = passkey.build_prompt(tokenizer, 400, depth, 54321)
        text = tokenizer.decode(ids[1:])
        assert abs(len(ids) - 400) < 40 and ids[0] == tokenizer.bos_token_id
        assert text.endswith(passkey.QUESTION) and text.count("54321") == 2
        before, after = text.split(passkey.needle(54321))
        assert (passkey.FILLER in before) == (depth > 0)
        assert (passkey.FILLER in after) == (depth < 1)
    accuracy, records = passkey.run_passkey(PlantedAnswerModel(tokenizer), tokenizer, LENGTHS,
                                            DEPTHS, trials=2, progress=False)
    assert accuracy.shape == (2, 3) and np.all(accuracy == 1.0) and len(records) == 12


def check_passkey_outputs(output_dir):
    with open(os.path.join(output_dir, "passkey.json")) as f:
        result = json.load(f)
    assert result["lengths"] == LENGTHS and result["depths"] == DEPTHS
    assert np.asarray(result["accuracy"]).shape == (len(LENGTHS), len(DEPTHS))
    assert len(result["results"]) == len(LENGTHS) * len(DEPTHS)
    assert all(0.0 <= a <= 1.0 for a in result["accuracy_by_length"].values())
    assert os.path.getsize(os.path.join(output_dir, "passkey.png")) > 1000
    return result


@pytest.mark.slow
def test_passkey_end_to_end_jax_and_hf(tiny_model, tmp_path, capsys):
    spec, hf_dir = tiny_model
    grid = ["--lengths", ",".join(map(str, LENGTHS)), "--depths", "0,0.5,1", "--trials", "1"]
    passkey.main(["--load_checkpoint", spec, "--tokenizer", TINY_SP, "--last_context_length",
                  "32", "--output_dir", str(tmp_path / "jax")] + grid)
    jax_result = check_passkey_outputs(tmp_path / "jax")
    assert jax_result["last_context_length"] == 32 and jax_result["use_memory"]
    passkey.main(["--hf_model", hf_dir, "--output_dir", str(tmp_path / "hf")] + grid)
    hf_result = check_passkey_outputs(tmp_path / "hf")  # tokenizer: the exported one
    # Same model, same prompts, same greedy decoding: the same tokens in both frameworks
    # (the answer budgets may differ: the two tokenizers split " 12345." differently).
    for ours, theirs in zip(hf_result["results"], jax_result["results"]):
        assert ours["prompt_tokens"] == theirs["prompt_tokens"]
        common = min(len(ours["answer_ids"]), len(theirs["answer_ids"]))
        assert ours["answer_ids"][:common] == theirs["answer_ids"][:common]
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_loss_by_position_end_to_end(tiny_model, tmp_path):
    spec, hf_dir = tiny_model
    data = tmp_path / "docs.jsonl"
    with open(data, "w") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"Document {i}. " + passkey.FILLER * (4 + i)}) + "\n")
    loss_by_position.main(["--load_checkpoint", spec, "--tokenizer", TINY_SP, "--data",
                           str(data), "--max_length", "100", "--bucket_size", "16",
                           "--last_context_length", "32", "--output_dir", str(tmp_path / "jax")])
    loss_by_position.main(["--hf_model", hf_dir, "--random_tokens", "--num_docs", "2",
                           "--max_length", "80", "--bucket_size", "16",
                           "--output_dir", str(tmp_path / "hf")])
    for run, tokens in (("jax", None), ("hf", 2 * 79)):
        with open(tmp_path / run / "loss_by_position.json") as f:
            result = json.load(f)
        buckets = len(result["bucket_starts"])
        assert len(result["with_memory"]) == len(result["without_memory"]) == buckets
        assert np.all(np.isfinite(result["with_memory"]))
        # The first window has no memory to use: both runs agree there.
        np.testing.assert_allclose(result["with_memory"][0], result["without_memory"][0],
                                   rtol=1e-4)
        if tokens is not None:
            assert sum(result["tokens_per_bucket"]) == tokens
        assert os.path.getsize(tmp_path / run / "loss_by_position.png") > 1000


def test_bucket_means():
    starts, means, counts = loss_by_position.bucket_means([np.ones(5), 3 * np.ones(2)], 4)
    np.testing.assert_array_equal(starts, [0, 4])
    np.testing.assert_array_equal(counts, [5, 2])  # positions 1-3 and 1-2, then 4-5
    np.testing.assert_allclose(means, [(3 * 1 + 2 * 3) / 5, 1.0])


@pytest.mark.slow
def test_readme_commands_read_a_runs_checkpoint(tiny_model, run_checkpoint, tmp_path):
    """Passkey, loss by position and the export on ``RUN/checkpoints/step_<N>``, bare or with
    either prefix: the same weights as the checkpoint the run would have saved them from."""
    spec, _ = tiny_model
    for prefix in ("", "params::", "trainstate::"):
        np.testing.assert_array_equal(
            checkpoint.load_params(prefix + run_checkpoint)["params"]["lm_head"]["kernel"],
            checkpoint.load_params(spec)["params"]["lm_head"]["kernel"])
    passkey.main(["--load_checkpoint", run_checkpoint, "--tokenizer", TINY_SP,
                  "--last_context_length", "32", "--lengths", "200", "--depths", "0.5",
                  "--trials", "1", "--output_dir", str(tmp_path / "passkey")])
    assert os.path.exists(tmp_path / "passkey" / "passkey.json")
    loss_by_position.main(["--load_checkpoint", f"params::{run_checkpoint}", "--tokenizer",
                           TINY_SP, "--random_tokens", "--num_docs", "1", "--max_length", "40",
                           "--bucket_size", "16", "--last_context_length", "32",
                           "--output_dir", str(tmp_path / "loss")])
    assert os.path.exists(tmp_path / "loss" / "loss_by_position.json")
    convert_easylm_to_hf.main(["--load_checkpoint", run_checkpoint, "--output_dir",
                               str(tmp_path / "hf"), "--no_memory"])
    convert_easylm_to_hf.convert(spec, str(tmp_path / "reference"), no_memory=True)
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    reference = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "reference").state_dict()
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.slow
def test_windows_default_to_the_trained_row_length(tiny_model, run_checkpoint):
    spec, _ = tiny_model
    assert WindowedLM.from_checkpoint(run_checkpoint).last_context_length == 32
    assert WindowedLM.from_checkpoint(spec).last_context_length == 8  # max_sequence_length


@pytest.mark.slow
def test_window_rules_end_to_end(tiny_model, tmp_path):
    _, hf_dir = tiny_model
    data = tmp_path / "docs.jsonl"
    with open(data, "w") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"Document {i}. " + passkey.FILLER * 12}) + "\n")
    window_rules.main(["--hf_model", hf_dir, "--data", str(data), "--prompt_windows", "2",
                       "--offsets", "1,13", "--continuation", "40", "--max_docs", "2",
                       "--output_dir", str(tmp_path / "rules")])
    with open(tmp_path / "rules" / "window_rules.json") as f:
        result = json.load(f)
    assert set(result["mean_loss"]) == set(window_rules.RULES) and result["num_docs"] == 2
    # The aligned rule is causal: the continuation read token by token has the losses of
    # the documents scored whole.
    model = FoTLlamaForCausalLM.from_pretrained(hf_dir).eval()
    tok = load_tokenizer({"vocab_file": TINY_SP})
    docs = loss_by_position.read_documents(str(data), tok, "text", 2 * 32 + 13 + 40, 0, 2)
    ids = torch.tensor(np.stack([d[:2 * 32 + 13 + 40] for d in docs]))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1], -1)
    losses = -logp.gather(2, ids[:, 1:, None])[..., 0]
    np.testing.assert_allclose(result["mean_loss"]["aligned"]["13"],
                               losses[:, 2 * 32 + 12:].mean().item(), rtol=1e-5)
    # The rules differ once the prompt does not end on a window boundary.
    assert result["mean_loss"]["aligned"]["13"] != result["mean_loss"]["longllama (limit W)"]["13"]
    assert os.path.getsize(tmp_path / "rules" / "window_rules.png") > 1000
