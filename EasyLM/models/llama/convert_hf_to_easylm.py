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

Uptraining to forgetting attention (FoX, docs/forgetting.md): ``--attention_type forgetting``
(or one family per layer, comma-separated) makes the layers outside ``--mem_layers`` FoX layers
that compute what the pretrained ones did: RoPE stays on, the forget gates start constant at
``sigmoid(--forget_gate_bias)`` (default: a decay below 1e-3 over the model's native context)
and, with ``--forgetting_kv_shift``, the shift gates at ``sigmoid(--kv_shift_bias)``.

    python -m EasyLM.models.llama.convert_hf_to_easylm --hf_model DIR --output PATH \
        --attention_type forgetting [--forget_gate_bias B] [--forgetting_kv_shift]

Uptraining to SUPRA linear attention (docs/linear.md): ``--attention_type supra`` keeps every
pretrained weight and adds the feature maps, starting as the identity; the model then
computes linear attention of ``ReLU`` of its queries and keys, which training adapts to.
"""
import argparse
import dataclasses
import glob
import json
import os
from typing import Any, Optional

import torch
from tqdm import tqdm

from EasyLM import cli
from EasyLM.checkpoint import save_params
from EasyLM.jax_utils import DTYPE_NAMES, float_dtype
from EasyLM.models.llama import gguf_import
from EasyLM.models.llama.attention import layer_attention_types
from EasyLM.models.llama.attention.forgetting import (NOT_UPTRAINABLE,
                                                      UPTRAINING_KV_SHIFT_BIAS,
                                                      default_forget_gate_bias,
                                                      uptraining_gates)
from EasyLM.models.llama.attention.linear import NOT_FROM_PRETRAINED, uptraining_feature_maps
from EasyLM.models.llama.hf_layout import hf_to_native, insert
from EasyLM.models.llama.llama_model import LLaMAConfig


@dataclasses.dataclass(frozen=True)
class Uptraining:
    """Pretrained layers turned into forgetting (FoX) layers that start as what they were:
    ``attention_type`` (one family for the layers outside ``mem_layers``, or one per layer),
    with RoPE kept (the pretrained weights rely on it), forget gates at
    ``sigmoid(forget_gate_bias)`` (None: :func:`default_forget_gate_bias` of the native
    context) and, with ``kv_shift``, shift gates at ``sigmoid(kv_shift_bias)``.  QK-norm and
    the output gate cannot start as the pretrained model (:data:`NOT_UPTRAINABLE`)."""
    attention_type: Any = "forgetting"
    forget_gate_bias: Optional[float] = None
    kv_shift: bool = False
    kv_shift_bias: float = UPTRAINING_KV_SHIFT_BIAS

    def config_overrides(self):
        return dict(attention_type=self.attention_type, forgetting_use_rope=True,
                    forgetting_kv_shift=self.kv_shift)

    def add_gates(self, params, config, param_dtype):
        """The new parameters of every forgetting (gates) and SUPRA (feature maps) layer of
        ``config`` into ``params`` (converted pretrained weights)."""
        bias = self.forget_gate_bias
        if bias is None:
            bias = default_forget_gate_bias(config.max_sequence_length)
        added = {"forgetting": lambda: uptraining_gates(config, bias, self.kv_shift_bias),
                 "supra": lambda: uptraining_feature_maps(config)}
        for i, family in enumerate(layer_attention_types(config)):
            if family not in added:
                continue
            for name, arrays in added[family]().items():
                for leaf, array in arrays.items():
                    insert(params, ("transformer", "h", str(i), "attention", name, leaf),
                           array.astype(float_dtype(param_dtype)))


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


def convert(hf_dir, mem_layers=None, param_dtype="fp32", uptraining=None):
    """``(variables, LLaMAConfig)`` for the HF model in ``hf_dir`` (``uptraining``: an
    :class:`Uptraining` to forgetting layers)."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    with open(config_path) as f:
        hf_config = json.load(f)
    return convert_tensors(hf_config, iterate_hf_tensors(hf_dir), mem_layers, param_dtype,
                           uptraining)


def convert_gguf(path, mem_layers=None, param_dtype="fp32", tokenizer_output=None,
                 hf_output=None, uptraining=None):
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
    return convert_tensors(hf_config, tensors, mem_layers, param_dtype, uptraining)


def model_overrides(mem_layers=None, uptraining=None):
    """The ``LLaMAConfig`` fields that ``--mem_layers`` and the uptraining options set."""
    overrides = {} if mem_layers is None else {"mem_layers": tuple(mem_layers)}
    if uptraining is not None:
        overrides.update(uptraining.config_overrides())
    return overrides


def convert_tensors(hf_config, tensors, mem_layers=None, param_dtype="fp32", uptraining=None):
    """``(variables, LLaMAConfig)`` of a ``config.json`` dict and its ``(name, array)`` stream."""
    config = LLaMAConfig.from_hf_config(hf_config, **model_overrides(mem_layers, uptraining))
    params = {}
    for name, tensor in tqdm(tensors, desc="converting", unit="tensor"):
        converted = hf_to_native(name, tensor, config)
        if converted is None:
            continue
        path, array = converted
        array = array.astype(float_dtype(param_dtype))
        insert(params, path, array)
    _check_complete(params, config)
    if uptraining is not None:
        uptraining.add_gates(params, config, param_dtype)
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


def parse_attention_type(text):
    """``"forgetting"`` -> that family for the layers outside ``--mem_layers``;
    ``"softmax,forgetting,..."`` -> one family per layer (``--attention_type``'s type)."""
    names = tuple(name.strip() for name in text.split(","))
    return names[0] if len(names) == 1 else names


def check_hf_model(hf_dir, mem_layers, uptraining=None):
    """Refuse, before any tensor is read, a ``--hf_model`` directory without a config and
    weights, a config this toolkit cannot convert, ``--mem_layers`` it does not have and an
    ``--attention_type`` that does not fit it."""
    hf_config = cli.hf_model_directory("--hf_model", hf_dir)
    layers = hf_config.get("num_hidden_layers")
    bad = [i for i in mem_layers or () if layers is not None and not 0 <= i < layers]
    if bad:
        raise cli.UsageError(f"--mem_layers: {bad} out of range: the model has {layers} "
                             f"layers, 0 to {layers - 1}")
    try:
        LLaMAConfig.from_hf_config(hf_config, **model_overrides(mem_layers))
    except (ValueError, KeyError, TypeError) as error:
        raise cli.UsageError(f"--hf_model: {hf_dir}/config.json: {error}") from None
    if uptraining is None:
        return
    try:
        LLaMAConfig.from_hf_config(hf_config, **model_overrides(mem_layers, uptraining))
    except ValueError as error:
        raise cli.UsageError(f"--attention_type: {error}") from None


def uptraining_from_args(args):
    """The :class:`Uptraining` the flags ask for (None without ``--attention_type``), or a
    :class:`~EasyLM.cli.UsageError` for a part that cannot start as the pretrained model."""
    forgetting = ("forget_gate_bias", "forgetting_kv_shift", "forgetting_qk_norm",
                  "forgetting_output_gate")
    if args.attention_type is None:
        given = [f"--{name}" for name in forgetting if getattr(args, name) not in (None, False)]
        if given:
            raise cli.UsageError(f"{', '.join(given)}: uptraining options; add "
                                 f"--attention_type forgetting")
        return None
    for name in ("forgetting_qk_norm", "forgetting_output_gate"):
        if getattr(args, name):
            raise cli.UsageError(f"--{name}: {NOT_UPTRAINABLE}")
    names = ((args.attention_type,) if isinstance(args.attention_type, str)
             else args.attention_type)
    for family, reason in NOT_FROM_PRETRAINED.items():
        if family in names:
            raise cli.UsageError(f"--attention_type {family}: {reason}")
    return Uptraining(args.attention_type, args.forget_gate_bias, args.forgetting_kv_shift,
                      args.kv_shift_bias)


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
    fox = parser.add_argument_group("uptraining to forgetting (docs/forgetting.md) or SUPRA "
                                    "(docs/linear.md) attention")
    fox.add_argument("--attention_type", default=None, type=parse_attention_type,
                     help="'forgetting': the layers outside --mem_layers become FoX layers "
                     "(RoPE kept), initialised to compute what they did; 'supra': SUPRA "
                     "linear attention layers (feature maps starting as the identity); or "
                     "one family per layer, comma-separated (softmax, forgetting, supra)")
    fox.add_argument("--forget_gate_bias", default=None, type=float,
                     help="initial forget-gate bias B (weight 0): every token keeps "
                     "sigmoid(B) of the older keys' weight; default: the smallest tenth whose "
                     "decay over max_position_embeddings tokens is below 1e-3 (14.6 for 2048)")
    fox.add_argument("--forgetting_kv_shift", action="store_true",
                     help="add the key/value shift, starting (nearly) off")
    fox.add_argument("--kv_shift_bias", default=UPTRAINING_KV_SHIFT_BIAS, type=float,
                     help="initial shift-gate bias (weight 0): sigmoid(-10) = 4.5e-5 of the "
                     "previous token is mixed in, and its gradient can still open the shift")
    fox.add_argument("--forgetting_qk_norm", action="store_true",
                     help="refused: QK-norm cannot start as the pretrained model")
    fox.add_argument("--forgetting_output_gate", action="store_true",
                     help="refused: the output norm cannot start as the pretrained model")
    args = parser.parse_args(argv)
    if not args.gguf and (args.tokenizer_output or args.hf_output):
        parser.error("--tokenizer_output and --hf_output go with --gguf")
    with cli.user_errors(parser.prog, gguf_import.GGUFError):
        uptraining = uptraining_from_args(args)
        cli.new_directory("--output", args.output)
        if args.gguf:
            for flag in ("--tokenizer_output", "--hf_output"):
                if getattr(args, flag[2:]):
                    cli.new_directory(flag, getattr(args, flag[2:]))
            variables, config = convert_gguf(args.gguf, args.mem_layers, args.param_dtype,
                                             args.tokenizer_output, args.hf_output, uptraining)
        else:
            check_hf_model(args.hf_model, args.mem_layers, uptraining)
            with cli.reading("--hf_model", args.hf_model):
                variables, config = convert(args.hf_model, args.mem_layers, args.param_dtype,
                                            uptraining)
        with cli.written_directory(args.output) as tmp:
            save_params(tmp, variables, config)
    families = ""
    if uptraining is not None:
        families = f", attention {', '.join(layer_attention_types(config))}"
    print(f"wrote params::{os.path.abspath(args.output)} "
          f"({config.num_hidden_layers} layers, mem_layers={list(config.mem_layers)}"
          f"{families})")


if __name__ == "__main__":
    main()
