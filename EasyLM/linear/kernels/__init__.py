"""The fused gated linear attention kernel (Pallas): :func:`flash.fused_linear_attention`."""
from EasyLM.linear.kernels.flash import (SUBCHUNK, TRITON_SHARED_MEMORY_LIMIT, check_inputs,
                                         check_shared_memory, check_supported,
                                         fused_linear_attention, triton_shared_memory)

__all__ = ["SUBCHUNK", "TRITON_SHARED_MEMORY_LIMIT", "check_inputs", "check_shared_memory",
           "check_supported", "fused_linear_attention", "triton_shared_memory"]
