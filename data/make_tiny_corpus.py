"""Writes ``tiny_corpus.jsonl`` (training) and ``tiny_eval.jsonl`` (evaluation) for smoke runs.

Documents are assembled from the project-written paragraphs of ``tokenizers/corpus.txt``
(see ``tokenizers/train_tiny_tokenizer.py``) with a fixed seed: mostly short documents of
one sentence to a few paragraphs, and some long ones that span several training sequences, so
the doc-aware pipelines have something to keep together.  Each line is
``{"text": ..., "source_dataset": "stories" | "notes"}``.

    python data/make_tiny_corpus.py
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, os.pardir, "tokenizers", "corpus.txt")
SEED = 1122


def make_document(rng, paragraphs):
    shape = rng.random()
    if shape < 0.1:
        first_sentence = rng.choice(paragraphs).split(". ")[0].rstrip(".") + "."
        return first_sentence
    count = rng.randint(8, 24) if shape > 0.93 else rng.randint(1, 3)
    return "\n\n".join(rng.choice(paragraphs) for _ in range(count))


def write(path, documents):
    with open(path, "w", encoding="utf-8") as f:
        for text, source in documents:
            f.write(json.dumps({"text": text, "source_dataset": source}) + "\n")


def main():
    with open(CORPUS, encoding="utf-8") as f:
        paragraphs = [line.strip() for line in f if line.strip()]
    rng = random.Random(SEED)
    # Evaluation documents use paragraphs the training documents never contain.
    rng.shuffle(paragraphs)
    held_out, train = paragraphs[:20], paragraphs[20:]

    def documents(pool, count):
        return [(make_document(rng, pool), rng.choice(["stories", "notes"])) for _ in range(count)]

    write(os.path.join(HERE, "tiny_corpus.jsonl"), documents(train, 300))
    write(os.path.join(HERE, "tiny_eval.jsonl"), documents(held_out, 40))


if __name__ == "__main__":
    main()
