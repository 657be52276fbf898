"""GGUF import: a tiny random LLaMA written with the gguf package's own writer, as llama.cpp
writes one (its tensor names, its q/k row order, a byte-level BPE tokenizer in the metadata),
converts with ``convert_hf_to_easylm --gguf`` to the logits transformers' own reading of the
file gives; its tokenizer directory encodes as the file's tokenizer does; bad inputs fail in
one line."""
import pickle

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from EasyLM.checkpoint import load_llama_config, load_params
from EasyLM.models.llama import convert_hf_to_easylm, gguf_import
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from EasyLM.tokenizer import load_tokenizer

# A byte-level BPE vocabulary (GPT-2's spelling: "Ġ" is a space) of three control tokens,
# some letters and the tokens its merges make.
SPECIAL = ["<unk>", "<s>", "</s>"]
LETTERS = list("Ġabdehilnorstw")
MERGES = ["t h", "Ġ th", "Ġth e", "e r", "l o", "lo w", "Ġ w", "i n", "Ġ a", "a n", "an d"]
TOKENS = SPECIAL + LETTERS + [merge.replace(" ", "") for merge in MERGES]
TEXT = "the other tower and the lower wind</s> then a thin bird"
# llama.cpp's token types: 1 normal, 3 control.
TOKEN_TYPES = [3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL))
# Q8_0 quantizes rows in blocks of 32 values, so every row length is a multiple of 32.
CONFIG = dict(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rope_theta=100000.0, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)


def llama_cpp_rows(weight, heads):
    """q/k rows in the order llama.cpp's converter writes them (``LlamaModel.permute``)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def random_model(tied, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**dict(CONFIG, **overrides), tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so that a dropped or misplaced norm shows
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.uniform_(0.5, 1.5)
    return model


def write_gguf(path, model, quantization, architecture="llama",
               vocabulary=(TOKENS, TOKEN_TYPES, MERGES)):
    """``model`` as llama.cpp's converter writes it: 2-D weights in ``quantization``, norms in
    float32, no ``output.weight`` when the head is tied; ``vocabulary`` is the byte-level BPE
    tokenizer's ``(tokens, llama.cpp token types, merges)``."""
    tokens, token_types, merges = vocabulary
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if name.endswith("q_proj.weight"):
            array = llama_cpp_rows(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_rows(array, config.num_key_value_heads)
        gguf_name = names.get_name(name.removesuffix(".weight")) + ".weight"
        if array.ndim == 2 and quantization != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, quantization),
                              raw_dtype=quantization)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_reading(path):
    """The model and tokenizer transformers itself reads from a GGUF file."""
    kwargs = dict(gguf_file=path.name, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=torch.float32, **kwargs).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("quantization,tied", [("F32", True), ("Q8_0", False)])
def test_converted_gguf_matches_transformers_reading(tmp_path, quantization, tied):
    original = random_model(tied)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, original, gguf.GGMLQuantizationType[quantization])
    convert_hf_to_easylm.main(["--gguf", str(path), "--output", str(tmp_path / "ckpt"),
                               "--tokenizer_output", str(tmp_path / "tok"),
                               "--hf_output", str(tmp_path / "hf")])
    reference, gguf_tokenizer = transformers_reading(path)
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()

    dequantized = reference.state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(exported.state_dict()[name], dequantized[name]), name
        if quantization == "F32" or tensor.ndim == 1:
            assert torch.equal(dequantized[name], tensor), name
        else:  # Q8_0: one scale per 32 values, so the error is at most half a step of 1/127
            error = (dequantized[name] - tensor).abs().max()
            assert 0 < error <= tensor.abs().max() / 127, name

    config = load_llama_config(str(tmp_path / "ckpt"))
    variables = load_params(f"params::{tmp_path / 'ckpt'}")
    assert config.tie_word_embeddings == tied and ("lm_head" in variables["params"]) != tied
    assert config.rope_theta == CONFIG["rope_theta"] and config.num_key_value_heads == 2
    tokens = np.random.default_rng(0).integers(0, len(TOKENS), size=(2, 24))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
        assert np.abs(exported(torch.tensor(tokens)).logits.numpy() - expected).max() == 0
    ours = FlaxLLaMAForCausalLMModule(config).apply(variables, jnp.asarray(tokens)).logits
    assert np.abs(np.asarray(ours) - expected).max() < 1e-4

    ids = gguf_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert {2, TOKENS.index("Ġthe")} <= set(ids)  # "</s>" kept whole, merges applied
    for directory in ("tok", "hf"):
        saved = transformers.AutoTokenizer.from_pretrained(tmp_path / directory)
        assert saved(TEXT, add_special_tokens=False)["input_ids"] == ids
        toolkit = load_tokenizer({"vocab_file": str(tmp_path / directory)})
        assert (toolkit.encode(TEXT), toolkit.decode(ids)) == (ids, TEXT)
        assert (toolkit.bos_token_id, toolkit.eos_token_id, toolkit.pad_token_id) == (1, 2, 2)
        assert pickle.loads(pickle.dumps(toolkit)).encode(TEXT) == ids


def bad_files(tmp_path):
    """``(path, what its one-line error says)`` of files the importer refuses."""
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    gpt2 = tmp_path / "gpt2.gguf"
    write_gguf(gpt2, random_model(tied=True), gguf.GGMLQuantizationType.F32, "gpt2")
    return [(tmp_path / "missing.gguf", "does not exist"), (text, "is not a GGUF file"),
            (gpt2, "holds a 'gpt2' model; only LLaMA-architecture")]


def test_bad_files_fail_in_one_line(tmp_path, capsys):
    for path, message in bad_files(tmp_path):
        with pytest.raises(gguf_import.GGUFError, match=message) as error:
            gguf_import.check_gguf(str(path))
        assert "\n" not in str(error.value)
        with pytest.raises(SystemExit) as exit_:
            convert_hf_to_easylm.main(["--gguf", str(path), "--output", str(tmp_path / "ck")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "ck").exists()


def test_outputs_are_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, "a")))
    target = tmp_path / "out"
    target.mkdir()
    (target / "earlier").write_text("")

    def half_written(directory):
        (tmp_path / directory / "tokenizer.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        gguf_import.save_tokenizer(tokenizer, str(target))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["earlier"]
    monkeypatch.undo()
    gguf_import.save_tokenizer(tokenizer, str(target))  # replaces the earlier one whole
    assert "earlier" not in {p.name for p in target.iterdir()}
    load_tokenizer({"vocab_file": str(target)})

    # The command refuses an output that exists before it reads anything.
    with pytest.raises(SystemExit) as exit_:
        convert_hf_to_easylm.main(["--gguf", str(tmp_path / "missing.gguf"), "--output",
                                   str(tmp_path / "ck"), "--tokenizer_output", str(target)])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "--tokenizer_output" in error and "already exists" in error
