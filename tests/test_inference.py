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


@pytest.mark.slow
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


@pytest.mark.slow
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
    # Aligned windows: the last 5 tokens are local, the two full windows before them memory.
    assert state.local_length.tolist() == [5] and state.memory_length.tolist() == [2 * WINDOW]
    assert state.capacity >= state.memory_length  # grown on demand, in whole windows


@pytest.mark.slow
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


@pytest.mark.slow
def test_greedy_generation_on_device_equals_the_host_loop(tiny):
    # Greedy tokens are chosen and fed back on the device (the host checks for the end of
    # every row only now and then); the result is the host loop's (top_k=1 sampling), also
    # where rows end at different steps and where all end before max_new_tokens.
    _, _, model = tiny
    prompt = np.random.default_rng(4).integers(0, 61, size=(2, WINDOW + 3))
    host = model.generate(prompt, 40, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(model.generate(prompt, 40), host)
    for eos in {int(host[0, 3]), int(host[1, 20]), int(host[0, 35])}:
        expected = model.generate(prompt, 40, temperature=1.0, top_k=1, eos_token_id=eos)
        got = model.generate(prompt, 40, eos_token_id=eos)
        np.testing.assert_array_equal(got, expected, err_msg=f"eos {eos}")
    # a device token steps as its host copy does
    states = [model.new_state(2), model.new_state(2)]
    for state in states:
        model.step(state, prompt)
    token = jnp.asarray(host[:, :1])
    on_device = model.step(states[0], token, last_only=True)
    np.testing.assert_array_equal(np.asarray(on_device),
                                  np.asarray(model.step(states[1], host[:, :1], last_only=True)))
    assert states[0].local_length.tolist() == states[1].local_length.tolist()


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="last_context_length must be >= 1"):
        MemoryOptions(0)
    with pytest.raises(ValueError, match="attention_grouping"):
        MemoryOptions(8, attention_grouping=(0, 4))


@pytest.mark.slow
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


@pytest.mark.slow
def test_logits_are_causal_however_the_input_is_split(tiny):
    # The aligned rule: a token's logits depend only on the tokens before it, so the whole
    # input, chunks that straddle windows, single tokens and a shorter prefix all agree.
    _, _, model = tiny
    tokens = np.random.default_rng(5).integers(0, 61, size=(2, 7 * WINDOW // 2))
    whole = model.logits(tokens)
    state, chunks, start = model.new_state(2), [], 0
    for size in (5, 17, 1, 1, 40):
        chunks.append(np.asarray(model.step(state, tokens[:, start:start + size])))
        start += size
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), whole, atol=1e-5)
    state = model.new_state(2)
    single = [np.asarray(model.step(state, tokens[:, t:t + 1])) for t in range(tokens.shape[1])]
    np.testing.assert_allclose(np.concatenate(single, axis=1), whole, atol=1e-5)
    prefix = 23 * WINDOW // 10
    np.testing.assert_allclose(model.logits(tokens[:, :prefix]), whole[:, :prefix], atol=1e-5)


@pytest.mark.slow
def test_masked_rows_of_different_lengths_equal_each_row_alone(tiny):
    _, _, model = tiny
    rng = np.random.default_rng(6)
    lengths, width = [3 * WINDOW + 4, 13, 3, 2 * WINDOW], 3 * WINDOW + 4
    rows = [rng.integers(0, 61, size=length) for length in lengths]
    tokens = rng.integers(0, 61, size=(len(rows), width))  # padding: any tokens
    left, right = tokens.copy(), tokens.copy()
    left_mask, right_mask = np.zeros((2, len(rows), width), bool)
    for i, row in enumerate(rows):
        left[i, width - len(row):], left_mask[i, width - len(row):] = row, True
        right[i, :len(row)], right_mask[i, :len(row)] = row, True
    scattered_mask = np.zeros_like(right_mask)  # padding between real tokens too
    scattered = tokens.copy()
    for i, row in enumerate(rows):
        at = np.sort(rng.choice(width, len(row), replace=False))
        scattered[i, at], scattered_mask[i, at] = row, True
    alone = [model.logits(row[None])[0] for row in rows]
    alone_losses = [model.token_losses(row[None])[0] for row in rows]
    for padded, mask in [(left, left_mask), (right, right_mask), (scattered, scattered_mask)]:
        logits = model.logits(padded, mask)
        losses, predictions = model.score(padded, mask)
        for i, keep in enumerate(mask):
            np.testing.assert_allclose(logits[i, keep], alone[i], atol=1e-5)
            assert not logits[i, ~keep].any()
            at = np.flatnonzero(keep)[1:] - 1  # the loss of each real token but the first
            np.testing.assert_allclose(losses[i, at], alone_losses[i], atol=1e-5)
            np.testing.assert_array_equal(predictions[i, at], alone[i][:-1].argmax(-1))
            assert not np.delete(losses[i], at).any()


