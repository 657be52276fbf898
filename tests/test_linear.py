"""Linear attention (EasyLM.linear): the chunked form and the fused kernel (in the Pallas
interpreter on CPU, compiled in the ``gpu``-marked tests) against the recurrence they compute,
in float32, outputs, final states and every gradient (gates included); padding; the declared
errors; the SUPRA and GLA layers' own pieces; models of linear layers, alone and beside FoT
memory layers, training and decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from EasyLM.linear import (FALLBACK_ORDER, IMPLEMENTATIONS, check_supported,
                           linear_attention, resolve_implementation)
from EasyLM.linear.kernels import (TRITON_SHARED_MEMORY_LIMIT, fused_linear_attention,
                                   triton_shared_memory)
from EasyLM.linear.kernels import flash as kernel_flash
from EasyLM.models.llama.attention.linear import group_norm_heads, supra_log_decay

WEAK, STRONG = 4.0, -3.0  # gate logits' mean: alpha near 0.98 or near 0.05 per token


def inputs(batch, length, heads, kv_heads, head_dim, per_dim, mu, seed=0, value_dim=None):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, value_dim or head_dim))
    gate_shape = (batch, length, heads, head_dim if per_dim else 1)
    log_alpha = jax.nn.log_sigmoid(mu + jax.random.normal(keys[3], gate_shape))
    state = jax.random.normal(keys[4], (batch, heads, head_dim, value_dim or head_dim))
    return q, k, v, log_alpha, state


def relative(got, want):
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def outputs_and_gradients(implementation, args, **options):
    def f(q, k, v, log_alpha, state):
        out, final = linear_attention(q, k, v, log_alpha, implementation=implementation,
                                      initial_state=state, return_state=True, **options)
        # every output and the final state reach the loss with their own weights
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(final)), (out, final)
    (_, (out, final)), grads = jax.jit(jax.value_and_grad(f, argnums=range(5), has_aux=True))(
        *args)
    return (out, final) + tuple(grads)


NAMES = ("out", "final state", "dq", "dk", "dv", "dlog_alpha", "dinitial_state")


# Each case compiles the recurrence and the chunked form with their gradients (seconds on a
# CPU): the full run only.
@pytest.mark.slow
@pytest.mark.parametrize("shape,per_dim,mu,options", [
    ((2, 64, 4, 2, 16), True, WEAK, dict(chunk_size=32, subchunk=8)),
    ((1, 96, 2, 2, 16), True, STRONG, dict(chunk_size=32, subchunk=8)),
    ((2, 50, 4, 1, 16), False, WEAK, dict(chunk_size=16, subchunk=8)),  # L % C != 0, GQA
    ((1, 40, 2, 2, 32), False, STRONG, dict()),  # shorter than the default chunk
    ((2, 200, 4, 2, 64), True, WEAK, dict()),
    ((1, 256, 2, 1, 128), False, STRONG, dict(chunk_size=128, subchunk=16)),
])
def test_chunked_equals_the_recurrence_in_float32(shape, per_dim, mu, options):
    args = inputs(*shape, per_dim=per_dim, mu=mu)
    want = outputs_and_gradients("scan", args)
    got = outputs_and_gradients("chunked", args, **options)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, name
        assert relative(a, b) < 1e-5, (name, relative(a, b))


# The kernel's gate gradient is q * dq - k * dk, reverse-summed inside each chunk: with gates
# of alpha near 0.05 a token (STRONG) the pairs it adds and subtracts are much larger than the
# result, and it is 4e-6 to 1.3e-5 from a float64 scan (the chunked form 2e-6 to 5e-6, the
# float32 scan 2e-8; measured 2026-12-06 on the CPU of that day).  With one gate per head
# (the pairs also summed over the key dimension) at (1, 80, 2, 1, 32), chunks of 64, another
# CPU (AMD EPYC, 2026-12-07) gave 2.8e-5, and 4.8e-5 with grads_block_v 16 (the sums over
# value blocks in another order), where the float32 scan is 2.3e-8 from float64: XLA's CPU
# code, and so the rounding, differs between machines.  Every other quantity is within 1e-6.
# Compiled on an H100 (2026-12-07), float32, strong gates at (2, 1024, 4, 2, 128) with the state
# in key blocks of 64: 1.6e-5 (the sums over key blocks in another order).
KERNEL_TOLERANCE = {("dlog_alpha", STRONG): 1e-4}


# The kernel in the Pallas interpreter: whole chunks, a row ending inside a chunk, GQA, gates
# per key dimension (weak ones: whole-chunk matmuls; strong ones: sixteen tokens at a time)
# and per head, value heads of another width, chunk sizes from 16 to 128.
@pytest.mark.slow
@pytest.mark.parametrize("shape,per_dim,mu,options", [
    ((2, 64, 4, 2, 16), True, WEAK, dict(chunk_size=32)),
    ((1, 80, 2, 1, 32), False, STRONG, dict(chunk_size=64)),  # L % C != 0, GQA
    ((1, 48, 2, 2, 16), True, STRONG, dict(chunk_size=16)),
    ((1, 128, 2, 2, 16), True, WEAK, dict(chunk_size=128, value_dim=32, block_v=16)),
    # alpha near 0.6: chunks of 64 sum near the kernel's MILD_LIMIT, some take whole-chunk
    # matmuls and some sixteen tokens at a time
    ((1, 320, 2, 2, 16), True, 0.7, dict(chunk_size=64)),
    # the backward's per-chunk work in two kernels (dq; dk and dv), both paths, and per head
    ((1, 320, 2, 2, 16), True, 0.7, dict(chunk_size=64, split_grads=True)),
    ((1, 80, 2, 1, 32), False, STRONG, dict(chunk_size=64, split_grads=True)),
    # the sequential kernels' states in blocks of key rows (and of value columns), gates per
    # key dimension (each block decays by its own) and per head
    ((1, 80, 2, 2, 32), True, 0.7, dict(chunk_size=32, block_k=16)),
    ((1, 80, 2, 1, 32), False, STRONG, dict(chunk_size=64, block_k=16, block_v=16)),
])
def test_kernel_equals_the_recurrence_in_float32(shape, per_dim, mu, options):
    check_kernel(shape, per_dim, mu, options)


# With jax_enable_x64 a Python int is int64, which lax's integer ops refuse beside the
# kernel's int32 indices (FoT.kernels.indices): the sub-chunk path and key blocks.
@pytest.mark.slow
@pytest.mark.parametrize("shape,per_dim,mu,options", [
    ((1, 48, 2, 2, 16), True, STRONG, dict(chunk_size=16)),
    ((1, 80, 2, 1, 32), False, STRONG, dict(chunk_size=64, block_k=16, block_v=16)),
])
def test_kernel_runs_with_64_bit_types_enabled(x64, shape, per_dim, mu, options):
    args = tuple(x.astype(jnp.float32) for x in inputs(*shape, per_dim=per_dim, mu=mu))
    want = outputs_and_gradients("scan", args)
    got = outputs_and_gradients("pallas", args, interpret=True, **options)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == jnp.float32, name
        assert relative(a, b) < KERNEL_TOLERANCE.get((name, mu), 1e-5), (name, relative(a, b))


# The backward's per-chunk work over the value columns in blocks (grads_block_v), two or four
# of them, in one kernel and split (dq; dk and dv): gates per key dimension weak (whole-chunk
# matmuls), strong (sixteen tokens at a time) and both in one row, and per head.
@pytest.mark.slow
@pytest.mark.parametrize("split_grads", [False, True], ids=["one-kernel", "split"])
@pytest.mark.parametrize("shape,per_dim,mu,options", [
    ((1, 64, 2, 2, 16), True, WEAK, dict(chunk_size=32, value_dim=32, grads_block_v=16)),
    ((1, 64, 2, 1, 16), True, STRONG, dict(chunk_size=32, value_dim=32, grads_block_v=16)),
    ((1, 320, 2, 2, 16), True, 0.7, dict(chunk_size=64, value_dim=64, grads_block_v=16)),
    ((1, 80, 2, 1, 32), False, STRONG, dict(chunk_size=64, grads_block_v=16)),  # L % C != 0
], ids=["gla-weak", "gla-strong", "gla-mixed-4-blocks", "per-head"])
def test_kernel_grads_in_value_blocks_equal_the_recurrence(shape, per_dim, mu, options,
                                                            split_grads):
    check_kernel(shape, per_dim, mu, dict(options, split_grads=split_grads))


def test_grads_block_v_is_checked():
    """A power of two from 16 dividing the value head size, or None; the Triton lowering's."""
    q, k, v, log_alpha, _ = inputs(1, 8, 2, 2, 16, per_dim=True, mu=WEAK, value_dim=32)
    for bad in (8, 24, 64, 0, True):
        with pytest.raises(ValueError, match=(
                f"grads_block_v must be None or a power of two from 16 that divides the value "
                f"head size 32, not {bad!r}")):
            linear_attention(q, k, v, log_alpha, implementation="pallas", interpret=True,
                             grads_block_v=bad)
    with pytest.raises(ValueError, match="grads_block_v is a setting of the Triton lowering"):
        fused_linear_attention(q, k, v, log_alpha, backend="mosaic", grads_block_v=16,
                               interpret=True)


