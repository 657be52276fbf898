"""Cross-batch attention benchmark: reference, blockwise, the fused Pallas kernel and cuDNN.

    python -m benchmarks.bench_attention                       # the full table (GPU)
    python -m benchmarks.bench_attention --variants pallas --C 4 --kv-heads 8 --no-check
    python -m benchmarks.bench_attention --variants pallas --C 4 --block-q 128 --num-warps 8,8,4

First checks the kernel against the reference in float32 and bf16 on a smaller shape (output
and the four gradients) and prints PASS/FAIL.  Then every (variant, C, kv heads) runs in a
fresh subprocess, so that each reports its own peak device memory, and is timed forward and
forward+backward (median over calls after a warm-up, ``block_until_ready``).  TFLOP/s count
useful work as docs/GPU.md says (:func:`EasyLM.flops.attention_flops`): ``4 L^2 D`` per row
and head for each allowed memory slot, half that for the causal local slot, 3.5x the forward
for forward+backward.

The cuDNN variant is ``jax.nn.dot_product_attention(implementation="cudnn")`` over K/V
gathered to ``[B, (C + 1) L, KV, D]`` and a boolean ``[B, 1, L, (C + 1) L]`` mask (causal on
the local part, the slot table on the rest; plain ``is_causal`` when C = 0).  The gather
happens outside the timed call, and its gradient stops at the gathered copies, so the
figure is cuDNN's attention alone.

Each subprocess's JAX takes the device memory a training run gets from the runner (its default
``gpu_memory_fraction``, unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` or
``XLA_CLIENT_MEM_FRACTION`` is already in the environment); the header says which.
"""
import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time

from benchmarks.device_memory import subprocess_environment

VARIANTS = ("reference", "blockwise", "pallas", "cudnn")
KERNEL_FLAGS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "num_warps", "num_stages")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--C", default="0,1,4,8", help="cross_batch_range values")
    p.add_argument("--kv-heads", default="32,8", help="key/value head counts (GQA when < H)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--stepping", action="store_true", help="cross_batch_stepping")
    p.add_argument("--packing", type=int, default=1, help="dataset_packing k")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per mode")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--json", help="also write the results here")
    add_kernel_flags(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def add_kernel_flags(parser):
    """The Pallas kernels' tile and Triton settings as flags (this benchmark's and
    bench_forgetting's: both kernels take the same ones)."""
    for flag in KERNEL_FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"),
                            help="pallas kernel option (warps/stages: N or fwd,dq,dkv)")


def kernel_options(args):
    options = {}
    for flag in KERNEL_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            numbers = tuple(int(x) for x in value.split(","))
            options[flag] = numbers if len(numbers) > 1 else numbers[0]
    return options


# ----------------------------------------------------------------------------- worker side

def make_inputs(job, dtype):
    import jax
    keys = jax.random.split(jax.random.PRNGKey(job.get("seed", 0)), 5)
    b, l, h, kv, d = job["batch"], job["length"], job["heads"], job["kv_heads"], job["head_dim"]
    q = jax.random.normal(keys[0], (b, l, h, d), dtype)
    k_loc, k_mem, v = (jax.random.normal(k, (b, l, kv, d), dtype) for k in keys[1:4])
    return q, k_loc, k_mem, v, jax.random.normal(keys[4], (b, l, h, d), dtype)


