"""Training throughput of the real trainer: tokens/s, step time, MFU and peak memory.

    python -m benchmarks.bench_train                          # the whole report (GPU)
    python -m benchmarks.bench_train --parts throughput --cases "fast:C=4,batch=16,remat=none"
    python -m benchmarks.bench_train --parts max_length --memory-gib 79.6
    python -m benchmarks.bench_train --model debug_fot --mem-layers 0 --length 256 ...  # CPU

Each case runs in a fresh subprocess (its own peak device memory; an out-of-memory case
cannot disturb the next) and drives :class:`EasyLM.trainer.Trainer` through
:func:`EasyLM.trainer.fit`, the loop a training run uses, on batches of random tokens
(Zipf-distributed, so the loss falls as the model learns the unigram statistics; the same
seed gives the same batches on both paths).  Timings come from ``fit``'s own logging window
over the timed steps (after ``--warmup`` steps that include compilation); MFU uses the FLOP
count of ``EasyLM.flops.flops_per_step`` (docs/training.md, "MFU").

Paths (``--cases`` may override any setting of a case):

- ``slow``: what the original FoT code computes: plain XLA attention in every layer, the
  reference cross-batch attention (gathered keys, materialised scores) in memory layers,
  layers unrolled, full ``[B, L, V]`` logits.
- ``fast``: cuDNN attention in ordinary layers, the fused Pallas kernel in memory layers
  (``auto`` picks both on a GPU), chunked cross-entropy, layers unrolled (scan over layers
  ran 7% slower on the H200; it is one of the ablations).

Parts:

- ``throughput``: for each path and cross-batch range, every remat policy of the path's list
  with batch sizes tried in ascending order until one runs out of memory; the best (highest
  tokens/s) of each group is marked.  Then single-change ablations around the best fast
  case (scan on, full logits, XLA attention, reference cross-batch) measure what each
  optimisation is worth.
- ``max_length``: the longest sequence (from ``--lengths``) each path trains at
  ``--max-length-batch`` rows with cross-batch range 4 under ``nothing_saveable`` remat.
- ``check``: both paths train ``--check-steps`` steps from the same initialisation and data;
  their per-step losses must agree within ``--check-rtol`` (bf16 compute).
- ``collectives`` (not in the default list): compiles (does not run) the train step of each
  ``--cases`` case, or of the fast path at the first ``--C`` and ``--batches``, on ``--mesh``
  and prints its collectives by kind, shape and bytes (:mod:`benchmarks.collectives`), e.g.
  to choose ``mesh_dim``; on CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
  gives fake devices.

Every part runs on ``--mesh`` (default ``1,-1,1``: the batch over all devices).  With
``--processes N`` each case runs as ``N`` processes of this host joined by ``jax.distributed``
(one GPU each, NCCL between them: the path of a multi-host run; on CPU, each process's own
host devices); every process feeds its block of the same global batch, process 0 reports and
the peak memory is the largest of any process's.  The case key ``flip=true`` sets
``flip_sharding_in_cross_batch`` (sharded memory layers exchange heads all-to-all instead of
the halo of neighbouring rows).

Device memory: each case's JAX takes what a training run gets from the runner, its default
``gpu_memory_fraction`` (``XLA_PYTHON_CLIENT_MEM_FRACTION``; JAX's own 75% would stop the
``1b`` cases at 59.4 GiB of an H100), unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` or
``XLA_CLIENT_MEM_FRACTION`` is already in the environment, which then stays.  ``--memory-gib``
replaces either with a cap (the fraction of the device's total, from nvidia-smi), e.g. 79.6 to
size runs for an 80 GB H100 on a larger GPU.  The report's first line and the table header
say which setting applied.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.device_memory import subprocess_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = {
    "slow": dict(attention="xla", cross_batch="reference", scan=False, chunk=0),
    "fast": dict(attention="auto", cross_batch="auto", scan=False, chunk=8192),
}
REMAT = {"slow": ("none", "nothing_saveable"),
         "fast": ("none", "dots_and_attention_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable")}
CASE_KEYS = ("C", "batch", "length", "remat", "scan", "chunk", "attention", "cross_batch",
             "packing", "stepping", "steps", "warmup", "lr", "flip")
DEFAULT_PARTS = ("throughput", "max_length", "check")
PARTS = DEFAULT_PARTS + ("collectives",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"some of {PARTS}")
    p.add_argument("--mesh", default="1,-1,1", help="mesh_dim (dp,fsdp,mp) of every case")
    p.add_argument("--model", default="1b", help="standard model config name")
    p.add_argument("--mem-layers", default="6,12,18", help="memory layer indices")
    p.add_argument("--vocab-size", type=int, default=0, help="override the model's vocabulary")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--C", default="4,0", help="cross-batch ranges of the throughput part")
    p.add_argument("--packing", type=int, default=2, help="dataset_packing (doc_aware_kN)")
    p.add_argument("--stepping", action="store_true", help="cross_batch_stepping")
    p.add_argument("--batches", default="8,16,32", help="batch sizes tried, ascending")
    p.add_argument("--paths", default="slow,fast")
    p.add_argument("--slow-remat", default=",".join(REMAT["slow"]))
    p.add_argument("--fast-remat", default=",".join(REMAT["fast"]))
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--cases", help="explicit throughput cases instead of the sweep: "
                   "'PATH:key=value,...;PATH:...' with keys " + ", ".join(CASE_KEYS))
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536",
                   help="max_length candidates, ascending")
    p.add_argument("--max-length-batch", type=int, default=8)
    p.add_argument("--check-steps", type=int, default=20)
    p.add_argument("--check-batch", type=int, default=8)
    p.add_argument("--check-rtol", type=float, default=1e-2)
    p.add_argument("--memory-gib", type=float, default=0.0,
                   help="cap JAX's device memory at this many GiB (0: the runner's default "
                   "gpu_memory_fraction, or the environment's XLA_*MEM_FRACTION)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per case")
    p.add_argument("--json", help="also write all results here (rewritten after every case, so "
                   "a run cut short keeps the cases it finished)")
    p.add_argument("--profile", help="trace the timed steps of each case into DIR/<n>/ and "
                   "print the device time per kernel (Perfetto trace)")
    p.add_argument("--processes", type=int, default=1,
                   help="run every case as this many processes of this host joined by "
                        "jax.distributed (the multi-host path: one process per GPU, NCCL "
                        "between them); 1: one process drives all local devices")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Worker: one case in this process.


class RandomTokens:
    """Endless ``(batch, metrics)`` of Zipf-distributed tokens, the interface ``fit`` reads:
    ``batch_size`` rows in all (the same for any number of processes), of which this process
    feeds block ``index`` of ``count``."""

    def __init__(self, batch_size, seq_length, vocab_size, seed, index=0, count=1):
        import numpy as np
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.rows = batch_size // count
        self.block = slice(index * self.rows, (index + 1) * self.rows)
        self._rng = np.random.default_rng(seed)

    def __iter__(self):
        import numpy as np
        while True:
            draw = self._rng.zipf(1.3, (self.batch_size, self.seq_length + 1))[self.block]
            tokens = ((draw - 1) % self.vocab_size).astype(np.int32)
            yield ({"input_tokens": tokens[:, :-1], "target_tokens": tokens[:, 1:],
                    "loss_masks": np.ones((self.rows, self.seq_length), np.float32)}, {})

    def get_state_dict(self):
        return {}


class Records:
    """The logger ``fit`` writes to, kept in memory."""

    def __init__(self):
        self.records = {}

    def write(self, step, record):
        if record:
            self.records.setdefault(step, {}).update(record)


def model_config(case):
    from EasyLM.models.llama.llama_model import LLaMAConfig
    overrides = dict(
        mem_layers=tuple(case["mem_layers"]), cross_batch_range=case["C"],
        cross_batch_stepping=case["stepping"], dataset_packing=case["packing"],
        attention_implementation=case["attention"],
        cross_batch_implementation=case["cross_batch"], scan_layers=case["scan"],
        flip_sharding_in_cross_batch=bool(case.get("flip")),
        remat_block="" if case["remat"] == "none" else case["remat"],
        max_sequence_length=max(case["length"], 2048))
    if case.get("vocab_size"):
        overrides["vocab_size"] = case["vocab_size"]
    return LLaMAConfig.load_config(case["model"], **overrides)


def resolved_attention(config, length):
    """What the model's attention layers run, as the table shows it: the softmax layers'
    implementation (memory layers' local attention included), and ``family:implementation``
    for each other family present, e.g. ``gla:pallas`` or ``cudnn+forgetting:pallas``."""
    import jax.numpy as jnp

    from EasyLM import forgetting, linear
    from EasyLM.models.llama.attention import MEMORY_FAMILY, layer_attention_types
    from EasyLM.models.llama.llama_model import resolve_attention_implementation

    families = set(layer_attention_types(config))
    parts = []
    if families & {"softmax", MEMORY_FAMILY}:
        parts.append(resolve_attention_implementation(config, "bfloat16"))
    if "forgetting" in families:
        parts.append("forgetting:" + forgetting.resolve_implementation(
            config.forgetting_implementation, length=length, head_dim=config.head_dim,
            dtype=jnp.bfloat16, padded=False))
    for family in sorted(families & {"gla", "supra"}):
        parts.append(f"{family}:" + linear.resolve_implementation(
            config.linear_implementation, chunk_size=config.linear_chunk_size,
            key_dim=config.head_dim, value_dim=config.head_dim, dtype=jnp.bfloat16,
            per_head=family == "supra"))
    return "+".join(parts)


def run_case(case):
    import jax
    import numpy as np

    from EasyLM import optimizers
    from EasyLM.jax_utils import get_jax_mesh
    from EasyLM.models.llama.llama_model import resolve_cross_batch_implementation
    from EasyLM.trainer import LoopSettings, Trainer, data_split, fit

    config = model_config(case)
    optimizer = optimizers.get_default_config()
    optimizer.adamw_optimizer.lr = case["lr"]
    mesh = get_jax_mesh(case["mesh"])
    trainer = Trainer(mesh, config, optimizer, "bf16", loss_chunk_tokens=case["chunk"])
    if case.get("part") == "collectives":
        from benchmarks.collectives import train_step_collectives
        with jax.set_mesh(mesh):
            return dict(devices=jax.device_count(), device=jax.devices()[0].device_kind,
                        collectives=train_step_collectives(trainer, case["batch"],
                                                           case["length"]))
    device = jax.local_devices()[0]
    result = dict(device=device.device_kind, jax=jax.__version__, devices=jax.device_count(),
                  attention_resolved=resolved_attention(config, case["length"]),
                  cross_batch_resolved=(resolve_cross_batch_implementation(
                      config, case["length"], "bfloat16") if case["C"] > 0 else "-"))
    result["processes"] = jax.process_count()
    data = RandomTokens(case["batch"], case["length"], config.vocab_size, case["seed"],
                        *data_split(mesh))
    logger = Records()
    warmup, steps = case["warmup"], case["steps"]
    with jax.set_mesh(mesh):
        state = trainer.init_state(case["seed"])
        start = time.perf_counter()
        if warmup:
            state = fit(trainer, state, data, LoopSettings(total_steps=warmup, log_freq=warmup,
                                                           show_progress=False), logger)
        result["warmup_s"] = time.perf_counter() - start
        log_freq = 1 if case.get("per_step") else steps
        if case.get("profile"):
            os.makedirs(case["profile"], exist_ok=True)
            jax.profiler.start_trace(case["profile"], create_perfetto_trace=True)
        fit(trainer, state, data, LoopSettings(total_steps=warmup + steps, log_freq=log_freq,
                                               show_progress=False), logger)
        if case.get("profile"):
            jax.profiler.stop_trace()
            result["profile_result"] = device_time_by_kernel(case["profile"], steps)
    ends = [s for s in sorted(logger.records) if s > warmup]
    timed = [logger.records[s] for s in ends]
    # fit logs every log_freq-th step and the last one: windows of unequal length.
    seconds = sum(r["train/step_time"] * (end - begin)
                  for r, begin, end in zip(timed, [warmup] + ends, ends))
    tokens = case["batch"] * case["length"] * steps
    mfu = [r.get("train/mfu") for r in timed]
    result.update(
        step_ms=seconds / steps * 1e3, tokens_per_s=tokens / seconds,
        tokens_per_s_per_device=tokens / seconds / jax.device_count(),
        mfu=float(np.mean(mfu)) if None not in mfu else None,
        tflops_per_device=float(np.mean([r["train/tflops_per_device"] for r in timed])),
        losses=[logger.records[s]["train/loss"] for s in sorted(logger.records)],
        final_loss=timed[-1]["train/loss"])
    stats = device.memory_stats() or {}
    result["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30 or None
    result["limit_gib"] = stats.get("bytes_limit", 0) / 2**30 or None
    if not np.isfinite(result["final_loss"]):
        result["error"] = "non-finite loss"
    return result


KERNEL_KINDS = (("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "dot")),
                ("cudnn attention", ("cudnn", "fmha", "flash_fprop", "flash_bprop", "sdpa")),
                ("pallas cross-batch", ("cross_batch", "_kernel")),
                ("collective / copy", ("nccl", "memcpy", "memset", "copy")),
                ("fusion (elementwise, reductions)", ("fusion", "reduce", "convert",
                                                      "transpose", "scatter", "gather")))


def kernel_kind(name):
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(key in low for key in keys):
            return kind
    return "other"


def device_time_by_kernel(trace_dir, steps, top=25):
    """Device milliseconds per step by kernel name and by kind, from the Perfetto trace that
    ``jax.profiler`` wrote under ``trace_dir``."""
    import collections
    import glob
    import gzip
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not paths:
        return {"error": f"no *.trace.json.gz under {trace_dir}"}
    with gzip.open(paths[-1], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {pid for pid, name in names.items() if "/device:GPU" in name or "TPU:" in name}
    by_name, by_kind, by_thread = (collections.Counter() for _ in range(3))
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device:
            continue
        thread = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
        if "xla ops" in thread.lower() or "module" in thread.lower():
            continue  # op / module summaries repeat the kernels' time
        ms = float(e.get("dur", 0)) / 1e3 / steps
        by_thread[thread] += ms
        by_name[e["name"][:90]] += ms
        by_kind[kernel_kind(e["name"])] += ms
    return {"by_kind": dict(by_kind.most_common()), "by_thread": dict(by_thread.most_common()),
            "top": by_name.most_common(top)}


def classify(error_text):
    if "RESOURCE_EXHAUSTED" in error_text or "out of memory" in error_text.lower():
        return "OOM"
    lines = [line for line in error_text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "failed")[:160]


def join_processes(process):
    """``jax.distributed.initialize`` for a worker of a ``--processes`` case: one process
    per GPU (``local_device_ids``), or on CPU each process's own host devices."""
    import jax
    kwargs = dict(coordinator_address=process["coordinator"],
                  num_processes=process["count"], process_id=process["id"])
    if "cpu" not in os.environ.get("JAX_PLATFORMS", ""):
        kwargs["local_device_ids"] = [process["id"]]
    jax.distributed.initialize(**kwargs)


def worker_main(payload):
    case = json.loads(payload)
    try:
        if case.get("process"):
            join_processes(case["process"])
        result = run_case(case)
    except Exception as error:  # noqa: BLE001 - reported as the case's outcome
        result = {"error": classify(f"{type(error).__name__}: {error}")}
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver.


_CASE_COUNTER = [0]


def in_subprocess(case, args):
    if args.profile:
        _CASE_COUNTER[0] += 1
        case = dict(case, profile=os.path.abspath(os.path.join(args.profile,
                                                               str(_CASE_COUNTER[0]))))
    start = time.perf_counter()
    outputs = run_workers(case, args)
    if outputs is None:
        return dict(case, error=f"timeout after {args.timeout:.0f} s")
    results = []
    for returncode, stdout, stderr in outputs:
        found = [json.loads(line[len("RESULT "):]) for line in stdout.splitlines()
                 if line.startswith("RESULT ")]
        results.append(found[-1] if found else
                       {"error": classify(stderr or f"exit status {returncode}")})
    # Process 0 reports; the peak memory is the largest of any process's GPU.
    result = next((r for r in results if "error" in r), results[0])
    peaks = [r["peak_gib"] for r in results if r.get("peak_gib")]
    if len(results) > 1 and peaks:
        result["peak_gib"] = max(peaks)
    result["wall_s"] = time.perf_counter() - start
    out = dict(case, **result)
    print(describe(out), flush=True)
    if args.json:
        args.finished.append(out)
        write_json(args.json, args.finished)
    if isinstance(out.get("profile_result"), dict):
        print_profile(out["profile_result"])
    return out


def run_workers(case, args):
    """``(returncode, stdout, stderr)`` of the case's worker process, or of each of its
    ``--processes`` workers (same host, joined through ``jax.distributed``); None on
    timeout."""
    import socket
    count = args.processes
    cases = [case]
    if count > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cases = [dict(case, process=dict(coordinator=f"127.0.0.1:{port}", count=count, id=i))
                 for i in range(count)]
    # Output goes to files, not pipes: a worker whose pipe filled up while another was being
    # read would stall, and with it every process of the case at its next collective.
    with tempfile.TemporaryDirectory() as tmp:
        logs = [(open(os.path.join(tmp, f"{i}.out"), "w+"),
                 open(os.path.join(tmp, f"{i}.err"), "w+")) for i in range(len(cases))]
        workers = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_train",
                                     "--worker", json.dumps(c)], stdout=out, stderr=err,
                                    text=True, env=args.case_environment, cwd=REPO)
                   for c, (out, err) in zip(cases, logs)]
        deadline = time.monotonic() + args.timeout
        try:
            for worker in workers:
                worker.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            return None
        finally:
            for worker in workers:
                worker.kill()
        outputs = []
        for worker, files in zip(workers, logs):
            texts = []
            for f in files:
                f.seek(0)
                texts.append(f.read())
                f.close()
            outputs.append((worker.returncode, *texts))
    return outputs


