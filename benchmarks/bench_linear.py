"""Gated linear attention benchmark: the fused Pallas kernel against the chunked XLA form and
fla's Triton kernels, forward and forward + backward.

    python -m benchmarks.bench_linear                          # the full table (GPU)
    python -m benchmarks.bench_linear --fla-path /tmp/fla      # with fla (unpacked wheel)
    python -m benchmarks.bench_linear --smoke --out /tmp/smoke # tiny shapes, CPU (tests)

Variants (bf16 q, k, v; float32 gates):

* ``pallas``: ``linear_attention(implementation="pallas")`` with a gate per key dimension
  (GLA), :mod:`EasyLM.linear.kernels`.
* ``pallas-head``: the same kernel with one gate per head (SUPRA, simple GLA).
* ``chunked``: the chunked XLA form with a gate per key dimension.
* ``fla-gla``: ``chunk_gla`` of fla-core 0.6.0 (PyTorch and Triton), a gate per key dimension.
* ``fla-simple``: fla-core's ``chunk_simple_gla``, one gate per head.

fla is imported from ``--fla-path`` (a directory where its wheel was unpacked with ``pip
install --no-index --no-deps --target DIR fla_core-0.6.0-py3-none-any.whl``); its variants are
skipped, saying why, when it does not import.

Shapes: each of ``--lengths`` and ``--head-dims`` with a fixed token budget (``B = tokens / L``)
and width (``H = width / D``), as many key/value heads as query heads (fla's GLA takes no
GQA), key and value heads of the same size, gates ``log_sigmoid(N(--gate-mu, 1)) / 16`` (GLA's
normaliser).  First each variant is checked against the float32 recurrence
(:func:`EasyLM.linear.scan.scan_linear_attention`, run by JAX; on the CPU for fla) at one small
shape, outputs and all gradients, and PASS/FAIL printed.  Each variant then runs every shape in
one subprocess of its own: JAX under the runner's memory fraction with preallocation off, fla's
PyTorch with JAX kept on the CPU.  Times are medians after a warm-up; forward and backward
take a random cotangent of the output.

Writes ``bench_linear_<device>_<date>.json`` and ``.png`` under ``--out`` and prints a Markdown
table last: milliseconds, and each Pallas variant's speed relative to fla's kernel of the same
gates (``x fla``: fla's time over ours).
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

from benchmarks.bench_attention import peak_bytes
# The shapes of a run: bench_forgetting's (a token budget and a width per head size and length).
from benchmarks.bench_forgetting import shapes
from benchmarks.device_memory import subprocess_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("pallas", "pallas-head", "chunked", "fla-gla", "fla-simple")
PEER = {"pallas": "fla-gla", "pallas-head": "fla-simple", "chunked": "fla-gla"}
PER_HEAD = ("pallas-head", "fla-simple")
MODES = ("fwd", "fwd+bwd")
# The check runs at the widest head size timed (128 by default), where --kernel-options aim.
CHECK_SHAPE = dict(batch=2, length=512, heads=4)
SMOKE_CHECK_SHAPE = dict(batch=1, length=64, heads=2, head_dim=16)
SMOKE = dict(lengths="64", head_dims="16", tokens=64, width=32, min_time=0.0)
CHECK_TOLERANCE = 2e-2  # bf16 inputs, relative error in the Frobenius norm
GRAD_NAMES = ("out", "dq", "dk", "dv", "dlog_alpha")


# --- inputs, shared by both workers (numpy, so that fla's side needs no JAX on the GPU) ---
# Everything that imports JAX is imported inside the workers: the driver imports none, and the
# fla worker keeps JAX on the CPU.

def numpy_inputs(shape, per_head, gate_mu, seed):
    """float32 ``q, k, v, log_alpha, cotangent``."""
    import numpy as np
    rng = np.random.default_rng(seed)
    b, l, h, d = shape["batch"], shape["length"], shape["heads"], shape["head_dim"]
    q, k, v, cotangent = (rng.standard_normal((b, l, h, d), np.float32) for _ in range(4))
    gates = rng.standard_normal((b, l, h) if per_head else (b, l, h, d), np.float32)
    log_alpha = -np.logaddexp(0.0, -(gate_mu + gates)) / 16.0
    return q, k, v, log_alpha.astype(np.float32), cotangent


def relative_errors(got, want):
    import numpy as np
    return {name: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                        / np.linalg.norm(np.asarray(b, np.float64)))
            for name, a, b in zip(GRAD_NAMES, got, want)}


def reference(arrays, per_head):
    """The float32 recurrence's output and gradients on bf16-rounded q, k, v."""
    import jax
    import jax.numpy as jnp

    from EasyLM.linear.scan import scan_linear_attention
    q, k, v, log_alpha, cotangent = arrays
    rounded = [jnp.asarray(x, jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)]
    gates = jnp.asarray(log_alpha)[..., None] if per_head else jnp.asarray(log_alpha)

    def f(q, k, v, a):
        return scan_linear_attention(q, k, v, a, scale=q.shape[3] ** -0.5)[0]
    out, vjp = jax.vjp(jax.jit(f), *rounded, gates)
    grads = list(vjp(jnp.asarray(cotangent)))
    if per_head:
        grads[3] = grads[3][..., 0]
    return [out] + grads


