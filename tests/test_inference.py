"""JAX windowed inference with FoT memory: against the training model's cross-batch attention,
attention grouping, memory dtype, losses and generation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from EasyLM.models.llama.windowed_lm import WindowedLM
from FoT.inference import MemoryOptions
from helpers import tiny_config

WINDOW = 8


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(max_sequence_length=WINDOW, mem_layers=(0, 2))
    variables = FlaxLLaMAForCausalLMModule(config).init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, WINDOW), jnp.int32))
    return variables, config, WindowedLM(variables, config, MemoryOptions(WINDOW))


def test_full_windows_equal_cross_batch_training_model(tiny):
    # The windows of one document as batch rows, each attending to all earlier rows with keys
    # rotated as if first: FOT_SPEC section 2 with C = windows - 1 is section 5's memory.
    variables, config, model = tiny
    windows = 4
    tokens = np.random.default_rng(0).integers(0, 61, size=(1, windows * WINDOW))
    training = FlaxLLaMAForCausalLMModule(config.replace(cross_batch_range=windows - 1))
    expected = training.apply(variables, jnp.asarray(tokens.reshape(windows, WINDOW))).logits
    np.testing.assert_allclose(model.logits(tokens), np.asarray(expected).reshape(1, -1, 61),
                               atol=1e-5)
    # Memory matters: the same windows without it differ after the first window.
    plain = WindowedLM(variables, config, MemoryOptions(WINDOW, use_memory=False))
    difference = np.abs(plain.logits(tokens) - model.logits(tokens)).max(axis=-1)[0]
    assert difference[:WINDOW].max() < 1e-5 and difference[WINDOW:].min() > 1e-4


def test_attention_grouping_and_memory_dtype(tiny):
    variables, config, model = tiny
    tokens = np.random.default_rng(1).integers(0, 61, size=(2, 3 * WINDOW + 3))
    expected = model.logits(tokens)
    grouped = WindowedLM(variables, config, MemoryOptions(WINDOW, attention_grouping=(1, 3)))
    np.testing.assert_allclose(grouped.logits(tokens), expected, atol=1e-5)
    bf16_memory = WindowedLM(variables, config, MemoryOptions(WINDOW, mem_dtype="bfloat16"))
    np.testing.assert_allclose(bf16_memory.logits(tokens), expected, atol=2e-2)


def test_token_losses_and_step_by_step_state(tiny):
    _, _, model = tiny
    tokens = np.random.default_rng(2).integers(0, 61, size=(1, 2 * WINDOW + 5))
    logits = model.logits(tokens)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(model.token_losses(tokens), expected, atol=1e-5)
    state = model.new_state(1)
    np.testing.assert_allclose(np.asarray(model.step(state, tokens)), logits, atol=1e-6)
    assert (state.local_length, state.memory_length) == (WINDOW, tokens.shape[1] - WINDOW)
    assert state.capacity >= state.memory_length  # grown on demand, in whole windows


def test_generation_modes(tiny):
    _, _, model = tiny
    prompt = np.random.default_rng(3).integers(0, 61, size=(2, WINDOW + 3))
    greedy = model.generate(prompt, 6)
    assert greedy.shape == (2, 6)
    np.testing.assert_array_equal(model.generate(prompt, 6, temperature=1.0, top_k=1), greedy)
    sampled = model.generate(prompt, 6, temperature=1.0, seed=7)
    np.testing.assert_array_equal(model.generate(prompt, 6, temperature=1.0, seed=7), sampled)
    first = int(greedy[0, 0])
    stopped = model.generate(prompt[:1], 6, eos_token_id=first)
    np.testing.assert_array_equal(stopped, [[first]])


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="last_context_length must be >= 1"):
        MemoryOptions(0)
    with pytest.raises(ValueError, match="attention_grouping"):
        MemoryOptions(8, attention_grouping=(0, 4))


def test_memory_limit_reads_only_the_last_windows(tiny):
    # With one memory layer, at layer 0, what a window stores does not depend on earlier
    # windows, so a memory that keeps m - 1 windows must give window t exactly what reading
    # windows t - m + 1 .. t from scratch gives.  score's argmax is the logits' argmax.
    variables, config, _ = tiny
    model = WindowedLM(variables, config.replace(mem_layers=(0,)), MemoryOptions(WINDOW))
    windows, m = 5, 3
    tokens = np.random.default_rng(3).integers(0, 61, size=(2, windows * WINDOW))
    limited = model.with_memory_limit((m - 1) * WINDOW)
    losses, predictions = limited.score(tokens)
    for t in range(windows):
        first = max(0, t - m + 1)
        fresh = model.logits(tokens[:, first * WINDOW:(t + 1) * WINDOW])[:, -WINDOW:]
        got = limited.logits(tokens[:, :(t + 1) * WINDOW])[:, -WINDOW:]
        np.testing.assert_allclose(got, fresh, atol=1e-5)
        np.testing.assert_array_equal(predictions[:, t * WINDOW:(t + 1) * WINDOW - 1],
                                      fresh[:, :-1].argmax(-1))
    assert np.abs(limited.logits(tokens) - model.logits(tokens)).max() > 1e-4
    logits = limited.logits(tokens)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(
        losses, -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0],
        atol=1e-5)


def test_memory_limit_extremes(tiny):
    _, _, model = tiny  # memory layers 0 and 2
    tokens = np.random.default_rng(4).integers(0, 61, size=(1, 4 * WINDOW))
    np.testing.assert_allclose(model.with_memory_limit(0).logits(tokens),
                               model.without_memory().logits(tokens), atol=1e-5)
    np.testing.assert_allclose(model.with_memory_limit(3 * WINDOW).logits(tokens),
                               model.logits(tokens), atol=1e-6)
    with pytest.raises(ValueError, match="memory limit"):
        model.with_memory_limit(-1)