def test_block_v_is_checked():
    """The sequential kernels' state blocks: powers of two from 16 dividing the head size."""
    kernel_flash.check_inputs(64, 64, jnp.float32, 64, block_v=32, block_k=16)
    for bad in (8, 24, 128, True):
        with pytest.raises(NotImplementedError, match=(
                f"block_v {bad} must be a power of two from 16 that divides the value head "
                f"size 64")):
            kernel_flash.check_inputs(64, 64, jnp.float32, 64, block_v=bad)
        with pytest.raises(NotImplementedError, match=(
                f"block_k {bad} must be a power of two from 16 that divides the key head "
                f"size 32")):
            kernel_flash.check_inputs(32, 64, jnp.float32, 64, block_k=bad)
    q, k, v, log_alpha, _ = inputs(1, 8, 2, 2, 16, per_dim=True, mu=WEAK)
    with pytest.raises(ValueError, match="block_k is a setting of the Triton lowering"):
        fused_linear_attention(q, k, v, log_alpha, backend="mosaic", block_k=16,
                               interpret=True)


def test_tuned_defaults_apply_where_they_were_measured_only():
    """bf16 128-wide heads with a gate per key dimension take the searched settings; float32,
    one gate per head and other head sizes the generic ones; what a caller gives wins."""
    tuned = kernel_flash.default_settings(128, 128, jnp.bfloat16, per_head=False)
    assert tuned == dict(dict(block_k=None, split_grads=False, grads_block_v=None),
                         **kernel_flash.TUNED_SETTINGS[(128, 128, "bfloat16", False)])
    generic = dict(block_v=64, block_k=None, num_warps=(4, 4, 4, 4), num_stages=(2, 1, 2, 1),
                   split_grads=False, grads_block_v=None)
    for key_dim, dtype, per_head in ((128, jnp.float32, False), (128, jnp.bfloat16, True),
                                     (64, jnp.bfloat16, False)):
        assert kernel_flash.default_settings(key_dim, key_dim, dtype, per_head) == dict(
            generic, block_v=min(key_dim, 64))
    seen = []
    real = kernel_flash.tiles.Plan

    def plan(**fields):
        seen.append(fields["block_v"])
        return real(**fields)
    q, k, v, log_alpha, _ = inputs(1, 16, 1, 1, 128, per_dim=True, mu=WEAK)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel_flash.tiles, "Plan", plan)
        jax.eval_shape(lambda *x: fused_linear_attention(*x, backend="triton", interpret=True),
                       q, k, v, log_alpha)
        jax.eval_shape(lambda *x: fused_linear_attention(*x, backend="triton", interpret=True,
                                                         block_v=32), q, k, v, log_alpha)
    assert seen == [128, 32]


