"""Hugging Face LLaMA directory -> toolkit checkpoint that ``load_checkpoint=params::PATH`` reads.

    python -m EasyLM.models.llama.convert_hf_to_easylm --hf_model DIR --output PATH \
        [--mem_layers 6,12,18] [--param_dtype fp32|bf16]
    python -m EasyLM.models.llama.convert_hf_to_easylm --gguf FILE --output PATH \
        [--tokenizer_output DIR] [--hf_output DIR] [--mem_layers ...] [--param_dtype ...]

Reads LLaMA-family directories (``LlamaForCausalLM``), this toolkit's FoT exports and
published LongLLaMA checkpoints (``model_type "longllama"``: their memory layers, window
``last_context_length`` and RoPE base carry over; ``mem_positionals=false`` is refused).
Tensors are streamed one at a time from safetensors (memory-mapped) or ``.bin`` shards, so
the converted model is held in memory once.  The model config travels with the checkpoint,
which appears at ``--output`` (new, or an empty directory) whole when it is written.
``--gguf`` reads a LLaMA from a GGUF file (llama.cpp's format) instead, through transformers
(:mod:`EasyLM.models.llama.gguf_import`); its tokenizer, byte-level BPE or SentencePiece, goes
to ``--tokenizer_output`` as a Hugging Face tokenizer directory (what ``tokenizer.vocab_file``
and the evaluations' ``--tokenizer`` take), and ``--hf_output`` writes the whole model as a
Hugging Face directory (float32) as well.
"""
import argparse
import glob
import json
import os

import torch
from tqdm import tqdm

from EasyLM import cli
from EasyLM.checkpoint import save_params
from EasyLM.jax_utils import DTYPE_NAMES, float_dtype
from EasyLM.models.llama import gguf_import
from EasyLM.models.llama.hf_layout import hf_to_native, insert
from EasyLM.models.llama.llama_model import LLaMAConfig


