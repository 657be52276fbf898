"""Mesh construction, rule-based sharding and small JAX helpers shared by model and trainer."""
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from FoT.logical_axes import MESH_AXES, logical_spec, mesh_axes

# The mesh axes that split a batch's rows.
BATCH_AXES = mesh_axes("batch")


def parse_mesh_dim(mesh_dim, device_count=None, key="mesh_dim"):
    """``"1,-1,1"`` -> a tuple of three sizes multiplying to the device count (one -1 allowed)."""
    device_count = jax.device_count() if device_count is None else device_count
    try:
        dims = [int(x) for x in str(mesh_dim).split(",")]
    except ValueError:
        raise ValueError(f"{key}={mesh_dim!r}: expected comma-separated integers like "
                         f"'1,-1,1' for the axes {MESH_AXES}") from None
    if len(dims) != len(MESH_AXES):
        raise ValueError(f"{key}={mesh_dim!r}: give one size per mesh axis {MESH_AXES}")
    if dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
        raise ValueError(f"{key}={mesh_dim!r}: sizes must be positive, with at most one -1")
    known = int(np.prod([d for d in dims if d != -1]))
    if -1 in dims:
        if device_count % known:
            raise ValueError(f"{key}={mesh_dim!r}: {device_count} devices cannot be split "
                             f"with fixed sizes multiplying to {known}")
        dims[dims.index(-1)] = device_count // known
    if int(np.prod(dims)) != device_count:
        raise ValueError(f"{key}={mesh_dim!r} multiplies to {int(np.prod(dims))} but there "
                         f"are {device_count} devices; change {key} so the sizes multiply to "
                         f"{device_count} (or use -1 for one axis)")
    return tuple(dims)


def get_jax_mesh(mesh_dim, key="mesh_dim"):
    dims = parse_mesh_dim(mesh_dim, key=key)
    devices = np.asarray(jax.devices()).reshape(dims)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(devices, MESH_AXES, axis_types=auto)


def with_sharding_constraint(x, spec):
    """Constrain an activation's sharding when a mesh is set; a no-op on a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def with_logical_constraint(x, *axis_names):
    """:func:`with_sharding_constraint` to the layout of an array whose axes are
    ``axis_names`` (:func:`FoT.logical_axes.logical_spec`)."""
    return with_sharding_constraint(x, logical_spec(*axis_names))


def tree_path_name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def match_partition_rules(rules, tree):
    """PartitionSpec for every leaf of ``tree``: the first rule whose regex matches its path."""
    def spec_for(path, leaf):
        name = tree_path_name(path)
        if np.ndim(leaf) == 0 or np.prod(np.shape(leaf)) == 1:
            return PS()
        for pattern, spec in rules:
            if re.search(pattern, name) is not None:
                return spec
        raise ValueError(f"no partition rule matches parameter {name!r}")
    return jax.tree_util.tree_map_with_path(spec_for, tree)


def named_shardings(mesh, specs):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PS))


# The float dtypes a config or command line may name: short name -> NumPy / JAX / PyTorch name.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(name):
    """``'bf16'`` or ``'bfloat16'`` -> ``'bfloat16'``, the name NumPy, JAX and PyTorch share."""
    if name in DTYPE_NAMES.values():
        return name
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose one of "
                         f"{sorted(DTYPE_NAMES) + sorted(DTYPE_NAMES.values())}")
    return DTYPE_NAMES[name]


def float_dtype(name):
    """``'bf16'`` / ``'bfloat16'`` / ``'fp32'`` ... -> a jnp dtype."""
    import jax.numpy as jnp
    return getattr(jnp, dtype_name(name))
