"""Side-by-side figures and tables of the "Does FoT work?" experiments (docs/experiments.md).

    python -m experiments.report dictionary --output_dir runs/dictionary \\
        runs/dictionary/eval_fot/dictionary_lookup.json runs/dictionary/eval_range0/...
    python -m experiments.report code --output_dir runs/code \\
        runs/code/eval_fot/loss_by_position.json runs/code/eval_range0/loss_by_position.json

Each input is the JSON an evaluation in ``eval/`` wrote for one model; the figure puts the
models together (``dictionary_lookup.png`` / ``code_loss_by_position.png``) and a Markdown
table (``.md`` beside it) gives the numbers (docs/results.md is generated from the JSON).
"""
import argparse
import json
import os

import numpy as np

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
        label = r.get("label") or os.path.basename(os.path.normpath(r["model"]))
        r["label"] = label
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


def _markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("dictionary", "code"))
    parser.add_argument("results", nargs="+", help="JSON files written by eval/")
    parser.add_argument("--labels", default=None,
                        help="comma list naming the models (default: the JSONs' labels)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    results = _load(args.results)
    if args.labels:
        for result, label in zip(results, args.labels.split(","), strict=True):
            result["label"] = label
    os.makedirs(args.output_dir, exist_ok=True)
    report = (dictionary_report if args.experiment == "dictionary" else code_report)(
        results, args.output_dir)
    name = "dictionary_lookup.md" if args.experiment == "dictionary" else "code_perplexity.md"
    with open(os.path.join(args.output_dir, name), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
