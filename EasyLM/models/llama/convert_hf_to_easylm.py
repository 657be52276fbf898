"""Hugging Face LLaMA directory -> toolkit checkpoint that ``load_checkpoint=params::PATH`` reads.

    python -m EasyLM.models.llama.convert_hf_to_easylm --hf_model DIR --output PATH \
        [--mem_layers 6,12,18] [--param_dtype fp32|bf16]

Reads LLaMA-family directories (``LlamaForCausalLM``), this toolkit's FoT exports and
published LongLLaMA checkpoints (``model_type "longllama"``: their memory layers, window
``last_context_length`` and RoPE base carry over; ``mem_positionals=false`` is refused).
Tensors are streamed one at a time from safetensors (memory-mapped) or ``.bin`` shards, so
the converted model is held in memory once.  The model config travels with the checkpoint.
"""
import argparse
import glob
import json
import os

import torch
from tqdm import tqdm

from EasyLM.checkpoint import save_params
from EasyLM.jax_utils import DTYPE_NAMES, float_dtype
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
    overrides = {} if mem_layers is None else {"mem_layers": tuple(mem_layers)}
    config = LLaMAConfig.from_hf_config(hf_config, **overrides)
    params = {}
    for name, tensor in tqdm(iterate_hf_tensors(hf_dir), desc="converting", unit="tensor"):
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
    if text is None:
        return None
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf_model", required=True, help="Hugging Face LLaMA directory")
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("--mem_layers", default=None,
                        help="comma-separated FoT memory layer indices, e.g. 6,12,18")
    parser.add_argument("--param_dtype", default="fp32", choices=sorted(DTYPE_NAMES))
    args = parser.parse_args(argv)
    variables, config = convert(args.hf_model, parse_mem_layers(args.mem_layers),
                                args.param_dtype)
    save_params(args.output, variables, config)
    print(f"wrote params::{os.path.abspath(args.output)} "
          f"({config.num_hidden_layers} layers, mem_layers={list(config.mem_layers)})")


if __name__ == "__main__":
    main()
