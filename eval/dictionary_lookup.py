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
cannot see window A).  Writes ``dictionary_lookup.json`` and ``dictionary_lookup.png``.
"""
import argparse
import json
import os

import numpy as np
from tqdm import tqdm

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
            raise ValueError(f"only {len(disjoint)} documents share no key with document {i}; "
                             f"a memory of {memory_windows} windows needs {count}: give more "
                             f"documents (--num_docs) or fewer --memory_windows")
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
    parser.add_argument("--window", type=int, default=None,
                        help="the task's window W (default: the model's local window)")
    parser.add_argument("--memory_windows", default="1,2,4,8,16,32,64",
                        help="comma list of memory sizes m, in windows")
    parser.add_argument("--num_docs", type=int, default=200,
                        help="documents read; half are test documents, all serve as "
                             "distractors")
    parser.add_argument("--batch_size", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default=None, help="name of the model in the plot and JSON")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    model, _ = model_from_args(args)
    window = args.window or model.last_context_length
    if model.last_context_length != window:
        raise ValueError(f"the model reads windows of {model.last_context_length} tokens but "
                         f"the task's are {window}: pass --last_context_length {window}")
    docs = read_documents(args.data, window, args.num_docs)
    sizes = [int(m) for m in args.memory_windows.split(",")]
    with_memory = [lookup_accuracy(model, docs, window, m, args.batch_size, args.seed)
                   for m in sizes]
    without_memory = lookup_accuracy(model.without_memory(), docs, window, 1, args.batch_size,
                                     args.seed)
    chance = 1.0 / len(np.unique(docs[far_lookups(docs, window)]))
    label = args.label or os.path.basename(os.path.normpath(args.hf_model or
                                                            args.load_checkpoint))
    result = dict(model=args.hf_model or args.load_checkpoint, label=label, data=args.data,
                  window=window, num_test_docs=max(1, len(docs) // 2), memory_windows=sizes,
                  accuracy_with_memory=with_memory, accuracy_without_memory=without_memory,
                  chance=chance)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "dictionary_lookup.json"), "w") as f:
        json.dump(result, f, indent=2)
    accuracy_curves(os.path.join(args.output_dir, "dictionary_lookup.png"), sizes,
                    {f"{label}, with memory": with_memory,
                     f"{label}, without memory": [without_memory] * len(sizes)},
                    f"far-lookup accuracy ({result['num_test_docs']} documents)", chance)
    print(f"{'memory windows':>15} {'accuracy':>9}")
    for m, accuracy in zip(sizes, with_memory):
        print(f"{m:>15} {accuracy:>9.4f}")
    print(f"{'no memory':>15} {without_memory:>9.4f}   (chance {chance:.4f})")
    return result


if __name__ == "__main__":
    main()
