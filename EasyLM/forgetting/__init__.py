"""Forgetting attention (FoX: softmax attention with a forget gate): the implementations.

:func:`forgetting_attention` is the one entry point layers call.  Variants (``implementation``):

* ``"reference"``: materialised float32 logits (:mod:`EasyLM.forgetting.reference`), the oracle.
"""
from EasyLM.forgetting.reference import (check_shapes, cumulative_log_forget,
                                         reference_forgetting_attention)

IMPLEMENTATIONS = ("reference",)
# Fastest first; a caller choosing automatically takes the first that accepts its inputs.
FALLBACK_ORDER = ("reference",)


def forgetting_attention(q, k, v, log_f, key_mask=None, implementation="auto"):
    """Forgetting attention ``[B, L, H, D]``: ``q [B, L, H, D]``, ``k, v [B, L, KV, D]``,
    ``log_f [B, L, H]`` (log forget gates), ``key_mask [B, L]`` or None."""
    check_shapes(q, k, v, log_f)
    if implementation not in ("auto",) + IMPLEMENTATIONS:
        raise ValueError(f"unknown forgetting attention implementation {implementation!r}; "
                         f"choose one of {('auto',) + IMPLEMENTATIONS}")
    return reference_forgetting_attention(q, k, v, log_f, key_mask)


__all__ = ["FALLBACK_ORDER", "IMPLEMENTATIONS", "cumulative_log_forget", "forgetting_attention",
           "reference_forgetting_attention"]
