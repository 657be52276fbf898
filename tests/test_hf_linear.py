"""The exported PyTorch model with linear attention (SUPRA, GLA) layers against the JAX model
it was exported from, in float32: the training forward on a row, windowed inference over
several windows (the state read on through them; padded rows too), cached generation against
greedy decoding by full forwards and JAX's, and the fields and tensors an export writes."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from EasyLM.models.llama import convert_easylm_to_hf
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from EasyLM.models.llama.windowed_lm import WindowedLM
from FoT.inference import MemoryOptions
from test_hf_fot import WINDOW, tiny_fot_checkpoint
from test_hf_forgetting import greedy_by_full_forwards, ids_of, load

ATOL = 1e-4
# Every layer SUPRA (GQA: keys with their own feature map), every layer GLA, and both beside
# an FoT memory layer and a softmax layer.
VARIANTS = {
    "supra": dict(attention_type="supra"),
    "gla": dict(attention_type="gla", kv_heads=1),
    "hybrid": dict(mem_layers=(1,), num_hidden_layers=4,
                   attention_type=["supra", "softmax", "softmax", "gla"]),
}


def export_variant(root, name, **checkpoint_options):
    architecture = dict(dict(mem_layers=()), **VARIANTS[name])
    variables, config, spec = tiny_fot_checkpoint(root / "ckpt", **architecture,
                                                  **checkpoint_options)
    convert_easylm_to_hf.convert(spec, str(root / "export"))
    return variables, config, root / "export"


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow)
                                        for name in VARIANTS])
def exported(request, tmp_path_factory):
    return export_variant(tmp_path_factory.mktemp(request.param), request.param)


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
    variables, config, directory = exported
    model = load(directory)
    jax_model = WindowedLM(variables, config, MemoryOptions(WINDOW))
    tokens = ids_of(3, 5 * WINDOW - 3, seed=2)
    mask = np.ones_like(tokens)
    mask[1, :WINDOW + 3], mask[2, -5:] = 0, 0
    with torch.no_grad():
        ours = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, jax_model.logits(tokens), atol=ATOL)
    with torch.no_grad():
        ours = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours, jax_model.logits(tokens, mask), atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_cached_generation_equals_greedy_full_forwards_and_jax(name, tmp_path):
    variables, config, directory = export_variant(tmp_path, name, init_scale=20.0, seed=3)
    model = load(directory)
    prompts = [ids_of(1, n, seed=10 + n, low=1) for n in (WINDOW - 3, 2 * WINDOW + 1)]
    new = 2 * WINDOW + 3
    expected = [greedy_by_full_forwards(model, prompt, new) for prompt in prompts]
    longest = max(p.shape[1] for p in prompts)
    ids, mask = np.zeros((2, longest), np.int64), np.zeros((2, longest), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - prompt.shape[1]:], mask[row, longest - prompt.shape[1]:] = prompt, 1
    # No end of sequence: the full forwards may pick token 2 (the config's EOS), which a
    # min_new_tokens run would forbid.
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        batch = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                               max_new_tokens=new, do_sample=False,
                               pad_token_id=0)[:, longest:].numpy()
    for row, tokens in enumerate(expected):
        np.testing.assert_array_equal(batch[row:row + 1], tokens, err_msg=f"row {row}")
    assert len(set(batch.ravel().tolist())) > 5
    jax_model = WindowedLM(variables, config, MemoryOptions(WINDOW))
    np.testing.assert_array_equal(jax_model.generate(prompts[1], new), expected[1])


@pytest.mark.slow
def test_export_writes_the_linear_layers_and_fields(tmp_path):
    _, config, directory = export_variant(tmp_path, "hybrid")
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
