"""Documents of the dictionary-lookup task (the FoT paper's synthetic retrieval task).

    python -m experiments.dictionary_data --output_dir runs/dictionary/data \\
        --window 256 --train_docs 80000 --eval_docs 2000

Every document is two local windows of ``W`` tokens, written as raw token ids (the text
processor's ``{tokens}`` base64 field, ``base64_token_dtype`` ``i2``; no tokenizer involved):

    window A   k1 v1 k2 v2 ... kP vP      the dictionary: P = W / 4 distinct keys, random values
               the P keys again, in another order, each followed by its value ("near" lookups)
    window B   the P keys in a third order with their values ("far" lookups: the definition
               lies in window A, one window back, reachable only through memory)
               the P keys in a fourth order with their values (answerable locally too)

Keys are drawn from ``num_keys`` ids and values from ``num_values`` ids, so a value guessed
without the dictionary is right with probability ``1 / num_values``.  With ``doc_aware_k2``
and a row length of ``W``, each document fills exactly one pair of rows: window A in row
``2j`` and window B in row ``2j + 1``, which reaches row ``2j`` (and, with cross-batch range
``C > 1``, ``C - 1`` windows of other documents, the distractors) through its memory layers.

The near lookups give a model trained from scratch a local induction task to learn first;
the far lookups are what only memory solves.  ``eval.dictionary_lookup`` measures accuracy
on the far lookups' values with a growing memory of other documents in front.
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


def make_document(rng, window, num_keys, num_values):
    """``(tokens [2W] int16, keys [P])`` of one document (layout in the module docstring)."""
    if window % 4:
        raise ValueError(f"window={window} must be a multiple of 4 (two halves of key/value "
                         f"pairs per window)")
    pairs = window // 4
    if pairs > num_keys:
        raise ValueError(f"num_keys={num_keys} is smaller than the {pairs} keys a window of "
                         f"{window} tokens needs")
    key_ids, value_ids, _ = vocabulary(num_keys, num_values)
    keys = rng.choice(key_ids, size=pairs, replace=False)
    values = rng.choice(value_ids, size=pairs)
    orders = [np.arange(pairs)] + [rng.permutation(pairs) for _ in range(3)]
    tokens = np.concatenate([np.stack([keys[o], values[o]], axis=1).reshape(-1)
                             for o in orders])
    return tokens.astype(np.int16), keys


def far_lookup_positions(window):
    """Positions (within a document) of the values of the far lookups: the first half of
    window B, every second token from ``W + 1``."""
    return window + 1 + 2 * np.arange(window // 4)


def encode_tokens(tokens):
    return base64.b64encode(np.asarray(tokens, np.int16).tobytes()).decode("ascii")


def decode_tokens(text):
    return np.frombuffer(base64.b64decode(text), np.int16).astype(np.int32)


def write_documents(path, num_docs, seed, window, num_keys, num_values):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(num_docs):
            tokens, _ = make_document(rng, window, num_keys, num_values)
            f.write(json.dumps({"tokens": encode_tokens(tokens)}) + "\n")


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
    parser.add_argument("--train_docs", type=int, default=80000)
    parser.add_argument("--eval_docs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    # Different seeds: no held-out document appears in training.
    for name, count, seed in (("train", args.train_docs, args.seed),
                              ("eval", args.eval_docs, args.seed + 1)):
        write_documents(os.path.join(args.output_dir, f"{name}.jsonl"), count, seed,
                        args.window, args.num_keys, args.num_values)
    _, _, vocab = vocabulary(args.num_keys, args.num_values)
    with open(os.path.join(args.output_dir, "task.json"), "w") as f:
        json.dump(dict(vars(args), vocab_size=vocab), f, indent=2)
    print(f"wrote {args.train_docs} + {args.eval_docs} documents of {2 * args.window} tokens "
          f"to {args.output_dir} (token ids < {vocab})")


if __name__ == "__main__":
    main()
