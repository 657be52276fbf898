"""Forgetting attention benchmark: the fused Pallas kernel against cuDNN and fla's Triton kernel.

    python -m benchmarks.bench_forgetting                          # the full table (GPU)
    python -m benchmarks.bench_forgetting --fla-path /tmp/fla      # with fla (unpacked wheel)
    python -m benchmarks.bench_forgetting --skip-threshold 1e-6    # adds the kernel with skipping
    python -m benchmarks.bench_forgetting --smoke --out /tmp/smoke # tiny shapes, CPU (tests)

Variants (bf16):

* ``pallas``: ``forgetting_attention(implementation="pallas")`` (:mod:`EasyLM.forgetting.kernels`).
* ``pallas-skip``: the same with ``skip_threshold`` (only with ``--skip-threshold``); the row
  gives the share of block pairs below the diagonal that it skips.
* ``cudnn``: ``jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")``, causal
  softmax attention without gates: the speed a gated kernel can hope to approach.
* ``fla``: ``parallel_forgetting_attn`` of fla-core 0.6.0 (PyTorch and Triton), imported from
  ``--fla-path`` (a directory where its wheel was unpacked with ``pip install --no-index
  --no-deps --target DIR fla_core-0.6.0-py3-none-any.whl``); skipped, saying why, when it does
  not import.

Shapes: each of ``--lengths`` and ``--head-dims`` with a fixed token budget (``B = tokens / L``)
and width (``H = width / D``), ``H / --group`` key/value heads, gates
``log_sigmoid(N(--gate-mu, 1))``.  First every variant is checked against the reference at one
small shape (output and the gradients of q, k, v and the gates; cuDNN with the gates at 1; fla
against the reference run by JAX on the CPU) and PASS/FAIL printed.  Then every (variant, L, D)
runs in a subprocess of its own: JAX with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` under the
runner's memory fraction, fla's PyTorch with JAX kept on the CPU.  Times are medians over calls
after a warm-up; TFLOP/s count causal work, ``4 B H L^2 D / 2`` forward
(:func:`EasyLM.flops.attention_flops`) and 3.5 times that forward plus backward.

Writes ``bench_forgetting_<device>_<date>.json`` and ``.png`` under ``--out`` and prints a
Markdown table last.  Imports no JAX: the workers (:mod:`benchmarks.forgetting_jax_worker`,
:mod:`benchmarks.forgetting_fla_worker`) do.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; benchmarks run on headless machines
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.bench_attention import add_kernel_flags, kernel_options  # noqa: E402
from benchmarks.device_memory import subprocess_environment  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("pallas", "cudnn", "fla")
WORKERS = {"pallas": "benchmarks.forgetting_jax_worker", "pallas-skip":
           "benchmarks.forgetting_jax_worker", "cudnn": "benchmarks.forgetting_jax_worker",
           "fla": "benchmarks.forgetting_fla_worker"}
MODES = ("fwd", "fwd+bwd")
# --smoke: one tiny shape that the Pallas interpreter runs in seconds on a CPU.
SMOKE = dict(lengths="64", head_dims="64", tokens=128, width=128, min_time=0.0)
CHECK_SHAPE = dict(batch=2, length=512, heads=4, head_dim=128)
SMOKE_CHECK_SHAPE = dict(batch=1, length=64, heads=2, head_dim=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--lengths", default="2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--tokens", type=int, default=32768, help="B * L of every shape")
    p.add_argument("--width", type=int, default=2048, help="H * D of every shape")
    p.add_argument("--group", type=int, default=1, help="query heads per key/value head")
    p.add_argument("--gate-mu", type=float, default=3.0,
                   help="gates log_sigmoid(N(mu, 1)); 3: f near 0.95")
    p.add_argument("--skip-threshold", type=float, help="also time the kernel skipping pairs "
                                                        "whose weights are all below this")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per mode")
    p.add_argument("--fla-path", help="directory of the unpacked fla-core wheel")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"),
                   help="directory of the JSON and PNG")
    p.add_argument("--smoke", action="store_true", help="one tiny shape, for CPU tests")
    add_kernel_flags(p)
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def shapes(args):
    """``[dict(length, head_dim, batch, heads)]`` of the run, in table order."""
    rows = []
    for head_dim in (int(x) for x in args.head_dims.split(",")):
        for length in (int(x) for x in args.lengths.split(",")):
            if args.tokens % length or args.width % head_dim:
                raise SystemExit(f"--tokens {args.tokens} and --width {args.width} must be "
                                 f"multiples of L={length} and D={head_dim}")
            rows.append(dict(length=length, head_dim=head_dim, batch=args.tokens // length,
                             heads=args.width // head_dim))
    return rows


def environments(args):
    """``({worker module: environment}, device memory in words)``."""
    jax_env, memory = subprocess_environment()
    jax_env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    path = [p for p in (args.fla_path, REPO, os.environ.get("PYTHONPATH")) if p]
    fla_env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), JAX_PLATFORMS="cpu")
    return {WORKERS["pallas"]: jax_env, WORKERS["fla"]: fla_env}, memory


def in_subprocess(job, envs, timeout):
    module = WORKERS[job["variant"]]
    try:
        proc = subprocess.run([sys.executable, "-m", module, json.dumps(job)], cwd=REPO,
                              capture_output=True, text=True, env=envs[module], timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(crashed=f"no result within {timeout:g} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return dict(crashed=tail[0][:160])


def print_check(variant, report):
    if "skipped" in report or "crashed" in report:
        print(f"check {variant}: {report.get('skipped') or 'FAIL (' + report['crashed'] + ')'}",
              flush=True)
        return
    for dtype, r in report.items():
        verdict = "PASS" if r["passed"] else "FAIL"
        errors = r.get("failure") or " ".join(f"{k}={v:.1e}" for k, v in r["errors"].items())
        print(f"check {variant} {dtype}: {verdict} ({errors}; tolerance "
              f"{r.get('tolerance', '-')})", flush=True)


def device_slug(rows):
    """``h200``, ``h100``, ``cpu``...: the device of the first timed row, for file names."""
    device = next((r["result"]["device"] for r in rows if "device" in r["result"]), "unknown")
    model = re.search(r"\b([A-Z]\d{2,4})\b", device)
    return (model.group(1) if model else re.sub(r"\W+", "_", device)).lower()


def cell(result, mode):
    r = result.get(mode)
    if not r:
        return "-", "-"
    if "error" in r:
        return r["error"], ""
    return f"{r['ms']:.2f}", f"{r['tflops']:.1f}"


def note(result):
    for key in ("skipped", "crashed"):
        if key in result:
            return f"{key}: {result[key]}"
    if "skipped_fraction" in result:
        return f"skips {100 * result['skipped_fraction']:.0f}% of the block pairs"
    return ""


def table(rows, header):
    lines = [header, "",
             "| variant | D | L | B | H | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
             "| note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["result"]
        cells = cell(r, "fwd") + cell(r, "fwd+bwd")
        lines.append(f"| {row['variant']} | {row['head_dim']} | {row['length']} | "
                     f"{row['batch']} | {row['heads']} | " + " | ".join(cells)
                     + f" | {note(r)} |")
    return "\n".join(lines)


def plot(path, rows, header):
    """TFLOP/s against L, one panel per mode and one line per (variant, head dim)."""
    fig, axes = plt.subplots(1, len(MODES), figsize=(12, 4.5), sharey=True)
    for ax, mode in zip(axes, MODES):
        lines = {}
        for row in rows:
            r = row["result"].get(mode)
            if r and "tflops" in r:
                lines.setdefault(f"{row['variant']} D={row['head_dim']}", []).append(
                    (row["length"], r["tflops"]))
        for label, points in sorted(lines.items()):
            ax.plot(*zip(*points), marker="o", label=label)
        lengths = sorted({row["length"] for row in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
        ax.set_xlabel("sequence length L")
        ax.set_title(mode)
        if lines:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("TFLOP/s (causal)")
    fig.suptitle(textwrap.fill(header, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    variants = args.variants.split(",") + (["pallas-skip"] if args.skip_threshold else [])
    unknown = set(variants) - set(WORKERS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    envs, memory = environments(args)
    common = dict(group=args.group, gate_mu=args.gate_mu, dtype="bfloat16",
                  modes=args.modes.split(","), min_time=args.min_time,
                  skip_threshold=args.skip_threshold, kernel_options=kernel_options(args))
    header = (f"bench_forgetting {datetime.date.today()}: bf16, {args.tokens} tokens per shape, "
              f"H*D={args.width}, "
              f"{'MHA' if args.group == 1 else f'GQA ({args.group} query heads per kv head)'}, "
              f"gates "
              f"log_sigmoid(N({args.gate_mu:g}, 1)), kernel options "
              f"{common['kernel_options'] or 'default'}, device memory {memory}")
    print(header, flush=True)
    checks = {}
    if not args.no_check:
        check_shape = SMOKE_CHECK_SHAPE if args.smoke else CHECK_SHAPE
        for variant in variants:
            checks[variant] = in_subprocess(dict(common, check=True, variant=variant,
                                                 **check_shape), envs, args.timeout)
            print_check(variant, checks[variant])
    rows = []
    for shape in shapes(args):
        for variant in variants:
            job = dict(common, variant=variant, **shape)
            rows.append(dict(job, result=in_subprocess(job, envs, args.timeout)))
            print(json.dumps(rows[-1]), flush=True)
    devices = sorted({r["result"]["device"] for r in rows if "device" in r["result"]})
    header += f"; device {', '.join(devices) or '?'}"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_forgetting_{device_slug(rows)}_"
                                  f"{datetime.date.today()}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(header=header, checks=checks, rows=rows), f, indent=1)
    plot(stem + ".png", rows, header)
    print(f"wrote {stem}.json and {stem}.png")
    print(table(rows, header))


if __name__ == "__main__":
    main()
