"""Pallas kernels of the FoT toolkit: fused cross-batch attention (see :mod:`FoT.kernels.flash`)."""
from FoT.kernels.flash import flash_cross_batch

__all__ = ["flash_cross_batch"]
