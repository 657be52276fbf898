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


@pytest.fixture(scope="module")
def chat_bpe_directory(tmp_path_factory):
    """A byte-level BPE tokenizer whose BOS is a chat marker that texts do not start with, as
    SmolLM2's (BOS ``<|im_start|>``, EOS ``<|im_end|>``, documents separated by
    ``<|endoftext|>``), saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(os.path.join(ROOT, "tokenizers", "corpus.txt")) as f:
        model.train_from_iterator(f.read().splitlines(), trainer)
    target = tmp_path_factory.mktemp("chat_bpe")
    PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<|im_start|>",
                            eos_token="<|im_end|>", unk_token="<|endoftext|>").save_pretrained(
        str(target))
    return target


def test_evaluation_prompts_start_with_bos_only_where_the_models_tokenizer_does(
        hf_directory, chat_bpe_directory):
    """The same model gets the same prompt however its tokenizer is read: an evaluation read
    with ``--tokenizer DIR`` had put a chat marker before every prompt that the model's own
    tokenizer (and ``--hf_model DIR``, which reads its ``tokenizer.json``) never adds."""
    from eval.models import encode

    from transformers import LlamaTokenizer

    # As LLaMA's own Hugging Face tokenizers are saved: texts start with BOS.
    llama_dir = chat_bpe_directory.parent / "llama_bos"
    LlamaTokenizer.from_pretrained(str(hf_directory), local_files_only=True,
                                   add_bos_token=True).save_pretrained(str(llama_dir))
    llama = [load_tokenizer({"vocab_file": TINY_MODEL}),
             load_tokenizer({"vocab_file": str(llama_dir)}),
             load_tokenizer({"vocab_file": str(llama_dir / "tokenizer.json")})]
    assert [t.prepends_bos for t in llama] == [True] * 3
    expected = [1] + llama[0].encode(TEXT)
    assert all(encode(t, TEXT) == expected for t in llama)
    chat = [load_tokenizer({"vocab_file": str(chat_bpe_directory)}),
            load_tokenizer({"vocab_file": str(chat_bpe_directory / "tokenizer.json")})]
    assert chat[0].bos_token_id == 1  # defined, but not put before texts
    assert [t.prepends_bos for t in chat] == [False, False]
    assert encode(chat[0], TEXT) == encode(chat[1], TEXT) == chat[0].encode(TEXT)
    assert 1 not in encode(chat[0], TEXT)
    assert encode(chat[0], TEXT, bos=False) == chat[0].encode(TEXT)
    assert pickle.loads(pickle.dumps(chat[0])).prepends_bos is False


def test_documents_start_with_bos_as_the_tokenizer_does_unless_set(chat_bpe_directory):
    from EasyLM.data.text import TextProcessor

    chat = load_tokenizer({"vocab_file": str(chat_bpe_directory)})
    llama = load_tokenizer({"vocab_file": TINY_MODEL})
    example = {"text": TEXT}
    tokens, mask, _ = TextProcessor({}, chat)(example)
    assert list(tokens) == chat.encode(TEXT) + [chat.eos_token_id]
    tokens, mask, _ = TextProcessor({}, llama)(example)
    assert list(tokens) == [1] + llama.encode(TEXT) + [2] and mask[0] == 0
    tokens, _, _ = TextProcessor({"add_bos_token": True}, chat)(example)
    assert list(tokens)[0] == chat.bos_token_id == 1
    tokens, _, _ = TextProcessor({"add_bos_token": "false"}, llama)(example)
    assert list(tokens) == llama.encode(TEXT) + [2]
    with pytest.raises(ConfigError, match=r"train_dataset.text_processor.add_bos_token='maybe'"
                                          r": give true, false or auto"):
        TextProcessor({"add_bos_token": "maybe"}, llama, name="train_dataset.text_processor")