def timed(call, sync, min_time):
    """``(median seconds of call(), seconds of the first call)`` after two warm-up calls (the
    first compiles: its time is mostly compilation)."""
    t0 = time.perf_counter()
    sync(call())
    first = time.perf_counter() - t0
    sync(call())
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def check_record(compute, arrays, per_head):
    """The check of one variant: its relative errors against :func:`reference`, or the error
    that stopped it (fla's backward refuses some GPU and Triton pairs: the variant is then
    still timed where it runs)."""
    try:
        got = compute(arrays)
    except Exception as e:  # noqa: BLE001 - reported, and the shapes still run
        return dict(error=str(e).strip().splitlines()[-1][:300], passed=False)
    errors = relative_errors(got, reference(arrays, per_head))
    return dict(errors=errors, passed=all(e < CHECK_TOLERANCE for e in errors.values()))


def emit(tag, value):
    """One line the driver reads as the worker goes (a timed-out worker keeps what it did)."""
    print(f"{tag} " + json.dumps(value), flush=True)


# --- the JAX worker ---

def jax_attention(variant, kernel_options=None):
    import jax

    from EasyLM.linear import linear_attention
    implementation = "chunked" if variant == "chunked" else "pallas"
    options = {}
    if implementation == "pallas":
        options = dict(kernel_options or {})
        if jax.default_backend() != "gpu":
            options["interpret"] = True

    def f(q, k, v, log_alpha):
        gates = log_alpha[..., None] if variant in PER_HEAD else log_alpha
        return linear_attention(q, k, v, gates, implementation=implementation, **options)
    return f


def jax_worker(job):
    import jax
    import jax.numpy as jnp

    variant, per_head = job["variant"], job["variant"] in PER_HEAD
    f = jax_attention(variant, job.get("kernel_options"))
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, shapes=[])
    if job["check"]:
        def compute(arrays):
            leaves = [jnp.asarray(x, jnp.bfloat16) for x in arrays[:3]]
            out, vjp = jax.vjp(jax.jit(f), *leaves, jnp.asarray(arrays[3]))
            return [out] + list(vjp(jnp.asarray(arrays[4], jnp.bfloat16)))
        arrays = numpy_inputs(job["check_shape"], per_head, job["gate_mu"], seed=1)
        result["check"] = check_record(compute, arrays, per_head)
        emit("CHECK", result["check"])
    emit("DEVICE", {k: result[k] for k in ("device", "jax")})
    for shape in job["shapes"]:
        arrays = numpy_inputs(shape, per_head, job["gate_mu"], seed=0)
        leaves = [jnp.asarray(x, jnp.bfloat16) for x in arrays[:3]] + [jnp.asarray(arrays[3])]
        cotangent = jnp.asarray(arrays[4], jnp.bfloat16)

        @jax.jit
        def forward_backward(*x):
            _, vjp = jax.vjp(f, *x)
            return vjp(cotangent)

        row = dict(shape)
        for mode, fn in (("fwd", jax.jit(f)), ("fwd+bwd", forward_backward)):
            try:
                seconds, first = timed(lambda: fn(*leaves), jax.block_until_ready,
                                       job["min_time"])
            except Exception as e:  # noqa: BLE001 - one failing shape must not hide the others
                row[mode] = dict(error=str(e).splitlines()[0][:200])
                continue
            row[mode] = dict(ms=seconds * 1e3, first_s=round(first, 2),
                             peak_gib=(peak_bytes() or 0) / 2**30)
        result["shapes"].append(row)
        emit("ROW", row)
    return result


# --- the fla worker ---

