"""The tokenizer of an exported directory encodes exactly as training did.

Reference: ``EasyLM.tokenizer.load_tokenizer`` on the file training was given.  Candidates: the
export loaded the way users do (``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)``)
and through the toolkit (``load_tokenizer`` on the directory).  Models: the shipped
``tiny_sp.model`` (identity normalisation, extra whitespace kept, byte fallback) and one
trained here with NFKC and ``remove_extra_whitespaces``, plus a Hugging Face tokenizer.
"""
import os
import pickle
import shutil

import pytest

from EasyLM.models.llama.convert_easylm_to_hf import copy_tokenizer
from EasyLM.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = os.path.join(ROOT, "tokenizers", "tiny_sp.model")
CORPUS = os.path.join(ROOT, "tokenizers", "corpus.txt")

TRICKY = [
    "", " ", "   ", "\t", "\n", "Hello  world", "Hello world", " Hello", "  Hello",
    "Hello ", "Hello   ", "  two  spaces  ", "line one\nline two\n", "a\tb\t\tc",
    "def f(x):\n    return x\n\tpass\n", "\n\n  indented\n    more", "1987 + 214 = 2201",
    "3.14159 and 1,000,000", "café naïve résumé Ångström", "ｆｕｌｌｗｉｄｔｈ ① ﬁ",
    "日本語のテキスト", "emoji 😀🚀 and 👍🏽", "<s>", "</s>", "<unk>",
    "text <s> inside </s> with <unk> tokens", "<s>Hello</s>", "▁already▁marked",
    "mixed \u00a0nbsp\u3000ideographic space", "The old sailor measured 1987 waves.",
]


@pytest.fixture(scope="module")
def nfkc_model(tmp_path_factory):
    """A tiny SentencePiece model that normalises: NFKC and extra-whitespace removal."""
    import sentencepiece as spm

    prefix = str(tmp_path_factory.mktemp("nfkc") / "nfkc")
    spm.SentencePieceTrainer.train(
        input=CORPUS, model_prefix=prefix, vocab_size=320, model_type="bpe", unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
        character_coverage=1.0, num_threads=1, minloglevel=2)
    return prefix + ".model"


def _normalizer(model_path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    spec = proto.normalizer_spec
    return spec.name, spec.remove_extra_whitespaces, spec.add_dummy_prefix


def _export(tokenizer_path, directory):
    os.makedirs(directory)
    copy_tokenizer(tokenizer_path, str(directory))
    return str(directory)


def _assert_same_tokenization(reference, export_dir):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    toolkit = load_tokenizer({"vocab_file": export_dir})
    for text in TRICKY:
        ids = reference.encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert toolkit.encode(text) == ids, repr(text)
        assert auto.decode(ids) == reference.decode(ids), repr(text)
    restored = pickle.loads(pickle.dumps(toolkit))
    assert restored.encode(TRICKY[5]) == reference.encode(TRICKY[5])


@pytest.mark.parametrize("model", ["tiny_sp", "nfkc"])
def test_sentencepiece_export_tokenizes_as_training(model, nfkc_model, tmp_path):
    path = TINY_MODEL if model == "tiny_sp" else nfkc_model
    expected = {"tiny_sp": ("identity", False, True), "nfkc": ("nmt_nfkc", True, True)}[model]
    assert _normalizer(path) == expected
    export_dir = _export(path, tmp_path / "export")
    assert os.path.exists(os.path.join(export_dir, "tokenizer.model"))
    reference = load_tokenizer({"vocab_file": path})
    if model == "nfkc":  # the test strings really exercise the normaliser
        assert reference.encode("  two  spaces  ") == reference.encode("two spaces")
    _assert_same_tokenization(reference, export_dir)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    ids = auto("Hello")["input_ids"]  # BOS first, as LLaMA tokenizers do
    assert ids == [reference.bos_token_id] + reference.encode("Hello")
    assert auto.decode(ids, skip_special_tokens=True) == "Hello"
    # Control tokens decode to their strings (lm-eval compares text with decode(bos)).
    assert auto.decode(ids) == "<s>Hello" and auto.decode([auto.bos_token_id]) == "<s>"
    assert auto.decode(ids + [auto.eos_token_id] + ids[1:]) == "<s>Hello</s>Hello"


@pytest.mark.parametrize("source", ["directory", "tokenizer.json"])
def test_hugging_face_export_tokenizes_as_training(source, tmp_path):
    from transformers import LlamaTokenizer

    source_dir, hf_dir = tmp_path / "sp", tmp_path / "hf"
    os.makedirs(source_dir)
    shutil.copy(TINY_MODEL, source_dir / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(source_dir), local_files_only=True).save_pretrained(
        str(hf_dir))
    path = str(hf_dir) if source == "directory" else str(hf_dir / "tokenizer.json")
    reference = load_tokenizer({"vocab_file": path})
    _assert_same_tokenization(reference, _export(path, tmp_path / "export"))