def iterate_hf_tensors(hf_dir):
    """Yield ``(name, float32 numpy array)`` for every tensor of a HF checkpoint directory."""
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if files:
        from safetensors import safe_open
        for path in files:
            with safe_open(path, framework="pt") as shard:
                for name in shard.keys():
                    yield name, shard.get_tensor(name).to(torch.float32).numpy()
        return
    files = sorted(glob.glob(os.path.join(hf_dir, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"{hf_dir} holds no *.safetensors or pytorch_model*.bin files")
    for path in files:
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        for name in list(shard):
            yield name, shard.pop(name).to(torch.float32).numpy()


def convert(hf_dir, mem_layers=None, param_dtype="fp32"):
    """``(variables, LLaMAConfig)`` for the HF model in ``hf_dir``."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    with open(config_path) as f:
        hf_config = json.load(f)
    return convert_tensors(hf_config, iterate_hf_tensors(hf_dir), mem_layers, param_dtype)


def convert_gguf(path, mem_layers=None, param_dtype="fp32", tokenizer_output=None,
                 hf_output=None):
    """``(variables, LLaMAConfig)`` for the LLaMA in GGUF file ``path``; writes its tokenizer
    directory to ``tokenizer_output`` and its Hugging Face directory to ``hf_output`` when
    given (replacing earlier ones).  A file that cannot work raises
    ``gguf_import.GGUFError``."""
    model, tokenizer = gguf_import.load(path)
    if hf_output:
        gguf_import.save_hf_directory(model, tokenizer, hf_output)
    if tokenizer_output:
        gguf_import.save_tokenizer(tokenizer, tokenizer_output)
    hf_config, tensors = gguf_import.config_and_tensors(model)
    return convert_tensors(hf_config, tensors, mem_layers, param_dtype)


def convert_tensors(hf_config, tensors, mem_layers=None, param_dtype="fp32"):
    """``(variables, LLaMAConfig)`` of a ``config.json`` dict and its ``(name, array)`` stream."""
    overrides = {} if mem_layers is None else {"mem_layers": tuple(mem_layers)}
    config = LLaMAConfig.from_hf_config(hf_config, **overrides)
    params = {}
    for name, tensor in tqdm(tensors, desc="converting", unit="tensor"):
        converted = hf_to_native(name, tensor, config)
        if converted is None:
            continue
        path, array = converted
        array = array.astype(float_dtype(param_dtype))
        insert(params, path, array)
    _check_complete(params, config)
    return {"params": params}, config


def _check_complete(params, config):
    missing = []
    layers = params.get("transformer", {}).get("h", {})
    for i in range(config.num_hidden_layers):
        if str(i) not in layers:
            missing.append(f"layer {i}")
    if "wte" not in params.get("transformer", {}):
        missing.append("embed_tokens")
    if not config.tie_word_embeddings and "lm_head" not in params:
        missing.append("lm_head (config says the head is not tied)")
    if missing:
        raise ValueError(f"Hugging Face checkpoint is incomplete: missing {missing}")


def parse_mem_layers(text):
    """``"6,12,18"`` -> ``[6, 12, 18]`` (``""``: no memory layers); also ``--mem_layers``'s
    argparse type."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, e.g. "
                                         f"6,12,18, got {text!r}") from None


def check_hf_model(hf_dir, mem_layers):
    """Refuse, before any tensor is read, a ``--hf_model`` directory without a config and
    weights, a config this toolkit cannot convert and ``--mem_layers`` it does not have."""
    hf_config = cli.hf_model_directory("--hf_model", hf_dir)
    layers = hf_config.get("num_hidden_layers")
    bad = [i for i in mem_layers or () if layers is not None and not 0 <= i < layers]
    if bad:
        raise cli.UsageError(f"--mem_layers: {bad} out of range: the model has {layers} "
                             f"layers, 0 to {layers - 1}")
    try:
        LLaMAConfig.from_hf_config(hf_config, **({} if mem_layers is None
                                                 else {"mem_layers": tuple(mem_layers)}))
    except (ValueError, KeyError, TypeError) as error:
        raise cli.UsageError(f"--hf_model: {hf_dir}/config.json: {error}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf_model", help="Hugging Face LLaMA directory")
    source.add_argument("--gguf", help="GGUF file of a LLaMA model (llama.cpp's format; "
                        "quantized tensors are dequantized)")
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("--mem_layers", default=None, type=parse_mem_layers,
                        help="comma-separated FoT memory layer indices, e.g. 6,12,18")
    parser.add_argument("--param_dtype", default="fp32", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--tokenizer_output", help="with --gguf: write the file's tokenizer "
                        "here, a Hugging Face tokenizer directory for tokenizer.vocab_file")
    parser.add_argument("--hf_output", help="with --gguf: also write the model here as a "
                        "Hugging Face directory (float32, with the tokenizer)")
    args = parser.parse_args(argv)
    if not args.gguf and (args.tokenizer_output or args.hf_output):
        parser.error("--tokenizer_output and --hf_output go with --gguf")
    with cli.user_errors(parser.prog, gguf_import.GGUFError):
        cli.new_directory("--output", args.output)
        if args.gguf:
            for flag in ("--tokenizer_output", "--hf_output"):
                if getattr(args, flag[2:]):
                    cli.new_directory(flag, getattr(args, flag[2:]))
            variables, config = convert_gguf(args.gguf, args.mem_layers, args.param_dtype,
                                             args.tokenizer_output, args.hf_output)
        else:
            check_hf_model(args.hf_model, args.mem_layers)
            with cli.reading("--hf_model", args.hf_model):
                variables, config = convert(args.hf_model, args.mem_layers, args.param_dtype)
        with cli.written_directory(args.output) as tmp:
            save_params(tmp, variables, config)
    print(f"wrote params::{os.path.abspath(args.output)} "
          f"({config.num_hidden_layers} layers, mem_layers={list(config.mem_layers)})")


if __name__ == "__main__":
    main()
