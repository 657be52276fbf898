"""How far an uptraining's converted layers start from the layers they replace, one at a time.

    python -m experiments.conversion_probe --hf_model runs/smollm2/hf --attention_type supra \\
        --data runs/smollm2/data/heldout.jsonl --length 1024 --max_docs 4 \\
        --output_dir runs/smollm2/eval/supra/probe

``convert_hf_to_easylm --attention_type FAMILY`` turns every layer of a pretrained LLaMA into
a FAMILY layer.  A FoX layer starts computing what the softmax layer did; a SUPRA layer does
not (ReLU feature maps, a decay, a GroupNorm in place of the softmax denominator), and the
whole converted model can start near the uniform loss.  This probe says where that comes
from.  For every layer ``L`` of ``--layers`` (default: all) it converts the model with only
``L`` changed and reads ``--max_docs`` documents of ``--length`` tokens through it and
through the base model, in float32:

* ``loss``: the mean next-token loss with only ``L`` converted (the base model's beside it);
* ``rms_ratio``: the root mean square of ``L``'s attention output (what the layer adds to the
  residual stream, after ``wo``) over the base layer's, on the same input (the layers before
  ``L`` are the base model's);
* ``cosine``: the two outputs' cosine similarity, averaged over tokens.

Then the model with every layer converted (``loss_all_layers``).  Writes ``probe.json``,
``probe.md`` (the table) and ``probe.png`` (loss and output scale by layer) to
``--output_dir`` (other files there are left alone) and prints their paths.  Each layer costs
a forward pass of the documents and a conversion: on CPU about 20 s a layer for
SmolLM2-135M at 4 x 1024 tokens.
"""
import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from EasyLM import cli
from EasyLM.models.llama.convert_hf_to_easylm import Uptraining, check_hf_model, convert
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from EasyLM.tokenizer import load_tokenizer
from eval.loss_by_position import read_documents
from eval.models import _tokenizer_file
from eval.plots import plt

FAMILIES = ("supra", "forgetting")


def _forward(variables, config, docs, layer):
    """``(mean loss, attention output of layer ``layer`` [tokens, hidden] or None)`` of the
    documents, one at a time, float32."""
    model = FlaxLLaMAForCausalLMModule(config)
    wanted = None if layer is None else str(layer)

    def capture(module, method):
        # The attention module of decoder layer ``wanted`` (the blocks are named by index).
        return (wanted is not None and method == "__call__" and module.name == "attention"
                and module.parent is not None and module.parent.name == wanted)

    @jax.jit
    def run(tokens):
        out, state = model.apply(variables, tokens[None], capture_intermediates=capture)
        logp = jax.nn.log_softmax(out.logits[0, :-1].astype(jnp.float32))
        loss = -jnp.take_along_axis(logp, tokens[1:, None], axis=-1).sum()
        found = jax.tree_util.tree_leaves(state.get("intermediates", {}))
        return loss, (found[0][0] if found else jnp.zeros((0,)))

    total, count, outputs = 0.0, 0, []
    for doc in docs:
        loss, attended = run(jnp.asarray(doc))
        total += float(loss)
        count += len(doc) - 1
        if layer is not None:
            if attended.size == 0:
                raise RuntimeError(f"layer {layer}'s attention output was not found")
            outputs.append(np.asarray(attended, np.float64).reshape(-1, attended.shape[-1]))
    return total / count, (np.concatenate(outputs) if outputs else None)


def compare(converted, base):
    """``(rms ratio, mean cosine)`` of two ``[tokens, hidden]`` outputs."""
    rms = np.sqrt(np.mean(converted ** 2)) / np.sqrt(np.mean(base ** 2))
    norms = np.linalg.norm(converted, axis=-1) * np.linalg.norm(base, axis=-1)
    cosine = np.sum(converted * base, axis=-1) / np.maximum(norms, 1e-30)
    return float(rms), float(np.mean(cosine))


def probe(hf_dir, uptraining, docs, layers, progress=print):
    """The probe's result (see the module docstring) as a dict."""
    base_vars, config = convert(hf_dir)
    n = config.num_hidden_layers
    base_loss, _ = _forward(base_vars, config, docs, None)
    progress(f"base model: loss {base_loss:.4f}")
    rows = []
    for layer in layers:
        families = ["softmax"] * n
        families[layer] = uptraining.attention_type
        one = dataclasses.replace(uptraining, attention_type=tuple(families))
        variables, layer_config = convert(hf_dir, uptraining=one)
        loss, converted = _forward(variables, layer_config, docs, layer)
        _, original = _forward(base_vars, config, docs, layer)
        rms, cosine = compare(converted, original)
        rows.append(dict(layer=layer, loss=loss, rms_ratio=rms, cosine=cosine))
        progress(f"layer {layer}: loss {loss:.4f}, output rms x{rms:.3f}, cosine {cosine:.4f}")
    variables, all_config = convert(hf_dir, uptraining=uptraining)
    all_loss, _ = _forward(variables, all_config, docs, None)
    progress(f"every layer converted: loss {all_loss:.4f}")
    return dict(model=hf_dir, attention_type=uptraining.attention_type,
                num_docs=len(docs), length=int(len(docs[0])), base_loss=base_loss,
                loss_all_layers=all_loss, layers=rows)


