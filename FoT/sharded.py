"""Cross-batch attention on a device mesh: every device attends for its own rows only.

A memory layer's inputs are sharded over rows (the mesh axes of the logical axis ``batch``,
:mod:`FoT.logical_axes`) and often over heads (those of ``heads``).  Left to the SPMD
partitioner, cross-batch attention gathers the whole batch on every device: a Pallas kernel is
a custom call the partitioner cannot split, and the reference's gather of neighbouring rows
becomes an all-gather.  :func:`sharded_cross_batch` runs the attention under ``shard_map``
instead, in one of two layouts:

* ``"rows"`` (halo): row ``b`` reads rows ``b - 1 .. b - C``, so with rows split contiguously a
  device only lacks the memory keys and values of the last ``h`` rows before its own (``h``
  = ``C``, plus up to ``dataset_packing - 1`` to start on a packing-group boundary).  They
  arrive by ``ppermute`` (one hop per device they span), and the device runs the unmodified
  attention on an extended batch ``[earlier rows; own rows; padding]``, keeping its own
  rows' outputs.  Every device runs the same program on the same shapes (its own rows sit
  at a per-device offset), and the extended batch's own slot table gives each own row the
  slots of its global row (see :func:`_local_offset`).  Cost: the earlier and padding rows
  also run as queries whose outputs are dropped, ``h / local rows`` more memory-layer
  attention per device.
* ``"heads"``: an all-to-all turns "all heads of my rows" into "all rows of my heads", the
  attention runs on the whole batch with the ordinary slot table, and a second all-to-all
  turns the result back.  It needs each device's key/value heads to split evenly over the
  devices holding rows; where they do not, ``"heads"`` runs as ``"rows"``.

On one device, or when no mesh axis shards the inputs, the plain attention runs: no wrapper,
same program.  ``"auto"`` takes ``"rows"``: its traffic is ``h`` rows of K and V per device
against four all-to-alls of every activation for ``"heads"``; which one is faster on real
interconnects has not been measured yet.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as PS

from FoT.cross_batch import cross_batch_core
from FoT.logical_axes import mesh_axes

LAYOUTS = ("auto", "rows", "heads")


def sharded_cross_batch(q, k_loc, k_mem, v, *, cross_batch_range, cross_batch_stepping=False,
                        dataset_packing=1, local_bias=None, layout="auto", mesh=None,
                        **core_options):
    """:func:`FoT.cross_batch.cross_batch_core` with rows (and heads) kept on their devices.

    Same arguments and result as ``cross_batch_core`` (``core_options`` are passed on:
    ``implementation``, ``block_size``, kernel options ...), plus ``layout`` (``"auto"``,
    ``"rows"`` or ``"heads"``) and ``mesh`` (default: the mesh set by ``jax.set_mesh``).
    Inputs are expected sharded as the model shards them: ``[batch, length, heads, head_dim]``
    (:mod:`FoT.logical_axes`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown cross-batch layout {layout!r}; choose one of {LAYOUTS}")
    args = dict(cross_batch_range=cross_batch_range, cross_batch_stepping=cross_batch_stepping,
                dataset_packing=dataset_packing, **core_options)
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    plan = _MeshPlan.make(mesh, q.shape, k_loc.shape)
    if plan is None:
        return cross_batch_core(q, k_loc, k_mem, v, local_bias=local_bias, **args)
    if layout == "heads" and plan.heads_split_over_rows(k_loc.shape[2]):
        body = _heads_body(plan, args)
    else:
        body = _rows_body(plan, q.shape[0], args)
    row_spec = PS(plan.batch_axes or None, None, plan.head_axis, None)
    bias_spec = PS()
    if local_bias is not None and local_bias.shape[0] == q.shape[0] > 1:
        bias_spec = PS(plan.batch_axes or None)
    in_specs = (row_spec,) * 4 + (bias_spec,)
    # Axes the specs do not name stay automatic: were they manual, the transpose would sum
    # the inputs' cotangents over them.  check_vma=False: pallas_call does not declare how
    # its outputs vary over mesh axes.
    manual = set(plan.batch_axes) | ({plan.head_axis} if plan.head_axis else set())
    run = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=row_spec,
                        axis_names=manual, check_vma=False)
    return run(q, k_loc, k_mem, v, local_bias)


