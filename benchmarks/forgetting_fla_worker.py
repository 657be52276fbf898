"""The PyTorch side of :mod:`benchmarks.bench_forgetting`: times ``fla``'s Triton forgetting
attention (``fla.ops.forgetting_attn.parallel_forgetting_attn``, fla-core 0.6.0) and checks it
against this toolkit's reference.

    PYTHONPATH=DIR python -m benchmarks.forgetting_fla_worker JOB_JSON   # one "RESULT {...}"

``DIR`` holds the unpacked wheel (``pip install --no-index --no-deps --target DIR
fla_core-0.6.0-py3-none-any.whl``).  Without an importable ``fla`` or a CUDA device the result
says why and the driver reports the variant as skipped.

fla's layout is the model's: ``q [B, T, HQ, D]``, ``k, v [B, T, H, D]`` (GQA when ``HQ`` is a
multiple of ``H``), ``g [B, T, HQ]`` the log forget gates (natural log, before the running sum;
it sums them itself), ``scale`` ``1 / sqrt(D)`` by default; so one set of inputs serves both.
The reference runs in JAX on the CPU, leaving the GPU to PyTorch.
"""
import json
import os
import statistics
import sys
import time

# Before JAX loads: on a GPU it would preallocate the memory PyTorch is measured with.
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from EasyLM.flops import attention_flops  # noqa: E402
from EasyLM.forgetting import reference_forgetting_attention  # noqa: E402

CHECK_TOLERANCE = 2e-2  # bf16, relative (Frobenius norm), as for the Pallas kernel


def numpy_inputs(job, seed):
    """float32 ``q, k, v, log_f, cotangent`` for ``job``'s shape, gates
    ``log_sigmoid(N(mu, 1))``."""
    rng = np.random.default_rng(seed)
    b, l, h, d = job["batch"], job["length"], job["heads"], job["head_dim"]
    kv = h // job["group"]
    q, k, v, cotangent = (rng.standard_normal(shape, np.float32) for shape in (
        (b, l, h, d), (b, l, kv, d), (b, l, kv, d), (b, l, h, d)))
    log_f = -np.logaddexp(0.0, -(job["gate_mu"] + rng.standard_normal((b, l, h))))
    return q, k, v, log_f.astype(np.float32), cotangent


def torch_inputs(torch, arrays, dtype):
    """CUDA tensors: q, k, v, cotangent in ``dtype``, the gates in float32; all but the
    cotangent require grad."""
    q, k, v, log_f, cotangent = (torch.from_numpy(x).cuda() for x in arrays)
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [log_f.requires_grad_()]
    return leaves, cotangent.to(dtype)


def timed(torch, fn, min_time):
    """Median seconds of ``fn()`` after two warm-up calls (the first compiles)."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_timing(job, torch, attention):
    leaves, cotangent = torch_inputs(torch, numpy_inputs(job, 0), torch.bfloat16)
    flops = attention_flops(job["length"], job["heads"], job["head_dim"], [1] * job["batch"])
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)

    def forward():
        with torch.no_grad():
            return attention(*leaves)

    def forward_backward():
        return torch.autograd.grad(attention(*leaves), leaves, cotangent)

    for mode, fn, work in (("fwd", forward, flops), ("fwd+bwd", forward_backward, 3.5 * flops)):
        if mode not in job["modes"]:
            continue
        torch.cuda.reset_peak_memory_stats()
        try:
            seconds = timed(torch, fn, job["min_time"])
        except Exception as e:  # noqa: BLE001 - one failing shape must not hide the others
            result[mode] = dict(error=str(e).splitlines()[0][:160])
            continue
        result[mode] = dict(ms=seconds * 1e3, tflops=work / seconds / 1e12,
                            peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    return result


def run_check(job, torch, attention):
    """fla's output and gradients (bf16) against the reference's on the same bf16 inputs."""
    arrays = numpy_inputs(job, 1)
    leaves, cotangent = torch_inputs(torch, arrays, torch.bfloat16)
    out = attention(*leaves)
    got = [out, *torch.autograd.grad(out, leaves, cotangent)]
    got = [x.detach().float().cpu().numpy() for x in got]

    q, k, v, log_f, ct = arrays
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out, vjp = jax.vjp(reference_forgetting_attention, *bf16, jnp.asarray(log_f))
    want = [np.asarray(x, np.float32) for x in (out, *vjp(jnp.asarray(ct, jnp.bfloat16)))]
    errors = {name: float(np.linalg.norm(a - b) / np.linalg.norm(b))
              for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), got, want)}
    return {"bfloat16": dict(errors=errors, tolerance=CHECK_TOLERANCE,
                             passed=all(e < CHECK_TOLERANCE for e in errors.values()))}


def main(argv):
    job = json.loads(argv[0])
    try:
        import torch
        from fla.ops.forgetting_attn import parallel_forgetting_attn
    except Exception as e:  # noqa: BLE001 - ImportError, or fla failing on a missing triton
        result = dict(skipped=f"fla not importable ({type(e).__name__}: {e}); unpack "
                              f"fla_core-0.6.0 with pip install --no-index --no-deps --target "
                              f"DIR and pass --fla-path DIR")
    else:
        if not torch.cuda.is_available():
            result = dict(skipped="fla's Triton kernels need a CUDA GPU")
        elif job.get("check"):
            result = run_check(job, torch, parallel_forgetting_attn)
        else:
            result = run_timing(job, torch, parallel_forgetting_attn)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