@pytest.mark.slow
def test_tuned_block_v_equals_the_generic_one_in_the_interpreter():
    """The searched settings change where the work runs, not what it computes: bf16 128-wide
    heads, outputs and gradients equal with the state in one block of value columns and two
    of key rows (the tuned ones) and in two of value columns and one of key rows."""
    args = inputs(1, 48, 1, 1, 128, per_dim=True, mu=0.7)
    args = [x.astype(jnp.bfloat16) for x in args[:3]] + list(args[3:])
    tuned = outputs_and_gradients("pallas", args, interpret=True)
    generic = outputs_and_gradients("pallas", args, interpret=True, block_v=64)
    for name, a, b in zip(NAMES, tuned, generic):
        assert relative(a.astype(jnp.float32), b.astype(jnp.float32)) < 1e-6, name


# The Mosaic (TPU) lowering in the TPU interpreter: the same maths in another grid.
@pytest.mark.slow
@pytest.mark.parametrize("shape,per_dim,mu,options", [
    ((1, 80, 2, 1, 32), False, STRONG, dict(chunk_size=64)),
    ((1, 320, 2, 2, 16), True, 0.7, dict(chunk_size=64)),
])
def test_mosaic_kernel_equals_the_recurrence_in_float32(shape, per_dim, mu, options):
    check_kernel(shape, per_dim, mu, dict(options, backend="mosaic"))


