"""Passkey retrieval, as LongLLaMA reports it, over a grid of prompt lengths and depths.

A 5-digit passkey sentence is hidden at a given depth of repeated filler text; the model must
generate the digits after "What is the pass key? The pass key is" (greedy decoding).

    python -m eval.passkey --load_checkpoint CHECKPOINT_DIR --tokenizer tokenizer.model \\
        --lengths 2048,8192,32768 --depths 0,0.25,0.5,0.75,1 --trials 5 --output_dir out/passkey
    python -m eval.passkey --hf_model EXPORTED_DIR --lengths ... [--no_memory]

``CHECKPOINT_DIR`` is a run's ``RUN/checkpoints/step_<N>`` or a converted model.

Prints accuracy per length, writes ``passkey.json`` and ``passkey.png`` (accuracy heat map)
to ``--output_dir`` (other files there are left alone) and prints their paths.
"""
import argparse
import re

import numpy as np
from tqdm import tqdm

from EasyLM import cli
from eval.models import add_model_arguments, encode, model_from_args
from eval.plots import accuracy_heatmap

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize them. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def needle(passkey):
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def prompt_text(fillers, depth, passkey):
    """The prompt with ``fillers`` filler repetitions, ``depth`` (0..1) of them before the
    needle."""
    before = round(depth * fillers)
    return "\n".join([TASK, " ".join([FILLER] * before), needle(passkey),
                      " ".join([FILLER] * (fillers - before)), QUESTION])


def build_prompt(tokenizer, length, depth, passkey):
    """Token ids of a prompt of about ``length`` tokens (whole filler repetitions)."""
    base = len(encode(tokenizer, prompt_text(0, depth, passkey)))
    per_filler = len(encode(tokenizer, FILLER + " ", bos=False))
    fillers = max(0, round((length - base) / per_filler))
    return encode(tokenizer, prompt_text(fillers, depth, passkey))


def is_correct(generated_text, passkey):
    """Whether the first number the model wrote is the passkey."""
    match = re.search(r"\d+", generated_text)
    return match is not None and match.group() == str(passkey)


def run_passkey(model, tokenizer, lengths, depths, trials=1, seed=0, progress=True):
    """Accuracy ``[len(lengths)][len(depths)]`` and per-trial records."""
    rng = np.random.default_rng(seed)
    accuracy = np.zeros((len(lengths), len(depths)))
    records = []
    cells = [(i, j) for i in range(len(lengths)) for j in range(len(depths))]
    bar = tqdm(total=len(cells) * trials, disable=not progress, desc="passkey")
    for i, j in cells:
        for _ in range(trials):
            passkey = int(rng.integers(10000, 100000))
            prompt = build_prompt(tokenizer, lengths[i], depths[j], passkey)
            answer_tokens = len(encode(tokenizer, f" {passkey}.", bos=False))
            generated = model.generate(np.asarray([prompt]), answer_tokens + 2)[0]
            answer = tokenizer.decode(generated)
            correct = is_correct(answer, passkey)
            accuracy[i, j] += correct / trials
            records.append(dict(length=lengths[i], prompt_tokens=len(prompt), depth=depths[j],
                                passkey=passkey, answer=answer, answer_ids=generated.tolist(),
                                correct=bool(correct)))
            bar.update()
        if j == len(depths) - 1:
            bar.write(f"length {lengths[i]:>8}: accuracy {accuracy[i].mean():.3f}")
    bar.close()
    return accuracy, records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--lengths", default="1024,2048,4096", type=cli.number_list(int, low=1),
                        help="prompt lengths in tokens")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                        type=cli.number_list(float, low=0, high=1),
                        help="fractions of the filler before the passkey")
    parser.add_argument("--trials", type=cli.integer(1), default=3,
                        help="passkeys per (length, depth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_memory", action="store_true",
                        help="run memory layers as ordinary local layers (baseline)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        cli.output_directory("--output_dir", args.output_dir)
        model, tokenizer = model_from_args(args, use_memory=not args.no_memory)
        accuracy, records = run_passkey(model, tokenizer, args.lengths, args.depths,
                                        args.trials, args.seed)
        print(f"{'length':>10} {'accuracy':>9}")
        for length, value in zip(args.lengths, accuracy.mean(axis=1)):
            print(f"{length:>10} {value:>9.3f}")
        memory = "without memory" if args.no_memory else "with memory"
        result = dict(model=args.hf_model or args.load_checkpoint, use_memory=not args.no_memory,
                      last_context_length=model.last_context_length, lengths=args.lengths,
                      depths=args.depths, trials=args.trials, accuracy=accuracy.tolist(),
                      accuracy_by_length=dict(zip(map(str, args.lengths),
                                                  accuracy.mean(axis=1).tolist())),
                      results=records)
        cli.write_files(args.output_dir, {
            "passkey.json": cli.json_writer(result),
            "passkey.png": lambda path: accuracy_heatmap(
                path, accuracy, args.lengths, args.depths,
                f"passkey retrieval, {memory}, window {model.last_context_length}")})


if __name__ == "__main__":
    main()
