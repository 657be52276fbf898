"""The model's attention families and the one place that picks a layer's family.

Every family is a subclass of :class:`~EasyLM.models.llama.attention.interface.AttentionLayer`
in a module of its own, registered in :data:`ATTENTION_FAMILIES` under its name.  The config
declares the families (``attention_type``: one name for every layer outside ``mem_layers``, or
one name per layer; :func:`check_attention_types` validates it); the decoder asks
:func:`layer_attention_types` which family each layer runs and :func:`attention_family` for the
class; it never looks at the name otherwise.
"""
from EasyLM.models.llama.attention.forgetting import ForgettingAttention
from EasyLM.models.llama.attention.fot_memory import FoTMemoryAttention
from EasyLM.models.llama.attention.linear import GatedLinearAttention, SupraAttention
from EasyLM.models.llama.attention.softmax import SoftmaxAttention

ATTENTION_FAMILIES = {
    "softmax": SoftmaxAttention,
    "fot_memory": FoTMemoryAttention,
    "forgetting": ForgettingAttention,
    "supra": SupraAttention,
    "gla": GatedLinearAttention,
}
# The family of the layers of ``mem_layers``, which alone decide where it runs.
MEMORY_FAMILY = "fot_memory"
# What a memory layer's own entry in a per-layer ``attention_type`` may say: it runs FoT
# memory, which is softmax attention over window and memory.
MEMORY_LAYER_ENTRIES = ("softmax", MEMORY_FAMILY)


def attention_family(name):
    """The :class:`AttentionLayer` subclass registered as ``name``."""
    if name not in ATTENTION_FAMILIES:
        raise ValueError(f"unknown attention family {name!r}; registered: "
                         f"{sorted(ATTENTION_FAMILIES)}")
    return ATTENTION_FAMILIES[name]


def check_attention_types(declared, num_layers, mem_layers):
    """Raises ``ValueError`` (one line, naming ``attention_type``) unless ``declared`` is a
    registered family for every layer outside ``mem_layers`` or a sequence of one registered
    family per layer, whose memory layers' entries say softmax or fot_memory and whose other
    entries do not say fot_memory."""
    others = sorted(set(ATTENTION_FAMILIES) - {MEMORY_FAMILY})
    if isinstance(declared, str):
        if declared == MEMORY_FAMILY:
            raise ValueError(f"attention_type {declared!r}: memory layers are the layers of "
                             f"mem_layers; give the family of the other layers, one of "
                             f"{others}")
        if declared not in ATTENTION_FAMILIES:
            raise ValueError(f"attention_type {declared!r}: unknown attention family; give one "
                             f"of {others} or a list of one family per layer")
        return
    if len(declared) != num_layers:
        raise ValueError(f"attention_type lists {len(declared)} families for "
                         f"{num_layers} layers (num_hidden_layers): give one per layer")
    for i, name in enumerate(declared):
        if name not in ATTENTION_FAMILIES:
            raise ValueError(f"attention_type[{i}] {name!r}: unknown attention family; choose "
                             f"one of {others}")
        if i in mem_layers and name not in MEMORY_LAYER_ENTRIES:
            raise ValueError(f"attention_type[{i}] {name!r}: layer {i} is in mem_layers and "
                             f"runs FoT memory (softmax over window and memory); its entry "
                             f"must be 'softmax' or 'fot_memory', or take {i} out of "
                             f"mem_layers")
        if i not in mem_layers and name == MEMORY_FAMILY:
            raise ValueError(f"attention_type[{i}] 'fot_memory': memory layers are the layers "
                             f"of mem_layers; add {i} to mem_layers or choose one of {others}")


def layer_attention_types(config):
    """The family name of every layer, in order: the layers of ``mem_layers`` are FoT memory
    layers, the others run ``attention_type`` (one family for all, or each its own)."""
    declared = config.attention_type
    if isinstance(declared, str):
        declared = (declared,) * config.num_hidden_layers
    return tuple(MEMORY_FAMILY if i in config.mem_layers else name
                 for i, name in enumerate(declared))
