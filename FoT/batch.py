"""The batch that the data pipelines yield and the trainer consumes: three arrays of one
``[rows, seq_len]`` shape (FOT_SPEC 4: the loss is over target tokens whose mask is > 0).

A NamedTuple, so that ``jit``, ``device_put``, ``tree_map`` and sharding take it as it is (JAX
knows NamedTuples without a registration, which keeps JAX out of the data processes).  It also
reads as a mapping of its field names (``batch["loss_masks"]``, ``batch.items()``): the form
batches had before, which scripts and saved batch files use.
"""
from typing import Any, NamedTuple

import numpy as np


class Batch(NamedTuple):
    input_tokens: Any  # int32: the tokens the model reads
    target_tokens: Any  # int32: the next token of each input position
    loss_masks: Any  # float32: > 0 where the target counts in the loss

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._fields:
                raise KeyError(f"{key!r} is not a batch field; a batch holds "
                               f"{', '.join(self._fields)}")
            return getattr(self, key)
        return tuple.__getitem__(self, key)

    def keys(self):
        return self._fields

    def items(self):
        return zip(self._fields, self)

    @classmethod
    def from_mapping(cls, batch):
        """``batch`` (a Batch, or a mapping with its fields such as a custom dataset's dict)
        checked: every field present, of one ``[rows, seq_len]`` shape."""
        missing = [name for name in cls._fields if name not in batch.keys()]
        if missing:
            raise ValueError(f"the batch lacks {', '.join(missing)}: a batch holds "
                             f"{', '.join(cls._fields)} (FoT.batch.Batch)")
        batch = cls(*(batch[name] for name in cls._fields))
        shapes = {name: np.shape(value) for name, value in batch.items()}
        if len(set(shapes.values())) != 1 or len(shapes["input_tokens"]) != 2:
            raise ValueError(f"the batch's fields must share one [rows, seq_len] shape, got "
                             f"{shapes}")
        return batch


# The dtype of each field, as the pipelines write them.
DTYPES = Batch(np.int32, np.int32, np.float32)
