"""Training data: text processing, JSON-lines and Hugging Face sources, and ``DatasetFactory``.

``DatasetFactory.load_dataset(config, tokenizer, process_index, process_count, name)`` returns
a dataset the trainer iterates for ``(batch, metrics)``: a :class:`FoT.batch.Batch` of this
process's rows (see ``FoT.data_pipeline``).  Documents flow as

    records (raw JSON lines or HF examples, each with the position just after it)
      -> TextProcessor, in-process or in a spawn pool (``tokenizer_processes``), in order
      -> skip bad records (counted; one warning per reason), drop short ones
         (``min_example_length``)
      -> the configured pipeline (``linear`` / ``doc_aware`` / ``doc_aware_kN``)

Both sources loop over their data forever, counting passes.  Resume is exact: the saved state
holds the position just after the last document the pipeline *consumed* (documents that a
tokenizer pool prepared ahead are read again after a restore) plus the pipeline's buffers.
A dataset has one live iterator: ``iter(dataset)`` (again) continues from the current state,
so call it after ``load_state_dict``; ``close()`` stops the tokenizer processes.

With several hosts, every host reads and tokenizes the whole stream (so the global batch
layout is exact) and keeps only its own rows; each host saves and restores its own state.
Tokenizer processes are started with 'spawn' (forking a process that runs JAX threads can
deadlock), so a script using ``tokenizer_processes > 1`` needs the usual
``if __name__ == "__main__":`` guard.

One job per module: ``text`` (example -> tokens), ``tokenizer_pool`` (records -> documents,
possibly in processes), ``skips`` (the skipped-records report), ``dataset`` (what every source
shares: position, checks, pipeline, resume state), ``json_source`` and ``huggingface_source``
(the two sources), ``factory`` (config -> dataset).
"""
from EasyLM.data.dataset import read_pipeline
from EasyLM.data.factory import DatasetFactory
from EasyLM.data.huggingface_source import HuggingfaceDataset
from EasyLM.data.json_source import JsonDataset
from EasyLM.data.skips import SkipReport
from EasyLM.data.text import DocumentError, TextProcessor, parse_record, process_record
from EasyLM.data.tokenizer_pool import tokenized

__all__ = ["DatasetFactory", "DocumentError", "HuggingfaceDataset", "JsonDataset", "SkipReport",
           "TextProcessor", "parse_record", "process_record", "read_pipeline", "tokenized"]
