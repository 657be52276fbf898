"""Tile and Triton settings of the forgetting attention kernel, searched on the GPU at hand.

    python -m benchmarks.tune_forgetting                        # D 64 and 128 at L 4096 (GPU)
    python -m benchmarks.tune_forgetting --shapes 8192x128 --budget 120
    python -m benchmarks.tune_forgetting --smoke --out /tmp/t   # tiny, interpreted (tests)

A greedy search in one process, per shape (``LxD``, bf16, ``--tokens`` per batch and
``--width`` = H * D as in :mod:`benchmarks.bench_forgetting`):

1. forward: every ``block_q x block_k x warps x stages`` of the grid, the forward alone timed;
2. dq kernel: its warps and stages, with the best forward tiles (the dq kernel shares them),
   forward+backward timed;
3. dk/dv kernel: its tiles, warps and stages, forward+backward timed.

Each stage starts from the kernel's defaults, so the defaults are always among the candidates
and the result is never slower than them on the machine measured.  A setting that fails to
compile (shared memory, say) is recorded with its error and skipped.  cuDNN's causal softmax
attention is timed in the same process at each shape, as the speed to approach.  ``--budget``
seconds per shape bound the search: what is not reached is reported as not tried.

Writes ``tune_forgetting_<device>_<date>.json`` under ``--out`` and prints, last, a Markdown
table of the defaults, the best setting found and cuDNN, forward and forward+backward TFLOP/s.
The kernel's defaults (:func:`EasyLM.forgetting.kernels.triton_lowering.default_blocks`,
``default_options``) are set by hand from these results (docs/kernels.md).
"""
import argparse
import dataclasses
import datetime
import itertools
import json
import os
import re
import time

import jax
import jax.numpy as jnp

from benchmarks.bench_attention import timed
from benchmarks.forgetting_jax_worker import inputs
from EasyLM.flops import attention_flops
from EasyLM.forgetting import forgetting_attention
from EasyLM.forgetting.kernels.triton_lowering import default_blocks, default_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORWARD_GRID = dict(block_q=(64, 128), block_k=(32, 64, 128), warps=(4, 8), stages=(2, 3))
DQ_GRID = dict(warps=(4, 8), stages=(2, 3, 4))
DKV_GRID = dict(block_q_dkv=(32, 64, 128), block_k_dkv=(64, 128), warps=(4, 8), stages=(2, 3))
SMOKE_GRID = dict(forward=dict(block_q=(32, 64), block_k=(32,), warps=(4,), stages=(2,)),
                  dq=dict(warps=(4,), stages=(2,)),
                  dkv=dict(block_q_dkv=(32,), block_k_dkv=(32, 64), warps=(4,), stages=(2,)))


def search_arguments(p, gate_mu, budget):
    """The arguments of a kernel settings search (this one's and tune_linear's)."""
    p.add_argument("--shapes", default="4096x64,4096x128", help="LxD, comma-separated")
    p.add_argument("--tokens", type=int, default=32768, help="B * L of every shape")
    p.add_argument("--width", type=int, default=2048, help="H * D of every shape")
    p.add_argument("--gate-mu", type=float, default=gate_mu, help="mean of the gates' logits")
    p.add_argument("--min-time", type=float, default=0.25, help="seconds of timed calls")
    p.add_argument("--budget", type=float, default=budget, help="seconds of search per shape")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--smoke", action="store_true", help="tiny shape and grid, interpreted")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    search_arguments(p, gate_mu=3.0, budget=150)
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.tokens, args.width, args.min_time = "64x64", 128, 128, 0.0
    return args


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)", item.strip())
        if not match:
            raise SystemExit(f"--shapes: {item!r} is not LxD (for example 4096x128)")
        shapes.append((int(match.group(1)), int(match.group(2))))
    return shapes


def grid(ranges):
    names = list(ranges)
    return [dict(zip(names, values)) for values in itertools.product(*ranges.values())]


