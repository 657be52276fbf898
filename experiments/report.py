"""Side-by-side figures and tables of the experiments (docs/experiments.md,
docs/forgetting.md).

    python -m experiments.report dictionary --output_dir runs/dictionary \\
        runs/dictionary/eval_fot/dictionary_lookup.json runs/dictionary/eval_range0/...
    python -m experiments.report code --output_dir runs/code \\
        runs/code/eval_fot/loss_by_position.json runs/code/eval_range0/loss_by_position.json
    python -m experiments.report position --split 8192 --labels base,fox --output_dir DIR \\
        BASE/loss_by_position.json FOX/loss_by_position.json

Each input is the JSON an evaluation in ``eval/`` wrote for one model; the figure puts the
models together (``dictionary_lookup.png`` / ``code_loss_by_position.png`` /
``position_loss.png``) and a Markdown table (``.md`` beside it) gives the numbers
(docs/results.md is generated from the JSON).  ``position`` compares models that read each
document as one window (FoX against LLaMA, an uptrained model against its base): the loss of
the tokens before position ``--split`` (the training length, the base model's native context)
and from it on.
"""
import argparse
import json
import os

import numpy as np

from EasyLM import cli
from eval.plots import accuracy_curves, loss_curves


def _load(paths):
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    return results


def dictionary_report(results, output_dir):
    sizes = results[0]["memory_windows"]
    if any(r["memory_windows"] != sizes for r in results):
        raise ValueError("the results measured different --memory_windows")
    curves = {}
    for r in results:
        curves[f"{r['label']}, with memory"] = r["accuracy_with_memory"]
        curves[f"{r['label']}, without memory"] = [r["accuracy_without_memory"]] * len(sizes)
    accuracy_curves(os.path.join(output_dir, "dictionary_lookup.png"), sizes, curves,
                    f"far-lookup accuracy ({results[0]['num_test_docs']} test documents)",
                    results[0]["chance"])
    header = ["model"] + [f"memory {m}" for m in sizes] + ["no memory"]
    rows = [[r["label"]] + [f"{a:.1%}" for a in r["accuracy_with_memory"]]
            + [f"{r['accuracy_without_memory']:.1%}"] for r in results]
    return _markdown(header, rows) + f"\nChance: {results[0]['chance']:.2%}.\n"


def code_report(results, output_dir):
    positions = results[0]["bucket_starts"]
    curves = {}
    for r in results:
        label = _label(r)
        for key in ("with_memory", "without_memory"):
            curves[f"{label}, {key.replace('_', ' ')}"] = np.asarray(r[key])
    loss_curves(os.path.join(output_dir, "code_loss_by_position.png"), positions, curves,
                f"held-out code: loss by position ({results[0]['num_docs']} files)",
                results[0]["last_context_length"])
    variants = list(results[0]["perplexity_past_first_window"])
    header = ["model"] + variants
    rows = [[r["label"]] + [f"{r['perplexity_past_first_window'][v]:.3f}" for v in variants]
            for r in results]
    return ("Perplexity of the tokens past the first window:\n\n"
            + _markdown(header, rows))


def position_report(results, output_dir, split):
    """Models that read each document as one window: their loss curves (documents of
    different lengths end at different positions) and the mean loss before and from
    ``split``, a multiple of the bucket size."""
    sizes = sorted({r["bucket_size"] for r in results})
    if len(sizes) > 1:
        raise cli.UsageError(f"the results measured different --bucket_size ({sizes})")
    if split % sizes[0]:
        raise cli.UsageError(f"--split {split} is not a multiple of the results' bucket size "
                             f"{sizes[0]}: a bucket would hold tokens of both sides")
    positions = max((r["bucket_starts"] for r in results), key=len)
    curves = {_label(r): np.asarray(r["with_memory"]) for r in results}
    loss_curves(os.path.join(output_dir, "position_loss.png"), positions, curves,
                "loss by position (dotted: multiples of the split)", split)
    header = ["model", "documents", f"loss before {split}", f"loss from {split}"]
    rows = [[r["label"], str(r["num_docs"]), _mean_loss(r, before=True, split=split),
             _mean_loss(r, before=False, split=split)] for r in results]
    return _markdown(header, rows)


def _mean_loss(result, before, split):
    """The mean loss of the tokens before (or from) position ``split``, a bucket boundary, or
    "-" where there are none."""
    chosen = (np.asarray(result["bucket_starts"]) < split) == before
    counts = np.asarray(result["tokens_per_bucket"])[chosen]
    if not counts.sum():
        return "-"
    return f"{np.dot(np.asarray(result['with_memory'])[chosen], counts) / counts.sum():.4f}"


def _label(result):
    """The result's label: ``--labels``, else its model directory's name."""
    result["label"] = (result.get("label")
                       or os.path.basename(os.path.normpath(result["model"])))
    return result["label"]


def _markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


REPORTS = {"dictionary": (dictionary_report, "dictionary_lookup.md"),
           "code": (code_report, "code_perplexity.md"),
           "position": (position_report, "position_loss.md")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(REPORTS))
    parser.add_argument("results", nargs="+", help="JSON files written by eval/")
    parser.add_argument("--labels", default=None,
                        help="comma list naming the models (default: the JSONs' labels)")
    parser.add_argument("--split", type=cli.integer(1), default=None,
                        help="position: the loss before and from this position (the training "
                             "length, a base model's native context)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        if (args.split is None) != (args.experiment != "position"):
            raise cli.UsageError("--split goes with position, and position needs it: the "
                                 "position (e.g. the training length) to split the loss at")
        labels = args.labels.split(",") if args.labels else None
        if labels and len(labels) != len(args.results):
            raise cli.UsageError(f"--labels names {len(labels)} models for "
                                 f"{len(args.results)} results; give one label a result")
        results = _load(args.results)
        for result, label in zip(results, labels or (), strict=False):
            result["label"] = label
        os.makedirs(args.output_dir, exist_ok=True)
        report, name = REPORTS[args.experiment]
        extra = {"split": args.split} if args.split else {}
        text = report(results, args.output_dir, **extra)
    with open(os.path.join(args.output_dir, name), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
