"""Triton settings of the fused gated linear attention kernel, searched on the GPU at hand.

    python -m benchmarks.tune_linear                          # D 64 and 128 at L 4096 (GPU)
    python -m benchmarks.tune_linear --shapes 8192x128 --gates head --budget 120
    python -m benchmarks.tune_linear --smoke --out /tmp/t     # tiny, interpreted (tests)

A greedy search in one process, per shape (``LxD``, bf16, ``--tokens`` per call and
``--width`` = H * D as in :mod:`benchmarks.bench_linear`, its inputs and GLA's gates), over
the four kernels of :mod:`EasyLM.linear.kernels.triton_lowering` in turn:

1. ``states`` (sequential): ``block_v`` x ``block_k`` (the state's value columns and key
   rows per program, shared with ``dstates``) x warps x stages, the forward timed;
2. ``outputs`` (per chunk): warps x stages, the forward timed;
3. ``dstates`` (sequential): warps x stages, forward + backward timed;
4. ``grads`` (per chunk): one kernel or two (``split_grads``: dq apart from dk and dv) x
   value columns all at once or in blocks (``grads_block_v``, where it divides the head) x
   warps x stages (both kernels'), forward + backward timed.

Each stage starts from the best so far, and the first stage from the kernel's defaults, so
the defaults are always among the candidates and the result is never slower than them on the
machine measured.  A setting that fails to compile (shared memory, say) is recorded with its
error and skipped.  The best setting's outputs and gradients are compared with the defaults'
(bf16: within 2e-2, relative Frobenius norm).  ``--budget`` seconds per shape bound the
search: what is not reached is recorded as not tried.

Writes ``tune_linear_<device>_<date>.json`` under ``--out`` and prints, last, a Markdown table
of the defaults and the best setting, forward and forward + backward milliseconds.  The
kernel's defaults (:func:`EasyLM.linear.kernels.flash.default_settings`: generic ones, and
``TUNED_SETTINGS`` by head size, dtype and gates) are set by hand from these results.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_attention import timed
from benchmarks.bench_linear import numpy_inputs
from benchmarks.tune_forgetting import (fail, grid, interpreted, parse_shapes,
                                         search_arguments, triton_settings, write_results)
from EasyLM.linear import linear_attention
from EasyLM.linear.kernels.flash import default_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("states", "outputs", "dstates", "grads")
GRIDS = dict(states=dict(block_v=(32, 64, 128), block_k=(None, 64, 32), warps=(4, 8),
                         stages=(1, 2, 3)),
             outputs=dict(warps=(4, 8), stages=(1, 2)),
             dstates=dict(warps=(4, 8), stages=(1, 2, 3)),
             grads=dict(split=(False, True), grads_block_v=(None, 64), warps=(4, 8),
                        stages=(1, 2)))
SMOKE_GRIDS = dict(states=dict(block_v=(16,), block_k=(16,), warps=(4,), stages=(2,)),
                   outputs=dict(warps=(4,), stages=(1,)), dstates=dict(warps=(4,), stages=(2,)),
                   grads=dict(split=(True,), grads_block_v=(16,), warps=(8,), stages=(1,)))
AGREEMENT = 2e-2  # bf16: the best setting against the defaults, outputs and gradients
MODE_OF_STAGE = dict(states="fwd", outputs="fwd", dstates="fwd+bwd", grads="fwd+bwd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gates", default="dim", choices=("dim", "head"),
                   help="a gate per key dimension (GLA) or one per head (SUPRA)")
    search_arguments(p, gate_mu=0.0, budget=240)
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.tokens, args.width, args.min_time = "64x32", 64, 64, 0.0
    return args


def defaults(head_dim, per_head=False):
    """The settings the kernel runs bf16 heads of ``head_dim`` with when given none."""
    return default_settings(head_dim, head_dim, jnp.bfloat16, per_head)


class Search:
    """Times settings of one shape until its deadline; keeps every result."""

    def __init__(self, shape, args, interpret):
        self.interpret, self.min_time = interpret, args.min_time
        self.per_head = args.gates == "head"
        self.deadline = time.perf_counter() + args.budget
        q, k, v, log_alpha, cotangent = numpy_inputs(shape, self.per_head, args.gate_mu, seed=0)
        if self.per_head:
            log_alpha = log_alpha[..., None]
        self.arrays = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)] + [
            jnp.asarray(log_alpha)]
        self.cotangent = jnp.asarray(cotangent, jnp.bfloat16)
        self.results = []
        self.compiled, self.measured = {}, {}  # by setting; by setting and mode

    def functions(self, options):
        key = json.dumps(options, sort_keys=True)
        if key not in self.compiled:
            self.compiled[key] = self._functions(options)
        return self.compiled[key]

    def _functions(self, options):
        def attention(*x):
            return linear_attention(*x, implementation="pallas", interpret=self.interpret,
                                    **options)

        def both(*x):
            out, vjp = jax.vjp(attention, *x)
            return [out] + list(vjp(self.cotangent))
        return {"fwd": jax.jit(attention), "fwd+bwd": jax.jit(both)}

    def run(self, stage, options, mode):
        """Milliseconds of the kernel with ``options`` in ``mode``; None when it failed or
        the deadline has passed."""
        key = (json.dumps(options, sort_keys=True), mode)
        if key in self.measured:  # the incumbent of each stage, timed once
            return self.measured[key]
        record = dict(stage=stage, mode=mode, options=options)
        self.results.append(record)
        if time.perf_counter() > self.deadline:
            record["error"] = "not tried: budget spent"
            return None
        try:
            seconds = timed(self.functions(options)[mode], self.arrays, self.min_time)
        except Exception as e:  # noqa: BLE001 - a setting that does not compile is skipped
            record["error"] = str(e).strip().splitlines()[0][:200]
            return None
        record["ms"] = self.measured[key] = seconds * 1e3
        return record["ms"]

    def best(self, stage, candidates, mode):
        """The fastest of ``candidates`` (option dicts; the first is the incumbent) and its
        milliseconds."""
        scored = [(self.run(stage, options, mode), i) for i, options in enumerate(candidates)]
        scored = [(ms, i) for ms, i in scored if ms is not None]
        if not scored:
            return candidates[0], None
        ms, i = min(scored)
        return candidates[i], ms

    def agreement(self, best, default):
        """Largest relative difference between the best setting's outputs and gradients and
        the defaults'."""
        got = self.functions(best)["fwd+bwd"](*self.arrays)
        want = self.functions(default)["fwd+bwd"](*self.arrays)
        return max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                         / np.linalg.norm(np.asarray(b, np.float64)))
                   for a, b in zip(got, want))


