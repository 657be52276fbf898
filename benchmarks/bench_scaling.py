"""Weak scaling of FoT training over the GPUs of one host: the same rows per GPU on 1, 2, 4, 8
GPUs, tokens/s per GPU and its efficiency against one GPU.

    python -m benchmarks.bench_scaling                                 # 1b FoT, C=4, 1-8 GPUs
    python -m benchmarks.bench_scaling --processes per_gpu            # jax.distributed, NCCL
    python -m benchmarks.bench_scaling --gpus 1,2 --memory-gib 76 --json out.json

Each GPU count runs one :mod:`benchmarks.bench_train` throughput case (its own subprocesses,
the real trainer) on the first ``n`` GPUs (``CUDA_VISIBLE_DEVICES``), with ``rows_per_gpu * n``
rows on mesh ``1,-1,1`` (rows over all devices), either as one process driving all of them
(``--processes one``) or one process per GPU joined by ``jax.distributed`` (``per_gpu``: the
multi-host path).  GPU counts above what the host has are skipped.  On CPU (``JAX_PLATFORMS=cpu``,
for tests) ``n`` is the number of host devices of the run.  Prints a Markdown table last.

Imports no JAX: the cases' subprocesses start it.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

from benchmarks.device_memory import gpu_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts, ascending")
    p.add_argument("--rows-per-gpu", type=int, default=16)
    p.add_argument("--case", default="fast:C=4,remat=none",
                   help="bench_train case without the batch (PATH:key=value,...)")
    p.add_argument("--processes", default="one", choices=("one", "per_gpu"))
    p.add_argument("--model", default="1b")
    p.add_argument("--mem-layers", default="6,12,18")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--memory-gib", type=float, default=0.0, help="bench_train's cap per GPU")
    p.add_argument("--timeout", type=float, default=900, help="seconds per GPU count")
    p.add_argument("--extra", default="", help="more bench_train arguments, space-separated")
    p.add_argument("--json", help="also write the rows here")
    return p.parse_args(argv)


def on_cpu(environ=os.environ):
    return "cpu" in environ.get("JAX_PLATFORMS", "")


def environment(count, processes, environ=os.environ):
    """The environment of a run on ``count`` devices (of which each of ``processes``
    processes drives ``count / processes`` on CPU)."""
    env = dict(environ)
    if on_cpu(environ):
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [
            f"--xla_force_host_platform_device_count={count // processes}"])
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(count))
    return env


def run_count(count, args):
    """bench_train's result row for ``count`` GPUs."""
    processes = count if args.processes == "per_gpu" else 1
    case = f"{args.case},batch={args.rows_per_gpu * count}"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "benchmarks.bench_train", "--parts", "throughput",
                   "--cases", case, "--mesh", "1,-1,1", "--model", args.model,
                   "--mem-layers", args.mem_layers, "--length", str(args.length),
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--processes", str(processes), "--timeout", str(args.timeout),
                   "--json", out] + (["--memory-gib", str(args.memory_gib)]
                                     if args.memory_gib else []) + args.extra.split()
        proc = subprocess.run(command, cwd=REPO, env=environment(count, processes),
                              capture_output=True, text=True)
        if not os.path.exists(out):
            return dict(gpus=count, error=(proc.stderr.strip().splitlines() or
                                           [f"exit status {proc.returncode}"])[-1][:160])
        with open(out) as f:
            row = json.load(f)[0]
    return dict(row, gpus=count, process_mode=args.processes)


def fmt(value, spec):
    """``value`` formatted by ``spec`` (a trailing ``%`` is printed, not applied)."""
    if value is None:
        return "-"
    return format(value, spec[:-1]) + "%" if spec.endswith("%") else format(value, spec)


def table(rows, args):
    base = next((r["tokens_per_s_per_device"] for r in rows
                 if r["gpus"] == 1 and "error" not in r), None)
    meta = next((r for r in rows if "device" in r), {})
    lines = [f"# bench_scaling: {meta.get('device', '?')}, jax {meta.get('jax', '?')}, "
             f"{datetime.date.today()}, model {args.model} (memory layers {args.mem_layers}), "
             f"case {args.case}, {args.rows_per_gpu} rows of {args.length} per GPU, mesh "
             f"1,-1,1, processes: {args.processes}",
             "",
             "| GPUs | processes | batch | step ms | tokens/s | tokens/s per GPU | MFU | "
             "peak GiB per GPU | efficiency |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gpus']} | - | - | {r['error']} | | | | | |")
            continue
        per = r["tokens_per_s_per_device"]
        lines.append(
            f"| {r['gpus']} | {r.get('processes', 1)} | {r['batch']} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {per:.0f} | {fmt(r.get('mfu') and 100 * r['mfu'], '.1f%')}"
            f" | {fmt(r.get('peak_gib'), '.1f')} | "
            f"{fmt(base and 100 * per / base, '.1f%')} |")
    lines.append("(efficiency: tokens/s per GPU against one GPU's; peak: the largest of any "
                 "GPU's)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    available = None if on_cpu() else gpu_count()
    counts = [int(n) for n in args.gpus.split(",")]
    if available is not None:
        skipped = [n for n in counts if n > available]
        if skipped:
            print(f"bench_scaling: this host has {available} GPUs; skipping {skipped}")
        counts = [n for n in counts if n <= available]
    rows = []
    for count in counts:
        rows.append(run_count(count, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("losses",)}),
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    print(table(rows, args))
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
