"""The slot table of cross-batch attention (FOT_SPEC 2.3-2.4): which neighbour rows each row
of a batch may attend to.

A leaf module, so that the cross-batch variants (:mod:`FoT.cross_batch`) and the kernel's
tiling plan (:mod:`FoT.kernels.plan`), which :mod:`FoT.cross_batch` dispatches to, both read
the one table without importing each other.
"""
import numpy as np


def validate_cross_batch_args(batch_size, cross_batch_range, dataset_packing):
    if cross_batch_range < 0:
        raise ValueError(f"cross_batch_range must be >= 0, got {cross_batch_range}")
    if dataset_packing < 1:
        raise ValueError(f"dataset_packing must be >= 1, got {dataset_packing}")
    check_whole_groups(batch_size, dataset_packing)


def check_whole_groups(rows, packing, parts=1, part_name="parts"):
    """Raise ``ValueError`` unless ``rows`` splits into ``parts`` equal shares of whole groups of
    ``packing`` rows: a document's ``packing`` consecutive rows must stay together in a batch,
    on a process and in a micro-batch, or cross-batch attention pairs the wrong rows."""
    if rows % packing:
        raise ValueError(f"{rows} rows are not divisible by dataset_packing {packing} "
                         f"(the packing factor {packing}: each document occupies {packing} "
                         f"consecutive rows; change the batch size or the data pipeline's kN)")
    if rows % (packing * parts):
        raise ValueError(f"{rows} rows are not divisible into {parts} {part_name} of whole "
                         f"groups of {packing} row(s)")


def allowed_slots(batch_size, cross_batch_range, dataset_packing, cross_batch_stepping):
    """``n_b`` of FOT_SPEC 2.4: how many context slots (slot 0 included) each row may use."""
    validate_cross_batch_args(batch_size, cross_batch_range, dataset_packing)
    num_slots = cross_batch_range + 1
    rows = np.arange(batch_size)
    if dataset_packing == 1 or not cross_batch_stepping:
        n = np.full(batch_size, num_slots)
    else:
        step = -(-num_slots // max(dataset_packing - 1, 1))
        n = np.minimum((rows % dataset_packing) * step + 1, num_slots)
    return np.minimum(n, rows + 1).astype(np.int32)


def slot_mask(batch_size, cross_batch_range, dataset_packing, cross_batch_stepping):
    """Boolean ``[B, C + 1]`` table: ``slot_mask[b, c]`` is whether row ``b`` sees slot ``c``."""
    n = allowed_slots(batch_size, cross_batch_range, dataset_packing, cross_batch_stepping)
    return np.arange(cross_batch_range + 1)[None, :] < n[:, None]


def slot_sources(batch_size, cross_batch_range):
    """``[B, C + 1]`` row index feeding each slot: ``(b - c) mod B``."""
    return (np.arange(batch_size)[:, None] - np.arange(cross_batch_range + 1)[None, :]) % batch_size