class _MeshPlan:
    """Which mesh axes split rows and heads, and into how many parts."""

    def __init__(self, batch_axes, batch_devices, head_axis, head_parts):
        self.batch_axes = batch_axes
        self.batch_devices = batch_devices
        self.head_axis = head_axis
        self.head_parts = head_parts

    def heads_split_over_rows(self, kv_heads):
        """Whether each device's key/value heads split evenly over the devices of its rows
        (what ``layout="heads"`` needs)."""
        return self.batch_devices > 1 and (kv_heads // self.head_parts) % self.batch_devices == 0

    @classmethod
    def make(cls, mesh, q_shape, kv_shape):
        """``None`` when nothing is split (no mesh, one device, or axes of size 1)."""
        if mesh is None or mesh.empty or mesh.size == 1:
            return None
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
        batch_axes = tuple(a for a in mesh_axes("batch") if a in sizes)
        batch_devices = int(np.prod([sizes[a] for a in batch_axes]))
        if q_shape[0] % batch_devices:
            raise ValueError(f"a batch of {q_shape[0]} rows does not split over the "
                             f"{batch_devices} devices of mesh axes {batch_axes}")
        # Heads split over their axis (the rules give key/value heads the same one) only if
        # both query and key/value heads do (GQA groups stay whole); otherwise every device of
        # that axis computes all heads of its rows.
        head = mesh_axes("heads")
        parts = sizes.get(head, 1)
        head_axis = (head if head in sizes and q_shape[2] % parts == kv_shape[2] % parts == 0
                     else None)
        if batch_devices == 1 and (parts == 1 or head_axis is None):
            return None
        return cls(batch_axes, batch_devices, head_axis, parts if head_axis else 1)


def _rows_body(plan, global_rows, args):
    """Per-device attention with a halo of previous rows' memory keys and values."""
    devices = plan.batch_devices
    rows = global_rows // devices
    packing = args["dataset_packing"]
    offsets = np.asarray([_local_offset(d * rows, args["cross_batch_range"], packing)
                          for d in range(devices)], np.int32)
    halo = int(offsets.max())
    extended = -(-(halo + rows) // packing) * packing

    def body(q, k_loc, k_mem, v, bias):
        if halo == 0 and extended == rows:
            return cross_batch_core(q, k_loc, k_mem, v, local_bias=bias, **args)
        offset = jnp.asarray(offsets)[lax.axis_index(plan.batch_axes)]

        def extend(x, before=None):
            """``[earlier rows; x; padding]`` with x at row ``offset``, ``extended`` rows."""
            if before is None:
                before = jnp.zeros((halo,) + x.shape[1:], x.dtype)
            padding = jnp.zeros((extended - rows,) + x.shape[1:], x.dtype)
            return lax.dynamic_slice_in_dim(jnp.concatenate([before, x, padding]),
                                            halo - offset, extended)

        halo_k, halo_v = (_receive_halo(x, halo, plan.batch_axes, devices) for x in (k_mem, v))
        if bias is not None and bias.shape[0] > 1:
            bias = extend(bias)
        out = cross_batch_core(extend(q), extend(k_loc), extend(k_mem, halo_k),
                               extend(v, halo_v), local_bias=bias, **args)
        return lax.dynamic_slice_in_dim(out, offset, rows)

    return body


def _local_offset(start, cross_batch_range, packing):
    """Where the rows of the device starting at global row ``start`` sit in its extended
    batch: after the earlier rows its slots may read (``C``, more to start on a packing-group
    boundary), or after all earlier rows where there are fewer (the extended batch then
    starts at global row 0).  Either way an extended row and its global row agree modulo the
    packing, and the slot cap ``row + 1`` binds only where it binds globally, so the extended
    batch's slot table gives each local row its global slots."""
    return min(start, cross_batch_range + (start - cross_batch_range) % packing)


def _receive_halo(x, halo, axes, devices):
    """The last ``halo`` rows before this device's first row (as many as the devices before it
    hold; rows before global row 0 arrive as zeros and are never read)."""
    rows = x.shape[0]
    hops = -(-halo // rows)  # at most devices - 1: no device's offset reaches before row 0
    pieces = []
    for hop in range(1, hops + 1):
        count = min(rows, halo - (hop - 1) * rows)
        shift = [(d, d + hop) for d in range(devices - hop)]
        pieces.insert(0, lax.ppermute(x[rows - count:], axes, shift))
    return jnp.concatenate(pieces)


def _heads_body(plan, args):
    """Rows -> heads all-to-all, attention over the whole batch, and back."""
    def to_heads(x):
        return lax.all_to_all(x, plan.batch_axes, split_axis=2, concat_axis=0, tiled=True)

    def to_rows(x):
        return lax.all_to_all(x, plan.batch_axes, split_axis=0, concat_axis=2, tiled=True)

    def body(q, k_loc, k_mem, v, bias):
        if bias is not None and bias.shape[0] > 1:
            bias = lax.all_gather(bias, plan.batch_axes, axis=0, tiled=True)
        out = cross_batch_core(*(to_heads(x) for x in (q, k_loc, k_mem, v)), local_bias=bias,
                               **args)
        return to_rows(out)

    return body
