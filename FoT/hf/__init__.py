"""The PyTorch FoT LLaMA model shipped inside exported Hugging Face directories.

Import the model from its modules (``FoT.hf.modeling_fot_llama``); this package file stays
free of torch so that the JAX side can share :mod:`FoT.hf.windows_fot_llama`.  The modelling
files import nothing from the toolkit, so :data:`MODEL_FILES` can be copied next to the
weights and loaded with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``;
:func:`fot_config_dict` writes the matching ``config.json``.
``tokenization_sentencepiece_llama.py`` is the tokenizer an export made from a SentencePiece
model ships (see ``EasyLM.models.llama.convert_easylm_to_hf.copy_tokenizer``).
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_FILES = tuple(os.path.join(_HERE, name) for name in (
    "configuration_fot_llama.py", "windows_fot_llama.py", "cache_fot_llama.py",
    "decode_fot_llama.py", "prefill_fot_llama.py", "attention_fot_llama.py",
    "forgetting_fot_llama.py", "linear_fot_llama.py", "modeling_fot_llama.py"))
AUTO_MAP = {
    "AutoConfig": "configuration_fot_llama.FoTLlamaConfig",
    "AutoModel": "modeling_fot_llama.FoTLlamaModel",
    "AutoModelForCausalLM": "modeling_fot_llama.FoTLlamaForCausalLM",
}


def fot_config_dict(llama_config, mem_layers, last_context_length, mem_positionals=True,
                    mem_dtype=None, mem_attention_grouping=None, torch_attention=True,
                    window_rule="aligned", local_window_limit=None):
    """``config.json`` of a FoT model from the one of the equivalent ``LlamaForCausalLM``."""
    from .configuration_fot_llama import FoTLlamaConfig
    grouping = None if mem_attention_grouping is None else [int(x) for x in
                                                            mem_attention_grouping]
    memory = dict(mem_layers=[int(i) for i in mem_layers],
                  last_context_length=int(last_context_length), mem_positionals=mem_positionals,
                  mem_dtype=mem_dtype, mem_attention_grouping=grouping,
                  torch_attention=torch_attention, window_rule=window_rule,
                  local_window_limit=None if local_window_limit is None
                  else int(local_window_limit))
    fields = {k: v for k, v in llama_config.items() if k not in ("architectures", "model_type")}
    FoTLlamaConfig(**dict(fields, **memory)).validate_fot()
    return dict(llama_config, model_type=FoTLlamaConfig.model_type,
                architectures=["FoTLlamaForCausalLM"], auto_map=dict(AUTO_MAP), **memory)