@pytest.mark.parametrize("platform,backend,options", [
    ("cuda", "triton", {}), ("cuda", "triton", dict(split_grads=True)), ("tpu", "mosaic", {}),
    pytest.param("cuda", "triton", dict(grads_block_v=64), id="cuda-triton-grads_block_v"),
    pytest.param("cuda", "triton", dict(split_grads=True, grads_block_v=64),
                 id="cuda-triton-split-grads_block_v"),
    pytest.param("cuda", "triton", dict(block_k=32), id="cuda-triton-block_k")])
@pytest.mark.parametrize("per_dim", [True, False])
def test_kernel_lowers_for_the_hardware(platform, backend, options, per_dim):
    """Forward and backward lower to Triton IR / Mosaic MLIR at a training shape (GQA, a row
    ending inside a chunk); the hardware compiler itself only runs on the device."""
    q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1000, 4, 128), jnp.bfloat16)
    log_alpha = jax.ShapeDtypeStruct((2, 1000, 8, 128 if per_dim else 1), jnp.float32)

    def forward_backward(*args):
        out, vjp = jax.vjp(lambda *x: linear_attention(
            *x, implementation="pallas", backend=backend, interpret=False, **options), *args)
        return vjp(out)

    lowered = jax.jit(forward_backward).trace(q, kv, kv, log_alpha).lower(
        lowering_platforms=(platform,))
    assert lowered.as_text()


def check_kernel(shape, per_dim, mu, options):
    options = dict(options)
    args = inputs(*shape, per_dim=per_dim, mu=mu, value_dim=options.pop("value_dim", None))
    want = outputs_and_gradients("scan", args)
    got = outputs_and_gradients("pallas", args, interpret=True, **options)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, name
        assert relative(a, b) < KERNEL_TOLERANCE.get((name, mu), 1e-5), (name, relative(a, b))


