"""The attention interface: every registered family implements it, returns one type in every
mode and keeps the state it declares, and its one-token decoding equals the training model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from EasyLM.models.llama.attention import (ATTENTION_FAMILIES, attention_family,
                                           layer_attention_types)
from EasyLM.models.llama.attention.interface import AttentionLayer, LayerOutput, StateShape
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from EasyLM.models.llama.windowed_lm import WindowedLM
from FoT.inference import MemoryOptions, Piece
from helpers import tiny_config

WINDOW = 8
# A tiny model whose every layer runs the family: a new family adds its line here.
EVERY_LAYER = {
    "softmax": dict(mem_layers=()),
    "fot_memory": dict(mem_layers=(0, 1, 2)),
    "forgetting": dict(mem_layers=(), attention_type="forgetting"),
    "supra": dict(mem_layers=(), attention_type="supra"),
    "gla": dict(mem_layers=(), attention_type="gla"),
}
# Families whose context is a recurrent state over the whole stream rather than a window:
# their windowed decoding equals the training model on the stream as one row.
STREAMING = {"supra", "gla", "supra_gqa"}
# Variants of a family whose switches change its parameters or state: checked as families.
VARIANTS = {
    "forgetting_pro_rope": ("forgetting", dict(
        EVERY_LAYER["forgetting"], forgetting_kv_shift=True, forgetting_qk_norm=True,
        forgetting_output_gate=True, forgetting_use_rope=True)),
    # Under GQA SUPRA's keys have their own feature map.
    "supra_gqa": ("supra", dict(EVERY_LAYER["supra"], num_key_value_heads=1)),
}
# The memory family's checks take seconds each (its modes compile the memory paths): full run.
FAMILIES = [pytest.param(name, marks=pytest.mark.slow) if name == "fot_memory" else name
            for name in sorted(ATTENTION_FAMILIES) + sorted(VARIANTS)]


def family_config(name):
    family, updates = VARIANTS.get(name, (name, EVERY_LAYER.get(name)))
    assert updates is not None, f"family {name!r}: add the config of a model of only such " \
        f"layers to EVERY_LAYER"
    config = tiny_config(max_sequence_length=WINDOW, **updates)
    assert set(layer_attention_types(config)) == {family}
    return config


def test_layers_take_their_family_from_the_config():
    config = tiny_config(num_hidden_layers=4, mem_layers=(1, 3))
    assert layer_attention_types(config) == ("softmax", "fot_memory", "softmax", "fot_memory")
    assert attention_family("fot_memory") is ATTENTION_FAMILIES["fot_memory"]
    with pytest.raises(ValueError, match="unknown attention family 'fox'; registered"):
        attention_family("fox")


@pytest.mark.parametrize("name", FAMILIES)
def test_family_implements_the_interface_in_every_mode(name):
    family = attention_family(VARIANTS.get(name, (name,))[0])
    assert issubclass(family, AttentionLayer)
    for method in ("attend", "attend_window", "empty_state"):
        assert getattr(family, method) is not getattr(AttentionLayer, method), method
    config = family_config(name)
    layer = family(config)
    batch = 2
    hidden = jax.random.normal(jax.random.PRNGKey(0), (batch, WINDOW, config.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(WINDOW), (batch, WINDOW))
    variables = jax.jit(layer.init)(jax.random.PRNGKey(1), hidden, positions)
    assert set(variables["params"]) >= {"wq", "wk", "wv", "wo"}  # the LLaMA layer's tree

    # Compiled, as the model runs it (one compilation instead of op-by-op dispatch).
    out = jax.jit(layer.apply)(variables, hidden, positions)
    assert isinstance(out, LayerOutput) and out.state is None
    assert out.hidden.shape == hidden.shape

    shape = StateShape(batch, WINDOW, 2 * WINDOW, jnp.float32, jnp.float32)
    state = family.empty_state(config, shape)
    grown = state.with_memory_capacity(4 * WINDOW)
    assert grown.memory_capacity in (0, 4 * WINDOW)
    assert state.with_memory_capacity(state.memory_capacity) is state
    for width in (WINDOW, 1):  # one window, one token
        ones = jnp.ones(batch, jnp.int32)
        piece = Piece(ones * WINDOW, ones * 0, ones * width, ones * WINDOW, 2 * WINDOW, WINDOW)
        out = jax.jit(lambda v, h, p, s: layer.apply(v, h, p, None, s, piece))(
            variables, hidden[:, :width], piece.query_positions(batch, width), state)
        assert isinstance(out, LayerOutput) and out.hidden.shape == (batch, width,
                                                                      config.hidden_size)
        assert jax.tree_util.tree_structure(out.state) == jax.tree_util.tree_structure(state)
        assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(out.state)] == \
            [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_decoding_equals_the_training_model(name):
    # Windows of a stream as batch rows, each later row attending to the earlier ones as
    # memory (cross-batch, C = windows - 1): what windowed inference computes token by token.
    config = family_config(name)
    windows = 3
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, WINDOW), jnp.int32))
    tokens = np.random.default_rng(0).integers(0, 61, size=(1, windows * WINDOW))
    if name in STREAMING:
        expected = np.asarray(FlaxLLaMAForCausalLMModule(config).apply(
            variables, jnp.asarray(tokens)).logits)
    else:
        training = FlaxLLaMAForCausalLMModule(config.replace(cross_batch_range=windows - 1))
        expected = np.asarray(training.apply(
            variables, jnp.asarray(tokens.reshape(windows, WINDOW))).logits).reshape(1, -1, 61)
    model = WindowedLM(variables, config, MemoryOptions(WINDOW))
    np.testing.assert_allclose(model.logits(tokens), expected, atol=1e-5)
    state = model.new_state(1)
    stepped = [model.step(state, jnp.asarray(tokens[:, i:i + 1]))
               for i in range(tokens.shape[1])]
    np.testing.assert_allclose(np.concatenate([np.asarray(x) for x in stepped], axis=1),
                               expected, atol=1e-5)