def write_json(path, results):
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def print_profile(profile):
    if "error" in profile:
        print(f"  profile: {profile['error']}")
        return
    print("  device ms per step by kind: " + ", ".join(
        f"{k} {v:.1f}" for k, v in profile["by_kind"].items()))
    print("  by stream: " + ", ".join(f"{k} {v:.1f}" for k, v in profile["by_thread"].items()))
    for name, ms in profile["top"]:
        print(f"    {ms:8.2f} ms  {name}")


def base_case(args, path, **updates):
    case = dict(PATHS[path], path=path, model=args.model,
                mem_layers=[int(i) for i in args.mem_layers.split(",") if i],
                vocab_size=args.vocab_size, length=args.length, C=4, packing=args.packing,
                stepping=args.stepping, batch=8, remat="nothing_saveable", steps=args.steps,
                warmup=args.warmup, lr=args.lr, seed=0, mesh=args.mesh)
    case.update(updates)
    return case


def parse_cases(text, args):
    cases = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        path, _, settings = item.partition(":")
        if path not in PATHS:
            raise SystemExit(f"--cases: unknown path {path!r} in {item!r} (use slow or fast)")
        updates = {}
        for pair in filter(None, settings.split(",")):
            key, _, value = pair.partition("=")
            if key not in CASE_KEYS:
                raise SystemExit(f"--cases: unknown key {key!r} in {item!r}; keys: {CASE_KEYS}")
            updates[key] = (value if key in ("remat", "attention", "cross_batch")
                            else json.loads(value.lower()) if key in ("scan", "stepping", "flip")
                            else float(value) if key == "lr" else int(value))
        cases.append(base_case(args, path, **updates))
    return cases