# The compiled kernel: float32 as tight as in the interpreter (KERNEL_TOLERANCE's gate gradient
# of strong gates included); bf16 rounds q, k, v, the decayed tiles and the score tiles to 8
# bits before each product.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape,per_dim,mu", [
    ((2, 1024, 8, 2, 64), True, WEAK),
    ((1, 2000, 4, 4, 128), True, STRONG),
    ((2, 512, 4, 1, 128), False, WEAK),
])
def test_gpu_kernel(shape, per_dim, mu, dtype, tolerance):
    """Settings the kernel declares beyond its shared memory (float32, 128-wide heads, one
    gate per head, chunks of 64: measured to fail to compile on an H100) are refused before
    compiling, and run with chunks of 32."""
    args = inputs(*shape, per_dim=per_dim, mu=mu, seed=3)
    want = outputs_and_gradients("scan", args)
    lowered = tuple(x.astype(dtype) for x in args[:3]) + args[3:]
    options = dict(interpret=False)
    if triton_shared_memory(shape[4], shape[4], dtype, 64, not per_dim) > (
            TRITON_SHARED_MEMORY_LIMIT):
        with pytest.raises(NotImplementedError, match="KiB of shared memory"):
            outputs_and_gradients("pallas", lowered, **options)
        options["chunk_size"] = 32
    got = outputs_and_gradients("pallas", lowered, **options)
    for name, a, b in zip(NAMES, got, want):
        limit = max(tolerance, KERNEL_TOLERANCE.get((name, mu), 0.0))
        assert relative(a.astype(jnp.float32), b) < limit, (name, relative(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape,per_dim,mu,options", [
    ((2, 1024, 4, 2, 128), True, STRONG, dict(block_k=64)),
    ((1, 2000, 4, 4, 128), True, 0.7, dict(block_k=32, block_v=64, chunk_size=32)),
    ((2, 512, 4, 1, 64), False, WEAK, dict(block_k=16, block_v=32)),
])
def test_gpu_kernel_in_state_blocks(shape, per_dim, mu, options, dtype, tolerance):
    """The sequential kernels with the state split into blocks of key rows (and of value
    columns), compiled: outputs and gradients as the recurrence's."""
    args = inputs(*shape, per_dim=per_dim, mu=mu, seed=5)
    want = outputs_and_gradients("scan", args)
    lowered = tuple(x.astype(dtype) for x in args[:3]) + args[3:]
    got = outputs_and_gradients("pallas", lowered, interpret=False, **options)
    for name, a, b in zip(NAMES, got, want):
        limit = max(tolerance, KERNEL_TOLERANCE.get((name, mu), 0.0))
        assert relative(a.astype(jnp.float32), b) < limit, (name, relative(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("implementation,options", [
    ("chunked", dict(chunk_size=32, subchunk=8)),
    ("pallas", dict(chunk_size=32, interpret=True)),
])
def test_gates_too_strong_for_a_naive_chunk_stay_finite_and_exact(implementation, options):
    """log alpha near -30 a token: exp of a chunk's running sum would overflow float32 if
    factored naively; every exponent the chunked form and the kernel take is <= 0."""
    args = inputs(1, 64, 2, 2, 16, per_dim=True, mu=-30.0)
    want = outputs_and_gradients("scan", args)
    got = outputs_and_gradients(implementation, args, **options)
    for name, a, b in zip(NAMES, got, want):
        assert np.all(np.isfinite(np.asarray(a))), name
        # d log alpha is ~1e-11 here (each gate multiplies a weight of e^-30): compared to
        # the scale of the other gradients instead of its own
        scale = float(jnp.max(jnp.abs(want[2]))) if name == "dlog_alpha" else None
        if scale:
            assert float(jnp.max(jnp.abs(a - b))) < 1e-6 * scale
        else:
            assert relative(a, b) < 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["scan", "chunked", "pallas"])
def test_padding_leaves_the_state_as_it_was(implementation):
    """Rows padded on the left and on the right give, at their real tokens, the outputs and
    the final state of the unpadded row."""
    q, k, v, log_alpha, _ = inputs(1, 24, 2, 2, 16, per_dim=True, mu=WEAK)
    want, want_state = linear_attention(q, k, v, log_alpha, implementation="scan",
                                        return_state=True)
    for left, right in ((5, 0), (0, 7), (3, 4)):
        def pad(x, value):  # padding that would change the state if it were read
            return jnp.pad(x, ((0, 0), (left, right)) + ((0, 0),) * (x.ndim - 2),
                           constant_values=value)
        mask = jnp.pad(jnp.ones((1, 24), bool), ((0, 0), (left, right)))
        out, state = linear_attention(pad(q, 0.7), pad(k, 0.7), pad(v, 0.7),
                                      pad(log_alpha, -1.0), mask,
                                      implementation=implementation, chunk_size=16,
                                      subchunk=16 if implementation == "pallas" else 8,
                                      return_state=True)
        np.testing.assert_allclose(out[:, left:left + 24], want, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(state, want_state, rtol=1e-5, atol=2e-6)


@pytest.mark.slow
def test_a_row_in_pieces_equals_the_row_at_once():
    """The final state carries a row on: two pieces (chunked, then one token at a time)
    equal the whole row, as windowed decoding relies on."""
    q, k, v, log_alpha, _ = inputs(2, 48, 2, 1, 16, per_dim=True, mu=WEAK)
    whole, whole_state = linear_attention(q, k, v, log_alpha, return_state=True)
    first, state = linear_attention(q[:, :40], k[:, :40], v[:, :40], log_alpha[:, :40],
                                    return_state=True)
    outs = [first]
    for t in range(40, 48):
        out, state = linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                      log_alpha[:, t:t + 1], implementation="scan",
                                      initial_state=state, return_state=True)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, whole_state, rtol=1e-5, atol=1e-5)


