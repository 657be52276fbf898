"""The fused cross-batch kernel (FoT.kernels) against the reference cross-batch attention.

On CPU both lowerings run in the Pallas interpreter (Triton plan and Mosaic plan) and are
lowered, without running, for GPU and TPU; the ``gpu``-marked tests run the compiled Triton
kernel and are skipped elsewhere.  Errors are
relative in the Frobenius norm: ``|a - b| / |b|``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from FoT.cross_batch import cross_batch_core
from FoT.kernels import check_supported, flash_cross_batch

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SMALL_BLOCKS = dict(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16)


def random_inputs(seed, B, L, H, KV, D, dtype):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (B, L, H, D), jnp.float32)
    k_loc, k_mem, v = (jax.random.normal(k, (B, L, KV, D), jnp.float32) for k in keys[1:4])
    cotangent = jax.random.normal(keys[4], (B, L, H, D), jnp.float32)
    return [x.astype(dtype) for x in (q, k_loc, k_mem, v, cotangent)]


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def assert_matches_reference(shape, C, stepping, packing, dtype, seed=0, **kernel_options):
    """Forward output and the four input gradients (one random cotangent) of the kernel
    equal the reference's."""
    q, k_loc, k_mem, v, cotangent = random_inputs(seed, *shape, dtype)
    args = dict(cross_batch_range=C, cross_batch_stepping=stepping, dataset_packing=packing)

    def reference(*inputs):
        return cross_batch_core(*inputs, implementation="reference",
                                precision=jax.lax.Precision.HIGHEST, **args)

    def kernel(*inputs):
        return flash_cross_batch(*inputs, **args, **kernel_options)

    results = []
    for fn in (reference, kernel):
        out, vjp = jax.vjp(jax.jit(fn), q, k_loc, k_mem, v)
        results.append((out, *vjp(cotangent)))
    for name, got, want in zip(("out", "dq", "dk_loc", "dk_mem", "dv"), *results[::-1]):
        assert got.dtype == want.dtype, name
        if C == 0 and name == "dk_mem":
            assert not np.any(np.asarray(got)), "k_mem is unused without memory slots"
            continue
        error = relative_error(got, want)
        assert error < TOLERANCE[dtype], f"{name}: relative error {error:.2e}"


