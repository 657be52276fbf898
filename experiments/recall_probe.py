"""Does a model recall facts from far back? Held-out files with the statements of
``experiments.recall_data`` inserted, scored with memory and without.

    python -m experiments.recall_probe --load_checkpoint CHECKPOINT --tokenizer TOKENIZER \\
        --data heldout.jsonl --output_dir out/recall [--last_context_length 1024]

Each of ``--num_docs`` held-out documents longer than ``--chars`` characters is cut to that
length and given ``--min_facts`` to ``--max_facts`` statements (the training format of
``experiments.recall_data``, new names and numbers). The block of repeated statements at its
end is then scored teacher-forced: the mean loss of its tokens and the share of its digit
tokens the model predicts exactly, once with FoT memory and once without. A model whose
memory layers retrieve what they read has a far higher digit accuracy with memory; digits
guessed without the facts are right about one time in ten. ``--recall_style question`` asks
about the facts instead (``experiments.recall_data``'s questions, each ending with its answer's
number): whether the model still answers a question with the number it read. Writes
``recall_probe.json``.
"""
import argparse
import json
import os
import random

import numpy as np

from eval.models import add_model_arguments, encode, model_from_args
from experiments.recall_data import RECALL_STYLES, with_facts


def probe_documents(path, num_docs, chars, min_facts, max_facts, seed, field="text",
                    recall_style="repeat"):
    """``(text, length of the text before the recalled block)`` of the first documents."""
    rng = random.Random(seed)
    out = []
    with open(path) as f:
        for line in f:
            if len(out) >= num_docs:
                break
            text = json.loads(line)[field]
            if len(text) > chars:
                text = with_facts(text[:chars], rng, min_facts, max_facts, 0.1, recall_style)
                out.append((text, text.rfind("\n\n")))
    if not out:
        raise SystemExit(f"--data {path}: no document longer than --chars {chars}")
    return out


def recall_scores(model, tokenizer, docs):
    """``{variant: (mean loss of the recalled block, digit accuracy there)}``."""
    sums = {"with memory": [], "without memory": []}
    for text, cut in docs:
        start = len(encode(tokenizer, text[:cut]))
        ids = np.asarray(encode(tokenizer, text), np.int32)[None]
        targets = ids[0, start:]
        digits = np.array([tokenizer.decode([t]).strip().isdigit() for t in targets])
        for name, variant in (("with memory", model), ("without memory", model.without_memory())):
            losses, predictions = variant.score(ids)
            block = slice(start - 1, ids.shape[1] - 1)
            hits = predictions[0][block] == targets
            sums[name].append((float(losses[0][block].mean()), float(hits[digits].mean())))
    return {name: tuple(np.mean(values, axis=0).tolist()) for name, values in sums.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="held-out JSON lines of long documents")
    parser.add_argument("--num_docs", type=int, default=16)
    parser.add_argument("--chars", type=int, default=40000)
    parser.add_argument("--min_facts", type=int, default=4)
    parser.add_argument("--max_facts", type=int, default=8)
    parser.add_argument("--recall_style", default="repeat", choices=RECALL_STYLES,
                        help="the facts stated again (repeat) or asked about (question)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    docs = probe_documents(args.data, args.num_docs, args.chars, args.min_facts, args.max_facts,
                           args.seed, recall_style=args.recall_style)
    model, tokenizer = model_from_args(args)
    scores = recall_scores(model, tokenizer, docs)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "recall_probe.json")
    with open(path, "w") as f:
        json.dump(dict(model=args.load_checkpoint or args.hf_model, documents=len(docs),
                       chars=args.chars, recall_style=args.recall_style,
                       scores={k: dict(loss=v[0], digit_accuracy=v[1])
                               for k, v in scores.items()}), f, indent=2)
    for name, (loss, accuracy) in scores.items():
        print(f"{name:>15}: recalled-block loss {loss:.3f}, digit accuracy {accuracy:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
