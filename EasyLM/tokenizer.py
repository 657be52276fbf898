"""Tokenizers behind one small interface: a LLaMA SentencePiece model or a Hugging Face one.

``load_tokenizer(config)`` picks the kind from ``vocab_file``:

- a SentencePiece ``.model`` file (local path or any fsspec URL), e.g. the original LLaMA
  ``tokenizer.model`` or the project's ``tokenizers/tiny_sp.model``;
- a local directory: its ``tokenizer.model`` if it has one (a LLaMA model directory or this
  project's export of a SentencePiece-trained model), else what ``transformers`` saved there
  (``AutoTokenizer``, no remote code);
- a ``tokenizer.json`` file (``PreTrainedTokenizerFast``).

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``bos_token_id``, ``eos_token_id`` and ``pad_token_id``; ``encode`` adds BOS/EOS only when
``add_bos_token`` / ``add_eos_token`` say so (the data pipeline's text processor adds them
itself, so keep both off for training).  ``prepends_bos`` says whether the model's own
tokenizer starts a text with BOS (LLaMA's do; SmolLM2's and other byte-level BPE ones, whose
BOS is a chat marker, do not): evaluation prompts follow it, so that the same model gets the
same prompt whichever way its tokenizer was read.  Both can be pickled, which parallel
tokenization needs.
"""
import os

import fsspec

from EasyLM.config import ConfigDict, ConfigError, Option


def get_default_config(updates=None):
    config = ConfigDict(
        vocab_file=Option("", "SentencePiece .model, HF tokenizer directory or tokenizer.json"),
        add_bos_token=Option(False, "encode() adds BOS; keep false for training (the text "
                             "processor adds it)"),
        add_eos_token=Option(False, "encode() adds EOS; keep false for training (the text "
                             "processor adds it)"),
    )
    return config.copy_and_update(updates)


class SentencePieceTokenizer:
    """A LLaMA-style SentencePiece model; special ids come from the model file.

    LLaMA's model defines no pad piece; ``pad_token_id`` is then 0 (``<unk>``), the token the
    pad-mode pipelines use."""

    def __init__(self, model_proto, add_bos_token=False, add_eos_token=False):
        import sentencepiece

        self._model_proto = model_proto
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.bos_token_id = self._processor.bos_id()
        self.eos_token_id = self._processor.eos_id()
        pad = self._processor.pad_id()
        self.pad_token_id = pad if pad >= 0 else 0
        # LLaMA's SentencePiece convention: every text starts with BOS.
        self.prepends_bos = self.bos_token_id >= 0

    @property
    def vocab_size(self):
        return self._processor.vocab_size()

    def __len__(self):
        return self.vocab_size

    def encode(self, text):
        return self._processor.encode(text, add_bos=self.add_bos_token, add_eos=self.add_eos_token)

    def decode(self, ids):
        return self._processor.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"model_proto": self._model_proto, "add_bos_token": self.add_bos_token,
                "add_eos_token": self.add_eos_token}

    def __setstate__(self, state):
        self.__init__(**state)


class HuggingFaceTokenizer:
    """A ``transformers`` tokenizer with the same interface as ``SentencePieceTokenizer``."""

    def __init__(self, tokenizer, add_bos_token=False, add_eos_token=False):
        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0
        # What the tokenizer itself does with special tokens on (its post-processor): a BOS
        # token that is only a chat-turn marker is defined but not put before texts.
        own = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.prepends_bos = bool(own) and self.bos_token_id is not None and (
            own[0] == self.bos_token_id)
        for flag, token_id, name in ((add_bos_token, self.bos_token_id, "BOS"),
                                     (add_eos_token, self.eos_token_id, "EOS")):
            if flag and token_id is None:
                raise ConfigError(f"tokenizer.add_{name.lower()}_token is set but the tokenizer "
                                  f"defines no {name} token")

    @property
    def vocab_size(self):
        return len(self.tokenizer)

    def __len__(self):
        return self.vocab_size

    def encode(self, text):
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.bos_token_id] if self.add_bos_token else []) + ids + (
            [self.eos_token_id] if self.add_eos_token else [])

    def decode(self, ids):
        return self.tokenizer.decode([int(i) for i in ids])


def tokenizer_from_json(path):
    """A bare ``tokenizer.json`` names no special tokens; assume LLaMA's where they exist."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = Tokenizer.from_file(path).get_vocab(with_added_tokens=True)
    special = {key: token for key, token in
               (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>"))
               if token in vocab}
    return PreTrainedTokenizerFast(tokenizer_file=path, **special)


def load_tokenizer(config, name="tokenizer"):
    """The tokenizer ``config.vocab_file`` names; ``name`` prefixes config keys in errors."""
    config = get_default_config(config)
    path = config.vocab_file
    flags = {"add_bos_token": config.add_bos_token, "add_eos_token": config.add_eos_token}
    if not path:
        raise ConfigError(f"{name}.vocab_file is empty; give a SentencePiece .model file (e.g. "
                          "tokenizers/tiny_sp.model), a Hugging Face tokenizer directory or a "
                          "tokenizer.json")
    if os.path.isdir(path):
        sentencepiece_model = os.path.join(path, "tokenizer.model")
        if os.path.exists(sentencepiece_model):
            # An export made from a SentencePiece model ships that model: read it as training
            # did, rather than running the directory's tokenizer code (remote code).
            with open(sentencepiece_model, "rb") as f:
                return SentencePieceTokenizer(f.read(), **flags)
        from transformers import AutoTokenizer

        return HuggingFaceTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True),
                                    **flags)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise ConfigError(f"{name}.vocab_file: {path} does not exist")
    if path.endswith(".json"):
        return HuggingFaceTokenizer(tokenizer_from_json(path), **flags)
    with fs.open(fs_path, "rb") as f:
        return SentencePieceTokenizer(f.read(), **flags)
