"""The fused gated linear attention kernel (Pallas): :func:`flash.fused_linear_attention`."""
from EasyLM.linear.kernels.flash import (SUBCHUNK, check_inputs, check_supported,
                                         fused_linear_attention)

__all__ = ["SUBCHUNK", "check_inputs", "check_supported", "fused_linear_attention"]
