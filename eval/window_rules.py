"""Which window rule reads a long prompt best: next-token loss of a continuation generated
token by token after the prompt, under each rule of the exported PyTorch FoT model.

    python -m eval.window_rules --hf_model EXPORTED_DIR --data docs.jsonl \\
        --prompt_windows 16 --offsets 1,256 --continuation 512 --output_dir out/rules

For each held-out document (long enough), the first ``P = prompt_windows * W + offset``
tokens are fed as one prompt, then the next ``--continuation`` tokens one at a time through
the cache, as generation reads them (teacher forcing: the true next token is fed).  Rules
(``windows_fot_llama``): ``aligned`` (the default: causal, windows at multiples of ``W`` as in
training), ``longllama`` with ``local_window_limit`` ``W`` and ``2W`` (the original LongLLaMA
code's rule: the prompt's last ``W`` tokens form its final window).  Documents are the rows
of one batch.  Writes ``window_rules.json`` (mean loss per rule and offset, and by
continuation position) and ``window_rules.png`` to ``--output_dir`` (other files there are
left alone) and prints their paths.
"""
import argparse

import numpy as np
import torch
from tqdm import tqdm

from EasyLM import cli
from eval.loss_by_position import read_documents
from eval.models import add_model_arguments, model_from_args
from eval.plots import loss_curves
from FoT.hf.cache_fot_llama import FoTCache

RULES = {"aligned": ("aligned", None), "longllama (limit W)": ("longllama", 1),
         "longllama (limit 2W)": ("longllama", 2)}


def continuation_losses(model, docs, prompt, continuation, rule, limit):
    """``[docs, continuation]`` losses of tokens ``prompt .. prompt + continuation - 1``."""
    config = model.model.config
    config.window_rule = rule
    config.local_window_limit = limit and limit * config.last_context_length
    ids = torch.as_tensor(np.stack([d[:prompt + continuation] for d in docs]),
                          device=model.device)
    cache, losses = FoTCache(config), []
    with torch.no_grad():
        logits = model.model(ids[:, :prompt], past_key_values=cache, logits_to_keep=1).logits
        for t in range(prompt, prompt + continuation):
            logp = torch.log_softmax(logits[:, -1].float(), -1)
            losses.append(-logp.gather(1, ids[:, t:t + 1])[:, 0].cpu().numpy())
            logits = model.model(ids[:, t:t + 1], past_key_values=cache).logits
    return np.stack(losses, axis=1)


def rule_losses(model, docs, prompt_windows, offsets, continuation):
    """``({rule: {offset: mean loss}}, {curve label: mean loss by continuation position})``
    of prompts of ``prompt_windows`` windows and each offset."""
    window = model.last_context_length
    results, curves = {}, {}
    cases = [(label, offset) for offset in offsets for label in RULES]
    for label, offset in tqdm(cases, desc="rules"):
        prompt = prompt_windows * window + offset
        losses = continuation_losses(model, docs, prompt, continuation, *RULES[label])
        results.setdefault(label, {})[str(offset)] = float(losses.mean())
        curves[f"{label}, prompt {prompt}"] = losses.mean(axis=0)
    return results, curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="JSONL file of documents")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--max_docs", type=cli.integer(1), default=16)
    parser.add_argument("--prompt_windows", type=cli.integer(1), default=16)
    parser.add_argument("--offsets", default="1,256", type=cli.number_list(int, low=0),
                        help="comma list: prompt lengths past the last whole window")
    parser.add_argument("--continuation", type=cli.integer(1), default=512)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if args.hf_model is None:
        parser.error("--hf_model is required: the rules are options of the exported model")
    with cli.user_errors(parser.prog):
        cli.input_file("--data", args.data)
        if cli.hf_model_directory("--hf_model", args.hf_model).get("model_type") != "fot_llama":
            raise cli.UsageError(f"--hf_model: {args.hf_model} is a plain LLaMA export; the "
                                 f"rules are those of a FoT export (convert_easylm_to_hf "
                                 f"without --no_memory)")
        cli.output_directory("--output_dir", args.output_dir)
        model, tokenizer = model_from_args(args)
        window = model.last_context_length
        longest = args.prompt_windows * window + max(args.offsets) + args.continuation
        docs = read_documents(args.data, tokenizer, args.text_field, longest, longest,
                              args.max_docs, too_short="lower --prompt_windows, --offsets or "
                                                       "--continuation")
        results, curves = rule_losses(model, docs, args.prompt_windows, args.offsets,
                                      args.continuation)
        print(f"{'rule':>22} " + " ".join(f"{'offset ' + str(o):>11}" for o in args.offsets))
        for label, by_offset in results.items():
            print(f"{label:>22} " + " ".join(f"{by_offset[str(o)]:>11.4f}"
                                             for o in args.offsets))
        result = dict(model=args.hf_model, data=args.data, num_docs=len(docs),
                      last_context_length=window, prompt_windows=args.prompt_windows,
                      continuation=args.continuation, mean_loss=results,
                      loss_by_position={k: v.tolist() for k, v in curves.items()})
        cli.write_files(args.output_dir, {
            "window_rules.json": cli.json_writer(result),
            "window_rules.png": lambda path: loss_curves(
                path, np.arange(args.continuation), curves,
                f"continuation loss after the prompt ({len(docs)} documents)", window)})


if __name__ == "__main__":
    main()