def fla_worker(job):
    os.environ["JAX_PLATFORMS"] = "cpu"  # the reference runs on the CPU, the GPU is PyTorch's
    try:
        import torch
        if job["variant"] == "fla-gla":
            from fla.ops.gla import chunk_gla as kernel
        else:
            from fla.ops.simple_gla import chunk_simple_gla as kernel
    except Exception as e:  # noqa: BLE001 - ImportError, or fla failing on a missing triton
        return dict(skipped=f"fla not importable ({type(e).__name__}: {e}); unpack "
                            f"fla_core-0.6.0 with pip install --no-index --no-deps --target DIR "
                            f"and pass --fla-path DIR")
    if not torch.cuda.is_available():
        return dict(skipped="fla's Triton kernels need a CUDA GPU")

    def leaves_of(arrays):
        q, k, v, log_alpha, cotangent = (torch.from_numpy(x).cuda() for x in arrays)
        leaves = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
        return leaves + [log_alpha.requires_grad_()], cotangent.to(torch.bfloat16)

    def attention(q, k, v, g):
        return kernel(q, k, v, g)[0]

    per_head = job["variant"] in PER_HEAD
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shapes=[])
    if job["check"]:
        def compute(arrays):
            leaves, cotangent = leaves_of(arrays)
            out = attention(*leaves)
            got = [out, *torch.autograd.grad(out, leaves, cotangent)]
            return [x.detach().float().cpu().numpy() for x in got]
        arrays = numpy_inputs(job["check_shape"], per_head, job["gate_mu"], seed=1)
        result["check"] = check_record(compute, arrays, per_head)
        emit("CHECK", result["check"])
    emit("DEVICE", {k: result[k] for k in ("device", "torch")})
    for shape in job["shapes"]:
        leaves, cotangent = leaves_of(numpy_inputs(shape, per_head, job["gate_mu"], seed=0))

        def forward():
            with torch.no_grad():
                return attention(*leaves)

        def forward_backward():
            return torch.autograd.grad(attention(*leaves), leaves, cotangent)

        row = dict(shape)
        for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            torch.cuda.reset_peak_memory_stats()
            try:
                seconds, first = timed(fn, lambda _: torch.cuda.synchronize(), job["min_time"])
            except Exception as e:  # noqa: BLE001
                row[mode] = dict(error=str(e).splitlines()[0][:200])
                continue
            row[mode] = dict(ms=seconds * 1e3, first_s=round(first, 2),
                             peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        result["shapes"].append(row)
        emit("ROW", row)
    return result


# --- the driver ---

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--lengths", default="2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--tokens", type=int, default=32768, help="B * L of every shape")
    p.add_argument("--width", type=int, default=2048, help="H * D of every shape")
    p.add_argument("--gate-mu", type=float, default=0.0, help="mean of the gates' logits")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per mode")
    p.add_argument("--fla-path", help="directory of the unpacked fla-core wheel")
    p.add_argument("--kernel-options", type=json.loads, default={},
                   help='JSON of the Pallas variants\' kernel settings, e.g. {"num_warps": 8}')
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--smoke", action="store_true", help="one tiny shape, for CPU tests")
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def check_shape(args, shape_list):
    """The shape each variant is checked at: the widest head size of the run's shapes."""
    if args.smoke:
        return SMOKE_CHECK_SHAPE
    return dict(CHECK_SHAPE, head_dim=max(shape["head_dim"] for shape in shape_list))


def run_worker(args, variant, shape_list):
    job = dict(variant=variant, shapes=shape_list, gate_mu=args.gate_mu,
               min_time=args.min_time, check=not args.no_check,
               kernel_options=args.kernel_options,
               check_shape=check_shape(args, shape_list))
    env, memory = subprocess_environment()
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + ([args.fla_path] if args.fla_path and variant.startswith("fla") else [])
        + [env.get("PYTHONPATH", "")])
    kind = "fla" if variant.startswith("fla") else "jax"
    started = time.time()
    # The worker's lines are read as they come: progress is printed per shape, and a worker
    # that runs past --timeout (killed by the timer) keeps the shapes it finished.
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_linear", "--worker", kind,
                             json.dumps(job)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(args.timeout, proc.kill)
    timer.start()
    partial, tail = dict(shapes=[]), []
    try:
        for line in proc.stdout:
            tag, _, payload = line.rstrip("\n").partition(" ")
            if tag == "RESULT":
                partial = json.loads(payload)
            elif tag == "ROW":
                row = json.loads(payload)
                partial["shapes"].append(row)
                cells = ", ".join(f"{m} {row[m]['ms']:.3f} ms (first call {row[m]['first_s']} s)"
                                  if "ms" in row.get(m, {}) else f"{m} {row.get(m)}"
                                  for m in MODES)
                print(f"[bench_linear] {variant} L={row['length']} D={row['head_dim']}: "
                      f"{cells}  [{time.time() - started:.0f} s]", flush=True)
            elif tag == "CHECK":
                partial["check"] = json.loads(payload)
            elif tag == "DEVICE":
                partial.update(json.loads(payload))
            else:
                tail = (tail + [line.strip()])[-3:]
        proc.wait()
    finally:
        timed_out = not timer.is_alive() and proc.returncode not in (0, None)
        timer.cancel()
    if timed_out:
        partial["error"] = (f"timed out after {args.timeout:g} s with {len(partial['shapes'])} "
                            f"of {len(shape_list)} shapes done")
    elif proc.returncode != 0:
        partial["error"] = f"worker exited {proc.returncode}: " + " | ".join(tail)[:400]
    partial.update(memory=memory, seconds=round(time.time() - started, 1))
    return partial