@pytest.mark.slow
def test_generation_from_padded_prompts_equals_each_prompt_alone(tiny):
    _, _, model = tiny
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 61, size=length) for length in (5, 11, 2)]
    new = 2 * WINDOW  # every row crosses at least one window boundary
    alone = [model.generate(prompt[None], new)[0] for prompt in prompts]
    width = max(map(len, prompts))
    for side in ("left", "right"):
        padded, mask = np.zeros((3, width), np.int32), np.zeros((3, width), bool)
        for i, prompt in enumerate(prompts):
            at = slice(width - len(prompt), None) if side == "left" else slice(len(prompt))
            padded[i, at], mask[i, at] = prompt, True
        np.testing.assert_array_equal(model.generate(padded, new, mask=mask), np.stack(alone),
                                      err_msg=side)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(padded, 2, mask=np.zeros_like(mask))


@pytest.mark.slow
def test_longllama_rule_follows_the_original_windows(tiny):
    # A prompt of 2.5 windows: the first 1.5 windows go to memory (a window, then half of
    # one), the last W tokens form a fresh final window.
    variables, config, model = tiny
    tokens = np.random.default_rng(8).integers(0, 61, size=(2, 5 * WINDOW // 2))
    cut = tokens.shape[1] - WINDOW
    longllama = WindowedLM(variables, config, MemoryOptions(WINDOW, window_rule="longllama"))
    logits = longllama.logits(tokens)
    # Tokens before the final window are seen exactly as under the aligned rule ...
    np.testing.assert_allclose(logits[:, :cut], model.logits(tokens[:, :cut]), atol=1e-5)
    # ... and the same calls one window part at a time put the same tokens in memory.
    state = longllama.new_state(2)
    parts = [np.asarray(longllama.step(state, tokens[:, a:b]))
             for a, b in [(0, WINDOW), (WINDOW, cut), (cut, None)]]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), logits, atol=1e-5)
    assert np.abs(logits[:, cut:] - model.logits(tokens)[:, cut:]).max() > 1e-4
    # Independently: with one memory layer (layer 0, whose memory entries depend only on the
    # tokens), the final window with tokens 0..cut-1 in memory is the aligned rule's fresh
    # window after two windows whose newest cut entries are those tokens.
    one = config.replace(mem_layers=(0,))
    ours = WindowedLM(variables, one, MemoryOptions(WINDOW, window_rule="longllama"))
    aligned = WindowedLM(variables, one, MemoryOptions(WINDOW)).with_memory_limit(cut)
    filler = np.random.default_rng(9).integers(0, 61, size=(2, 2 * WINDOW - cut))
    expected = aligned.logits(np.concatenate([filler, tokens], axis=1))[:, 2 * WINDOW:]
    np.testing.assert_allclose(ours.logits(tokens)[:, cut:], expected, atol=1e-5)
    # A local limit above W: the tokens before the final window form one window of that
    # size, as under the aligned rule with that window.
    wide = WindowedLM(variables, config,
                      MemoryOptions(WINDOW, window_rule="longllama", local_window_limit=cut))
    np.testing.assert_allclose(wide.logits(tokens),
                               WindowedLM(variables, config, MemoryOptions(cut)).logits(tokens),
                               atol=1e-5)


def test_last_only_logits_are_each_rows_last_real_token(tiny):
    model = tiny[2]
    tokens = np.random.default_rng(9).integers(0, model.vocab_size, (3, 2 * WINDOW + 5))
    mask = np.ones_like(tokens, bool)
    mask[0, :4], mask[1, -3:] = False, False  # left- and right-padded rows
    full = np.asarray(model.step(model.new_state(3), tokens, mask))
    last = np.asarray(model.step(model.new_state(3), tokens, mask, last_only=True))
    ends = [tokens.shape[1] - 1, tokens.shape[1] - 4, tokens.shape[1] - 1]
    np.testing.assert_allclose(last[:, 0], full[np.arange(3), ends], atol=1e-6)
