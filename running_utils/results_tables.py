"""docs/results.md: the measured results as tables, written from the JSON of
``benchmarks/results/`` and ``experiments/results/`` so that a figure of the docs is the
figure that was measured.

Each table names its source file, device, date and command. The date is the one in the
file's name (``..._2026-11-24.json``), the device the one the file records where it records
one. Figures with no JSON stay as text in the doc of their topic, with their device and date.
"""
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

BENCHMARKS = "benchmarks/results"
EXPERIMENTS = "experiments/results"


@dataclass
class Table:
    """One table of results.md: ``columns`` are ``(header, row -> cell text)``."""
    title: str
    source: str  # repository path of the JSON file (or folder) it reads
    device: str
    command: str
    rows: Callable  # repository root -> list of rows
    columns: list
    note: str = ""


def _load(root, path):
    with open(os.path.join(root, path)) as f:
        return json.load(f)


def _date(path):
    return re.search(r"\d{4}-\d{2}-\d{2}", path).group(0)


def _number(value, digits=1):
    """``1,234.5``-style figures; a blank for what was not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:,.{digits}f}"


def _percent(value, digits=1):
    return "" if value is None else f"{100 * value:.{digits}f}%"


def _measured(key, digits=1, scale=1.0, shows_error=False):
    """A measured figure of a row; where the case failed, its error (``OOM``) in the column
    that ``shows_error`` and blanks in the others."""
    def cell(row):
        if row.get("error"):
            if not shows_error:
                return ""
            return "OOM" if "OOM" in row["error"] or "RESOURCE" in row["error"] else "error"
        value = row.get(key)
        return _number(None if value is None else value * scale, digits)
    return cell


def _mfu(row):
    return "" if row.get("error") else _percent(row.get("mfu"))


def _resolved(key):
    """The implementation a case ran (``auto`` resolved), else the one it asked for."""
    return lambda row: row.get(f"{key}_resolved") or row[key]


def _yes(key):
    return lambda row: "yes" if row.get(key) else "no"


# --- training throughput (benchmarks/bench_train.py) --------------------------------------

def _throughput_rows(path):
    return lambda root: [r for r in _load(root, path) if not r.get("part")]


TRAIN_COLUMNS = [
    ("path", lambda r: r["path"]),
    ("C", lambda r: str(r["C"])),
    ("rows", lambda r: str(r["batch"])),
    ("remat", lambda r: r["remat"]),
    ("scan", _yes("scan")),
    ("chunked loss", lambda r: "yes" if r["chunk"] else "no"),
    ("attention", _resolved("attention")),
    ("cross-batch", _resolved("cross_batch")),
    ("step ms", _measured("step_ms", shows_error=True)),
    ("tokens/s", _measured("tokens_per_s", 0)),
    ("MFU", _mfu),
    ("peak GiB", _measured("peak_gib")),
]

MULTI_GPU_COLUMNS = [
    ("path", lambda r: r["path"]),
    ("C", lambda r: str(r["C"])),
    ("GPUs", lambda r: str(r["devices"])),
    ("mesh", lambda r: r["mesh"]),
    ("rows (per GPU)", lambda r: f"{r['batch']} ({r['batch'] // r['devices']})"),
    ("remat", lambda r: r["remat"]),
    ("step ms", _measured("step_ms", shows_error=True)),
    ("tokens/s", _measured("tokens_per_s", 0)),
    ("tokens/s per GPU", _measured("tokens_per_s_per_device", 0)),
    ("MFU", _mfu),
    ("peak GiB per GPU", _measured("peak_gib")),
]


def _collective_rows(path):
    """Per case of the collectives part: instructions and bytes per kind of collective."""
    def rows(root):
        out = []
        for case in _load(root, path):
            if case.get("part") != "collectives":
                continue
            kinds = {}
            for op in case["collectives"]:
                count, total = kinds.get(op["kind"], (0, 0))
                kinds[op["kind"]] = (count + 1, total + op["bytes"])
            for kind, (count, total) in sorted(kinds.items()):
                out.append(dict(case=f"{case['path']} C={case['C']} rows={case['batch']}",
                                kind=kind, count=count, gib=total / 2 ** 30))
        return out
    return rows


def _longest_rows(path):
    return lambda root: [r for r in _load(root, path) if r.get("part") == "max_length"]


def _check_rows(path):
    return lambda root: [r for r in _load(root, path) if r.get("part") == "check_verdict"]


# --- attention and inference benchmarks ------------------------------------------------------

def _rows_of(path):
    return lambda root: _load(root, path)["rows"]


ATTENTION_COLUMNS = [
    ("variant", lambda r: r["variant"]),
    ("KV heads", lambda r: str(r["kv_heads"])),
    ("C", lambda r: str(r["C"])),
    ("fwd ms", lambda r: _number(r["fwd_ms"], 2)),
    ("fwd TFLOP/s", lambda r: _number(r["fwd_tflops"], 0)),
    ("fwd peak GiB", lambda r: _number(r["fwd_peak_gib"], 2)),
    ("fwd+bwd ms", lambda r: _number(r["fwd_bwd_ms"], 2)),
    ("fwd+bwd TFLOP/s", lambda r: _number(r["fwd_bwd_tflops"], 0)),
    ("fwd+bwd peak GiB", lambda r: _number(r["fwd_bwd_peak_gib"], 2)),
    ("inputs GiB", lambda r: _number(r["inputs_gib"], 2)),
]

INFERENCE_COLUMNS = [
    ("framework", lambda r: r["framework"]),
    ("decode steps", lambda r: {"graph": "CUDA graph", "eager": "eager", "jit": "jit"}[r["mode"]]),
    ("grouping", lambda r: r["grouping"]),
    ("rows", lambda r: str(r["batch"])),
    ("prompt tokens", lambda r: f"{r['length']:,}"),
    ("prefill tokens/s", _measured("prefill_tok_s", 0, shows_error=True)),
    ("decode ms/step", _measured("decode_ms", 2)),
    ("peak GiB", _measured("peak_gib", 2)),
]


# --- experiments -------------------------------------------------------------------------------

def _dictionary_rows(folder):
    def rows(root):
        out = []
        for name in ("eval_fot.json", "eval_fot_hf.json", "eval_range0.json"):
            result = _load(root, f"{folder}/{name}")
            out.append(dict(result, by_memory=dict(zip(result["memory_windows"],
                                                       result["accuracy_with_memory"]))))
        return out
    return rows


def _dictionary_columns(windows=(1, 2, 4, 8, 16, 32, 64)):
    columns = [("model", lambda r: r["label"])]
    for m in windows:
        columns.append((f"memory {m}", lambda r, m=m: _percent(r["by_memory"].get(m))))
    columns.append(("no memory", lambda r: _percent(r["accuracy_without_memory"])))
    return columns


def _past_first_window_rows(files):
    """Loss and perplexity of the tokens past the first window, per model and memory."""
    def rows(root):
        out = []
        for label, path in files:
            result = _load(root, path)
            out.append(dict(label=label, loss=result["loss_past_first_window"],
                            perplexity=result["perplexity_past_first_window"]))
        return out
    return rows


def _past_first_window_columns(reads=(1, 4, 16, 64)):
    columns = [("model", lambda r: r["label"])]
    for m in reads:
        key = f"reads {m} window" + ("s" if m > 1 else "")
        columns.append((f"reads {m}" + (" (no memory)" if m == 1 else ""),
                        lambda r, key=key: f"{r['loss'][key]:.3f} / {r['perplexity'][key]:.2f}"))
    return columns


def _window_rule_rows(path):
    def rows(root):
        result = _load(root, path)
        return [dict(rule=rule, losses=losses) for rule, losses in result["mean_loss"].items()]
    return rows


def _window_rule_columns(offsets=("1", "128", "256", "384")):
    columns = [("rule", lambda r: r["rule"])]
    for offset in offsets:
        columns.append((f"prompt 16W+{offset}", lambda r, o=offset: f"{r['losses'][o]:.4f}"))
    return columns


def _passkey_rows(folder, files):
    def rows(root):
        return [dict(label=label, **_load(root, f"{folder}/{name}")) for label, name in files]
    return rows


def _passkey_columns(lengths=(4096, 8192, 16384, 32768, 65536, 131072, 262144)):
    columns = [("model", lambda r: r["label"]), ("trials", lambda r: str(r["trials"]))]
    for n in lengths:
        columns.append((f"{n // 1024}k", lambda r, n=n: _number(
            r["accuracy_by_length"].get(str(n)), 2)))
    return columns


# --- forgetting attention (benchmarks/bench_forgetting.py, tune_forgetting.py, experiments) --

def _forgetting_rows(path):
    """The kernel benchmark's rows, flattened: variant, D, L and each mode's figures."""
    def rows(root):
        out = []
        for row in _load(root, path)["rows"]:
            result = row["result"]
            flat = dict(variant=row["variant"], head_dim=row["head_dim"], length=row["length"])
            for mode in ("fwd", "fwd+bwd"):
                for key in ("ms", "tflops"):
                    flat[f"{mode} {key}"] = (result.get(mode) or {}).get(key)
            out.append(flat)
        return out
    return rows


FORGETTING_COLUMNS = [
    ("variant", lambda r: r["variant"]),
    ("D", lambda r: str(r["head_dim"])),
    ("L", lambda r: str(r["length"])),
    ("fwd ms", _measured("fwd ms", 2)),
    ("fwd TFLOP/s", _measured("fwd tflops")),
    ("fwd+bwd ms", _measured("fwd+bwd ms", 2)),
    ("fwd+bwd TFLOP/s", _measured("fwd+bwd tflops")),
]


def _tile_search_rows(path):
    """Per searched shape: the defaults it started from, the best setting and cuDNN."""
    def describe(o):
        return (f"q{o['block_q']} k{o['block_k']}, dkv q{o['block_q_dkv']} k{o['block_k_dkv']}, "
                f"warps {','.join(map(str, o['num_warps']))}, "
                f"stages {','.join(map(str, o['num_stages']))}")

    def rows(root):
        out = []
        for result in _load(root, path)["results"]:
            shape = result["shape"]
            for name, options, rates in (("start", result["default"], result["default_tflops"]),
                                         ("best", result["best"], result["best_tflops"]),
                                         ("cuDNN causal softmax", None,
                                          result["cudnn_tflops"] or {})):
                out.append({"L": shape["length"], "D": shape["head_dim"], "setting": name,
                            "options": describe(options) if options else "",
                            "fwd": rates.get("fwd"), "fwd+bwd": rates.get("fwd+bwd")})
        return out
    return rows


def _position_rows(items, split):
    """Loss of the tokens before and from ``split`` of ``[(label, eval JSON)]``."""
    def mean(result, before):
        chosen = [(start < split) == before for start in result["bucket_starts"]]
        pairs = [(loss, n) for loss, n, keep in zip(result["with_memory"],
                                                    result["tokens_per_bucket"], chosen) if keep]
        return sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)

    def rows(root):
        return [{"model": label, "documents": (r := _load(root, path))["num_docs"],
                 "before": mean(r, True), "from": mean(r, False)} for label, path in items]
    return rows


FOX_SCRATCH = f"{EXPERIMENTS}/fox_scratch_h100_2026-12-06"

DICTIONARY = f"{EXPERIMENTS}/dictionary_lookup_h100_2026-11-24"
CODE = f"{EXPERIMENTS}/code_memory_h100_2026-11-24"
SMOLLM2 = f"{EXPERIMENTS}/pretrained_smollm2_h200_2026-12-02"
SMOLLM2_V3 = f"{EXPERIMENTS}/pretrained_smollm2_h100_2026-12-06"
H100 = "one NVIDIA H100 80GB HBM3, jax 0.11.2, CUDA 13"
H200 = "one NVIDIA H200, jax 0.11.2, CUDA 13"

SECTIONS = [
    ("Training throughput (`benchmarks/bench_train.py`)", [
        Table("`1b` FoT model on the H100 (the runner's default memory fraction, 0.95)",
              f"{BENCHMARKS}/bench_train_h100_2026-11-24.json", H100,
              "python -m benchmarks.bench_train --parts throughput --cases ...",
              _throughput_rows(f"{BENCHMARKS}/bench_train_h100_2026-11-24.json"), TRAIN_COLUMNS,
              "Two invocations, each cut by the device's 10-minute command limit; the JSON "
              "was written from their log (`bench_train_h100_2026-11-24.log`)."),
        Table("`1b` FoT model on the H200, JAX capped at 79.6 GiB (an 80 GB H100's memory)",
              f"{BENCHMARKS}/bench_train_h200_2026-11-22.json", H200,
              "python -m benchmarks.bench_train --memory-gib 79.6 [--parts/--paths/--cases]",
              _throughput_rows(f"{BENCHMARKS}/bench_train_h200_2026-11-22.json"),
              TRAIN_COLUMNS,
              "Several invocations on the same day, each a selection of the sweep and of "
              "single-change ablations; every row is 10 timed steps after 3 warm-up steps, in "
              "a fresh process."),
        Table("Longest trainable sequence, 8 rows, C=4, `nothing_saveable` (H200 capped at "
              "79.6 GiB)",
              f"{BENCHMARKS}/bench_train_h200_2026-11-22.json", H200,
              "python -m benchmarks.bench_train --memory-gib 79.6 --parts max_length",
              _longest_rows(f"{BENCHMARKS}/bench_train_h200_2026-11-22.json"),
              [("path", lambda r: r["path"]), ("length", lambda r: f"{r['length']:,}"),
               ("s/step", _measured("step_ms", 2, 1e-3, shows_error=True)),
               ("peak GiB", _measured("peak_gib"))],
              "Each path's lengths double until one runs out of memory; lengths between the "
              "last that fits and the first that does not were not tried."),
        Table("Loss check: slow and fast paths, 20 steps from the same initialisation and "
              "batches (8 rows, C=4, lr 3e-4)",
              f"{BENCHMARKS}/bench_train_h200_2026-11-22.json", H200,
              "python -m benchmarks.bench_train --memory-gib 79.6 --parts check",
              _check_rows(f"{BENCHMARKS}/bench_train_h200_2026-11-22.json"),
              [("first loss", lambda r: f"{r['first_loss']:.3f}"),
               ("last loss, slow", lambda r: f"{r['last_loss_slow']:.4f}"),
               ("last loss, fast", lambda r: f"{r['last_loss_fast']:.4f}"),
               ("largest relative difference", lambda r: f"{r['max_rel_diff']:.1e}"),
               ("passed (< 1e-2)", lambda r: "yes" if r["passed"] else "no")]),
        Table("Two GPUs: `1b` FoT model on 2 x H200, JAX capped at 76 GiB per GPU",
              f"{BENCHMARKS}/bench_train_2xh200_2026-11-24.json",
              "2 x NVIDIA H200 of one host, jax 0.11.2",
              "python -m benchmarks.bench_train --mesh 1,-1,1 --memory-gib 76 "
              "--parts throughput,collectives --cases ...",
              _throughput_rows(f"{BENCHMARKS}/bench_train_2xh200_2026-11-24.json"),
              MULTI_GPU_COLUMNS,
              "Memory layers under the halo exchange (`flip_sharding_in_cross_batch` off), no "
              "remat; one process with both GPUs."),
        Table("Two GPUs: collectives of the compiled train step per kind",
              f"{BENCHMARKS}/bench_train_2xh200_2026-11-24.json",
              "2 x NVIDIA H200 of one host, jax 0.11.2",
              "python -m benchmarks.bench_train --mesh 1,-1,1 --memory-gib 76 "
              "--parts throughput,collectives --cases ...",
              _collective_rows(f"{BENCHMARKS}/bench_train_2xh200_2026-11-24.json"),
              [("case", lambda r: r["case"]), ("kind", lambda r: r["kind"]),
               ("instructions", lambda r: str(r["count"])),
               ("GiB per step", lambda r: _number(r["gib"], 3))],
              "No all-gather of activations along the batch: the all-gathers are weights (FSDP), "
              "the collective-permutes the memory layers' halo."),
    ]),
    ("Cross-batch attention (`benchmarks/bench_attention.py`)", [
        Table("bf16, B=8, L=2048, H=32, D=128, stepping off, k=1",
              f"{BENCHMARKS}/bench_attention_h200_2026-11-22.json", H200,
              "python -m benchmarks.bench_attention",
              _rows_of(f"{BENCHMARKS}/bench_attention_h200_2026-11-22.json"), ATTENTION_COLUMNS,
              "Medians of timed calls after a warm-up, in a fresh process; three runs of the "
              "day (cuDNN rows: run 1, reference and blockwise: run 2, Pallas: run 3 with the "
              "final defaults). cuDNN runs on keys and values gathered in advance (not timed). "
              "Peak memory includes the inputs."),
    ]),
    ("Forgetting attention (FoX)", [
        Table("Fused Pallas FoX kernel against fla-core 0.6.0 and cuDNN causal softmax, bf16, "
              "32k tokens per shape, H*D = 2048, MHA",
              f"{BENCHMARKS}/bench_forgetting_h100_2026-12-06_tuned.json",
              "one NVIDIA H100 80GB HBM3, jax 0.11.2, torch 2.11, fla-core 0.6.0",
              "python -m benchmarks.bench_forgetting --fla-path DIR",
              _forgetting_rows(f"{BENCHMARKS}/bench_forgetting_h100_2026-12-06_tuned.json"),
              FORGETTING_COLUMNS,
              "The kernel's default tiles (those the H200 search below chose). Joined from five "
              "calls on one machine, each cut by the device's limits (the JSON's header says "
              "which). cuDNN has no gates: it is the speed of causal softmax attention alone."),
        Table("Tile search of the FoX kernel at L=4096 (bf16, TFLOP/s)",
              f"{BENCHMARKS}/tune_forgetting_nvidia_h200_2026-12-06.json", H200,
              "python -m benchmarks.tune_forgetting --budget 150",
              _tile_search_rows(f"{BENCHMARKS}/tune_forgetting_nvidia_h200_2026-12-06.json"),
              [("L", lambda r: str(r["L"])), ("D", lambda r: str(r["D"])),
               ("setting", lambda r: r["setting"]), ("tiles, warps, stages",
                                                      lambda r: r["options"]),
               ("fwd", _measured("fwd")), ("fwd+bwd", _measured("fwd+bwd"))],
              "start: the cross-batch kernel's defaults, where the search began; best: now the "
              "kernel's defaults for that head size."),
        Table("From scratch, 600 steps of 32 x 2,048 tokens (39M), seed 1: mean loss on 32 "
              "held-out files of 16,384 tokens read as one window",
              FOX_SCRATCH, "one NVIDIA H100 80GB HBM3 (both runs sharing it), jax 0.11.2",
              "bash experiments/code_memory.sh fox_pro && bash experiments/code_memory.sh "
              "llama (CODE_WINDOW=16384, docs/forgetting.md)",
              _position_rows([("FoX (Pro), 100m_fox_pro", f"{FOX_SCRATCH}/eval_fox_pro.json"),
                              ("LLaMA, 100m", f"{FOX_SCRATCH}/eval_llama.json")], 2048),
              [("model", lambda r: r["model"]), ("documents", lambda r: str(r["documents"])),
               ("loss before position 2,048 (the training length)",
                lambda r: _number(r["before"], 4)),
               ("loss from position 2,048 to 16,384", lambda r: _number(r["from"], 4))]),
    ]),
    ("Long-context inference (`benchmarks/bench_inference.py`)", [
        Table("PyTorch export, 1.24B random FoT model, window 2048, bf16 (the default: chunked "
              "prefill, CUDA-graph decoding)",
              f"{BENCHMARKS}/bench_inference_torch_h100_2026-11-24_chunked.json",
              "one NVIDIA H100 80GB HBM3, torch 2.11 + CUDA 13, transformers 5.17",
              "python -m benchmarks.bench_inference",
              _rows_of(f"{BENCHMARKS}/bench_inference_torch_h100_2026-11-24_chunked.json"),
              INFERENCE_COLUMNS,
              "The eager and CUDA-graph rows of a batch size share their prefill; the eager "
              "rows run first, so the first 128k prefill of the process is in the eager row."),
        Table("PyTorch export, earlier the same day (before the chunked prefill)",
              f"{BENCHMARKS}/bench_inference_torch_h100_2026-11-24.json",
              "one NVIDIA H100 80GB HBM3, torch 2.11 + CUDA 13, transformers 5.17",
              "python -m benchmarks.bench_inference",
              _rows_of(f"{BENCHMARKS}/bench_inference_torch_h100_2026-11-24.json"),
              INFERENCE_COLUMNS),
        Table("JAX `WindowedLM`, the same model (greedy tokens chosen on the device)",
              f"{BENCHMARKS}/bench_inference_jax_h100_2026-11-24_device_tokens.json", H100,
              "python -m benchmarks.bench_inference --framework jax",
              _rows_of(f"{BENCHMARKS}/bench_inference_jax_h100_2026-11-24_device_tokens.json"),
              INFERENCE_COLUMNS, "Peak is JAX's pool."),
        Table("JAX `WindowedLM`, memory attention grouped 16 heads x 512 queries",
              f"{BENCHMARKS}/bench_inference_jax_grouped_h100_2026-11-24_device_tokens.json",
              H100, "python -m benchmarks.bench_inference --framework jax --groupings 16x512",
              _rows_of(
                  f"{BENCHMARKS}/bench_inference_jax_grouped_h100_2026-11-24_device_tokens.json"),
              INFERENCE_COLUMNS),
    ]),
    ("Does FoT work? (`experiments/`)", [
        Table("Dictionary lookup with distractors: far-lookup accuracy by memory size "
              "(windows of 256 tokens; chance 0.39%)",
              DICTIONARY, H100, "bash experiments/dictionary_lookup.sh",
              _dictionary_rows(DICTIONARY), _dictionary_columns(),
              "`fot`: cross-batch range 7; `range0`: the same model trained with range 0; "
              "`fot (PyTorch export)`: the FoT checkpoint exported and evaluated in PyTorch."),
        Table("Long source files: loss / perplexity of the tokens past the first 512-token "
              "window, reading m windows (64 held-out files of 8,193-32,768 tokens)",
              CODE, H100,
              "bash experiments/code_memory.sh fot && bash experiments/code_memory.sh range0",
              _past_first_window_rows([("FoT (range 4)", f"{CODE}/eval_fot.json"),
                                       ("range 0", f"{CODE}/eval_range0.json")]),
              _past_first_window_columns()),
        Table("Window rules: mean loss of 512 tokens read one at a time after a prompt of 16 "
              "windows plus an offset (32 held-out files, the code model above)",
              f"{EXPERIMENTS}/window_rules_h100_2026-11-24/window_rules.json",
              "one NVIDIA H100 80GB HBM3, torch 2.11",
              "python -m eval.window_rules --hf_model runs/code/exported --data "
              "runs/code/data/heldout.jsonl --prompt_windows 16 --offsets 1,128,256,384 "
              "--continuation 512 --output_dir out/rules",
              _window_rule_rows(f"{EXPERIMENTS}/window_rules_h100_2026-11-24/window_rules.json"),
              _window_rule_columns()),
        Table("SmolLM2-135M continued with FoT (first recipe): loss / perplexity past the first "
              "1024-token window (6 held-out files of 16k-34k tokens)",
              f"{SMOLLM2}/loss.json", H200 + ", torch 2.11", "bash experiments/pretrained_fot.sh",
              _past_first_window_rows([("FoT, 2,000 steps", f"{SMOLLM2}/loss.json")]),
              _past_first_window_columns()),
        Table("SmolLM2-135M: passkey accuracy by prompt length (5 depths)",
              SMOLLM2, H200 + ", torch 2.11", "bash experiments/pretrained_fot.sh",
              _passkey_rows(SMOLLM2, [
                  ("base model, Hugging Face, full attention", "pk_base.json"),
                  ("FoT, exported PyTorch, memory", "pk_hf.json"),
                  ("FoT, JAX WindowedLM, memory", "pk_jax.json"),
                  ("FoT, JAX, no memory", "pk_nomem.json")]),
              _passkey_columns()),
        Table("SmolLM2-135M, recipe v3 (documents without BOS, denser facts, lr 1e-4, 2,213 "
              "steps): loss / perplexity past the first 1024-token window (16 held-out files "
              "of 8,192 tokens)",
              f"{SMOLLM2_V3}/loss.json", H100 + ", torch 2.11",
              "python -m eval.loss_by_position --load_checkpoint CKPT --tokenizer TOK --data "
              "heldout.jsonl --min_length 8192 --max_length 8192 --max_docs 16 --bucket_size "
              "1024 --context_windows 1,4,8 --last_context_length 1024 --dtype bf16",
              _past_first_window_rows([("FoT v3, 2,213 steps", f"{SMOLLM2_V3}/loss.json")]),
              _past_first_window_columns(reads=(1, 4, 8))),
        Table("SmolLM2-135M, recipe v3: passkey accuracy by prompt length (5 depths)",
              SMOLLM2_V3, H100 + ", torch 2.11",
              "python -m eval.passkey --lengths 2048,4096,16384 --depths 0,0.25,0.5,0.75,1 "
              "--trials 2 --dtype bf16 [--load_checkpoint CKPT --last_context_length 1024 "
              "[--no_memory] | --hf_model BASE]",
              _passkey_rows(SMOLLM2_V3, [
                  ("base model, Hugging Face, full attention", "pk_base.json"),
                  ("FoT v3, JAX WindowedLM, memory", "pk_fot.json"),
                  ("FoT v3, JAX, no memory", "pk_fot_no_memory.json")]),
              _passkey_columns(lengths=(2048, 4096, 16384))),
    ]),
]

HEADER = """\
# Measured results

Written by `python -m running_utils.docs` from the JSON files each table names; do not edit by
hand (`tests/test_docs.py` fails when this file differs from what the command writes). A
blank cell was not measured; OOM: the case ran out of device memory. What the figures mean,
and figures measured without a JSON record, are in the doc of each topic:
[benchmarks](benchmarks.md), [multi-host](multi_host.md), [experiments](experiments.md).
"""


def render_table(table, root):
    head = [h for h, _ in table.columns]
    lines = [f"### {table.title}", "",
             f"Device: {table.device}. Date: {_date(table.source)}. Source: `{table.source}`.",
             "", "```text", table.command, "```", ""]
    if table.note:
        lines += [table.note, ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in table.rows(root):
        lines.append("| " + " | ".join(cell(row) for _, cell in table.columns) + " |")
    return "\n".join(lines) + "\n"


def render(root):
    """The text of docs/results.md for the checkout at ``root``."""
    parts = [HEADER]
    for title, tables in SECTIONS:
        parts.append(f"\n## {title}\n")
        parts += ["\n" + render_table(t, root) for t in tables]
    return "".join(parts)
