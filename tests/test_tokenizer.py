"""The shipped SentencePiece model and Hugging Face tokenizers behind one interface."""
import os
import pickle
import shutil

import pytest

from EasyLM.config import ConfigError
from EasyLM.tokenizer import SentencePieceTokenizer, get_default_config, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = os.path.join(ROOT, "tokenizers", "tiny_sp.model")
TEXT = "The old sailor measured 1987 waves near the harbour, then wrote: ünïcode!"


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    """The shipped model converted offline into a saved Hugging Face LLaMA tokenizer."""
    from transformers import LlamaTokenizer

    source = tmp_path_factory.mktemp("sp")
    shutil.copy(TINY_MODEL, source / "tokenizer.model")
    target = tmp_path_factory.mktemp("hf")
    LlamaTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(str(target))
    return target


def test_shipped_model_ids_and_round_trip():
    tokenizer = load_tokenizer({"vocab_file": TINY_MODEL})
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id) == (512, 1, 2)
    assert tokenizer.pad_token_id == 0
    ids = tokenizer.encode(TEXT)
    assert all(isinstance(i, int) for i in ids) and 1 not in ids and 2 not in ids
    assert tokenizer.decode(ids) == TEXT  # byte fallback keeps unseen characters
    restored = pickle.loads(pickle.dumps(tokenizer))
    assert restored.encode(TEXT) == ids


def test_bos_eos_flags():
    tokenizer = load_tokenizer({"vocab_file": TINY_MODEL, "add_bos_token": True,
                                "add_eos_token": True})
    plain = load_tokenizer({"vocab_file": TINY_MODEL}).encode(TEXT)
    assert tokenizer.encode(TEXT) == [1] + plain + [2]


@pytest.mark.parametrize("file", [None, "tokenizer.json"])
def test_hugging_face_tokenizer_matches_sentencepiece(hf_directory, file):
    path = str(hf_directory / file) if file else str(hf_directory)
    tokenizer = load_tokenizer({"vocab_file": path, "add_eos_token": True})
    reference = load_tokenizer({"vocab_file": TINY_MODEL})
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id) == (512, 1, 2)
    ids = tokenizer.encode(TEXT)
    assert ids == reference.encode(TEXT) + [2]
    assert tokenizer.decode(ids[:-1]) == TEXT
    assert pickle.loads(pickle.dumps(tokenizer)).encode(TEXT) == ids


def test_clear_errors():
    with pytest.raises(ConfigError, match="tokenizer.vocab_file is empty"):
        load_tokenizer(get_default_config())
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer({"vocab_file": "/nonexistent/tokenizer.model"})
    with pytest.raises(ConfigError, match="vocab_file"):
        get_default_config({"vocab_fil": TINY_MODEL})


def test_directory_with_a_sentencepiece_model_reads_it_without_remote_code(tmp_path):
    # An export (or a LLaMA model directory) ships tokenizer.model: training's own tokenizer,
    # read directly, even when the directory also carries tokenizer code.
    shutil.copy(TINY_MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": '
                                                    '["missing.Tokenizer", null]}}')
    tokenizer = load_tokenizer({"vocab_file": str(tmp_path)})
    assert isinstance(tokenizer, SentencePieceTokenizer)
    reference = load_tokenizer({"vocab_file": TINY_MODEL})
    assert tokenizer.encode("  leading  spaces") == reference.encode("  leading  spaces")
