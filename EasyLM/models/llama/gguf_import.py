"""A LLaMA model in a GGUF file (llama.cpp's format) -> a Hugging Face directory, a tokenizer
directory and the tensors the toolkit's converter takes.

transformers reads the file itself, with the ``gguf`` package: it dequantizes every tensor to
float (``gguf.dequantize``), maps llama.cpp's tensor names to its own, undoes the row order
llama.cpp's converter gives q and k (``LlamaTensorProcessor`` permutes them back to HF's
half-rotation layout, per key/value head for k) and rebuilds the tokenizer, byte-level BPE or
SentencePiece, from the metadata.  A file without ``output.weight`` has tied embeddings.  The
model it loads keeps a GGUF quantizer and refuses ``save_pretrained``, so :func:`load` moves
its weights into a plain model of the same class and config, which saves a normal directory
that loads without ``gguf``.

    from EasyLM.models.llama import gguf_import
    model, tokenizer = gguf_import.load("model.gguf")
    gguf_import.save_hf_directory(model, tokenizer, "hf_model")   # config, weights, tokenizer
    gguf_import.save_tokenizer(tokenizer, "tokenizer_dir")        # tokenizer.vocab_file takes it
    hf_config, tensors = gguf_import.config_and_tensors(model)    # for convert_hf_to_easylm

The command line is ``convert_hf_to_easylm --gguf FILE``.
"""
import copy
import glob
import os

import torch

from EasyLM import cli
from EasyLM.jax_utils import dtype_name

GGUF_MAGIC = b"GGUF"
# The gguf version requirements.txt pins, for the error that asks for it.
GGUF_REQUIREMENT = "gguf==0.19.0"
# The tokenizer's special tokens -> the metadata keys of their ids.  They are set from the file
# after transformers' reading: transformers 5.17 takes the BOS token for EOS too and drops the
# padding token (SmolLM2 came out with EOS <|im_start|>), which would end every training
# document with the wrong token.
SPECIAL_TOKENS = {"bos_token": "tokenizer.ggml.bos_token_id",
                  "eos_token": "tokenizer.ggml.eos_token_id",
                  "unk_token": "tokenizer.ggml.unknown_token_id",
                  "pad_token": "tokenizer.ggml.padding_token_id"}


class GGUFError(ValueError):
    """A GGUF file this importer cannot read; the message is one line."""


def _field(reader, key):
    """The first value of a metadata field (``None`` if absent), as stored."""
    field = reader.fields.get(key)
    return None if field is None else field.parts[field.data[0]]


def _string_field(reader, key):
    value = _field(reader, key)
    return None if value is None else bytes(value).decode("utf-8")


def check_gguf(path):
    """The file's ``gguf.GGUFReader``; refuses, in one line, a missing file, a file that is
    not GGUF, an architecture other than ``llama`` and RoPE scaling that transformers' reader
    would drop."""
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        # Deferred: only GGUF imports need the package, and it may be missing.
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError(f"reading GGUF files needs the gguf package: pip install "
                        f"{GGUF_REQUIREMENT}") from None
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as error:
        message = " ".join(str(error).split())
        raise GGUFError(f"{path} is not a readable GGUF file: {message}") from None
    architecture = _string_field(reader, "general.architecture")
    if architecture != "llama":
        raise GGUFError(f"{path} holds a {architecture!r} model; only LLaMA-architecture GGUF "
                        f"files (general.architecture 'llama') can be imported")
    # transformers' reader maps no rope.scaling keys for llama: a scaled model (Llama 3.1's
    # rope_freqs tensor, linear or YaRN scaling) would load with plain RoPE.
    scaling = _string_field(reader, "llama.rope.scaling.type")
    if (scaling not in (None, "none")
            or any(tensor.name == "rope_freqs.weight" for tensor in reader.tensors)):
        raise GGUFError(f"{path} uses RoPE scaling ({scaling or 'rope_freqs.weight'}), which "
                        f"transformers' GGUF reader does not carry over; convert the model's "
                        f"Hugging Face directory instead")
    return reader


def load(path, dtype="fp32"):
    """``(model, tokenizer)``: transformers' reading of GGUF ``path``, the model a plain
    ``LlamaForCausalLM`` with ``dtype`` weights, the tokenizer a fast one."""
    reader = check_gguf(path)
    # Deferred: transformers takes seconds to import, and the converter needs it only here.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=getattr(torch, dtype_name(dtype)),
        local_files_only=True)
    model = _without_quantizer(gguf_model)
    for attribute, key in SPECIAL_TOKENS.items():
        token_id = _field(reader, key)
        if token_id is not None:
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(int(token_id[0])))
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


def _without_quantizer(gguf_model):
    """The same weights (shared, not copied) in a model without the GGUF quantizer."""
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    # The file's general.name, not a path: the saved config would name a directory that is not
    # there.
    config.name_or_path = ""
    with torch.device("meta"):
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    return model.eval()


def config_and_tensors(model):
    """``(config.json dict, iterator of (HF name, float32 numpy array))`` of a loaded model,
    what ``convert_hf_to_easylm`` reads from a directory; a tied head yields no ``lm_head``."""
    hf_config = model.config.to_dict()
    hf_config["architectures"] = [type(model).__name__]

    def tensors():
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            yield name, tensor.detach().to(torch.float32).numpy()

    return hf_config, tensors()


def save_tokenizer(tokenizer, output_dir):
    """Write the tokenizer as a Hugging Face tokenizer directory (``tokenizer.json``,
    ``tokenizer_config.json`` with the special tokens, the chat template when the file has
    one): ``AutoTokenizer`` and the toolkit's ``tokenizer.vocab_file`` read it.  Like
    :func:`save_hf_directory`, it appears whole or not at all (an earlier one is replaced)."""
    with cli.written_directory(output_dir) as tmp:
        tokenizer.save_pretrained(tmp)


def save_hf_directory(model, tokenizer, output_dir):
    """Write ``config.json``, safetensors weights (in the dtype :func:`load` was given) and the
    tokenizer: a directory ``from_pretrained`` loads without ``gguf``."""
    with cli.written_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        for path in glob.glob(os.path.join(tmp, "*.safetensors")):
            cli.set_open_mode(path)  # safetensors writes them with mode 0600
        tokenizer.save_pretrained(tmp)
