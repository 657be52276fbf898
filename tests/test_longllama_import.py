"""Published LongLLaMA checkpoints (``model_type "longllama"``) import into a toolkit checkpoint
with their memory layers and window, and that checkpoint exports again.

The LongLLaMA directory is simulated the way the published ones are laid out: LLaMA tensor
names in Hugging Face's rotate-half layout in ``pytorch_model.bin``, each attention layer's
``rotary_emb.inv_freq`` buffer saved beside the weights, and LongLLaMA's own config fields.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from EasyLM.checkpoint import save_params
from EasyLM.models.llama import convert_easylm_to_hf, convert_hf_to_easylm
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule, LLaMAConfig
from helpers import tiny_config

WINDOW = 16


def longllama_directory(root, **config_updates):
    """A random tiny FoT model, written as a LongLLaMA checkpoint; returns its JAX variables."""
    config = tiny_config(num_key_value_heads=4, max_sequence_length=WINDOW, mem_layers=(1,))
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(3),
                                                        jnp.zeros((1, WINDOW), jnp.int32))
    save_params(str(root / "ckpt"), variables, config)
    convert_easylm_to_hf.convert(f"params::{root / 'ckpt'}", str(root / "export"))
    tensors = {}
    for path in sorted((root / "export").glob("*.safetensors")):
        tensors.update(load_file(path))
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    directory = root / "long_llama"
    directory.mkdir()
    torch.save(tensors, directory / "pytorch_model.bin")
    hf = dict(
        architectures=["LongLlamaForCausalLM"], model_type="longllama",
        auto_map={"AutoConfig": "configuration_longllama.LongLlamaConfig",
                  "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM"},
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, hidden_act="silu",
        max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=config.rms_norm_eps,
        use_cache=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, torch_dtype="float32", last_context_length=WINDOW,
        mem_layers=[1], mem_positionals=True, mem_dtype="bfloat16",
        mem_attention_grouping=None, torch_attention=False, gradient_checkpoint_every_ith=1)
    hf.update(config_updates)
    (directory / "config.json").write_text(json.dumps(hf))
    return variables, config, directory


@pytest.mark.slow
def test_longllama_checkpoint_imports_with_memory_layers_and_window(tmp_path):
    variables, config, directory = longllama_directory(tmp_path)
    imported, imported_config = convert_hf_to_easylm.convert(str(directory))
    assert imported_config.mem_layers == (1,)
    assert imported_config.max_sequence_length == WINDOW  # last_context_length, not 2048
    assert imported_config.rope_theta == config.rope_theta
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        other = imported["params"]
        for key in path:
            other = other[key.key]
        np.testing.assert_array_equal(np.asarray(other), np.asarray(leaf),
                                      err_msg=jax.tree_util.keystr(path))

    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, WINDOW))
    model = FlaxLLaMAForCausalLMModule(imported_config)
    np.testing.assert_array_equal(
        np.asarray(model.apply(imported, jnp.asarray(tokens)).logits),
        np.asarray(FlaxLLaMAForCausalLMModule(config).apply(variables,
                                                             jnp.asarray(tokens)).logits))

    # The imported checkpoint is an ordinary toolkit checkpoint: it exports as a FoT model
    # with the LongLLaMA window.
    save_params(str(tmp_path / "imported"), imported, imported_config)
    convert_easylm_to_hf.convert(f"params::{tmp_path / 'imported'}", str(tmp_path / "again"))
    exported = json.loads((tmp_path / "again" / "config.json").read_text())
    assert exported["model_type"] == "fot_llama"
    assert exported["mem_layers"] == [1] and exported["last_context_length"] == WINDOW


@pytest.mark.slow
def test_longllama_without_memory_positionals_is_refused(tmp_path):
    _, _, directory = longllama_directory(tmp_path, mem_positionals=False)
    with pytest.raises(ValueError, match="mem_positionals=false"):
        convert_hf_to_easylm.convert(str(directory))


def test_longllama_config_reads_code_llama_rope_theta():
    hf = dict(model_type="longllama", architectures=["LongLlamaForCausalLM"], vocab_size=32016,
              hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, rope_theta=1e6, last_context_length=2048,
              max_position_embeddings=16384, mem_layers=[8, 16, 24])
    config = LLaMAConfig.from_hf_config(hf)
    assert config.rope_theta == 1e6 and config.mem_layers == (8, 16, 24)
    assert config.max_sequence_length == 2048