class Search:
    """Times settings of one shape until its deadline; keeps every result."""

    def __init__(self, job, args, interpret):
        self.job, self.interpret, self.min_time = job, interpret, args.min_time
        self.deadline = time.perf_counter() + args.budget
        self.arrays = inputs(job, jnp.bfloat16)
        self.flops = attention_flops(job["length"], job["heads"], job["head_dim"],
                                     [1] * job["batch"])
        self.results = []

    def run(self, stage, options, mode):
        """TFLOP/s of the kernel with ``options`` in ``mode`` (``fwd`` or ``fwd+bwd``); None
        when it failed or the deadline has passed."""
        record = dict(stage=stage, mode=mode, options=options)
        self.results.append(record)
        if time.perf_counter() > self.deadline:
            record["error"] = "not tried: budget spent"
            return None
        q, k, v, log_f, cotangent = self.arrays

        def attention(*x):
            return forgetting_attention(*x, implementation="pallas", interpret=self.interpret,
                                        **options)

        if mode == "fwd":
            fn, work = jax.jit(attention), self.flops
        else:
            def fn(*x):
                _, vjp = jax.vjp(attention, *x)
                return vjp(cotangent)
            fn, work = jax.jit(fn), 3.5 * self.flops
        try:
            seconds = timed(fn, (q, k, v, log_f), self.min_time)
        except Exception as e:  # noqa: BLE001 - a setting that does not compile is skipped
            record["error"] = str(e).strip().splitlines()[0][:200]
            return None
        record.update(ms=seconds * 1e3, tflops=work / seconds / 1e12)
        return record["tflops"]

    def best(self, stage, candidates, mode):
        """The fastest of ``candidates`` (option dicts; the first is the incumbent)."""
        scored = [(self.run(stage, options, mode), i) for i, options in enumerate(candidates)]
        scored = [(score, i) for score, i in scored if score is not None]
        if not scored:
            return candidates[0], None
        score, i = max(scored)
        return candidates[i], score


def triton_settings(options, kernel, warps, stages):
    """``options`` with kernel ``kernel``'s (0 forward, 1 dq, 2 dk/dv) warps and stages set."""
    new = dict(options)
    for name, value in (("num_warps", warps), ("num_stages", stages)):
        values = list(new[name])
        values[kernel] = value
        new[name] = tuple(values)
    return new


def defaults(dtype, head_dim):
    options = dataclasses.asdict(default_blocks(dtype, head_dim))
    triton = default_options(dtype, head_dim)
    options.update(num_warps=triton.num_warps, num_stages=triton.num_stages)
    return options


def search_shape(job, args, interpret, grids):
    search = Search(job, args, interpret)
    start = defaults(jnp.bfloat16, job["head_dim"])
    start = {name: value if not isinstance(value, int) else min(value, job["length"])
             for name, value in start.items()}
    default_fwd = search.run("default", start, "fwd")
    default_both = search.run("default", start, "fwd+bwd")

    forward = [start] + [triton_settings(dict(start, block_q=c["block_q"], block_k=c["block_k"]),
                                         0, c["warps"], c["stages"])
                         for c in grid(grids["forward"])]
    best, best_fwd = search.best("forward", forward, "fwd")
    dq = [best] + [triton_settings(best, 1, c["warps"], c["stages"]) for c in grid(grids["dq"])]
    best, _ = search.best("dq", dq, "fwd+bwd")
    dkv = [best] + [triton_settings(dict(best, block_q_dkv=c["block_q_dkv"],
                                         block_k_dkv=c["block_k_dkv"]), 2, c["warps"],
                                    c["stages"]) for c in grid(grids["dkv"])]
    best, best_both = search.best("dkv", dkv, "fwd+bwd")
    return dict(shape=job, default=start, default_tflops={"fwd": default_fwd,
                                                          "fwd+bwd": default_both},
                best=best, best_tflops={"fwd": best_fwd, "fwd+bwd": best_both},
                cudnn_tflops=cudnn_tflops(job, search) if not interpret else None,
                tried=search.results)


