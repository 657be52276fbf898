"""The fused gated linear attention kernel (Pallas): :func:`flash.fused_linear_attention`."""
from EasyLM.linear.kernels.flash import check_supported, fused_linear_attention

__all__ = ["check_supported", "fused_linear_attention"]