def attention_fn(job, variant):
    """``(f, prepare)``: the variant's attention and the untimed step that turns
    ``(q, k_loc, k_mem, v)`` into ``f``'s arguments."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from FoT.cross_batch import cross_batch_core
    from FoT.slots import slot_mask, slot_sources

    args = dict(cross_batch_range=job["C"], cross_batch_stepping=job["stepping"],
                dataset_packing=job["packing"])
    if variant != "cudnn":
        options = job["kernel_options"] if variant == "pallas" else {}
        return (lambda *x: cross_batch_core(*x, implementation=variant, **args, **options),
                lambda *x: x)

    b, l, c = job["batch"], job["length"], job["C"]
    sources = slot_sources(b, c)
    causal = np.tril(np.ones((l, l), bool))
    mask = np.concatenate([np.broadcast_to(causal, (b, l, l))]
                          + [np.broadcast_to(slot_mask(b, c, job["packing"], job["stepping"])
                                             [:, s, None, None], (b, l, l))
                             for s in range(1, c + 1)], axis=2)
    mask = jnp.asarray(mask[:, None])

    def gather(q, k_loc, k_mem, v):
        keys = jnp.concatenate([k_loc] + [k_mem[sources[:, s]] for s in range(1, c + 1)], 1)
        values = jnp.concatenate([v[sources[:, s]] for s in range(c + 1)], 1)
        return q, keys, values

    def cudnn(q, keys, values):
        if c == 0:
            return jax.nn.dot_product_attention(q, keys, values, is_causal=True,
                                                implementation="cudnn")
        return jax.nn.dot_product_attention(q, keys, values, mask=mask, implementation="cudnn")
    return cudnn, gather


def timed(fn, inputs, min_time):
    import jax
    jax.block_until_ready(fn(*inputs))  # compile
    jax.block_until_ready(fn(*inputs))
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes():
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_timing(job):
    import jax
    import jax.numpy as jnp
    from EasyLM.flops import attention_flops
    from FoT.slots import allowed_slots

    dtype = jnp.dtype(job["dtype"])
    q, k_loc, k_mem, v, cotangent = make_inputs(job, dtype)
    fn, prepare = attention_fn(job, job["variant"])
    inputs = jax.block_until_ready(jax.jit(prepare)(q, k_loc, k_mem, v))
    input_bytes = sum(x.nbytes for x in inputs)
    n_slots = allowed_slots(job["batch"], job["C"], job["packing"], job["stepping"])
    flops = attention_flops(job["length"], job["heads"], job["head_dim"], n_slots)
    result = dict(input_gib=input_bytes / 2**30, device=jax.devices()[0].device_kind)
    forward = jax.jit(fn)

    @jax.jit
    def forward_backward(*x):
        _, vjp = jax.vjp(fn, *x)
        return vjp(cotangent)

    for mode, f, work in (("fwd", forward, flops), ("fwd+bwd", forward_backward, 3.5 * flops)):
        if mode not in job["modes"]:
            continue
        try:
            seconds = timed(f, inputs, job["min_time"])
        except Exception as e:  # noqa: BLE001 - an OOM must not hide the other rows
            text = str(e)
            if "Shared memory size limit" in text:
                error = "tiles exceed shared memory"
            elif "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
                error = "OOM"
            else:
                error = text.splitlines()[0][:120]
            result[mode] = dict(error=error)
            continue
        result[mode] = dict(ms=seconds * 1e3, tflops=work / seconds / 1e12,
                            peak_gib=(peak_bytes() or 0) / 2**30)
    return result


def run_check(job):
    """Kernel vs reference, output and gradients, on a smaller shape."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from FoT.cross_batch import cross_batch_core

    report = {}
    for dtype, tolerance in (("float32", 1e-4), ("bfloat16", 2e-2)):
        q, k_loc, k_mem, v, cotangent = make_inputs(job, jnp.dtype(dtype))
        args = dict(cross_batch_range=job["C"], cross_batch_stepping=job["stepping"],
                    dataset_packing=job["packing"])
        outs = []
        try:
            for impl, options in (("reference", dict(precision=jax.lax.Precision.HIGHEST)),
                                  ("pallas", job["kernel_options"])):
                fn = jax.jit(lambda *x, impl=impl, options=options: cross_batch_core(
                    *x, implementation=impl, **args, **options))
                out, vjp = jax.vjp(fn, q, k_loc, k_mem, v)
                outs.append([np.asarray(t, np.float64) for t in (out, *vjp(cotangent))])
        except Exception as e:  # noqa: BLE001 - report it, then check the other dtype
            report[dtype] = dict(errors={}, tolerance=tolerance, passed=False,
                                 failure=str(e).splitlines()[0][:200])
            continue
        errors = {name: float(np.linalg.norm(a - b) / np.linalg.norm(b))
                  for name, a, b in zip(("out", "dq", "dk_loc", "dk_mem", "dv"), *outs[::-1])}
        report[dtype] = dict(errors=errors, tolerance=tolerance,
                             passed=all(e < tolerance for e in errors.values()))
    return report


# ----------------------------------------------------------------------------- driver side

def in_subprocess(job, env):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_attention", "--worker",
                           json.dumps(job)], capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return dict(crashed=tail[0][:160])


def describe(cell):
    if cell is None:
        return "-", "-", "-"
    if "error" in cell:
        return cell["error"], "", ""
    return f"{cell['ms']:.2f}", f"{cell['tflops']:.1f}", f"{cell['peak_gib']:.2f}"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        result = run_check(job) if job.get("check") else run_timing(job)
        print("RESULT " + json.dumps(result), flush=True)
        return
    common = dict(batch=args.batch, length=args.length, heads=args.heads,
                  head_dim=args.head_dim, stepping=args.stepping, packing=args.packing,
                  dtype=args.dtype, modes=args.modes.split(","), min_time=args.min_time,
                  kernel_options=kernel_options(args))
    env, memory = subprocess_environment()
    header = (f"{datetime.date.today()} kernel options {common['kernel_options'] or 'default'}"
              f", device memory {memory}")
    print(header, flush=True)
    check = None
    if not args.no_check:
        check = in_subprocess(dict(common, check=True, batch=4, length=512, heads=8,
                                   kv_heads=2, C=2, stepping=True, packing=2, seed=1), env)
        for dtype, r in check.items():
            if isinstance(r, dict):
                verdict = "PASS" if r["passed"] else "FAIL"
                errors = r.get("failure") or " ".join(f"{k}={v:.1e}"
                                                      for k, v in r["errors"].items())
                print(f"check {dtype}: {verdict} ({errors}; tolerance {r['tolerance']})",
                      flush=True)
            else:
                print(f"check: FAIL ({r})", flush=True)
    rows = []
    for kv in (int(x) for x in args.kv_heads.split(",")):
        for c in (int(x) for x in args.C.split(",")):
            for variant in args.variants.split(","):
                job = dict(common, variant=variant, kv_heads=kv, C=c)
                result = in_subprocess(job, env)
                rows.append(dict(job, result=result))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, check=check, rows=rows), f, indent=1)
    print_table(args, rows, header)


def print_table(args, rows, header):
    devices = {row["result"].get("device") for row in rows} - {None}
    print(f"\n{header}; device {', '.join(sorted(devices)) or '?'}; B={args.batch} "
          f"L={args.length} H={args.heads} D={args.head_dim} {args.dtype}, "
          f"stepping={args.stepping} k={args.packing}")
    print("| variant | KV | C | fwd ms | fwd TFLOP/s | fwd peak GiB | fwd+bwd ms "
          "| fwd+bwd TFLOP/s | fwd+bwd peak GiB | inputs GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        r = row["result"]
        if "crashed" in r:
            print(f"| {row['variant']} | {row['kv_heads']} | {row['C']} | crashed: "
                  f"{r['crashed']} |")
            continue
        cells = describe(r.get("fwd")) + describe(r.get("fwd+bwd"))
        print(f"| {row['variant']} | {row['kv_heads']} | {row['C']} | " + " | ".join(cells)
              + f" | {r['input_gib']:.2f} |")


if __name__ == "__main__":
    main()