TRITON_CASES = [  # (B, L, H, KV, D), C, stepping, packing
    ((4, 32, 2, 2, 64), 0, False, 1),
    ((4, 32, 2, 1, 64), 1, False, 1),
    ((6, 32, 4, 2, 64), 2, True, 2),
    ((8, 32, 2, 1, 64), 4, True, 4),
    ((4, 32, 4, 1, 64), 4, True, 2),     # C = B: slot rows wrap around the batch
    ((2, 32, 2, 1, 64), 4, False, 1),    # C > B
    ((4, 32, 2, 2, 128), 2, False, 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("shape,C,stepping,packing", TRITON_CASES)
def test_triton_interpret_float32(shape, C, stepping, packing):
    assert_matches_reference(shape, C, stepping, packing, jnp.float32, backend="triton",
                             interpret=True, **SMALL_BLOCKS)


@pytest.mark.slow
def test_triton_interpret_with_64_bit_types_enabled(x64):
    """Python ints are int64 with jax_enable_x64; the kernel's indices (memory slots,
    readers, causal ranges) stay int32 (FoT.kernels.indices)."""
    assert_matches_reference((4, 32, 2, 1, 64), 2, True, 1, jnp.float32, backend="triton",
                             interpret=True, **SMALL_BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [
    dict(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32),
    dict(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16),
])
def test_triton_interpret_unequal_blocks(blocks):
    """Diagonal tiles that a query (or key) tile only partly overlaps."""
    assert_matches_reference((4, 64, 2, 1, 64), 2, True, 2, jnp.float32, seed=1,
                             backend="triton", interpret=True, **blocks)


@pytest.mark.slow
@pytest.mark.parametrize("shape,C,stepping,packing", [
    ((4, 32, 4, 2, 64), 2, True, 2),
    ((8, 32, 2, 1, 128), 4, False, 4),
])
def test_triton_interpret_bfloat16(shape, C, stepping, packing):
    assert_matches_reference(shape, C, stepping, packing, jnp.bfloat16, seed=2,
                             backend="triton", interpret=True, **SMALL_BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("shape,C,stepping,packing,dtype", [
    ((4, 32, 2, 1, 64), 0, False, 1, jnp.float32),
    ((6, 32, 4, 2, 64), 3, True, 3, jnp.float32),
    ((4, 32, 2, 2, 64), 4, True, 2, jnp.bfloat16),   # wraps around the batch
])
def test_mosaic_interpret(shape, C, stepping, packing, dtype):
    assert_matches_reference(shape, C, stepping, packing, dtype, seed=3, backend="mosaic",
                             interpret=True, block_q=16, block_k=16, block_q_dkv=16,
                             block_k_dkv=32)


@pytest.mark.slow
def test_default_backend_on_cpu_interprets_the_triton_plan():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU default")
    assert_matches_reference((4, 32, 2, 1, 64), 1, False, 1, jnp.float32, **SMALL_BLOCKS)


@pytest.mark.slow
def test_through_cross_batch_core():
    q, k_loc, k_mem, v, _ = random_inputs(4, 4, 32, 2, 1, 64, jnp.float32)
    args = dict(cross_batch_range=2, cross_batch_stepping=True, dataset_packing=2)
    want = cross_batch_core(q, k_loc, k_mem, v, implementation="reference", **args)
    got = cross_batch_core(q, k_loc, k_mem, v, implementation="pallas", **args, **SMALL_BLOCKS)
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("platform,backend", [("cuda", "triton"), ("tpu", "mosaic")])
@pytest.mark.parametrize("dtype,kv_heads,head_dim", [(jnp.bfloat16, 8, 128),
                                                     (jnp.float32, 32, 64)])
def test_lowers_for_the_hardware(platform, backend, dtype, kv_heads, head_dim):
    """Forward and backward lower to Triton IR / Mosaic MLIR at a production shape with the
    default tiles (the hardware compiler itself only runs on the device)."""
    q = jax.ShapeDtypeStruct((8, 2048, 32, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((8, 2048, kv_heads, head_dim), dtype)

    def forward_backward(*inputs):
        out, vjp = jax.vjp(lambda *x: flash_cross_batch(
            *x, cross_batch_range=4, backend=backend, interpret=False), *inputs)
        return vjp(out)

    lowered = jax.jit(forward_backward).trace(q, kv, kv, kv).lower(
        lowering_platforms=(platform,))
    assert lowered.as_text()


@pytest.mark.parametrize("shape,options,error,message", [
    ((2, 48, 2, 1, 64), dict(block_q=32, block_k=16), NotImplementedError,
     "multiple of block_q=32"),
    ((2, 32, 2, 1, 64), dict(block_k=24), NotImplementedError, "power of two"),
    ((2, 32, 2, 1, 32), {}, NotImplementedError, "head dims"),
    ((2, 32, 3, 2, 64), {}, ValueError, "not a multiple"),
    ((2, 32, 2, 1, 64), dict(backend="cuda"), ValueError, "unknown kernel backend"),
    ((2, 32, 2, 1, 64), dict(backend="mosaic", num_warps=4), ValueError, "Triton settings"),
])
def test_errors(shape, options, error, message):
    # NotImplementedError: inputs the kernel does not run (a caller may fall back to another
    # variant); ValueError: a mistake in the call.
    q, k_loc, k_mem, v, _ = random_inputs(0, *shape, jnp.float32)
    with pytest.raises(error, match=message):
        flash_cross_batch(q, k_loc, k_mem, v, cross_batch_range=1, **options)


def test_declared_support():
    """check_supported raises what flash_cross_batch would, and refuses platforms where the
    kernel would only be interpreted."""
    check_supported(256, 64, jnp.bfloat16, interpret=True)
    for length, head_dim, dtype, message in [(256, 96, jnp.float32, "head dims"),
                                             (256, 64, jnp.float64, "16- or 32-bit"),
                                             (600, 64, jnp.float32, "multiple of"),
                                             (40, 64, jnp.float32, "power of two")]:
        with pytest.raises(NotImplementedError, match=message):
            check_supported(length, head_dim, dtype, interpret=True)
    if jax.default_backend() == "cpu":
        with pytest.raises(NotImplementedError, match="interpreter"):
            check_supported(256, 64, jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,C,stepping,packing", [
    ((4, 256, 4, 2, 128), 2, True, 2),
    ((8, 512, 4, 4, 64), 4, False, 1),
])
def test_gpu_kernel(shape, C, stepping, packing, dtype):
    assert_matches_reference(shape, C, stepping, packing, dtype, seed=5, interpret=False)
