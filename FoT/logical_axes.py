"""The device mesh's axes and the one table that says which of them split each logical axis.

Arrays name their axes by meaning (``batch``, ``heads``, ``mlp`` ...); :data:`LOGICAL_AXIS_RULES`
maps every name to the mesh axes that split it, and :func:`logical_spec` turns a list of names
into a ``PartitionSpec``.  The model's activation constraints, its parameters' partition rules
and the sharded cross-batch attention (:mod:`FoT.sharded`) all read this table, so a layout
changes in one place.  It sits in FoT, the lowest layer, because :mod:`FoT.sharded` needs it
and imports nothing from EasyLM; :mod:`EasyLM.jax_utils` builds the mesh from
:data:`MESH_AXES`.
"""
from jax.sharding import PartitionSpec as PS

# Data parallel, fully sharded data parallel (rows, and each weight's model-width side),
# tensor parallel (heads, the MLP's inner width, the vocabulary).
MESH_AXES = ("dp", "fsdp", "mp")

LOGICAL_AXIS_RULES = {
    # Activations.
    "batch": ("dp", "fsdp"),
    "length": None,
    # The residual stream's width stays whole on every device: every tensor-parallel shard
    # needs it, and splitting it over mp also miscompiled on XLA:CPU.
    "activation_embed": None,
    "heads": "mp",
    "kv_heads": "mp",
    "head_dim": None,
    # Parameters and activations alike.
    "mlp": "mp",
    "vocab": "mp",
    # Parameters: the model-width side of every weight, split by FSDP and gathered for use.
    "embed": "fsdp",
}


def mesh_axes(name):
    """The mesh axis (a name, a tuple of names, or None: not split) of logical axis ``name``."""
    if name not in LOGICAL_AXIS_RULES:
        raise KeyError(f"unknown logical axis {name!r}; known: {sorted(LOGICAL_AXIS_RULES)}")
    return LOGICAL_AXIS_RULES[name]


def logical_spec(*names):
    """``PartitionSpec`` of an array whose axes are ``names`` (None: an axis never split)."""
    return PS(*(None if name is None else mesh_axes(name) for name in names))
