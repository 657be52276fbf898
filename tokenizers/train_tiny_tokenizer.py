"""Writes ``corpus.txt`` (project-written English prose) and trains ``tiny_sp.model`` on it.

The tiny SentencePiece model lets tests, benchmarks and ``configs/setup_test.json`` run
without downloading the LLaMA tokenizer.  It uses LLaMA's conventions: BPE, ``<unk>`` = 0,
``<s>`` = 1, ``</s>`` = 2, no pad piece, byte fallback, split digits, no normalisation.

The corpus is a few handwritten paragraphs plus paragraphs generated from sentence
templates with a fixed seed, one paragraph per line, so both files are reproducible:

    python tokenizers/train_tiny_tokenizer.py
"""
import os
import random

import sentencepiece as spm

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_SIZE = 512
SEED = 20261122
GENERATED_PARAGRAPHS = 180

HANDWRITTEN = [
    "The lighthouse keeper wrote the weather in a blue notebook every morning. Wind from the "
    "west, a thin rain, three fishing boats leaving before dawn. Nobody asked him to keep the "
    "record, but after forty years the notebook had become the only honest history of the bay.",
    "A long document is a patient thing. Its first page introduces a name that returns on the "
    "last page, and a reader who forgot the beginning cannot understand the end. Models that "
    "read long documents face the same problem, only with tokens instead of pages.",
    "Grandmother kept her recipes in a tin box: bread with walnuts, soup made from whatever the "
    "garden offered, and a plum cake that was never written down the same way twice.",
    "The train left the valley at seven minutes past nine. Through the window one could see "
    "orchards, a river swollen by the spring melt, and a village whose church bell rang twice "
    "as the last carriage crossed the bridge.",
    "To measure the speed of a pipeline, count the tokens it produces and divide by the time it "
    "took. Then measure again, because the first number is always a little optimistic.",
    "In the archive room the boxes were labelled by year, from 1901 to 1999, and the dust on "
    "each lid told how often anyone had cared about that particular decade.",
    "She planted tomatoes along the south wall, beans near the fence and a row of sunflowers "
    "that the sparrows visited every afternoon in late August.",
    "Good software is read far more often than it is written. Names should say what a thing "
    "is, comments should say why it is done that way, and tests should fail loudly when "
    "somebody breaks a promise the code made to its users.",
    "The expedition counted 214 birds on the first island, 87 on the second and none at all "
    "on the third, where the wind had scoured the rocks clean of every nest.",
    "When the power failed, the town library lit candles and kept reading aloud. Children sat "
    "on the carpet, parents leaned against the shelves, and the story went on until midnight.",
    "Questions are cheap and answers are expensive, said the old teacher, so ask many "
    "questions and check every answer twice before you believe it.",
    "The bakery opened at five. By six the queue reached the corner, and by seven the rye "
    "loaves were gone, leaving only rolls, a few croissants and the smell of warm flour.",
]

SUBJECTS = ["the old sailor", "a young engineer", "the village doctor", "my neighbour",
            "the research team", "a curious child", "the museum guide", "our teacher",
            "the night watchman", "a travelling musician", "the gardener", "the librarian",
            "the captain", "a tired student", "the baker", "the astronomer"]
VERBS = ["noticed", "remembered", "described", "repaired", "painted", "measured", "explained",
         "discovered", "carried", "questioned", "followed", "collected", "studied", "built"]
OBJECTS = ["the broken clock", "a map of the coast", "the strange signal", "an unfinished letter",
           "the river bridge", "a box of photographs", "the northern trail", "a forgotten song",
           "the data from the sensors", "a wooden boat", "the garden wall", "a list of numbers",
           "the evening sky", "an old radio", "the long report", "a basket of apples"]
PLACES = ["near the harbour", "in the mountains", "behind the station", "at the edge of town",
          "inside the laboratory", "under the old oak", "by the frozen lake", "in the market",
          "on the top floor", "across the valley", "beside the railway", "in the quiet library"]
TIMES = ["at dawn", "before the storm", "on a Sunday", "late in the evening", "in early spring",
         "after the meeting", "during the winter", "at noon", "the next morning", "in 1987",
         "last autumn", "every Tuesday"]
ADJECTIVES = ["quiet", "bright", "narrow", "ancient", "careful", "unexpected", "heavy", "gentle",
              "complicated", "simple", "distant", "warm", "cold", "patient", "noisy"]
CONNECTIVES = ["Later", "Meanwhile", "Afterwards", "Surprisingly", "Of course", "In the end",
               "For a while", "Nevertheless", "At first", "Once again"]
FEELINGS = ["glad", "worried", "curious", "surprised", "proud", "uncertain", "calm", "amused"]

TEMPLATES = [
    "{Subject} {verb} {object} {place} {time}.",
    "{Connective}, {subject} {verb} {object} and felt {feeling}.",
    "It was a {adjective} day {place}, and {subject} {verb} {object}.",
    "{Time}, {subject} {verb} {object} {place}.",
    "Nobody expected that {subject} would have {verb} {object} so quickly.",
    "{Subject} counted {number} steps from the door to {object}.",
    "\"Have you seen {object}?\" asked {subject}, looking {adjective} and {feeling}.",
    "The {adjective} path {place} led {subject} to {object}.",
    "According to the notes, {subject} {verb} {object} {number} times {time}.",
    "{Connective}, the {adjective} light {place} made everything look {adjective2}.",
    "If {subject} had not {verb} {object}, the story would have ended {place}.",
    "There were {number} reasons to stay {place}, and {subject} knew every one of them.",
]


def _sentence(rng):
    words = {
        "subject": rng.choice(SUBJECTS), "verb": rng.choice(VERBS), "object": rng.choice(OBJECTS),
        "place": rng.choice(PLACES), "time": rng.choice(TIMES), "feeling": rng.choice(FEELINGS),
        "adjective": rng.choice(ADJECTIVES), "adjective2": rng.choice(ADJECTIVES),
        "connective": rng.choice(CONNECTIVES), "number": str(rng.randint(2, 2000)),
    }
    words.update({key.capitalize(): value[0].upper() + value[1:] for key, value in words.items()})
    return rng.choice(TEMPLATES).format(**words)


def corpus_paragraphs(seed=SEED, count=GENERATED_PARAGRAPHS):
    """Handwritten paragraphs followed by ``count`` generated ones of 2-9 sentences."""
    rng = random.Random(seed)
    generated = [" ".join(_sentence(rng) for _ in range(rng.randint(2, 9))) for _ in range(count)]
    return HANDWRITTEN + generated


def main():
    corpus = os.path.join(HERE, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(corpus_paragraphs()) + "\n")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(HERE, "tiny_sp"), vocab_size=VOCAB_SIZE,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, num_threads=1, max_sentence_length=16384, minloglevel=2)
    os.remove(os.path.join(HERE, "tiny_sp.vocab"))


if __name__ == "__main__":
    main()