def candidates(incumbent, stage, grids, value_dim):
    kernel = KERNELS.index(stage)
    found = [incumbent]
    for c in grid(grids[stage]):
        options = dict(incumbent)
        if "block_v" in c:
            if c["block_v"] > value_dim:
                continue
            options["block_v"] = c["block_v"]
        if "block_k" in c:
            if c["block_k"] is not None and c["block_k"] >= value_dim:
                continue  # one block: the same program as all the key rows at once
            options["block_k"] = c["block_k"]
        if "split" in c:
            options["split_grads"] = c["split"]
        if "grads_block_v" in c:
            if c["grads_block_v"] is not None and c["grads_block_v"] >= value_dim:
                continue  # one block: the kernel at once, in a loop of one step
            options["grads_block_v"] = c["grads_block_v"]
        found.append(triton_settings(options, kernel, c["warps"], c["stages"]))
    return found


def search_shape(shape, args, interpret, grids):
    search = Search(shape, args, interpret)
    start = defaults(shape["head_dim"], args.gates == "head")
    default_ms = {mode: search.run("default", start, mode) for mode in ("fwd", "fwd+bwd")}
    best = start
    for stage in KERNELS:
        mode = MODE_OF_STAGE[stage]
        best, _ = search.best(stage, candidates(best, stage, grids, shape["head_dim"]), mode)
    best_ms = {mode: search.run("best", best, mode) for mode in ("fwd", "fwd+bwd")}
    result = dict(shape=shape, gates=args.gates, default=start, default_ms=default_ms,
                  best=best, best_ms=best_ms, tried=search.results)
    if best != start and best_ms["fwd+bwd"] is not None:
        # Timed again beside the defaults, now that both are compiled: the search's figures
        # were taken minutes apart.
        for name, options in (("default", start), ("best", best)):
            fn = search.functions(options)
            result[f"{name}_ms"] = {mode: timed(fn[mode], search.arrays, args.min_time) * 1e3
                                    for mode in ("fwd", "fwd+bwd")}
        result["agreement"] = search.agreement(best, start)
    return result


def describe(options):
    return (f"block_v {options['block_v']}"
            + (f" block_k {options['block_k']}" if options.get("block_k") else "")
            + f" warps {','.join(map(str, options['num_warps']))} "
            f"stages {','.join(map(str, options['num_stages']))}"
            + (" split grads" if options["split_grads"] else "")
            + (f" grads block_v {options['grads_block_v']}" if options.get("grads_block_v")
               else ""))


def table(results):
    def ms(value):
        return "" if value is None else f"{value:.3f}"

    lines = ["| gates | L | D | B x H | setting | fwd ms | fwd+bwd ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        shape = result["shape"]
        for name, key in (("default", "default"), ("best", "best")):
            times = result[f"{key}_ms"]
            lines.append(f"| {result['gates']} | {shape['length']} | {shape['head_dim']} | "
                         f"{shape['batch']} x {shape['heads']} | {name}: "
                         f"{describe(result[key])} | {ms(times.get('fwd'))} | "
                         f"{ms(times.get('fwd+bwd'))} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    interpret = interpreted("tune_linear", args)
    grids = SMOKE_GRIDS if args.smoke else GRIDS
    results = []
    for length, head_dim in parse_shapes(args.shapes):
        if args.tokens % length or args.width % head_dim:
            raise SystemExit(f"--tokens {args.tokens} and --width {args.width} must be "
                             f"multiples of L={length} and D={head_dim}")
        shape = dict(batch=args.tokens // length, length=length,
                     heads=args.width // head_dim, head_dim=head_dim)
        started = time.perf_counter()
        results.append(search_shape(shape, args, interpret, grids))
        result = results[-1]
        print(f"[tune_linear] L={length} D={head_dim} gates per {args.gates}: "
              f"{len(result['tried'])} settings in {time.perf_counter() - started:.0f} s; "
              f"best {describe(result['best'])} ({result['best_ms']}, defaults "
              f"{result['default_ms']}); agreement {result.get('agreement')}", flush=True)
    write_results("tune_linear", args, results)
    print(table(results))
    for result in results:
        if result["best_ms"].get("fwd+bwd") is None:
            fail(result, "no setting ran")
        if result.get("agreement", 0.0) > AGREEMENT:
            fail(result, f"the best setting differs from the defaults by "
                         f"{result['agreement']:.2e} (more than {AGREEMENT})")
    return results


if __name__ == "__main__":
    main()