def table(result):
    lines = [f"{result['attention_type']} conversion of {result['model']}, "
             f"{result['num_docs']} documents of {result['length']} tokens: base model "
             f"{result['base_loss']:.4f}, every layer converted "
             f"{result['loss_all_layers']:.4f}", "",
             "| layer converted | loss | output rms / base | cosine to base |",
             "| --- | --- | --- | --- |"]
    for row in result["layers"]:
        lines.append(f"| {row['layer']} | {row['loss']:.4f} | {row['rms_ratio']:.3f} | "
                     f"{row['cosine']:.4f} |")
    return "\n".join(lines) + "\n"


def write_table(path, result):
    with open(path, "w") as f:
        f.write(table(result))


def figure(path, result):
    layers = [row["layer"] for row in result["layers"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(layers, [row["loss"] for row in result["layers"]], marker="o",
             label="only this layer converted")
    top.axhline(result["base_loss"], color="C1", linestyle="--", label="base model")
    top.axhline(result["loss_all_layers"], color="C3", linestyle=":",
                label="every layer converted")
    top.set_ylabel("mean next-token loss")
    top.legend(fontsize=8)
    bottom.plot(layers, [row["rms_ratio"] for row in result["layers"]], marker="o",
                label="output rms / base")
    bottom.plot(layers, [row["cosine"] for row in result["layers"]], marker="s",
                label="cosine to base")
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_yscale("log")
    bottom.set_xlabel("layer")
    bottom.legend(fontsize=8)
    top.set_title(f"{result['attention_type']} conversion, one layer at a time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf_model", required=True, help="Hugging Face LLaMA directory")
    parser.add_argument("--attention_type", required=True, choices=FAMILIES)
    parser.add_argument("--forget_gate_bias", type=float, default=None,
                        help="forgetting: as convert_hf_to_easylm's")
    parser.add_argument("--forgetting_kv_shift", action="store_true",
                        help="forgetting: as convert_hf_to_easylm's")
    parser.add_argument("--tokenizer", default=None,
                        help="default: the tokenizer in --hf_model")
    parser.add_argument("--data", required=True, help="JSONL file of documents")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--length", type=cli.integer(2), default=1024,
                        help="tokens of each document (shorter ones are skipped)")
    parser.add_argument("--max_docs", type=cli.integer(1), default=4)
    parser.add_argument("--layers", type=cli.number_list(int, low=0), default=None,
                        help="comma list of layers to convert one at a time (default: all)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        cli.hf_model_directory("--hf_model", args.hf_model)
        cli.input_file("--data", args.data)
        cli.output_directory("--output_dir", args.output_dir)
        uptraining = Uptraining(args.attention_type, args.forget_gate_bias,
                                args.forgetting_kv_shift)
        check_hf_model(args.hf_model, None, uptraining)
        with open(f"{args.hf_model}/config.json") as f:
            num_layers = json.load(f)["num_hidden_layers"]
        layers = list(range(num_layers)) if args.layers is None else list(args.layers)
        bad = [layer for layer in layers if layer >= num_layers]
        if bad:
            raise cli.UsageError(f"--layers: {bad} out of range for a model of {num_layers} "
                                 f"layers (valid: 0..{num_layers - 1})")
        tokenizer_path = args.tokenizer or _tokenizer_file(args.hf_model)
        if tokenizer_path is None:
            raise cli.UsageError(f"--hf_model: {args.hf_model} holds no tokenizer; pass "
                                 f"--tokenizer")
        with cli.reading("--tokenizer", tokenizer_path):
            tokenizer = load_tokenizer({"vocab_file": tokenizer_path})
        docs = read_documents(args.data, tokenizer, args.text_field, args.length, args.length,
                              args.max_docs, too_short="lower --length")
        with cli.reading("--hf_model", args.hf_model):
            result = probe(args.hf_model, uptraining, docs, layers)
        cli.write_files(args.output_dir, {
            "probe.json": cli.json_writer(result),
            "probe.md": lambda path: write_table(path, result),
            "probe.png": lambda path: figure(path, result)})
        print(table(result), end="")


if __name__ == "__main__":
    main()
