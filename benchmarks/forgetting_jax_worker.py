"""The JAX side of :mod:`benchmarks.bench_forgetting`: times the fused forgetting attention
kernel and cuDNN's causal softmax attention, and checks both against the reference.

    python -m benchmarks.forgetting_jax_worker JOB_JSON     # prints one "RESULT {...}" line

Run by the driver in a subprocess of its own, so that JAX starts with the driver's memory
settings and never shares the GPU with the PyTorch worker.
"""
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_attention import peak_bytes, timed
from EasyLM.flops import attention_flops
from EasyLM.forgetting import (cumulative_log_forget, forgetting_attention,
                               reference_forgetting_attention)
from EasyLM.forgetting.kernels.triton_lowering import default_blocks
from EasyLM.forgetting.skipping import skip_ranges, skipped_fraction

# Relative errors (Frobenius norm) a kernel may show against the float32 reference.
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def inputs(job, dtype, seed=0):
    """``q, k, v, log_f, cotangent`` for ``job``'s shape; gates ``log_sigmoid(N(mu, 1))``."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    b, l, h, d = job["batch"], job["length"], job["heads"], job["head_dim"]
    kv = h // job["group"]
    q = jax.random.normal(keys[0], (b, l, h, d), dtype)
    k, v = (jax.random.normal(key, (b, l, kv, d), dtype) for key in keys[1:3])
    log_f = jax.nn.log_sigmoid(job["gate_mu"] + jax.random.normal(keys[3], (b, l, h)))
    return q, k, v, log_f, jax.random.normal(keys[4], (b, l, h, d), dtype)


def attention(job, variant):
    """``f(q, k, v, log_f)`` of ``variant``: the kernel (with or without skipping) or cuDNN,
    which has no gates and is the speed of causal softmax attention alone."""
    if variant == "cudnn":
        return lambda q, k, v, log_f: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    options = dict(job.get("kernel_options", {}))
    if jax.default_backend() == "cpu":  # the smoke run: the Triton plan, interpreted
        options["interpret"] = True
    if variant == "pallas-skip":
        options["skip_threshold"] = job["skip_threshold"]
    return lambda *x: forgetting_attention(*x, implementation="pallas", **options)


def skip_block(job):
    """The kernel's skip granularity for ``job``: its largest tile (``plan.skip_block``)."""
    tiles = dataclasses.asdict(default_blocks(job["dtype"], job["head_dim"]))
    tiles.update({name: size for name, size in job.get("kernel_options", {}).items()
                  if name in tiles})
    return min(max(tiles.values()), job["length"])


def run_timing(job):
    q, k, v, log_f, cotangent = inputs(job, jnp.dtype(job["dtype"]))
    fn = attention(job, job["variant"])
    flops = attention_flops(job["length"], job["heads"], job["head_dim"], [1] * job["batch"])
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__)
    if job["variant"] == "pallas-skip":
        key_start, _ = skip_ranges(q, k, cumulative_log_forget(log_f), job["skip_threshold"],
                                   skip_block(job))
        result["skipped_fraction"] = skipped_fraction(key_start)

    @jax.jit
    def forward_backward(*x):
        _, vjp = jax.vjp(fn, *x)
        return vjp(cotangent)

    # Forward + backward counts the backward pass as 2.5 forwards (FlashAttention's
    # convention, as benchmarks/bench_attention.py does).
    for mode, f, work in (("fwd", jax.jit(fn), flops), ("fwd+bwd", forward_backward,
                                                        3.5 * flops)):
        if mode not in job["modes"]:
            continue
        try:
            seconds = timed(f, (q, k, v, log_f), job["min_time"])
        except Exception as e:  # noqa: BLE001 - one failing shape must not hide the others
            result[mode] = dict(error=str(e).splitlines()[0][:160])
            continue
        result[mode] = dict(ms=seconds * 1e3, tflops=work / seconds / 1e12,
                            peak_gib=(peak_bytes() or 0) / 2**30)
    return result


def relative_errors(got, want):
    names = ("out", "dq", "dk", "dv", "dlog_f")
    return {name: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                        / np.linalg.norm(np.asarray(b, np.float64)))
            for name, a, b in zip(names, got, want)}


def outputs_and_gradients(fn, q, k, v, log_f, cotangent):
    out, vjp = jax.vjp(jax.jit(fn), q, k, v, log_f)
    return (out, *vjp(cotangent))


def run_check(job):
    """The variant's output and gradients against the reference's on ``job``'s (small) shape,
    float32 and bf16; cuDNN's with the gates at 1 (``log f = 0``), where forgetting attention
    is causal softmax attention."""
    report = {}
    dtypes = ("bfloat16",) if job["variant"] == "cudnn" else ("float32", "bfloat16")
    for dtype in dtypes:
        q, k, v, log_f, cotangent = inputs(job, jnp.dtype(dtype), seed=1)
        if job["variant"] == "cudnn":
            log_f = jnp.zeros_like(log_f)
        try:
            want = outputs_and_gradients(reference_forgetting_attention, q, k, v, log_f,
                                         cotangent)
            got = outputs_and_gradients(attention(job, job["variant"]), q, k, v, log_f,
                                        cotangent)
        except Exception as e:  # noqa: BLE001 - report it, then check the other dtype
            report[dtype] = dict(passed=False, failure=str(e).splitlines()[0][:200])
            continue
        errors = relative_errors(got, want)
        if job["variant"] == "cudnn":
            del errors["dlog_f"]  # cuDNN takes no gates
        report[dtype] = dict(errors=errors, tolerance=CHECK_TOLERANCE[dtype],
                             passed=all(e < CHECK_TOLERANCE[dtype] for e in errors.values()))
    return report


def main(argv):
    job = json.loads(argv[0])
    if job["variant"] == "cudnn" and jax.default_backend() != "gpu":
        result = dict(skipped="cuDNN attention needs a GPU")
    else:
        result = run_check(job) if job.get("check") else run_timing(job)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
