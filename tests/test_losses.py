"""Chunked cross-entropy: the same sums and gradients as full logits, without them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from EasyLM.losses import chunk_length, chunked_token_sums, token_sums


def inputs(rows=4, length=12, width=16, vocab=50, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(keys[0], (rows, length, width))
    kernel = jax.random.normal(keys[1], (width, vocab)) / 4
    targets = jax.random.randint(keys[2], (rows, length), 0, vocab)
    masks = (jax.random.uniform(keys[3], (rows, length)) > 0.3).astype(jnp.float32)
    return hidden, kernel, targets, masks


def test_chunk_length_divides_the_sequence_within_the_token_budget():
    assert chunk_length(4, 12, 16) == 4
    assert chunk_length(4, 13, 16) == 1  # 13 is prime: one position at a time
    assert chunk_length(16, 2048, 8192) == 512
    assert chunk_length(64, 2048, 8) == 1  # never below one position
    assert chunk_length(1, 100, 10 ** 6) == 100


# The smallest chunk (the most chunk steps) is the slowest to compile: full suite only.
@pytest.mark.parametrize("chunk_tokens", [pytest.param(4, marks=pytest.mark.slow), 8, 20, 48,
                                          10 ** 6])
def test_chunked_sums_and_gradients_equal_full_logits(chunk_tokens):
    hidden, kernel, targets, masks = inputs()

    def full(h, w):
        loss, correct, count, _ = token_sums(h @ w, targets, masks)
        return loss, (correct, count)

    def chunked(h, w):
        loss, correct, count, _ = chunked_token_sums(h, w, targets, masks, chunk_tokens)
        return loss, (correct, count)

    # Compiled, as the train step runs it (and one compilation instead of op-by-op dispatch).
    (loss, (correct, count)), grads = jax.jit(jax.value_and_grad(full, (0, 1), has_aux=True))(
        hidden, kernel)
    (c_loss, (c_correct, c_count)), c_grads = jax.jit(jax.value_and_grad(
        chunked, (0, 1), has_aux=True))(hidden, kernel)
    np.testing.assert_allclose(c_loss, loss, rtol=1e-6)
    assert c_correct == correct and c_count == count == float(jnp.sum(masks > 0))
    for got, want in zip(c_grads, grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # masked-out tokens get no gradient
    assert np.all(np.asarray(c_grads[0])[np.asarray(masks) == 0] == 0)


@pytest.mark.slow
def test_bf16_chunks_stay_close_to_float32_and_keep_float32_kernel_gradient():
    hidden, kernel, targets, masks = inputs(rows=2, length=64, width=32, vocab=300)

    def loss_fn(dtype):
        def f(h, w):
            return chunked_token_sums(h.astype(dtype), w, targets, masks, 32, dtype)[0]
        return jax.jit(jax.value_and_grad(f, (0, 1)))(hidden, kernel)

    (loss32, (dh32, dw32)), (loss16, (dh16, dw16)) = loss_fn(jnp.float32), loss_fn(jnp.bfloat16)
    assert dw16.dtype == jnp.float32  # accumulated over chunks in float32
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    np.testing.assert_allclose(dw16, dw32, atol=2e-2 * float(jnp.max(jnp.abs(dw32))))
    np.testing.assert_allclose(np.asarray(dh16, np.float32), dh32,
                               atol=2e-2 * float(jnp.max(jnp.abs(dh32))))


@pytest.mark.slow
def test_z_loss_sums_and_gradients_chunked_equal_full_and_the_definition():
    """The z-loss (sum of logsumexp(logits)^2 over counted tokens) from full logits equals its
    definition, and the chunked sums give the same value and gradients of
    cross-entropy + coefficient * z."""
    hidden, kernel, targets, masks = inputs(seed=3)
    logits = hidden @ kernel
    want = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * (masks > 0))
    np.testing.assert_allclose(token_sums(logits, targets, masks).z, want, rtol=1e-6)

    def objective(sums_fn):
        def f(h, w):
            sums = sums_fn(h, w)
            return sums.loss + 0.3 * sums.z
        return jax.jit(jax.value_and_grad(f, (0, 1)))(hidden, kernel)

    value, grads = objective(lambda h, w: token_sums(h @ w, targets, masks))
    c_value, c_grads = objective(lambda h, w: chunked_token_sums(h, w, targets, masks, 8))
    np.testing.assert_allclose(c_value, value, rtol=1e-6)
    for got, want in zip(c_grads, grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the z term moves the gradient: it is not the cross-entropy's alone
    ce_grad = jax.grad(lambda h: token_sums(h @ kernel, targets, masks).loss)(hidden)
    assert float(jnp.max(jnp.abs(grads[0] - ce_grad))) > 1e-3