def ok(result):
    return "error" not in result


def best_of(results):
    good = [r for r in results if ok(r)]
    return max(good, key=lambda r: r["tokens_per_s"]) if good else None


def throughput(args):
    if args.cases:
        return [in_subprocess(case, args) for case in parse_cases(args.cases, args)]
    results, best = [], {}
    ranges = [int(c) for c in args.C.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    remats = {"slow": args.slow_remat.split(","), "fast": args.fast_remat.split(",")}
    for path in args.paths.split(","):
        first = ranges[0]
        group = []
        for remat in remats[path]:
            for batch in batches:
                result = in_subprocess(base_case(args, path, C=first, batch=batch,
                                                 remat=remat), args)
                group.append(result)
                if not ok(result):
                    break
        best[path, first] = best_of(group)
        results += group
        for other in ranges[1:]:  # the other ranges at the best setting of the first
            if best[path, first] is None:
                continue
            chosen = best[path, first]
            result = in_subprocess(base_case(args, path, C=other, batch=chosen["batch"],
                                             remat=chosen["remat"]), args)
            best[path, other] = result if ok(result) else None
            results.append(result)
    for result in results:
        result["best"] = any(b is not None and b is result for b in best.values())
    chosen = best.get(("fast", ranges[0]))
    if chosen is not None and not args.no_ablations:
        for change in (dict(scan=True), dict(chunk=0), dict(attention="xla"),
                       dict(cross_batch="reference")):
            if ranges[0] == 0 and "cross_batch" in change:
                continue
            case = {k: chosen[k] for k in base_case(args, "fast")}
            case.update(change, ablation=", ".join(f"{k}={v}" for k, v in change.items()))
            results.append(in_subprocess(case, args))
    return results


def max_length(args):
    results = []
    lengths = [int(n) for n in args.lengths.split(",")]
    for path in args.paths.split(","):
        for length in lengths:
            case = base_case(args, path, C=4, batch=args.max_length_batch, length=length,
                             remat="nothing_saveable", steps=1, warmup=1, part="max_length")
            result = in_subprocess(case, args)
            results.append(result)
            if not ok(result):
                break
    return results


def check(args):
    results = []
    for path in ("slow", "fast"):
        case = base_case(args, path, C=4, batch=args.check_batch, steps=args.check_steps,
                         warmup=0, per_step=True, part="check")
        results.append(in_subprocess(case, args))
    slow, fast = results
    verdict = {"part": "check_verdict"}
    if ok(slow) and ok(fast):
        a, b = slow["losses"], fast["losses"]
        rel = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        verdict.update(max_rel_diff=rel, first_loss=a[0], last_loss_slow=a[-1],
                       last_loss_fast=b[-1],
                       passed=bool(rel <= args.check_rtol and a[-1] < a[0] and b[-1] < b[0]))
    else:
        verdict.update(passed=False, error="a path failed to train")
    results.append(verdict)
    print(f"CHECK {'PASS' if verdict['passed'] else 'FAIL'}: "
          + json.dumps({k: v for k, v in verdict.items() if k != "part"}), flush=True)
    return results


def collectives(args):
    from benchmarks import collectives as audit
    cases = (parse_cases(args.cases, args) if args.cases else
             [base_case(args, "fast", C=int(args.C.split(",")[0]),
                        batch=int(args.batches.split(",")[0]))])
    results = [in_subprocess(dict(case, part="collectives"), args) for case in cases]
    for r in results:
        if ok(r):
            entries = [dict(e, shape=tuple(e["shape"])) for e in r["collectives"]]
            print(audit.format_table(entries, f"{describe_setting(r)} on mesh {r['mesh']} "
                                     f"({r['devices']} x {r['device']})"))
            print(f"\nall-gathers of activations along the batch: "
                  f"{len(audit.batch_all_gathers(entries, r['batch'], r['length']))}")
    return results


def describe_setting(r):
    return (f"{r.get('path')} C={r.get('C')} B={r.get('batch')} L={r.get('length')} "
            f"remat={r.get('remat')} scan={r.get('scan')} chunk={r.get('chunk')} "
            f"attn={r.get('attention')} xb={r.get('cross_batch')}")


def describe(r):
    setting = describe_setting(r)
    if not ok(r):
        return f"{setting}: {r['error']}"
    if r.get("part") == "collectives":
        return f"{setting}: {len(r['collectives'])} collectives on mesh {r['mesh']}"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
    return (f"{setting}: {r['step_ms']:.1f} ms/step, {r['tokens_per_s']:.0f} tok/s, "
            f"MFU {mfu}, peak {peak} GiB, loss {r['final_loss']:.3f} "
            f"[{r.get('attention_resolved')}/{r.get('cross_batch_resolved')}]")


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_tables(results, args):
    meta = next((r for r in results if ok(r) and "device" in r), {})
    print(f"\n# bench_train: {meta.get('device', '?')} x{meta.get('devices', '?')}, "
          f"jax {meta.get('jax', '?')}, {datetime.date.today()}, model {args.model} "
          f"(memory layers {args.mem_layers}), packing {args.packing}, stepping "
          f"{args.stepping}, bf16 compute / fp32 master weights, device memory "
          f"{args.memory_setting}")
    rows = [r for r in results if r.get("part") is None]
    if rows:
        print("\n| path | C | batch | L | remat | scan | chunked CE | attention | cross-batch "
              "| step ms | tokens/s | MFU | peak GiB | warm-up s | note |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            note = r.get("ablation") and f"ablation: {r['ablation']}" or (
                "**best**" if r.get("best") else "")
            if not ok(r):
                note = r["error"]
            print(f"| {r['path']} | {r['C']} | {r['batch']} | {r['length']} | {r['remat']} | "
                  f"{'yes' if r['scan'] else 'no'} | {'yes' if r['chunk'] else 'no'} | "
                  f"{r.get('attention_resolved', r['attention'])} | "
                  f"{r.get('cross_batch_resolved', r['cross_batch'])} | "
                  f"{fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('tokens_per_s'), '.0f')} | "
                  f"{fmt(r.get('mfu') and 100 * r['mfu'], '.1f')} | "
                  f"{fmt(r.get('peak_gib'), '.1f')} | {fmt(r.get('warmup_s'), '.0f')} | "
                  f"{note} |")
    lengths = [r for r in results if r.get("part") == "max_length"]
    if lengths:
        print("\n| path | batch | L | trains | step s | peak GiB |")
        print("|---|---|---|---|---|---|")
        for r in lengths:
            print(f"| {r['path']} | {r['batch']} | {r['length']} | "
                  f"{'yes' if ok(r) else r['error']} | "
                  f"{fmt(r.get('step_ms') and r['step_ms'] / 1e3, '.2f')} | "
                  f"{fmt(r.get('peak_gib'), '.1f')} |")
    checks = [r for r in results if r.get("part") == "check"]
    if checks:
        print("\n| step | " + " | ".join(r["path"] for r in checks) + " |")
        print("|---|" + "---|" * len(checks))
        for i in range(max(len(r.get("losses", [])) for r in checks)):
            print(f"| {i + 1} | " + " | ".join(
                fmt(r["losses"][i] if i < len(r.get("losses", [])) else None, ".4f")
                for r in checks) + " |")
        verdict = next(r for r in results if r.get("part") == "check_verdict")
        print(f"\nloss check: {'PASS' if verdict['passed'] else 'FAIL'} "
              f"(max relative difference {fmt(verdict.get('max_rel_diff'), '.2e')}, "
              f"tolerance {args.check_rtol})")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    results = []
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {PARTS}")
    args.case_environment, args.memory_setting = subprocess_environment(args.memory_gib)
    args.finished = []
    print(f"bench_train: device memory {args.memory_setting}", flush=True)
    if "throughput" in parts:
        results += throughput(args)
    if "max_length" in parts:
        results += max_length(args)
    if "check" in parts:
        results += check(args)
    if "collectives" in parts:
        results += collectives(args)
    if args.json:
        write_json(args.json, results)
    print_tables(results, args)
    verdict = next((r for r in results if r.get("part") == "check_verdict"), None)
    return 0 if verdict is None or verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
