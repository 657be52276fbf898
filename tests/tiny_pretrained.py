"""A tiny stand-in for SmolLM2-135M-Instruct, shared by the tests of the pretrained-model
recipes (``experiments/pretrained_fot.sh``, ``experiments/uptrain_fox.sh``): a random GQA
LLaMA with tied embeddings and a byte-level BPE tokenizer, written as a GGUF file and imported
as ``experiments.get_smollm2`` imports the real one; and the arguments that shrink the
recipes' corpus and runs to CPU size."""
import gguf
from helpers import REPO
from test_gguf import random_model, write_gguf

from EasyLM.models.llama import convert_hf_to_easylm

# transformers' reading of a GGUF byte-level tokenizer adds <|endoftext|> when it is missing.
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
# The corpus builder on this checkout's own files: held-out files of 3,000+ characters, which
# the byte-level tokenizer (nearly a token a character) makes documents of 1,024+ tokens.
CORPUS_ARGS = (f"--roots {REPO} --heldout_fraction 0.3 --min_chars 3000 "
               "--max_train_chars 2000000 --max_heldout_chars 600000")


def byte_symbols():
    """The 256 one-character symbols of a byte-level BPE vocabulary (GPT-2's spelling): bytes
    that print stand for themselves, the others for characters from 256 on."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(
        range(0xAE, 0x100))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def byte_vocabulary():
    tokens = SPECIAL + byte_symbols() + [merge.replace(" ", "") for merge in MERGES]
    types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))
    return tokens, types, MERGES


def write_tiny_pretrained(out, max_position_embeddings):
    """What ``get_smollm2 --output_dir out`` writes, for the tiny model: ``out/hf``,
    ``out/tokenizer`` and ``out/fot_init`` (memory layer 1)."""
    tokens, _, _ = byte_vocabulary()
    model = random_model(tied=True, vocab_size=len(tokens),
                         max_position_embeddings=max_position_embeddings)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tiny.gguf"
    write_gguf(path, model, gguf.GGMLQuantizationType.F32, vocabulary=byte_vocabulary())
    convert_hf_to_easylm.main(["--gguf", str(path), "--output", str(out / "fot_init"),
                               "--mem_layers", "1", "--tokenizer_output", str(out / "tokenizer"),
                               "--hf_output", str(out / "hf")])


def runner_args(seq_length, total_steps=4):
    """Runner flags of a tiny run: ``total_steps`` steps of 8 rows of ``seq_length`` tokens in
    float32, evaluated and saved every 2 steps."""
    return (f"--total_steps={total_steps} --train_dataset.json_dataset.batch_size=8 "
            f"--train_dataset.json_dataset.seq_length={seq_length} "
            f"--eval_dataset.json_dataset.batch_size=8 "
            f"--eval_dataset.json_dataset.seq_length={seq_length} --dtype=fp32 --eval_freq=2 "
            "--eval_steps=1 --save_model_freq=2 --train_log_freq=1 "
            "--train_dataset.json_dataset.tokenizer_processes=1 "
            "--eval_dataset.json_dataset.tokenizer_processes=1 "
            "--optimizer.adamw_optimizer.lr_warmup_steps=1 "
            f"--optimizer.adamw_optimizer.lr_decay_steps={total_steps}")
