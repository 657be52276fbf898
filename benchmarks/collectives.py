"""The collectives of a compiled train step: what a mesh costs in communication.

Reads the per-device program XLA compiled (``compiled.as_text()``) and lists every
all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute with its shape and
bytes, so that a user can compare meshes (``mesh_dim``) and a test can assert that no
activation is gathered along the batch.  Counts are per instruction of the program: a
collective inside a loop (gradient accumulation, ``scan_layers``) runs once per iteration but
is listed once.

    python -m benchmarks.bench_train --parts collectives --mesh 2,2,2 ...   # one table

This module imports no JAX at import time (the benchmark drivers must not).
"""
import collections
import re

from FoT.batch import DTYPES, Batch

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
# "%name = <result type> <kind>[-start](<operands>), attributes"; asynchronous pairs are
# counted at their -start (the -done carries no new data).
_INSTRUCTION = re.compile(r"=\s*(?P<result>.*?)\s(?P<kind>" + "|".join(KINDS)
                          + r")(?:-start)?\((?P<operands>.*?)\)(?P<attrs>.*)$")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_GATHER_DIMS = re.compile(r"dimensions=\{(\d+)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _arrays(text):
    out = []
    for m in _ARRAY.finditer(text):
        if m["dtype"] in _ITEM_BYTES:
            dims = tuple(int(d) for d in m["dims"].split(",") if d)
            size = 1
            for d in dims:
                size *= d
            out.append((m["dtype"], dims, size * _ITEM_BYTES[m["dtype"]]))
    return out


def collectives(hlo_text):
    """One dict per collective instruction: ``kind``, ``dtype``, ``shape`` (of its largest
    array, operand or result: the gathered / reduced / exchanged tensor as one device holds
    it), ``bytes`` of that array, ``op_name`` (the JAX operation it serves, when XLA kept it),
    and for all-gathers ``gather_dim`` and the operand's
    ``operand_shape``."""
    found = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.search(line)
        if m is None:
            continue
        operands = _arrays(m["operands"])
        arrays = _arrays(m["result"]) + operands
        if not arrays:
            continue
        dtype, shape, size = max(arrays, key=lambda a: a[2])
        op_name = _OP_NAME.search(m["attrs"])
        entry = dict(kind=m["kind"], dtype=dtype, shape=shape, bytes=size,
                     op_name=op_name.group(1) if op_name else "")
        if m["kind"] == "all-gather":
            dims = _GATHER_DIMS.search(m["attrs"])
            entry["gather_dim"] = int(dims.group(1)) if dims else None
            entry["operand_shape"] = operands[0][1] if operands else None
        found.append(entry)
    return found


def batch_all_gathers(entries, batch_rows, seq_length):
    """All-gathers that assemble activations along the batch: gathered on their first
    dimension into ``batch_rows`` rows (``[B, L, ...]``) or ``batch_rows * seq_length`` tokens
    (``[B * L, ...]``).  Choose model sizes that differ from both, so that parameters cannot
    match."""
    wanted = {batch_rows, batch_rows * seq_length}
    return [e for e in entries if e["kind"] == "all-gather" and e.get("gather_dim") == 0
            and e["shape"] and e["shape"][0] in wanted]


def summary(entries):
    """``{kind: (instructions, bytes)}`` in ``KINDS`` order (kinds absent are left out)."""
    totals = collections.OrderedDict()
    for kind in KINDS:
        chosen = [e for e in entries if e["kind"] == kind]
        if chosen:
            totals[kind] = (len(chosen), sum(e["bytes"] for e in chosen))
    return totals


def format_table(entries, title=""):
    """Markdown: one line per kind and distinct shape, then totals per kind."""
    groups = collections.Counter((e["kind"], e["dtype"], e["shape"], e["bytes"])
                                 for e in entries)
    lines = [f"\n# collectives{': ' + title if title else ''}",
             "\n| kind | dtype | shape (per device) | instructions | bytes each | bytes |",
             "|---|---|---|---|---|---|"]
    for (kind, dtype, shape, size), count in sorted(
            groups.items(), key=lambda g: (KINDS.index(g[0][0]), -g[0][3] * g[1])):
        lines.append(f"| {kind} | {dtype} | {list(shape)} | {count} | {_human(size)} | "
                     f"{_human(size * count)} |")
    lines += ["\n| kind | instructions | bytes |", "|---|---|---|"]
    for kind, (count, size) in summary(entries).items():
        lines.append(f"| {kind} | {count} | {_human(size)} |")
    if not entries:
        lines.append("| (none) | 0 | 0 |")
    return "\n".join(lines)


def _human(size):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def train_step_collectives(trainer, batch_rows, seq_length):
    """Collectives of ``trainer``'s compiled train step on a ``[batch_rows, seq_length]``
    batch (compiled, not run); call inside ``jax.set_mesh(trainer.mesh)``."""
    import jax
    batch = Batch(*(jax.ShapeDtypeStruct((batch_rows, seq_length), dtype,
                                         sharding=trainer.batch_sharding) for dtype in DTYPES))
    compiled = trainer._train.lower(trainer.abstract_state(), batch).compile()
    return collectives(compiled.as_text())
