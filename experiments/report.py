"""Side-by-side figures and tables of the experiments (docs/experiments.md,
docs/forgetting.md).

    python -m experiments.report dictionary --output_dir runs/dictionary \\
        runs/dictionary/eval_fot/dictionary_lookup.json runs/dictionary/eval_range0/...
    python -m experiments.report code --output_dir runs/code \\
        runs/code/eval_fot/loss_by_position.json runs/code/eval_range0/loss_by_position.json
    python -m experiments.report position --split 8192 --labels base,fox --output_dir DIR \\
        BASE/loss_by_position.json FOX/loss_by_position.json
    python -m experiments.report tokens --spans 2048,8192 --output_dir DIR \\
        BASE/loss_by_position.json RUN_STEP_200/loss_by_position.json ...

Each input is the JSON an evaluation in ``eval/`` wrote for one model; the figure puts the
models together (``dictionary_lookup.png`` / ``code_loss_by_position.png`` /
``position_loss.png``) and a Markdown table (``.md`` beside it) gives the numbers
(docs/results.md is generated from the JSON).  ``position`` compares models that read each
document as one window (FoX against LLaMA, an uptrained model against its base): the loss of
the tokens before position ``--split`` (the training length, the base model's native context)
and from it on.  ``tokens`` follows one run's checkpoints: the mean loss within the first
``--spans`` tokens of the documents against the tokens each checkpoint was trained on (its
step times the tokens a step of its run's ``config.json``), beside the models without a step
(the base model), drawn as horizontal lines (``token_loss.png``).
"""
import argparse
import json
import os

import numpy as np

from EasyLM import cli
from eval.plots import accuracy_curves, loss_curves, token_curves


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


def tokens_report(results, output_dir, spans):
    """Checkpoints of one run against models without a training step (see the module)."""
    size = results[0]["bucket_size"]
    if any(r["bucket_size"] != size for r in results) or any(s % size for s in spans):
        raise cli.UsageError(f"every --spans value must be a multiple of the results' bucket "
                             f"size, and the results must share one ({size})")
    trained = sorted((r for r in results if _trained_tokens(r) is not None),
                     key=_trained_tokens)
    if not trained:
        raise cli.UsageError("no result comes from a training checkpoint (.../step_N): "
                             "give the evaluations of a run's checkpoints")
    references = [r for r in results if _trained_tokens(r) is None]
    tokens = [_trained_tokens(r) for r in trained]
    curves = {f"within {span}": [float(_mean_loss(r, True, span)) for r in trained]
              for span in spans}
    lines = {f"{_label(r)} within {span}": float(_mean_loss(r, True, span))
             for span in spans for r in references}
    token_curves(os.path.join(output_dir, "token_loss.png"), tokens, curves, lines,
                 "held-out loss within the first tokens of each document")
    header = ["model", "training tokens"] + [f"loss within {span}" for span in spans]
    rows = [[_label(r), "-"] + [_mean_loss(r, True, span) for span in spans]
            for r in references]
    rows += [[_label(r), f"{n:,}"] + [_mean_loss(r, True, span) for span in spans]
             for r, n in zip(trained, tokens)]
    return _markdown(header, rows)


def _trained_tokens(result):
    """Tokens a checkpoint ``.../<run>/checkpoints/step_N`` was trained on (``N`` times the
    batch of its run's ``config.json``), or None for a model that is not such a checkpoint."""
    path = result["model"].split("::")[-1].rstrip("/")
    name = os.path.basename(path)
    if not name.startswith("step_") or not name[5:].isdigit():
        return None
    config_path = os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except OSError as e:
        raise cli.UsageError(f"{result['model']}: cannot read its run's {config_path} ({e}), "
                             "which gives the tokens a step") from None
    kind = config.get("train_dataset.type", "json")
    batch = config[f"train_dataset.{kind}_dataset.batch_size"]
    return int(name[5:]) * batch * config[f"train_dataset.{kind}_dataset.seq_length"]


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
           "position": (position_report, "position_loss.md"),
           "tokens": (tokens_report, "token_loss.md")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(REPORTS))
    parser.add_argument("results", nargs="+", help="JSON files written by eval/")
    parser.add_argument("--labels", default=None,
                        help="comma list naming the models (default: the JSONs' labels)")
    parser.add_argument("--split", type=cli.integer(1), default=None,
                        help="position: the loss before and from this position (the training "
                             "length, a base model's native context)")
    parser.add_argument("--spans", type=cli.number_list(int, low=1), default=None,
                        help="tokens: the loss within the first N tokens of the documents, "
                             "for each N (multiples of the bucket size)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        if (args.split is None) != (args.experiment != "position"):
            raise cli.UsageError("--split goes with position, and position needs it: the "
                                 "position (e.g. the training length) to split the loss at")
        if (args.spans is None) != (args.experiment != "tokens"):
            raise cli.UsageError("--spans goes with tokens, and tokens needs it: the lengths "
                                 "to take the loss within, e.g. 2048,8192")
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
        if args.spans:
            extra = {"spans": args.spans}
        text = report(results, args.output_dir, **extra)
    with open(os.path.join(args.output_dir, name), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
