"""The model's attention families and the one place that picks a layer's family.

Every family is a subclass of :class:`~EasyLM.models.llama.attention.interface.AttentionLayer`
in a module of its own, registered in :data:`ATTENTION_FAMILIES` under its name.  The decoder
asks :func:`layer_attention_types` which family each layer runs and :func:`attention_family`
for the class; it never looks at the name otherwise.
"""
from EasyLM.models.llama.attention.fot_memory import FoTMemoryAttention
from EasyLM.models.llama.attention.softmax import SoftmaxAttention

ATTENTION_FAMILIES = {
    "softmax": SoftmaxAttention,
    "fot_memory": FoTMemoryAttention,
}


def attention_family(name):
    """The :class:`AttentionLayer` subclass registered as ``name``."""
    if name not in ATTENTION_FAMILIES:
        raise ValueError(f"unknown attention family {name!r}; registered: "
                         f"{sorted(ATTENTION_FAMILIES)}")
    return ATTENTION_FAMILIES[name]


def layer_attention_types(config):
    """The family name of every layer, in order: the layers of ``mem_layers`` are FoT memory
    layers, the others ordinary softmax attention."""
    return tuple("fot_memory" if i in config.mem_layers else "softmax"
                 for i in range(config.num_hidden_layers))
