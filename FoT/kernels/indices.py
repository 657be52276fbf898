"""Integer index arithmetic for the Pallas kernels (FoT, forgetting and linear attention).

Quotients and remainders of non-negative indices go through ``lax.div`` and ``lax.rem``:
Mosaic lowers them directly, where ``//`` and ``%`` of ``jnp`` add a sign correction.
``lax`` refuses operands of different integer types, and with ``jax_enable_x64`` a Python int
becomes int64 beside the kernels' int32 grid indices and iotas; these helpers give a Python
int the other operand's type, and compute with Python ints when both are.
"""
import jax.numpy as jnp
from jax import lax


def _same_type(a, b):
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        dtype = getattr(b, "dtype", None)
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def index_div(a, b):
    """``a // b`` of non-negative indices (traced int32 scalars or arrays, or Python ints)."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return lax.div(*_same_type(a, b))


def index_rem(a, b):
    """``a % b`` of non-negative indices (traced int32 scalars or arrays, or Python ints)."""
    if isinstance(a, int) and isinstance(b, int):
        return a % b
    return lax.rem(*_same_type(a, b))


def index_min(a, b):
    """The smaller of two indices (traced int32 scalars or arrays, or Python ints)."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return lax.min(*_same_type(a, b))
