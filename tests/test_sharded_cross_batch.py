"""Cross-batch attention with the batch sharded over 8 fake devices (FoT.sharded): the same
numbers as one device, and a per-device program that never holds the whole batch."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from EasyLM.jax_utils import get_jax_mesh
from FoT.cross_batch import cross_batch_core
from FoT.sharded import sharded_cross_batch

ROWS, LENGTH, HEAD_DIM = 16, 32, 64
KERNEL = dict(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, interpret=True)
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|"
                        r"collective-permute)(?:-start)?\(")

CASES = [  # implementation options, mesh, H, KV, C, stepping, packing, padded bias, layout
    # One hop: each device (2 rows) reads the 2 rows of the device before it.
    (dict(implementation="reference"), "1,8,1", 2, 1, 2, True, 2, False, "auto"),
    # C beyond the rows of a device: the halo comes from 3 devices back.
    (dict(implementation="reference"), "1,8,1", 2, 2, 5, False, 1, False, "auto"),
    # Packing groups of 4 straddle devices of 2 rows; stepping.
    (dict(implementation="reference"), "2,4,1", 4, 2, 3, True, 4, False, "auto"),
    # Heads over mp, 4 rows per device, C beyond them, a padding mask in the local slot.
    (dict(implementation="blockwise", block_size=16), "2,2,2", 4, 2, 5, True, 4, True, "auto"),
    (dict(implementation="pallas", backend="triton", **KERNEL), "1,8,1", 2, 1, 3, True, 2,
     False, "auto"),
    (dict(implementation="pallas", backend="triton", **KERNEL), "2,2,2", 4, 2, 1, False, 1,
     False, "auto"),
    # All-to-all to heads: 8 key/value heads, one per batch device.
    (dict(implementation="reference"), "1,8,1", 8, 8, 2, True, 2, False, "heads"),
]


def inputs(H, KV, padded, rows=ROWS):
    keys = jax.random.split(jax.random.PRNGKey(H * 10 + KV), 5)
    q = jax.random.normal(keys[0], (rows, LENGTH, H, HEAD_DIM))
    k_loc, k_mem, v = (jax.random.normal(k, (rows, LENGTH, KV, HEAD_DIM)) for k in keys[1:4])
    cotangent = jax.random.normal(keys[4], q.shape)
    bias = None
    if padded:  # causal, and each row's last (row % 3) keys are padding
        valid = jnp.arange(LENGTH)[None, :] < LENGTH - jnp.arange(rows)[:, None] % 3
        allowed = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))[None] & valid[:, None, :]
        bias = jnp.where(allowed, 0.0, -1e6)[:, None]
    return (q, k_loc, k_mem, v, cotangent), bias


def forward_and_gradients(attention, bias):
    def run(q, k_loc, k_mem, v, cotangent):
        out, vjp = jax.vjp(lambda *x: attention(*x, bias), q, k_loc, k_mem, v)
        return (out,) + vjp(cotangent)
    return run


def two_device_mesh():
    return Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2, 1), ("dp", "fsdp", "mp"),
                axis_types=(jax.sharding.AxisType.Auto,) * 3)


def sharded_program(mesh, args, bias, settings):
    """The compiled forward-and-gradients program on ``mesh`` and its inputs, placed."""
    rows = NamedSharding(mesh, PS(("dp", "fsdp"), None, "mp", None))
    with jax.set_mesh(mesh):
        placed = [jax.device_put(x, rows) for x in args]
        placed_bias = None if bias is None else jax.device_put(
            bias, NamedSharding(mesh, PS(("dp", "fsdp"))))
        step = jax.jit(forward_and_gradients(
            lambda *x: sharded_cross_batch(*x[:4], local_bias=x[4], **settings), placed_bias))
        return step.lower(*placed).compile(), placed


def assert_matches_one_device(mesh, args, bias, settings):
    expected = jax.jit(forward_and_gradients(
        lambda *x: cross_batch_core(*x[:4], local_bias=x[4], implementation="reference",
                                    cross_batch_range=settings["cross_batch_range"],
                                    cross_batch_stepping=settings["cross_batch_stepping"],
                                    dataset_packing=settings["dataset_packing"]), bias))(*args)
    compiled, placed = sharded_program(mesh, args, bias, settings)
    with jax.set_mesh(mesh):
        got = compiled(*placed)
    for name, a, b in zip(("out", "dq", "dk_loc", "dk_mem", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
    return compiled


def assert_rows_stay_local(compiled):
    """No per-device array holds the whole batch, and only the halo moves."""
    program = compiled.as_text()
    whole_batch = re.findall(rf"\[{ROWS},{LENGTH},[\d,]*\]", program)
    assert not whole_batch, f"arrays of the whole batch per device: {set(whole_batch)}"
    assert set(COLLECTIVE.findall(program)) == {"collective-permute"}


@pytest.mark.slow
@pytest.mark.parametrize("options,mesh_dim,H,KV,C,stepping,packing,padded,layout", CASES)
def test_matches_one_device_and_keeps_rows_local(options, mesh_dim, H, KV, C, stepping,
                                                 packing, padded, layout):
    args, bias = inputs(H, KV, padded)
    settings = dict(cross_batch_range=C, cross_batch_stepping=stepping,
                    dataset_packing=packing, layout=layout, **options)
    compiled = assert_matches_one_device(get_jax_mesh(mesh_dim), args, bias, settings)
    if layout == "heads":
        assert set(COLLECTIVE.findall(compiled.as_text())) == {"all-to-all"}
    else:
        assert_rows_stay_local(compiled)


@pytest.mark.slow
def test_mosaic_kernel():
    """The TPU interpreter synchronises every device at each kernel call with one thread per
    device, more than this machine runs at once: 8 devices are compiled, 2 are run.  The
    interpreter's time grows with the grid (rows per device, plus the halo), so the run has
    half the rows: 4 a device, still more than the range of 3 the halo brings from the device
    before (25 s instead of 37 s on 2 cores)."""
    args, _ = inputs(4, 2, False)
    settings = dict(cross_batch_range=3, cross_batch_stepping=True, dataset_packing=2,
                    implementation="pallas", backend="mosaic", **KERNEL)
    assert_rows_stay_local(sharded_program(get_jax_mesh("2,2,2"), args, None, settings)[0])
    assert_matches_one_device(two_device_mesh(), inputs(4, 2, False, rows=ROWS // 2)[0], None,
                              settings)


def test_one_device_runs_the_plain_attention():
    (q, k_loc, k_mem, v, _), _ = inputs(2, 1, False)
    settings = dict(cross_batch_range=2, cross_batch_stepping=True, dataset_packing=2)

    def jaxpr(attention):
        return str(jax.make_jaxpr(lambda *x: attention(*x, **settings))(q, k_loc, k_mem, v))

    plain = jaxpr(cross_batch_core)
    assert jaxpr(sharded_cross_batch) == plain  # no mesh
    one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("dp", "fsdp", "mp"),
               axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(one):
        assert jaxpr(sharded_cross_batch) == jaxpr(cross_batch_core)


def test_bad_settings_fail_clearly():
    (q, k_loc, k_mem, v, _), _ = inputs(2, 1, False)
    with pytest.raises(ValueError, match="unknown cross-batch layout"):
        sharded_cross_batch(q, k_loc, k_mem, v, cross_batch_range=1, layout="columns")
    with jax.set_mesh(get_jax_mesh("1,8,1")):
        with pytest.raises(ValueError, match="12 rows does not split over the 8 devices"):
            sharded_cross_batch(q[:12], k_loc[:12], k_mem[:12], v[:12], cross_batch_range=1)
