"""experiments.conversion_probe: each converted layer against the base layer it replaces."""
import glob
import json
import os

import numpy as np
import pytest
import torch
import transformers

from EasyLM.tokenizer import load_tokenizer
from eval.loss_by_position import read_documents
from experiments import conversion_probe
from helpers import REPO, TINY_SP

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 3-layer GQA LLaMA (Hugging Face) and two of this checkout's docs pages."""
    path = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(path / "hf")
    with open(path / "docs.jsonl", "w") as f:
        for page in sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))[:4]:
            with open(page) as text:
                f.write(json.dumps({"text": text.read()}) + "\n")
    return path, model


def run_probe(path, family, out, *extra):
    conversion_probe.main(["--hf_model", str(path / "hf"), "--attention_type", family,
                           "--tokenizer", TINY_SP, "--data", str(path / "docs.jsonl"),
                           "--length", "64", "--max_docs", "2", "--output_dir", str(out),
                           *extra])
    with open(out / "probe.json") as f:
        return json.load(f)


def test_a_fox_conversion_starts_as_its_base_layer_by_layer(tiny, tmp_path):
    path, model = tiny
    result = run_probe(path, "forgetting", tmp_path / "out")
    # The base loss is transformers' on the same tokens (BOS, cut and shift as the probe's).
    docs = read_documents(str(path / "docs.jsonl"), load_tokenizer({"vocab_file": TINY_SP}),
                          "text", 64, 64, 2)
    with torch.no_grad():
        ids = torch.tensor(np.stack(docs), dtype=torch.long)
        want = float(model(input_ids=ids, labels=ids).loss)
    assert result["base_loss"] == pytest.approx(want, abs=1e-4)
    # A FoX layer starts as the softmax layer (forget gates at sigmoid(12.5) over 64 tokens):
    # the same output, scale and loss, layer by layer and all together.
    assert [row["layer"] for row in result["layers"]] == [0, 1, 2]
    for row in result["layers"]:
        assert row["rms_ratio"] == pytest.approx(1.0, abs=1e-3), row
        assert row["cosine"] > 0.9999, row
        assert row["loss"] == pytest.approx(want, abs=1e-3), row
    assert result["loss_all_layers"] == pytest.approx(want, abs=1e-3)
    table = (tmp_path / "out" / "probe.md").read_text()
    assert "| layer converted | loss | output rms / base | cosine to base |" in table
    assert (tmp_path / "out" / "probe.png").stat().st_size > 0


def test_a_supra_layer_is_measured_against_the_layer_it_replaces(tiny, tmp_path):
    path, _ = tiny
    result = run_probe(path, "supra", tmp_path / "out", "--layers", "2")
    [row] = result["layers"]
    # GroupNorm sets each head's output to unit variance where the softmax averaged values:
    # another scale and direction, a different loss.
    assert row["layer"] == 2 and abs(row["rms_ratio"] - 1.0) > 0.1
    assert row["cosine"] < 0.99
    assert abs(row["loss"] - result["base_loss"]) > 1e-3
    assert np.isfinite(result["loss_all_layers"])


def test_a_layer_beyond_the_model_is_refused_before_loading(tiny, tmp_path, capsys):
    path, _ = tiny
    with pytest.raises(SystemExit):
        run_probe(path, "supra", tmp_path / "out", "--layers", "0,3")
    assert "--layers: [3] out of range for a model of 3 layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
