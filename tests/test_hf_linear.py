"""The exported PyTorch model with linear attention (SUPRA, GLA) layers against the JAX model
it was exported from, in float32: the training forward on a row, windowed inference over
several windows (the state read on through them; padded rows too), cached generation against
greedy decoding by full forwards and JAX's, and the fields and tensors an export writes."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from test_hf_forgetting import (check_cached_generation, check_windowed_logits,
                                export_variant, ids_of, load)

ATOL = 1e-4
# Every layer SUPRA (GQA: keys with their own feature map), every layer GLA, and both beside
# an FoT memory layer and a softmax layer.
VARIANTS = {
    "supra": dict(attention_type="supra"),
    "gla": dict(attention_type="gla", kv_heads=1),
    "hybrid": dict(mem_layers=(1,), num_hidden_layers=4,
                   attention_type=["supra", "softmax", "softmax", "gla"]),
}


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow)
                                        for name in VARIANTS])
def exported(request, tmp_path_factory):
    return export_variant(tmp_path_factory.mktemp(request.param), request.param, VARIANTS)


def test_a_row_equals_the_jax_training_forward(exported):
    # Longer than a chunk of the PyTorch form (64) and not a multiple of it.
    variables, config, directory = exported
    tokens = ids_of(2, 150, seed=1)
    expected = FlaxLLaMAForCausalLMModule(config).apply(variables, jnp.asarray(tokens)).logits
    with torch.no_grad():
        ours = load(directory, last_context_length=160)(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, np.asarray(expected), atol=ATOL)


def test_windowed_logits_equal_jax_windowed_inference(exported):
    # The linear layers read on through the windows; rows padded on the left or the right
    # keep their own state.
    check_windowed_logits(*exported)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_cached_generation_equals_greedy_full_forwards_and_jax(name, tmp_path):
    check_cached_generation(*export_variant(tmp_path, name, VARIANTS, init_scale=20.0,
                                            seed=3))


@pytest.mark.slow
def test_export_writes_the_linear_layers_and_fields(tmp_path):
    _, config, directory = export_variant(tmp_path, "hybrid", VARIANTS)
    written = json.loads((directory / "config.json").read_text())
    assert written["attention_type"] == ["supra", "softmax", "softmax", "gla"]
    assert written["supra_use_rope"] is True and written["gla_gate_rank"] == 16
    assert (directory / "linear_fot_llama.py").exists()
    model = load(directory)
    names = {name for name, _ in model.named_parameters()}
    for name in ("model.layers.0.self_attn.feature_map.weight",
                 "model.layers.0.self_attn.key_feature_map.bias",
                 "model.layers.3.self_attn.gate_up.bias", "model.layers.3.self_attn.ogate.weight",
                 "model.layers.3.self_attn.o_norm.weight"):
        assert name in names, name
    with pytest.raises(ValueError, match="run without autograd only"):
        model(torch.tensor(ids_of(1, 4, seed=0)))
