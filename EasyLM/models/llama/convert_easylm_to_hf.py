"""Toolkit checkpoint -> a Hugging Face model directory.

    python -m EasyLM.models.llama.convert_easylm_to_hf --load_checkpoint CHECKPOINT_DIR \
        --output_dir DIR [--dtype fp32|bf16|fp16] [--tokenizer_path TOKENIZER] \
        [--last_context_length W] [--mem_attention_grouping HEADS,QUERIES] [--no_memory]

``CHECKPOINT_DIR`` is a run's ``RUN/checkpoints/step_<N>`` or a converted model (a
``params::`` or ``trainstate::`` prefix is optional; see :mod:`EasyLM.checkpoint`); the model
config comes from it.  A plain LLaMA becomes a ``LlamaForCausalLM``.  A FoT model (non-empty
``mem_layers``) becomes a ``FoTLlamaForCausalLM`` with memory: the modelling files of
:mod:`FoT.hf` are copied beside the weights and ``config.json`` maps the Auto classes to them,
so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it;
``--no_memory`` writes it as a plain ``LlamaForCausalLM`` instead (same tensors).  A model
with forgetting-attention (FoX) layers is always a ``FoTLlamaForCausalLM``, memory layers or
not: that class runs them (:func:`forgetting_fields`).  Weights are
written as safetensors shards of at most ``--max_shard_size`` bytes with an index, the
tokenizer (a SentencePiece ``.model`` file or a Hugging Face tokenizer directory) beside them.
The directory is written under a temporary name beside ``DIR`` and moved into place at the
end, so it appears whole; an earlier export at ``DIR`` is replaced, any other content refused.
:func:`export` is the extension point for other model classes: it takes the tensor stream
and the ``config.json`` contents separately.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch

from EasyLM import cli
from EasyLM.checkpoint import load_llama_config, load_params, parse_checkpoint_spec
from EasyLM.jax_utils import DTYPE_NAMES, dtype_name
from EasyLM.models.llama.attention import layer_attention_types
from EasyLM.models.llama.hf_layout import native_to_hf
from EasyLM.models.llama.llama_model import FORGETTING_SWITCHES
from EasyLM.models.llama.inference_window import default_window
from EasyLM.tokenizer import tokenizer_from_json
from FoT.hf import MODEL_FILES, fot_config_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")
# The longest input a FoT export declares.  Positions are relative to the local window and
# older tokens move to memory, so the model takes inputs of any length; transformers reads
# max_position_embeddings as that length (generate() warns past it and caps its default
# max_length there), so the trained context would be the wrong bound.
FOT_MAX_POSITION_EMBEDDINGS = 2 ** 31 - 1


def write_safetensors(tensors, output_dir, dtype="fp32", max_shard_size=5 * 2 ** 30):
    """Write ``(name, array)`` pairs as sharded safetensors with
    ``model.safetensors.index.json``."""
    from safetensors.torch import save_file
    torch_dtype = getattr(torch, dtype_name(dtype))
    shards, current, current_size = [], {}, 0

    def flush():
        nonlocal current, current_size
        if current:
            shards.append(current)
            name = f"shard-{len(shards):05d}.safetensors"
            save_file(current, os.path.join(output_dir, name), metadata={"format": "pt"})
            cli.set_open_mode(os.path.join(output_dir, name))
            shards[-1] = (name, list(current))
            current, current_size = {}, 0

    total = 0
    for name, array in tensors:
        tensor = torch.from_numpy(np.asarray(array, dtype=np.float32)).to(torch_dtype)
        size = tensor.numel() * tensor.element_size()
        if current and current_size + size > max_shard_size:
            flush()
        current[name] = tensor.contiguous()
        current_size += size
        total += size
    flush()
    if len(shards) == 1:
        os.rename(os.path.join(output_dir, shards[0][0]),
                  os.path.join(output_dir, "model.safetensors"))
        return
    renamed = {}
    for i, (old, names) in enumerate(shards, 1):
        new = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(output_dir, old), os.path.join(output_dir, new))
        renamed.update({n: new for n in names})
    with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": renamed}, f, indent=2)


def copy_tokenizer(tokenizer_path, output_dir):
    """Write the training tokenizer into the export so that it encodes exactly as training did.

    A Hugging Face directory is copied as it is, and a ``tokenizer.json`` is saved with the
    same special tokens training assumed (:func:`EasyLM.tokenizer.tokenizer_from_json`).  A
    SentencePiece model is shipped as ``tokenizer.model`` with
    :class:`FoT.hf.tokenization_sentencepiece_llama.SentencePieceLlamaTokenizer` as remote
    code: transformers' own conversion of it disagrees with sentencepiece on whitespace,
    normalisation and special-token strings in the text."""
    if os.path.isdir(tokenizer_path):
        copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_path, f))]
        if not copied:
            raise FileNotFoundError(f"{tokenizer_path} holds none of {TOKENIZER_FILES}")
        for name in copied:
            shutil.copyfile(os.path.join(tokenizer_path, name), os.path.join(output_dir, name))
        return
    if not os.path.exists(tokenizer_path):
        raise FileNotFoundError(f"tokenizer {tokenizer_path} does not exist")
    if tokenizer_path.endswith(".json"):
        tokenizer_from_json(tokenizer_path).save_pretrained(output_dir)
        return
    from FoT.hf.tokenization_sentencepiece_llama import SentencePieceLlamaTokenizer
    tokenizer = SentencePieceLlamaTokenizer(tokenizer_path)
    tokenizer.register_for_auto_class("AutoTokenizer")
    tokenizer.save_pretrained(output_dir)


def export(tensors, hf_config, output_dir, dtype="fp32", tokenizer_path=None,
           max_shard_size=5 * 2 ** 30, extra_files=()):
    """Write a Hugging Face model directory from a tensor stream and ``config.json`` dict.

    The directory appears whole or not at all (:func:`EasyLM.cli.written_directory`; an
    earlier one is replaced).  The tokenizer goes first: one that cannot be read fails before
    minutes of weights are written."""
    hf_config = dict(hf_config, torch_dtype=dtype_name(dtype))
    with cli.written_directory(output_dir) as tmp:
        if tokenizer_path:
            with cli.reading("--tokenizer_path", tokenizer_path):
                copy_tokenizer(tokenizer_path, tmp)
            _set_tokenizer_max_length(tmp, hf_config["max_position_embeddings"])
        write_safetensors(tensors, tmp, dtype, max_shard_size)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        for path in extra_files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))


def _set_tokenizer_max_length(output_dir, length):
    # The tokenizer warns about inputs longer than its model_max_length: make it the model's.
    path = os.path.join(output_dir, "tokenizer_config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        values = json.load(f)
    values["model_max_length"] = length
    with open(path, "w") as f:
        json.dump(values, f, indent=2)


def convert(load_checkpoint, output_dir, dtype="fp32", tokenizer_path=None,
            max_shard_size=5 * 2 ** 30, no_memory=False, **memory_options):
    """Export a checkpoint; ``memory_options`` (``last_context_length``,
    ``mem_attention_grouping``, ``mem_dtype``, ``mem_positionals``, ``torch_attention``,
    ``window_rule``, ``local_window_limit``) go to
    the config of a FoT model, whose ``last_context_length`` defaults to the row length the
    checkpoint's run trained on (else the model's ``max_sequence_length``)."""
    _, path = parse_checkpoint_spec(load_checkpoint)
    config = load_llama_config(path)
    hf_config, extra_files = config.to_hf_dict(), ()
    forgetting = forgetting_fields(config)
    if forgetting and no_memory:  # checked before the weights are read
        raise cli.UsageError("--no_memory: the model has forgetting-attention (FoX) or "
                             "linear attention layers, which LlamaForCausalLM cannot run; "
                             "export it without --no_memory (and load it with mem_layers=[] "
                             "to run its memory layers without memory)")
    if (config.mem_layers or forgetting) and not no_memory:
        options = {k: v for k, v in memory_options.items() if v is not None}
        options.setdefault("last_context_length", default_window(path, config))
        hf_config = dict(hf_config, max_position_embeddings=FOT_MAX_POSITION_EMBEDDINGS,
                         **forgetting)
        hf_config = fot_config_dict(hf_config, config.mem_layers, **options)
        extra_files = MODEL_FILES

    def tensors():  # read once the export writes weights: after the tokenizer is checked
        with cli.reading("--load_checkpoint", load_checkpoint):
            params = load_params(load_checkpoint)["params"]
        yield from native_to_hf(params, config)

    export(tensors(), hf_config, output_dir, dtype, tokenizer_path, max_shard_size,
           extra_files)
    return config


# The families only the FoT model class runs, and the config fields each exports.
EXPORTED_FAMILIES = {"forgetting": FORGETTING_SWITCHES, "supra": ("supra_use_rope",),
                     "gla": ("gla_gate_rank", "gla_gate_normaliser")}


def forgetting_fields(config):
    """The ``config.json`` fields of a model's forgetting-attention (FoX) and linear attention
    (SUPRA, GLA) layers (none without such layers, so that other exports stay as they were):
    the family of every layer (``mem_layers`` are FoT memory layers whatever their entry
    says, ``softmax`` here) and the fields of the families present.  Only the FoT model class
    runs these layers: such a model is exported as one even without memory layers, and runs
    in windows as the JAX ``WindowedLM`` does."""
    types = layer_attention_types(config)
    present = [family for family in EXPORTED_FAMILIES if family in types]
    if not present:
        return {}
    fields = {name: getattr(config, name) for family in present
              for name in EXPORTED_FAMILIES[family]}
    return dict(attention_type=[name if name in EXPORTED_FAMILIES else "softmax"
                                for name in types], **fields)


def is_export(directory):
    """Whether ``directory`` holds a Hugging Face model: a ``config.json`` and weights."""
    names = os.listdir(directory)
    return "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names)


def check_arguments(args):
    """Refuse, before the weights are read, a checkpoint, tokenizer or output directory that
    cannot work (:class:`EasyLM.cli.UsageError`)."""
    path, _ = cli.checkpoint_argument("--load_checkpoint", args.load_checkpoint)
    if args.tokenizer_path is not None:
        cli.input_path("--tokenizer_path", args.tokenizer_path)
        if os.path.isdir(args.tokenizer_path) and not any(
                os.path.exists(os.path.join(args.tokenizer_path, f)) for f in TOKENIZER_FILES):
            raise cli.UsageError(f"--tokenizer_path: {args.tokenizer_path} holds none of "
                                 f"{', '.join(TOKENIZER_FILES)}; give a tokenizer directory "
                                 f"or a SentencePiece .model file")
    output = os.path.abspath(args.output_dir)
    if "://" not in path and os.path.commonpath([output, path]) == output:
        raise cli.UsageError(f"--output_dir: {args.output_dir} holds the checkpoint being "
                             f"converted and would be replaced; choose another directory")
    cli.new_directory("--output_dir", args.output_dir,
                      replaces=("a Hugging Face model", is_export))


def _flag(text):
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load_checkpoint", required=True,
                        help="checkpoint directory: a run's RUN/checkpoints/step_<N> or a "
                             "converted model (params:: or trainstate:: prefix optional)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--tokenizer_path", default=None,
                        help="SentencePiece .model file or Hugging Face tokenizer directory")
    parser.add_argument("--max_shard_size", type=cli.integer(1), default=5 * 2 ** 30,
                        help="bytes per safetensors shard")
    memory = parser.add_argument_group("FoT memory (models with mem_layers)")
    memory.add_argument("--no_memory", action="store_true",
                        help="export as a plain LlamaForCausalLM, without memory")
    memory.add_argument("--last_context_length", type=cli.integer(1), default=None,
                        help="local context window in tokens (default: the training row "
                             "length of a run's checkpoint, else max_sequence_length)")
    memory.add_argument("--mem_attention_grouping", default=None,
                        type=cli.number_list(int, count=2, low=1),
                        help="HEADS,QUERIES processed at a time in memory layers")
    memory.add_argument("--mem_dtype", default=None, choices=sorted(DTYPE_NAMES.values()),
                        help="dtype of stored memory (default: the activation dtype)")
    memory.add_argument("--window_rule", default=None, choices=("aligned", "longllama"),
                        help="how inputs are cut into windows: aligned (default; causal, as "
                             "training sees windows) or longllama (the original LongLLaMA "
                             "code's rule, for models published with it)")
    memory.add_argument("--local_window_limit", type=cli.integer(1), default=None,
                        help="longllama rule: the most tokens the local window holds (the "
                             "original's max_position_embeddings; default "
                             "last_context_length)")
    memory.add_argument("--torch_attention", default=True, type=_flag,
                        help="use torch scaled_dot_product_attention (true/false)")
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        check_arguments(args)
        convert(args.load_checkpoint, args.output_dir, args.dtype, args.tokenizer_path,
                args.max_shard_size, no_memory=args.no_memory,
                last_context_length=args.last_context_length,
                mem_attention_grouping=args.mem_attention_grouping, mem_dtype=args.mem_dtype,
                torch_attention=args.torch_attention, window_rule=args.window_rule,
                local_window_limit=args.local_window_limit)
    print(f"wrote {os.path.abspath(args.output_dir)}")


if __name__ == "__main__":
    main()
