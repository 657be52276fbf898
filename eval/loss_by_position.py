"""Next-token loss of long documents as a function of position, with and without FoT memory.

    python -m eval.loss_by_position --load_checkpoint CHECKPOINT_DIR \\
        --tokenizer tokenizer.model --data docs.jsonl [--text_field text] --max_length 32768 \\
        --bucket_size 1024 --output_dir out/loss
    python -m eval.loss_by_position --hf_model EXPORTED_DIR --random_tokens --num_docs 4 ...

Documents (JSONL, one object per line) are tokenized with a leading BOS and cut to
``--max_length`` tokens; those shorter than ``--min_length`` are skipped.  The loss of the
token at position ``p`` (predicted from positions ``< p``) is averaged over documents within
buckets of ``--bucket_size`` positions, with memory and without.  ``--context_windows
1,4,16,64`` adds the model reading only the last ``m`` windows (its memory forgetting all but
the newest ``m - 1``), and the JSON gives each variant's mean loss over every token (with
``--last_context_length`` at the model's native context: the short-context retention of a
continued model against its base) and the loss and perplexity of the tokens past the first
window.  Writes ``loss_by_position.json`` and
``loss_by_position.png`` to ``--output_dir`` (other files there are left alone) and prints
their paths.
"""
import argparse
import json

import numpy as np
from tqdm import tqdm

from EasyLM import cli
from eval.models import add_model_arguments, encode, load_model_from_args, tokenizer_from_args
from eval.plots import loss_curves


def read_documents(path, tokenizer, text_field, max_length, min_length, max_docs,
                   too_short="lower --min_length"):
    """Token ids of the first ``max_docs`` documents with at least ``min_length`` tokens;
    ``too_short`` says what to change when there is none."""
    docs = []
    for text in _texts(path, text_field):
        if len(docs) >= max_docs:
            break
        ids = encode(tokenizer, text)[:max_length]
        if len(ids) >= min_length:
            docs.append(np.asarray(ids, np.int32))
    if not docs:
        raise cli.UsageError(f"--data: no document of {path} has {min_length}+ tokens in "
                             f"field {text_field!r}; {too_short} or check --text_field")
    return docs


def _texts(path, text_field):
    """The ``text_field`` of each line of a JSONL file; a line that has none is refused."""
    with open(path) as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    document = json.loads(line)
                except json.JSONDecodeError as error:
                    raise cli.UsageError(f"--data: line {number} of {path} is not JSON "
                                         f"({error}); give a JSONL file, one object a line"
                                         ) from None
                if not isinstance(document, dict) or text_field not in document:
                    raise cli.UsageError(f"--data: line {number} of {path} has no field "
                                         f"{text_field!r}; set --text_field to the field that "
                                         f"holds the text")
                yield document[text_field]
        except UnicodeDecodeError:
            raise cli.UsageError(f"--data: {path} is not a text file; give a JSONL file, one "
                                 f"object a line") from None


def random_documents(vocab_size, num_docs, length, seed):
    # Ids 0-2 are the usual unk/BOS/EOS; keep them out.
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, size=length, dtype=np.int32) for _ in range(num_docs)]


