"""Pallas kernels of the FoT toolkit: fused cross-batch attention (see :mod:`FoT.kernels.flash`)
and the declaration of the inputs it supports."""
from FoT.kernels.flash import check_supported, flash_cross_batch

__all__ = ["check_supported", "flash_cross_batch"]
