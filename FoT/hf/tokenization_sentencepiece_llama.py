"""The tokenizer shipped inside exports made from a SentencePiece model: sentencepiece itself.

transformers converts a ``tokenizer.model`` into a ``tokenizers`` pipeline that ignores parts
of the model's normalizer spec (extra-whitespace removal, NFKC, the dummy prefix before a
leading space) and matches ``<s>``/``</s>``/``<unk>`` written in the text as control tokens,
so it encodes some strings differently from training.  This class encodes with the exported
``tokenizer.model`` exactly as training did (``EasyLM.tokenizer.SentencePieceTokenizer``) and
adds only the BOS token in front, as LLaMA tokenizers do.  It imports nothing from the
toolkit: it is copied beside the weights and loaded with
``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)``.
"""
import os

import sentencepiece
from transformers import PreTrainedTokenizer


class SentencePieceLlamaTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, add_bos_token=True, add_eos_token=False, **kwargs):
        self.vocab_file = vocab_file
        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        for name, token_id in (("unk_token", self.sp_model.unk_id()),
                               ("bos_token", self.sp_model.bos_id()),
                               ("eos_token", self.sp_model.eos_id()),
                               ("pad_token", self.sp_model.pad_id())):
            if token_id >= 0:
                kwargs.setdefault(name, self.sp_model.id_to_piece(token_id))
        # Text is never split on special-token strings: sentencepiece reads "<s>" as characters.
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode_pieces(tokens)

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        """sentencepiece's decoding, with control tokens (``<s>``, ``</s>``) written as their
        strings unless skipped, as Hugging Face tokenizers do (sentencepiece drops them:
        tools that compare text with ``decode(bos_token_id)`` would see an empty string)."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        text, run = [], []
        for token in (int(i) for i in token_ids):
            if token in skipped:
                continue
            if self.sp_model.is_control(token):
                text += [self.sp_model.decode(run), self.sp_model.id_to_piece(token)]
                run = []
            else:
                run.append(token)
        return "".join(text + [self.sp_model.decode(run)])

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None,
                                already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        mask = [1] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))
        start = int(self.add_bos_token)
        for ids in (token_ids_0, token_ids_1 or []):
            mask[start:start + len(ids)] = [0] * len(ids)
            start += len(ids) + int(self.add_bos_token) + int(self.add_eos_token)
        return mask

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "")
                            + self.vocab_files_names["vocab_file"])
        with open(path, "wb") as f:
            f.write(self.sp_model.serialized_model_proto())
        return (path,)
