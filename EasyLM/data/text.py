"""Text processing: one example (a JSON line or a Hugging Face example) -> ``(tokens,
loss_mask, source_name)``, as the ``text_processor.*`` keys say; an example it cannot use is a
:class:`DocumentError`, which the reader counts and skips."""
import base64
import binascii
import json

import numpy as np

from EasyLM.config import ConfigDict, ConfigError, Option, coerce_like


class DocumentError(ValueError):
    """An example the text processor cannot use (e.g. a configured field is missing)."""


class TextProcessor:
    """Turns one example (a dict of fields) into ``(tokens, loss_mask, source_name)``.

    ``fields`` is a comma list; each entry is a text field, ``a+b`` (fields joined by
    ``subfield_separator``), ``{name}`` (base64 of raw tokens of ``base64_token_dtype``),
    ``{name:mask}`` (the same, with a per-token loss mask: base64 of one uint8 per token,
    0 = no loss), or a literal ``<|bos|>`` / ``<|eos|>``; ``[entry]`` gives its tokens loss
    mask 0.
    ``prepend_text`` goes before the first text field.  BOS (mask 0) and EOS (mask 1)
    wrap the document when enabled."""

    @staticmethod
    def get_default_config(updates=None):
        config = ConfigDict(
            fields=Option("text", "comma list of text fields, 'a+b' (joined), '{name}' (base64 "
                          "tokens), '{name:mask}' (base64 tokens with a base64 uint8 loss mask "
                          "per token), '<|bos|>' / '<|eos|>'; '[entry]' has no loss"),
            fields_from_example=Option("", "name of an example field holding that example's "
                                       "fields spec (instead of fields)"),
            subfield_separator=Option(" ", "text between the parts of an 'a+b' field"),
            add_bos_token=Option("auto", "start each document with BOS (no loss): true, false, "
                                 "or auto: as the model's tokenizer does by itself (LLaMA's: "
                                 "yes; SmolLM2's, whose BOS is a chat marker: no)"),
            add_eos_token=Option(True, "end each document with EOS (with loss)"),
            prepend_text=Option("", "text put before the first text field"),
            base64_token_dtype=Option("i4", "numpy dtype of the tokens in '{name}' fields"),
            source_field=Option("source_dataset", "example field naming its source, for the "
                                "per-source metrics"),
            default_source=Option("other", "source name of examples without source_field"),
        )
        return config.copy_and_update(updates)

    def __init__(self, config, tokenizer, name="text_processor"):
        self.config = self.get_default_config(config)
        self.name = name  # the config prefix named in error messages
        if not self.config.fields and not self.config.fields_from_example:
            raise ConfigError(f"set {name}.fields (e.g. 'text') or {name}.fields_from_example")
        self.tokenizer = tokenizer
        self.add_bos = self._add_bos(self.config.add_bos_token, tokenizer, name)
        self._parsed = {}

    @staticmethod
    def _add_bos(value, tokenizer, name):
        if str(value).strip().lower() == "auto":
            return bool(getattr(tokenizer, "prepends_bos", True))
        try:  # the config's own reading of booleans
            return coerce_like(True, value, f"{name}.add_bos_token")
        except ConfigError:
            raise ConfigError(f"{name}.add_bos_token={value!r}: give true, false or auto") from None

    def _fields(self, spec):
        """``[(kind, name, mask)]`` with kind ``bos``, ``eos``, ``base64`` or ``text``; a
        ``base64`` name may be ``tokens:mask``."""
        if spec not in self._parsed:
            fields = []
            for field in spec.split(","):
                masked = field.startswith("[") and field.endswith("]")
                field = field[1:-1] if masked else field
                if field in ("<|bos|>", "<|eos|>"):
                    kind = field[2:-2]
                elif field.startswith("{") and field.endswith("}"):
                    kind, field = "base64", field[1:-1]
                else:
                    kind = "text"
                fields.append((kind, field, 0.0 if masked else 1.0))
            self._parsed[spec] = fields
        return self._parsed[spec]

    def _field(self, example, name):
        if name not in example:
            raise DocumentError(f"missing field '{name}'")
        return example[name]

    def _base64(self, example, field, dtype):
        text = self._field(example, field)  # a missing field is not a decoding error
        try:
            raw = base64.b64decode(text, validate=True)
            return np.frombuffer(raw, dtype=dtype)
        except (binascii.Error, TypeError, ValueError) as error:
            raise DocumentError(f"field '{field}' is not base64 of {np.dtype(dtype).name} "
                                f"({error})") from None

    def _tokens(self, example, kind, field, prefix):
        if kind == "bos":
            return [self.tokenizer.bos_token_id]
        if kind == "eos":
            return [self.tokenizer.eos_token_id]
        if kind == "base64":
            return self._base64(example, field.partition(":")[0],
                                self.config.base64_token_dtype)
        parts = [self._field(example, name) for name in field.split("+")]
        if not all(isinstance(part, str) for part in parts):
            raise DocumentError(f"field '{field}' is not text")
        return self.tokenizer.encode(prefix + self.config.subfield_separator.join(parts))

    def __call__(self, example):
        spec = (self._field(example, self.config.fields_from_example)
                if self.config.fields_from_example else self.config.fields)
        tokens, masks = [], []
        if self.add_bos:
            tokens.append([self.tokenizer.bos_token_id])
            masks.append([0.0])
        prefix = self.config.prepend_text
        for kind, field, mask in self._fields(spec):
            piece = self._tokens(example, kind, field, prefix)
            prefix = "" if kind == "text" else prefix
            tokens.append(piece)
            mask_field = field.partition(":")[2] if kind == "base64" else ""
            if mask_field:
                per_token = self._base64(example, mask_field, np.uint8)
                if len(per_token) != len(piece):
                    raise DocumentError(f"field '{mask_field}' has {len(per_token)} loss-mask "
                                        f"entries for {len(piece)} tokens")
                masks.append(mask * (per_token > 0).astype(np.float32))
            else:
                masks.append(np.full(len(piece), mask, np.float32))
        if self.config.add_eos_token:
            tokens.append([self.tokenizer.eos_token_id])
            masks.append([1.0])
        source = str(example.get(self.config.source_field) or self.config.default_source)
        return (np.concatenate(tokens).astype(np.int32),
                np.concatenate(masks).astype(np.float32), source)


def parse_record(payload):
    """The example of a raw JSON line (or an example dict itself); DocumentError if none."""
    try:
        example = json.loads(payload.decode("utf-8")) if isinstance(payload, bytes) else payload
    except UnicodeDecodeError:
        raise DocumentError("not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise DocumentError(f"malformed JSON ({error.msg})") from None
    if not isinstance(example, dict):
        raise DocumentError("not a JSON object")
    return example


def process_record(processor, payload):
    """``(tokens, loss_mask, source)`` for a raw JSON line or an example dict, or a string
    saying why it must be skipped."""
    try:
        return processor(parse_record(payload))
    except DocumentError as error:
        return str(error)