def table(results):
    lines = ["| variant | D | L | B x H | fwd ms | fwd+bwd ms | fwd x fla | fwd+bwd x fla |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ms(variant, shape, mode):
        for row in results.get(variant, {}).get("shapes", []):
            if all(row[k] == shape[k] for k in ("length", "head_dim", "batch", "heads")):
                return row.get(mode, {}).get("ms")
        return None

    for variant, result in results.items():
        for row in result.get("shapes", []):
            cells = [variant, row["head_dim"], row["length"], f"{row['batch']} x {row['heads']}"]
            for mode in MODES:
                value = row.get(mode, {})
                cells.append(f"{value['ms']:.3f}" if "ms" in value else value.get("error", "-"))
            for mode in MODES:
                mine, peer = ms(variant, row, mode), ms(PEER.get(variant, ""), row, mode)
                cells.append(f"{peer / mine:.2f}" if mine and peer else "")
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = sorted({row["head_dim"] for r in results.values() for row in r.get("shapes", [])})
    if not dims:
        return
    fig, axes = plt.subplots(len(MODES), len(dims), figsize=(5 * len(dims), 7), squeeze=False)
    for i, mode in enumerate(MODES):
        for j, d in enumerate(dims):
            ax = axes[i][j]
            for variant, result in results.items():
                rows = [r for r in result.get("shapes", []) if r["head_dim"] == d
                        and "ms" in r.get(mode, {})]
                if rows:
                    ax.plot([r["length"] for r in rows],
                            [r["batch"] * r["length"] / r[mode]["ms"] / 1e3 for r in rows],
                            marker="o", label=variant)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, head size {d}")
            ax.set_xlabel("row length L (tokens B x L fixed)")
            ax.set_ylabel("million tokens / s (one layer's attention)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    shape_list = shapes(args)
    results = {}
    for variant in variants:
        print(f"[bench_linear] {variant}: {len(shape_list)} shapes ...", flush=True)
        results[variant] = run_worker(args, variant, shape_list)
        check = results[variant].get("check")
        if check and "error" in check:
            print(f"[bench_linear] {variant} check FAIL (it stopped: {check['error']})",
                  flush=True)
        elif check:
            worst = max(check["errors"].values())
            print(f"[bench_linear] {variant} check {'PASS' if check['passed'] else 'FAIL'} "
                  f"(largest relative error {worst:.2e}, tolerance {CHECK_TOLERANCE})",
                  flush=True)
        for key in ("skipped", "error"):
            if key in results[variant]:
                print(f"[bench_linear] {variant} {key}: {results[variant][key]}", flush=True)
    device = next((r["device"] for r in results.values() if "device" in r), "cpu")
    stamp = datetime.date.today().isoformat()
    name = f"bench_linear_{re.sub(r'[^a-z0-9]+', '_', device.lower()).strip('_')}_{stamp}"
    os.makedirs(args.out, exist_ok=True)
    report = dict(date=stamp, device=device, args=vars(args), results=results)
    tmp = os.path.join(args.out, name + ".json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(args.out, name + ".json"))
    plot(results, os.path.join(args.out, name + ".png"))
    print(table(results))
    return report


def worker_main(kind, job_json):
    job = json.loads(job_json)
    result = fla_worker(job) if kind == "fla" else jax_worker(job)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        if sys.argv[2] == "fla":
            os.environ["JAX_PLATFORMS"] = "cpu"
        worker_main(sys.argv[2], sys.argv[3])
    else:
        main()