def test_declarations_and_errors_say_what_is_wrong():
    assert IMPLEMENTATIONS == ("scan", "chunked", "pallas")
    assert FALLBACK_ORDER == ("pallas", "chunked", "scan")
    shapes = dict(key_dim=64, value_dim=64, dtype=jnp.bfloat16)
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_implementation("auto", **shapes) == ("pallas" if on_gpu else "chunked")
    assert resolve_implementation("auto") == "chunked"  # the kernel's support needs the shapes
    # what the kernel does not take falls back to the chunked form
    assert resolve_implementation("auto", chunk_size=48, **shapes) == "chunked"
    assert resolve_implementation("auto", key_dim=48, value_dim=64,
                                  dtype=jnp.bfloat16) == "chunked"
    with pytest.raises(NotImplementedError, match="key head sizes .* not 48"):
        check_supported("pallas", key_dim=48, value_dim=64, dtype=jnp.float32)
    if not on_gpu:
        with pytest.raises(NotImplementedError, match="only runs in the Pallas interpreter"):
            check_supported("pallas", **shapes)
    with pytest.raises(NotImplementedError, match="sub-chunks of 16 tokens, not 8"):
        check_supported("pallas", subchunk=8, **shapes)
    with pytest.raises(NotImplementedError, match="chunks of 16, 32, 64 or 128 tokens, not 48"):
        fused_linear_attention(*inputs(1, 8, 2, 2, 16, per_dim=True, mu=WEAK)[:4],
                               chunk_size=48, interpret=True)
    with pytest.raises(ValueError, match="split_grads is a setting of the Triton lowering"):
        fused_linear_attention(*inputs(1, 8, 2, 2, 16, per_dim=True, mu=WEAK)[:4],
                               backend="mosaic", split_grads=True, interpret=True)
    assert resolve_implementation("scan") == "scan"
    with pytest.raises(ValueError, match="unknown linear attention implementation 'fast'"):
        resolve_implementation("fast")
    with pytest.raises(NotImplementedError, match="subchunk 16 must divide chunk_size 40"):
        check_supported("chunked", chunk_size=40)
    q, k, v, log_alpha, _ = inputs(1, 8, 4, 2, 16, per_dim=True, mu=WEAK)
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3"):
        linear_attention(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)), log_alpha)
    with pytest.raises(ValueError, match=r"log_alpha has shape \(1, 8, 4, 8\)"):
        linear_attention(q, k, v, log_alpha[..., :8])
    with pytest.raises(ValueError, match="initial_state has shape"):
        linear_attention(q, k, v, log_alpha, initial_state=jnp.zeros((1, 4, 16, 8)))


def test_the_kernel_declares_what_exceeds_a_gpus_shared_memory(monkeypatch):
    """Float32 with 128-wide heads, one gate per head and chunks of 64 failed to compile on an
    H100 (294,912 bytes of shared memory asked for, 232,448 there); a gate per key dimension,
    or bfloat16, compiled.  The kernel refuses the first before compiling, saying what to
    change, and ``auto`` takes the chunked form for it."""
    assert triton_shared_memory(128, 128, jnp.float32, 64, per_head=True) == 294_912
    assert triton_shared_memory(128, 128, jnp.float32, 64, per_head=False) <= (
        TRITON_SHARED_MEMORY_LIMIT)
    with pytest.raises(NotImplementedError, match=(
            "needs about 288 KiB of shared memory for float32 heads of 128x128, chunks of 64 "
            "and one gate per head .* use bfloat16 inputs or smaller chunks")):
        fused_linear_attention(*inputs(1, 64, 2, 1, 128, per_dim=False, mu=WEAK)[:4],
                               backend="triton", interpret=False)
    # as on a GPU: only the shared memory decides
    monkeypatch.setattr(kernel_flash, "check_compiled", lambda backend, kernel: None)
    shapes = dict(key_dim=128, value_dim=128)
    assert resolve_implementation("auto", dtype=jnp.float32, per_head=True,
                                  **shapes) == "chunked"
    assert resolve_implementation("auto", dtype=jnp.float32, per_head=True, chunk_size=32,
                                  **shapes) == "pallas"
    assert resolve_implementation("auto", dtype=jnp.bfloat16, per_head=True,
                                  **shapes) == "pallas"
    assert resolve_implementation("auto", dtype=jnp.float32, **shapes) == "pallas"
    # and the Mosaic lowering (TPU) is not held to it
    assert kernel_flash.check_supported(128, 128, jnp.float32, 64, per_head=True,
                                        backend="mosaic") is None


def test_supra_decays_and_group_norm():
    decay = np.exp(np.asarray(supra_log_decay(8)))
    np.testing.assert_allclose(decay, np.exp(-2.0 ** (-8.0 * np.arange(1, 9) / 8)), rtol=1e-6)
    assert decay[0] < decay[-1] and abs(decay[-1] - np.exp(-1 / 256)) < 1e-7
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 16)) * 4 + 1
    normed = np.asarray(group_norm_heads(x))
    np.testing.assert_allclose(normed.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(normed.var(-1), 1, rtol=1e-3)
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.group_norm(torch.tensor(np.asarray(x)).reshape(10, 48), 3,
                                          eps=1e-5).reshape(2, 5, 3, 16).numpy()
    np.testing.assert_allclose(normed, want, atol=1e-5)
