"""Cross-batch attention against a per-row loop written straight from FOT_SPEC section 2."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from EasyLM.models.llama.rope import apply_rope, apply_rope_as_first, inverse_frequencies
from FoT.cross_batch import MASK_VALUE, cross_batch_attention, cross_batch_core
from FoT.slots import allowed_slots, slot_mask


def loop_cross_batch(q, k, v, positions, C, stepping, packing, theta=10000.0):
    """Row by row: RoPE, the slot rule, one float32 softmax over all allowed keys."""
    B, L, H, D = q.shape
    kv = k.shape[2]
    inv = inverse_frequencies(D, theta)
    outs = []
    for b in range(B):
        if packing == 1 or not stepping:
            n = C + 1
        else:
            step = math.ceil((C + 1) / max(packing - 1, 1))
            n = min((b % packing) * step + 1, C + 1)
        n = min(n, b + 1)
        qb = apply_rope(q[b:b + 1], positions[b:b + 1], inv)[0]
        keys = [apply_rope(k[b:b + 1], positions[b:b + 1], inv)[0]]
        values = [v[b]]
        masks = [np.tril(np.ones((L, L), bool))]
        for c in range(1, n):
            src = (b - c) % B
            keys.append(apply_rope_as_first(k[src:src + 1], positions[src:src + 1], inv)[0])
            values.append(v[src])
            masks.append(np.ones((L, L), bool))
        keys = jnp.repeat(jnp.concatenate(keys, 0), H // kv, axis=1).astype(jnp.float32)
        values = jnp.repeat(jnp.concatenate(values, 0), H // kv, axis=1).astype(jnp.float32)
        mask = np.concatenate(masks, 1)
        s = jnp.einsum("qhd,khd->hqk", qb.astype(jnp.float32), keys) / math.sqrt(D)
        s = jnp.where(mask[None], s, -jnp.inf)
        outs.append(jnp.einsum("hqk,khd->qhd", jax.nn.softmax(s, axis=-1), values))
    return jnp.stack(outs).astype(q.dtype)


def random_qkv(seed, B, L, H, KV, D, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(keys[0], (B, L, H, D), dtype),
            jax.random.normal(keys[1], (B, L, KV, D), dtype),
            jax.random.normal(keys[2], (B, L, KV, D), dtype))


def rope_callbacks(positions, theta=10000.0):
    def pos_encode_as_first(xk):
        return apply_rope_as_first(xk, positions, inverse_frequencies(xk.shape[-1], theta))

    def pos_encode(xq, xk):
        d = xq.shape[-1]
        return (apply_rope(xq, positions, inverse_frequencies(d, theta)),
                apply_rope(xk, positions, inverse_frequencies(d, theta)))
    return pos_encode_as_first, pos_encode


def test_slot_table_matches_spec_examples():
    assert list(allowed_slots(8, 6, 4, True) - 1) == [0, 1, 2, 3, 0, 3, 6, 6]
    assert list(allowed_slots(6, 2, 1, False) - 1) == [0, 1, 2, 2, 2, 2]
    assert list(allowed_slots(6, 2, 2, False) - 1) == [0, 1, 2, 2, 2, 2]
    table = slot_mask(8, 6, 4, True)
    assert table.shape == (8, 7) and table[:, 0].all() and table.sum() == 8 + 21


CASES = [  # B, L, H, KV, D, C, stepping, packing, shifted positions
    (4, 8, 2, 2, 8, 1, False, 1, False),
    (6, 8, 4, 2, 8, 2, True, 2, True),
    (8, 8, 4, 1, 8, 6, True, 4, False),
    (4, 8, 4, 4, 8, 5, False, 2, True),   # C >= B: slots wrap around the batch
    (8, 4, 2, 1, 16, 3, True, 2, False),
]


@pytest.mark.slow
@pytest.mark.parametrize("B,L,H,KV,D,C,stepping,packing,shifted", CASES)
def test_legacy_call_matches_per_row_loop(B, L, H, KV, D, C, stepping, packing, shifted):
    q, k, v = random_qkv(B * 10 + C, B, L, H, KV, D)
    positions = jnp.broadcast_to(jnp.arange(L), (B, L))
    if shifted:
        positions = positions + 3 * jnp.arange(B)[:, None]
    as_first, encode = rope_callbacks(positions)
    causal = jnp.where(jnp.tril(jnp.ones((L, L), bool)), 0.0, -1e9)[None, None]
    bias = jnp.broadcast_to(causal, (B, 1, L, L))

    @jax.jit
    def ours(q, k, v):
        return cross_batch_attention(q, k, v, bias, MASK_VALUE, C, stepping, packing, as_first,
                                     encode)

    @jax.jit
    def loop(q, k, v):
        return loop_cross_batch(q, k, v, positions, C, stepping, packing)

    np.testing.assert_allclose(ours(q, k, v), loop(q, k, v), atol=1e-5, rtol=1e-5)
    cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)
    grads_ours = jax.vjp(ours, q, k, v)[1](cotangent)
    grads_loop = jax.vjp(loop, q, k, v)[1](cotangent)
    for name, a, b in zip("qkv", grads_ours, grads_loop):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.slow
@pytest.mark.parametrize("B,L,H,KV,D,C,stepping,packing,shifted", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_blockwise_matches_reference(B, L, H, KV, D, C, stepping, packing, shifted, with_bias):
    q, k_loc, v = random_qkv(B + C, B, L, H, KV, D)
    k_mem = jax.random.normal(jax.random.PRNGKey(3), k_loc.shape)
    bias = None
    if with_bias:  # causal plus a padded tail in every row
        allowed = jnp.tril(jnp.ones((L, L), bool))[None, None] & (
            jnp.arange(L) < L - 1)[None, None, None, :]
        bias = jnp.broadcast_to(jnp.where(allowed, 0.0, MASK_VALUE), (B, 1, L, L))

    def run(impl):
        return lambda q, kl, km, v: cross_batch_core(
            q, kl, km, v, cross_batch_range=C, cross_batch_stepping=stepping,
            dataset_packing=packing, local_bias=bias, implementation=impl, block_size=4)

    args = (q, k_loc, k_mem, v)
    ref_out, ref_vjp = jax.vjp(run("reference"), *args)
    blk_out, blk_vjp = jax.vjp(run("blockwise"), *args)
    np.testing.assert_allclose(blk_out, ref_out, atol=1e-5, rtol=1e-5)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    for name, a, b in zip(["q", "k_loc", "k_mem", "v"], blk_vjp(cotangent), ref_vjp(cotangent)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_blockwise_never_builds_the_full_score_tensor():
    B, L, H, D, C = 4, 64, 2, 8, 3
    q, k, v = random_qkv(0, B, L, H, H, D)
    fn = jax.jit(lambda q, k, v: cross_batch_core(q, k, k, v, cross_batch_range=C,
                                                  implementation="blockwise", block_size=16))
    hlo = fn.lower(q, k, v).as_text()
    full = f"{B},{H},1,{L},{C + 1},{L}"
    assert full not in hlo and f"{(C + 1) * L}" not in hlo.split("while")[0]


@pytest.mark.slow
def test_c_zero_is_causal_attention():
    q, k, v = random_qkv(1, 2, 8, 2, 2, 8)
    out = cross_batch_core(q, k, jnp.zeros_like(k), v, cross_batch_range=0)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    s = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), s, -jnp.inf)
    expected = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_bad_arguments_fail_clearly():
    q, k, v = random_qkv(0, 6, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="not divisible by dataset_packing 4"):
        cross_batch_core(q, k, k, v, cross_batch_range=1, dataset_packing=4)
    with pytest.raises(ValueError, match="unknown cross-batch implementation"):
        cross_batch_core(q, k, k, v, cross_batch_range=1, implementation="fast")
    with pytest.raises(NotImplementedError, match="multiple of its block size"):
        cross_batch_core(q, k, k, v, cross_batch_range=1, implementation="blockwise",
                         block_size=3)
    q3 = jnp.zeros((6, 8, 3, 8))
    with pytest.raises(ValueError, match="not a multiple"):
        cross_batch_core(q3, k, k, v, cross_batch_range=1)