def bucket_means(losses_per_doc, bucket_size):
    """``(bucket starts, mean loss per bucket, token count per bucket)``; position ``p`` is the
    predicted token's (``p >= 1``)."""
    longest = max(len(l) for l in losses_per_doc) + 1
    num_buckets = -(-longest // bucket_size)
    totals, counts = np.zeros(num_buckets), np.zeros(num_buckets, np.int64)
    for losses in losses_per_doc:
        buckets = np.arange(1, len(losses) + 1) // bucket_size
        np.add.at(totals, buckets, losses)
        np.add.at(counts, buckets, 1)
    return np.arange(num_buckets) * bucket_size, totals / np.maximum(counts, 1), counts


def context_label(windows):
    return f"reads {windows} window" + ("s" if windows > 1 else "")


def loss_by_position(model, docs, bucket_size, context_windows=(), progress=True):
    """``(bucket starts, {label: mean loss per bucket}, token counts, {label: mean loss of
    the tokens past the first window}, {label: mean loss of every token})`` for the model
    with memory, without memory, and for each ``m`` of ``context_windows`` reading ``m``
    windows (its memory keeping only the newest ``m - 1``)."""
    window = model.last_context_length
    variants = [("with memory", model), ("without memory", model.without_memory())]
    if context_windows:
        if not hasattr(model, "with_memory_limit"):
            raise ValueError("--context_windows needs a toolkit checkpoint (--load_checkpoint): "
                             "the exported PyTorch model has no memory limit")
        variants += [(context_label(m), model.with_memory_limit((m - 1) * window))
                     for m in context_windows]
    curves, beyond, overall, counts = {}, {}, {}, None
    for label, runner in variants:
        losses = [runner.token_losses(doc[None])[0]
                  for doc in tqdm(docs, desc=label, disable=not progress)]
        positions, curves[label], counts = bucket_means(losses, bucket_size)
        # losses[i][p - 1] is the loss of token p; "past the first window" is p >= window.
        tail = np.concatenate([l[window - 1:] for l in losses])
        beyond[label] = float(tail.mean()) if tail.size else float("nan")
        overall[label] = float(np.concatenate(losses).mean())
    return positions, curves, counts, beyond, overall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="JSONL file of documents")
    data.add_argument("--random_tokens", action="store_true",
                      help="uniformly random token documents (a smoke test)")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--max_length", type=cli.integer(2), default=32768)
    parser.add_argument("--min_length", type=cli.integer(0), default=0,
                        help="skip shorter documents (default: keep all)")
    parser.add_argument("--max_docs", "--num_docs", dest="max_docs", type=cli.integer(1),
                        default=100)
    parser.add_argument("--bucket_size", type=cli.integer(1), default=1024)
    parser.add_argument("--context_windows", default=(), type=cli.number_list(int, low=1),
                        help="comma list of m: also measure the model reading m windows (a "
                             "memory of m - 1), e.g. 1,4,16,64 (toolkit checkpoints only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        if args.data is not None:
            cli.input_file("--data", args.data)
        if args.min_length > args.max_length:
            raise cli.UsageError(f"--min_length {args.min_length} is above --max_length "
                                 f"{args.max_length}: documents are cut to --max_length tokens, "
                                 f"so none could qualify; give --min_length {args.max_length} "
                                 f"for documents that fill every position")
        if args.context_windows and args.hf_model:
            raise cli.UsageError("--context_windows needs a toolkit checkpoint "
                                 "(--load_checkpoint): the exported PyTorch model has no "
                                 "memory limit")
        cli.output_directory("--output_dir", args.output_dir)
        tokenizer = tokenizer_from_args(args)
        if not args.random_tokens:  # a file that cannot work fails before the model loads
            docs = read_documents(args.data, tokenizer, args.text_field, args.max_length,
                                  args.min_length, args.max_docs)
        model = load_model_from_args(args)
        if args.random_tokens:
            docs = random_documents(model.vocab_size, args.max_docs, args.max_length, args.seed)
        positions, curves, counts, beyond, overall = loss_by_position(
            model, docs, args.bucket_size, args.context_windows)
        print(f"{'position':>10} {'with memory':>12} {'without':>9} {'tokens':>8}")
        for row in zip(positions, curves["with memory"], curves["without memory"], counts):
            print(f"{row[0]:>10} {row[1]:>12.4f} {row[2]:>9.4f} {row[3]:>8}")
        print(f"\n{'':<24} {'all tokens':>10} {'past the first window':>22} {'perplexity':>11}")
        for label, value in beyond.items():
            print(f"{label:<24} {overall[label]:>10.4f} {value:>22.4f} {np.exp(value):>11.3f}")
        result = dict(model=args.hf_model or args.load_checkpoint,
                      data="random tokens" if args.random_tokens else args.data,
                      num_docs=len(docs), last_context_length=model.last_context_length,
                      bucket_size=args.bucket_size, bucket_starts=positions.tolist(),
                      tokens_per_bucket=counts.tolist(),
                      **{label.replace(" ", "_"): values.tolist()
                         for label, values in curves.items()},
                      loss_all_tokens=overall, loss_past_first_window=beyond,
                      perplexity_past_first_window={label: float(np.exp(value))
                                                    for label, value in beyond.items()})
        cli.write_files(args.output_dir, {
            "loss_by_position.json": cli.json_writer(result),
            "loss_by_position.png": lambda path: loss_curves(
                path, positions, curves, f"loss by position ({len(docs)} documents)",
                model.last_context_length)})


if __name__ == "__main__":
    main()