def cudnn_tflops(job, search):
    """cuDNN causal softmax attention (no gates) on the same arrays, forward and
    forward+backward TFLOP/s."""
    q, k, v, _, cotangent = search.arrays

    def attention(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def both(q, k, v):
        _, vjp = jax.vjp(attention, q, k, v)
        return vjp(cotangent)

    rates = {}
    for mode, fn, work in (("fwd", attention, search.flops), ("fwd+bwd", both,
                                                              3.5 * search.flops)):
        try:
            rates[mode] = work / timed(jax.jit(fn), (q, k, v), search.min_time) / 1e12
        except Exception as e:  # noqa: BLE001 - the kernel's results stand without it
            rates[mode] = None
            print(f"cuDNN {mode}: {str(e).splitlines()[0][:160]}")
    return rates


def describe(options):
    return (f"q{options['block_q']} k{options['block_k']} dkv q{options['block_q_dkv']} "
            f"k{options['block_k_dkv']} warps {','.join(map(str, options['num_warps']))} "
            f"stages {','.join(map(str, options['num_stages']))}")


def table(results):
    def rate(value):
        return "" if value is None else f"{value:.1f}"

    lines = ["| L | D | setting | fwd TFLOP/s | fwd+bwd TFLOP/s | share of cuDNN fwd / fwd+bwd |",
             "| --- | --- | --- | --- | --- | --- |"]
    for result in results:
        shape, cudnn = result["shape"], result["cudnn_tflops"] or {}
        rows = [("default: " + describe(result["default"]), result["default_tflops"]),
                ("best: " + describe(result["best"]), result["best_tflops"])]
        if cudnn:
            rows.append(("cuDNN causal softmax", cudnn))
        for name, rates in rows:
            share = " / ".join(f"{rates[m] / cudnn[m]:.0%}" if rates.get(m) and cudnn.get(m)
                               else "" for m in ("fwd", "fwd+bwd"))
            lines.append(f"| {shape['length']} | {shape['head_dim']} | {name} | "
                         f"{rate(rates.get('fwd'))} | {rate(rates.get('fwd+bwd'))} | {share} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    interpret = interpreted("tune_forgetting", args)
    grids = SMOKE_GRID if args.smoke else dict(forward=FORWARD_GRID, dq=DQ_GRID, dkv=DKV_GRID)
    results = []
    for length, head_dim in parse_shapes(args.shapes):
        job = dict(length=length, head_dim=head_dim, batch=max(1, args.tokens // length),
                   heads=max(1, args.width // head_dim), group=1, gate_mu=args.gate_mu)
        started = time.perf_counter()
        results.append(search_shape(job, args, interpret, grids))
        print(f"L={length} D={head_dim}: {len(results[-1]['tried'])} settings in "
              f"{time.perf_counter() - started:.0f} s; best {describe(results[-1]['best'])}",
              flush=True)
    write_results("tune_forgetting", args, results)
    print(table(results))
    for result in results:
        if result["best_tflops"]["fwd+bwd"] is None:
            fail(result, "no setting ran")
    return results


def interpreted(name, args):
    """Whether the kernels run in the interpreter here: only ``--smoke`` may (its timings mean
    nothing, it checks the script)."""
    interpret = jax.default_backend() != "gpu"
    if interpret and not args.smoke:
        raise SystemExit(f"{name} times the compiled kernel: run it on a GPU (or --smoke, "
                         f"interpreted, to check the script)")
    return interpret


def write_results(name, args, results):
    """``<name>_<device>_<date>.json`` under ``--out``, written whole or not at all."""
    device = jax.devices()[0].device_kind
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}_{slug}_{datetime.date.today()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(device=device, jax=jax.__version__, date=str(datetime.date.today()),
                       args=vars(args), results=results), f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


def fail(result, what):
    """Ends the run naming the shape, ``what`` went wrong and the search's first error."""
    errors = [r["error"] for r in result["tried"] if "error" in r]
    raise SystemExit(f"L={result['shape']['length']} D={result['shape']['head_dim']}: {what}; "
                     f"first error: {errors[0] if errors else '-'}")


if __name__ == "__main__":
    main()
