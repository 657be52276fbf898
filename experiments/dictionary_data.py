"""Documents of the dictionary-lookup task (the FoT paper's synthetic retrieval task).

    python -m experiments.dictionary_data --output_dir runs/dictionary/data \\
        --window 256 --train_docs 80000 --eval_docs 2000

Every document is two local windows of ``W`` tokens, written as raw token ids with a
per-token loss mask (the text processor's ``{tokens:loss_mask}`` base64 fields,
``base64_token_dtype`` ``i2``; no tokenizer involved), all of it key/value pairs:

    window A   k1 v1 k2 v2 ... kP vP      the dictionary: P distinct keys, random values
               lookups: keys drawn from the P, each followed by its value ("near" lookups)
    window B   more lookups; the first lookup of each key in window B is a "far" lookup:
               its definition lies one window back, reachable only through memory

Keys are drawn from ``num_keys`` ids and values from ``num_values`` ids, so a value guessed
without the dictionary is right with probability ``1 / num_values``.  Only the values of
lookups carry loss (the mask is 0 on keys, which are random, and on the dictionary's values):
the loss is the task's, not noise, as in associative-recall benchmarks.  A small dictionary
(P = 16 by default) looked up about 8 times per window gives a model trained from scratch
many local examples of content-based recall to learn from; FoT training then has it do the
same recall through memory.

With ``doc_aware_k2`` and a row length of ``W``, each document fills exactly one pair of
rows: window A in row ``2j`` and window B in row ``2j + 1``, which reaches row ``2j`` (and,
with cross-batch range ``C > 1``, ``C - 1`` windows of other documents, the distractors)
through its memory layers.  ``eval.dictionary_lookup`` measures accuracy on the far lookups'
values with a growing memory of other documents in front.
"""
import argparse
import base64
import json
import os

import numpy as np

FIRST_ID = 3  # ids 0-2 stay the tokenizer's unk / BOS / EOS


def vocabulary(num_keys, num_values):
    """``(key ids, value ids, smallest vocabulary size)``."""
    keys = np.arange(FIRST_ID, FIRST_ID + num_keys)
    values = np.arange(keys[-1] + 1, keys[-1] + 1 + num_values)
    return keys, values, int(values[-1]) + 1


def make_document(rng, window, num_keys, num_values, pairs=16):
    """``tokens [2W]`` (int16) of one document (layout in the module docstring)."""
    if window % 2 or not 0 < 2 * pairs < window:
        raise ValueError(f"window={window} must be even and longer than the dictionary's "
                         f"{2 * pairs} tokens (pairs={pairs})")
    if pairs > num_keys:
        raise ValueError(f"num_keys={num_keys} is smaller than pairs={pairs}")
    key_ids, value_ids, _ = vocabulary(num_keys, num_values)
    keys = rng.choice(key_ids, size=pairs, replace=False)
    values = rng.choice(value_ids, size=pairs)
    lookups = rng.integers(0, pairs, size=window - pairs)  # W - P pairs fill both windows
    order = np.concatenate([np.arange(pairs), lookups])
    return np.stack([keys[order], values[order]], axis=1).reshape(-1).astype(np.int16)


def loss_mask(window, pairs=16):
    """``[2W]`` uint8: 1 on the values of lookups (everything after the dictionary)."""
    mask = np.zeros(2 * window, np.uint8)
    mask[2 * pairs + 1::2] = 1
    return mask


def far_lookups(docs, window):
    """``[num_docs, 2W]`` bool: the values of the first lookup of each key in window B."""
    docs = np.atleast_2d(docs)
    marks = np.zeros(docs.shape, bool)
    for doc, mark in zip(docs, marks):
        keys = doc[window::2]
        _, first = np.unique(keys, return_index=True)
        mark[window + 1 + 2 * first] = True
    return marks


def document_keys(doc):
    """The set of keys a document uses (its even positions)."""
    return np.unique(doc[0::2])


def encode_tokens(tokens, dtype=np.int16):
    return base64.b64encode(np.asarray(tokens, dtype).tobytes()).decode("ascii")


def decode_tokens(text):
    return np.frombuffer(base64.b64decode(text), np.int16).astype(np.int32)


def write_documents(path, num_docs, seed, window, num_keys, num_values, pairs):
    rng = np.random.default_rng(seed)
    mask = encode_tokens(loss_mask(window, pairs), np.uint8)
    with open(path, "w") as f:
        for _ in range(num_docs):
            tokens = make_document(rng, window, num_keys, num_values, pairs)
            f.write(json.dumps({"tokens": encode_tokens(tokens), "loss_mask": mask}) + "\n")


def read_documents(path, window, max_docs=None):
    """Token arrays ``[num_docs, 2W]`` of a file written by :func:`write_documents`."""
    docs = []
    with open(path) as f:
        for line in f:
            if max_docs is not None and len(docs) >= max_docs:
                break
            tokens = decode_tokens(json.loads(line)["tokens"])
            if len(tokens) != 2 * window:
                raise ValueError(f"{path}: a document of {len(tokens)} tokens; this task's "
                                 f"documents are 2 windows of {window} (check --window)")
            docs.append(tokens)
    return np.stack(docs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--window", type=int, default=256, help="local window W in tokens")
    parser.add_argument("--num_keys", type=int, default=4096)
    parser.add_argument("--num_values", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=16, help="dictionary size P")
    parser.add_argument("--train_docs", type=int, default=80000)
    parser.add_argument("--eval_docs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    # Different seeds: no held-out document appears in training.
    for name, count, seed in (("train", args.train_docs, args.seed),
                              ("eval", args.eval_docs, args.seed + 1)):
        write_documents(os.path.join(args.output_dir, f"{name}.jsonl"), count, seed,
                        args.window, args.num_keys, args.num_values, args.pairs)
    _, _, vocab = vocabulary(args.num_keys, args.num_values)
    with open(os.path.join(args.output_dir, "task.json"), "w") as f:
        json.dump(dict(vars(args), vocab_size=vocab), f, indent=2)
    print(f"wrote {args.train_docs} + {args.eval_docs} documents of {2 * args.window} tokens "
          f"to {args.output_dir} (token ids < {vocab})")


if __name__ == "__main__":
    main()
