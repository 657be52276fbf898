"""Training documents that reward reading far back: real files with short statements of fact
inserted, repeated at the end of the file.

    python -m experiments.recall_data --input runs/smollm2/data/train.jsonl \\
        --output runs/smollm2/data/train_recall.jsonl --fraction 0.3

Language modelling on ordinary files rarely needs an exact fact from thousands of tokens back,
so a model continued on them for a few hundred million tokens learns little retrieval through
its memory layers. This mixes in the missing signal: each document of ``--input`` is, with
probability ``--fraction``, copied with ``--min_facts`` to ``--max_facts`` statements such as
``The serial number of Tavoren is 48213.`` inserted at random line breaks of its first part,
and the same statements appended at its end in a shuffled order, so predicting the numbers at
the end needs the text far before them. Everything else is the file as it was; the other
documents pass through unchanged, in their order.

``--chunk_chars N`` first cuts every document at line breaks into pieces of at most N
characters, each a document of its own. The distance between a statement and its recall is then
bounded by the piece: with pieces of about the cross-batch span a training row group covers
(rows x window tokens), the memory layers see most statements and their recalls in one group,
so every recalled number is a training signal for retrieval through memory rather than for
guessing.

``--recall_style`` says how a fact comes back at the end: ``repeat`` (the statement again, word
for word), ``question`` (a question about it followed by its answer, e.g. ``Which order number
does Tavoren have? Tavoren has order number 48213.``) or ``mixed`` (either, half and half). A
model continued on source files alone stops answering questions with the numbers it read;
the questions keep that habit in the training signal.

The statements and questions use their own wording and numbers of 3 to 7 digits; nothing in
them is shaped like the passkey prompt of ``eval.passkey`` (no "pass key", no "Remember it",
no filler text), so a passkey result after this training is a transfer, not a rehearsal.
Writes the mixed JSON lines (atomically) and prints how many documents carry facts.
"""
import argparse
import json
import os
import random

THINGS = ("serial number", "room number", "account id", "order number", "access code",
          "ticket number", "badge id", "locker code", "invoice number", "batch number")
STATEMENTS = ("The {thing} of {name} is {value}.", "{name} has {thing} {value}.",
              "Note: the {thing} for {name} is {value}.")
# A question about a fact, then its answer (the number last, as a reader answering would end).
QUESTIONS = ("What is the {thing} of {name}? The {thing} of {name} is {value}.",
             "Which {thing} does {name} have? {name} has {thing} {value}.",
             "Question: the {thing} for {name}? Answer: {value}.")
RECALL_STYLES = ("repeat", "question", "mixed")
SYLLABLES = ("ka", "ren", "to", "vo", "mi", "sal", "dor", "en", "qua", "li", "bar", "tek",
             "os", "ni", "vel", "ra", "gun", "zi", "fe", "mar")


def random_name(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


def facts(rng, count, recall_style="repeat"):
    """``count`` facts with distinct names, each ``(statement, recall)``: the statement
    inserted in the text and what comes back at the end (:data:`RECALL_STYLES`)."""
    if recall_style not in RECALL_STYLES:
        raise ValueError(f"recall_style {recall_style!r}: expected one of {RECALL_STYLES}")
    names, out = set(), []
    while len(out) < count:
        name = random_name(rng)
        if name in names:
            continue
        names.add(name)
        digits = rng.randint(3, 7)  # the draws in recipe v3's order: its data stays the same
        value = rng.randint(10 ** (digits - 1), 10 ** digits - 1)
        template = rng.choice(STATEMENTS)
        fields = dict(thing=rng.choice(THINGS), name=name, value=value)
        statement = template.format(**fields)
        ask = recall_style == "question" or (recall_style == "mixed" and rng.random() < 0.5)
        out.append((statement, rng.choice(QUESTIONS).format(**fields) if ask else statement))
    return out


def with_facts(text, rng, min_facts, max_facts, recall_share, recall_style="repeat"):
    """``text`` with statements inserted at line breaks of its first ``1 - recall_share`` and
    recalled, shuffled, after it."""
    lines = text.split("\n")
    head = max(1, int(len(lines) * (1 - recall_share)))
    chosen = facts(rng, rng.randint(min_facts, max_facts), recall_style)
    places = sorted(rng.randrange(head) for _ in chosen)
    for offset, (place, (statement, _)) in enumerate(zip(places, chosen)):
        lines.insert(place + offset, statement)
    recalled = [recall for _, recall in chosen]
    rng.shuffle(recalled)
    return "\n".join(lines) + "\n\n" + "\n".join(recalled) + "\n"


def pieces(text, chunk_chars):
    """``text`` cut at line breaks into pieces of at most ``chunk_chars`` characters (a single
    longer line is a piece of its own); 0 keeps it whole."""
    if not chunk_chars or len(text) <= chunk_chars:
        return [text]
    out, current, size = [], [], 0
    for line in text.split("\n"):
        if current and size + len(line) + 1 > chunk_chars:
            out.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    out.append("\n".join(current))
    return out


def mix(input_path, output_path, fraction, min_facts, max_facts, recall_share, min_chars, seed,
        field="text", chunk_chars=0, recall_style="repeat"):
    """Write the mixed file; returns ``(documents, documents with facts)``."""
    rng = random.Random(seed)
    total = changed = 0
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    temporary = f"{output_path}.tmp-{os.getpid()}"
    with open(input_path) as source, open(temporary, "w") as out:
        for line in source:
            record = json.loads(line)
            for text in pieces(record[field], chunk_chars):
                if len(text) >= min_chars and rng.random() < fraction:
                    text = with_facts(text, rng, min_facts, max_facts, recall_share,
                                      recall_style)
                    changed += 1
                out.write(json.dumps(dict(record, **{field: text})) + "\n")
                total += 1
    os.replace(temporary, output_path)
    return total, changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="JSON lines of documents")
    parser.add_argument("--output", required=True)
    parser.add_argument("--field", default="text")
    parser.add_argument("--fraction", type=float, default=0.3,
                        help="share of the documents that get facts")
    parser.add_argument("--min_facts", type=int, default=1)
    parser.add_argument("--max_facts", type=int, default=8)
    parser.add_argument("--recall_share", type=float, default=0.1,
                        help="final share of a document's lines where no fact is inserted")
    parser.add_argument("--min_chars", type=int, default=6000,
                        help="documents shorter than this stay as they are")
    parser.add_argument("--chunk_chars", type=int, default=0,
                        help="cut documents at line breaks into pieces of at most this many "
                             "characters first (0: keep them whole)")
    parser.add_argument("--recall_style", default="repeat", choices=RECALL_STYLES,
                        help="how facts come back at the end: the statement again, a question "
                             "and its answer, or either")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        parser.error(f"--input {args.input}: no such file")
    if not 0 <= args.fraction <= 1 or not 0 < args.recall_share < 1:
        parser.error("--fraction must be in [0, 1] and --recall_share in (0, 1)")
    if not 1 <= args.min_facts <= args.max_facts:
        parser.error("need 1 <= --min_facts <= --max_facts")
    if args.chunk_chars < 0:
        parser.error("--chunk_chars must be >= 0")
    total, changed = mix(args.input, args.output, args.fraction, args.min_facts, args.max_facts,
                         args.recall_share, args.min_chars, args.seed, args.field,
                         args.chunk_chars, args.recall_style)
    print(f"{args.output}: {total} documents, {changed} with facts")


if __name__ == "__main__":
    main()
