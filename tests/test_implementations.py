"""One oracle for every cross-batch implementation: each variant of ``cross_batch_core``, run on
RoPE-rotated inputs as the memory layers run it, gives the output and input gradients of the
per-row loop written from FOT_SPEC section 2 (:func:`test_cross_batch.loop_cross_batch`).

The Pallas kernel runs in the Pallas interpreter on CPU (seconds per case): ``slow``."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from EasyLM.models.llama.rope import apply_rope, apply_rope_as_first, inverse_frequencies
from FoT.cross_batch import IMPLEMENTATIONS, cross_batch_core
from test_cross_batch import loop_cross_batch, random_qkv

# Blocks small enough for these shapes: the blockwise variant's, and the kernel's tiles.
BLOCK_OPTIONS = {"reference": {}, "blockwise": dict(block_size=8),
                 "pallas": dict(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16)}
CASES = [  # B, L, H, KV, D, C, stepping, packing: head_dim 64 is the kernel's smallest
    (4, 32, 2, 2, 64, 1, False, 1),
    (6, 32, 4, 2, 64, 7, True, 2),  # GQA, stepping, and C >= B: slots wrap around the batch
]


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def inputs(B, L, H, KV, D, C, stepping, packing):
    q, k, v = random_qkv(B + C, B, L, H, KV, D)
    positions = jnp.broadcast_to(jnp.arange(L), (B, L)) + 3 * jnp.arange(B)[:, None]
    return q, k, v, positions, jax.random.normal(jax.random.PRNGKey(1), q.shape)


def output_and_gradients(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    return (out, *vjp(cotangent))


@functools.lru_cache(maxsize=None)
def oracle(case):
    """The loop's output and gradients, computed once per case for all variants."""
    B, L, H, KV, D, C, stepping, packing = case
    q, k, v, positions, cotangent = inputs(*case)
    return output_and_gradients(
        lambda q, k, v: loop_cross_batch(q, k, v, positions, C, stepping, packing),
        q, k, v, cotangent)


# The fast lane checks the blockwise implementation on the first case: Pallas interprets for
# seconds, the reference is the one the model and inference tests run, and the second case's
# loop oracle costs seconds.
@pytest.mark.parametrize("implementation", [
    pytest.param(name, marks=[pytest.mark.slow] if name in ("pallas", "reference") else [])
    for name in IMPLEMENTATIONS])
@pytest.mark.parametrize("case", [CASES[0], pytest.param(CASES[1], marks=pytest.mark.slow)])
@pytest.mark.slow
def test_matches_the_per_row_loop(implementation, case):
    assert set(BLOCK_OPTIONS) == set(IMPLEMENTATIONS)
    B, L, H, KV, D, C, stepping, packing = case
    q, k, v, positions, cotangent = inputs(*case)
    inv = inverse_frequencies(D, 10000.0)

    def variant(q, k, v):
        return cross_batch_core(
            apply_rope(q, positions, inv), apply_rope(k, positions, inv),
            apply_rope_as_first(k, positions, inv), v, cross_batch_range=C,
            cross_batch_stepping=stepping, dataset_packing=packing,
            implementation=implementation, **BLOCK_OPTIONS[implementation])

    got = output_and_gradients(variant, q, k, v, cotangent)
    for name, ours, want in zip(("out", "dq", "dk", "dv"), got, oracle(case)):
        error = relative_error(ours, want)
        assert error < 1e-5, f"{implementation} {name}: relative error {error:.2e}"
