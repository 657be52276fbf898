"""Cross-batch attention on a device mesh: every device attends for its own rows only.

A memory layer's inputs are sharded over rows (the batch axes ``dp, fsdp``) and often over
heads (``mp``).  Left to the SPMD partitioner, cross-batch attention gathers the whole batch
on every device: a Pallas kernel is a custom call the partitioner cannot split, and the
reference's gather of neighbouring rows becomes an all-gather.  :func:`sharded_cross_batch`
runs the attention under ``shard_map`` instead, in one of two layouts:

* ``"rows"`` (halo): row ``b`` reads rows ``b - 1 .. b - C``, so with rows split contiguously a
  device only lacks the memory keys and values of the last ``h`` rows of the devices before
  it (``h`` = ``C`` rounded up to whole packing groups).  They arrive by ``ppermute`` (one hop
  per device they span), and the device runs the unmodified attention on the extended batch
  ``[halo; local]``, keeping the outputs of its own rows.  The extended batch starts on a
  packing-group boundary and, on the first devices, never reaches before global row 0, so the
  slot table of the extended batch equals the global one on every local row; the branch of
  each of those first devices is picked with ``lax.switch``.  Cost: the halo rows also run
  as (discarded) queries, ``h / local_rows`` more memory-layer attention per device.
* ``"heads"``: an all-to-all turns "all heads of my rows" into "all rows of my heads", the
  attention runs on the whole batch with the ordinary slot table, and a second all-to-all
  turns the result back.  It needs each device's key/value heads to split evenly over the
  devices holding rows; where they do not, ``"heads"`` runs as ``"rows"``.

On one device, or when no mesh axis shards the inputs, the plain attention runs: no wrapper,
same program.  ``"auto"`` takes ``"rows"``: its traffic is ``h`` rows of K and V per device
against four all-to-alls of every activation for ``"heads"``; which one is faster on real
interconnects has not been measured yet (README, sharding).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as PS

from FoT.cross_batch import cross_batch_core

LAYOUTS = ("auto", "rows", "heads")
BATCH_AXES = ("dp", "fsdp")
HEAD_AXIS = "mp"


def sharded_cross_batch(q, k_loc, k_mem, v, *, cross_batch_range, cross_batch_stepping=False,
                        dataset_packing=1, local_bias=None, layout="auto", mesh=None,
                        **core_options):
    """:func:`FoT.cross_batch.cross_batch_core` with rows (and heads) kept on their devices.

    Same arguments and result as ``cross_batch_core`` (``core_options`` are passed on:
    ``implementation``, ``block_size``, kernel options ...), plus ``layout`` (``"auto"``,
    ``"rows"`` or ``"heads"``) and ``mesh`` (default: the mesh set by ``jax.set_mesh``).
    Inputs are expected sharded as the model shards them: rows over ``dp, fsdp``, heads over
    ``mp``.
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
    # check_vma=False: pallas_call does not declare how its outputs vary over mesh axes.
    run = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=row_spec,
                        check_vma=False)
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
        batch_axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
        batch_devices = int(np.prod([sizes[a] for a in batch_axes]))
        if q_shape[0] % batch_devices:
            raise ValueError(f"a batch of {q_shape[0]} rows does not split over the "
                             f"{batch_devices} devices of mesh axes {batch_axes}")
        # Heads split over mp only if both query and key/value heads do (GQA groups stay
        # whole); otherwise every mp device computes all heads of its rows.
        mp = sizes.get(HEAD_AXIS, 1)
        head_axis = HEAD_AXIS if mp > 1 and q_shape[2] % mp == kv_shape[2] % mp == 0 else None
        if not batch_axes and head_axis is None:
            return None
        return cls(batch_axes, batch_devices, head_axis, mp if head_axis else 1)


def _rows_body(plan, global_rows, args):
    """Per-device attention with a halo of previous rows' memory keys and values."""
    devices = plan.batch_devices
    rows = global_rows // devices
    layouts = [_extended_batch(d * rows, rows, args["cross_batch_range"],
                               args["dataset_packing"]) for d in range(devices)]
    branches = sorted(set(layouts))
    branch_of_device = np.asarray([branches.index(x) for x in layouts], np.int32)
    halo = max(lead for lead, _ in branches)

    def attend(lead, tail, q, k_loc, k_mem, v, halo_k, halo_v, bias):
        def pad(x, before=None):
            parts = [jnp.zeros((lead,) + x.shape[1:], x.dtype) if before is None
                     else before[before.shape[0] - lead:], x,
                     jnp.zeros((tail,) + x.shape[1:], x.dtype)]
            return jnp.concatenate(parts) if lead or tail else x

        if bias is not None and bias.shape[0] > 1:
            bias = pad(bias)
        out = cross_batch_core(pad(q), pad(k_loc), pad(k_mem, halo_k), pad(v, halo_v),
                               local_bias=bias, **args)
        return out[lead:lead + rows]

    def body(q, k_loc, k_mem, v, bias):
        if len(branches) == 1:
            return attend(*branches[0], q, k_loc, k_mem, v, None, None, bias)
        halo_k, halo_v = (_receive_halo(x, halo, plan.batch_axes, devices) for x in (k_mem, v))
        branch = jnp.asarray(branch_of_device)[lax.axis_index(plan.batch_axes)]
        return lax.switch(branch, [lambda *a, layout=x: attend(*layout, *a) for x in branches],
                          q, k_loc, k_mem, v, halo_k, halo_v, bias)

    return body


def _extended_batch(start, rows, cross_batch_range, packing):
    """``(lead, tail)``: the device whose rows begin at global row ``start`` attends over
    ``lead`` earlier rows, its own ``rows`` and ``tail`` padding rows.

    ``lead`` covers the ``C`` rows its slots may read and starts the extended batch on a
    packing-group boundary, and ``tail`` ends it on one, so the extended batch's slot table
    (rows modulo the packing, slots capped at row + 1) gives each of the device's rows the
    slots of its global row.  ``lead`` never reaches before global row 0, where the cap must
    stay.  The padding rows' outputs are dropped, so they add compute but no gradient.
    """
    lead = min(start, cross_batch_range + (start - cross_batch_range) % packing)
    return lead, -(lead + rows) % packing


def _receive_halo(x, halo, axes, devices):
    """The last ``halo`` rows before this device's first row (as many as the devices before it
    hold; rows before global row 0 arrive as zeros and are never read)."""
    rows = x.shape[0]
    hops = min(-(-halo // rows), devices - 1)
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
