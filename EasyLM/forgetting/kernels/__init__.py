"""Pallas kernel of forgetting attention: the fused forward and backward passes
(:mod:`EasyLM.forgetting.kernels.flash`) and the declaration of the inputs they support."""
from EasyLM.forgetting.kernels.flash import check_supported, flash_forgetting_attention

__all__ = ["check_supported", "flash_forgetting_attention"]
