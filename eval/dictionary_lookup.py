"""Dictionary-lookup accuracy through FoT memory, as the memory fills with distractors.

    python -m eval.dictionary_lookup --load_checkpoint trainstate::RUN/checkpoints/step_N \\
        --data runs/dictionary/data/eval.jsonl --memory_windows 1,2,4,8,16,32,64 \\
        --output_dir out/dictionary
    python -m eval.dictionary_lookup --hf_model EXPORTED_DIR --data ... --output_dir ...

Documents are those of :mod:`experiments.dictionary_data`: window A holds a dictionary and
lookups, window B more lookups, whose first of each key is a "far" lookup.  For a memory of ``m``
windows, each test document is read after ``m - 1`` windows of other documents whose keys
are all different from its own (distractors), so when window B is processed its memory holds
the distractors and window A.  Accuracy is that of the most likely next token at the far
lookups' values, whose definition only the memory holds; it is also measured with memory
layers run as ordinary local layers (the no-memory baseline, at chance for a model that
cannot see window A).  Writes ``dictionary_lookup.json`` and ``dictionary_lookup.png`` to
``--output_dir`` (other files there are left alone) and prints their paths.
"""
import argparse
import os

import numpy as np
from tqdm import tqdm

from EasyLM import cli
from eval.models import add_model_arguments, model_from_args
from eval.plots import accuracy_curves
from experiments.dictionary_data import document_keys, far_lookups, read_documents


def distractor_prefixes(docs, window, num_targets, memory_windows, rng):
    """``[num_targets, (m - 1) * W]``: the last ``m - 1`` windows of a concatenation of other
    documents sharing no key with target ``i``."""
    keys = [document_keys(doc) for doc in docs]
    needed = memory_windows - 1
    prefixes = []
    for i in range(num_targets):
        if not needed:
            prefixes.append(np.zeros(0, np.int32))
            continue
        disjoint = [j for j in rng.permutation(len(docs))
                    if j != i and not np.isin(keys[j], keys[i]).any()]
        count = -(-needed // 2)
        if len(disjoint) < count:
            raise cli.UsageError(f"only {len(disjoint)} documents share no key with document "
                                 f"{i}; a memory of {memory_windows} windows needs {count}: give "
                                 f"more documents (--num_docs) or fewer --memory_windows")
        prefixes.append(np.concatenate([docs[j] for j in disjoint[:count]])[-needed * window:])
    return np.stack(prefixes)


def lookup_accuracy(model, docs, window, memory_windows, batch_size, seed=0, progress=True):
    """Far-lookup accuracy of the first ``len(docs) // 2`` documents read after
    ``memory_windows - 1`` distractor windows (taken from all ``docs``)."""
    rng = np.random.default_rng(seed)
    targets = docs[:max(1, len(docs) // 2)]
    prefixes = distractor_prefixes(docs, window, len(targets), memory_windows, rng)
    marks = np.concatenate([np.zeros(prefixes.shape, bool), far_lookups(targets, window)], 1)
    correct = []
    for start in tqdm(range(0, len(targets), batch_size), disable=not progress,
                      desc=f"memory {memory_windows} windows"):
        batch = np.concatenate([prefixes[start:start + batch_size],
                                targets[start:start + batch_size]], axis=1)
        _, predictions = model.score(batch)
        # predictions[:, p - 1] is the guess for token p.
        hits = predictions == batch[:, 1:]
        correct.append(hits[marks[start:start + batch_size, 1:]])
    return float(np.concatenate(correct).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="eval.jsonl of experiments.dictionary_data")
    parser.add_argument("--window", type=cli.integer(1), default=None,
                        help="the task's window W (default: the model's local window)")
    parser.add_argument("--memory_windows", default="1,2,4,8,16,32,64",
                        type=cli.number_list(int, low=1),
                        help="comma list of memory sizes m, in windows")
    parser.add_argument("--num_docs", type=cli.integer(1), default=200,
                        help="documents read; half are test documents, all serve as "
                             "distractors")
    parser.add_argument("--batch_size", type=cli.integer(1), default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default=None, help="name of the model in the plot and JSON")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        cli.input_file("--data", args.data)
        if args.window and args.last_context_length not in (None, args.window):
            raise cli.UsageError(window_mismatch(args.last_context_length, args.window))
        cli.output_directory("--output_dir", args.output_dir)
        model, _ = model_from_args(args)
        window = args.window or model.last_context_length
        if model.last_context_length != window:
            raise cli.UsageError(window_mismatch(model.last_context_length, window))
        with cli.reading("--data", args.data):
            docs = read_documents(args.data, window, args.num_docs)
        result = evaluate(model, docs, window, args)
        print(f"{'memory windows':>15} {'accuracy':>9}")
        for m, accuracy in zip(args.memory_windows, result["accuracy_with_memory"]):
            print(f"{m:>15} {accuracy:>9.4f}")
        print(f"{'no memory':>15} {result['accuracy_without_memory']:>9.4f}   "
              f"(chance {result['chance']:.4f})")
        label, sizes = result["label"], args.memory_windows
        cli.write_files(args.output_dir, {
            "dictionary_lookup.json": cli.json_writer(result),
            "dictionary_lookup.png": lambda path: accuracy_curves(
                path, sizes, {f"{label}, with memory": result["accuracy_with_memory"],
                              f"{label}, without memory":
                                  [result["accuracy_without_memory"]] * len(sizes)},
                f"far-lookup accuracy ({result['num_test_docs']} documents)",
                result["chance"])})


def window_mismatch(model_window, task_window):
    return (f"--window: the task's windows are {task_window} tokens but the model reads "
            f"{model_window}; pass --last_context_length {task_window}")


def evaluate(model, docs, window, args):
    """The result the JSON holds: accuracy with each memory size and without memory."""
    sizes = list(args.memory_windows)
    with_memory = [lookup_accuracy(model, docs, window, m, args.batch_size, args.seed)
                   for m in sizes]
    without_memory = lookup_accuracy(model.without_memory(), docs, window, 1, args.batch_size,
                                     args.seed)
    chance = 1.0 / len(np.unique(docs[far_lookups(docs, window)]))
    label = args.label or os.path.basename(os.path.normpath(args.hf_model or
                                                            args.load_checkpoint))
    return dict(model=args.hf_model or args.load_checkpoint, label=label, data=args.data,
                window=window, num_test_docs=max(1, len(docs) // 2), memory_windows=sizes,
                accuracy_with_memory=with_memory, accuracy_without_memory=without_memory,
                chance=chance)


if __name__ == "__main__":
    main()
