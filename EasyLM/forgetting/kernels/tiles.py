"""Per-tile maths of the forgetting attention kernel, shared by the Triton and Mosaic lowerings
and by the blockwise variant (mapped over rows and heads).

The cross-batch kernel's tile conventions (:mod:`FoT.kernels.tiles`: base-2 scores, ``[rows, 1]``
float32 statistics, matmuls in the input dtype accumulating in float32, float32 matmuls at full
precision) plus the decay bias: a tile's scores are

    s2 = q . k * score_scale + (c_q - c_k) * log2(e)

with ``c`` the running sums of the log gates.  The same functions serve query-major tiles
(``[block_q, block_k]``: ``c_q`` a column, ``c_k`` a row) and key-major ones
(``[block_k, block_q]``: ``c_q`` a row, ``c_k`` a column).
"""
import jax.numpy as jnp

from FoT.kernels import tiles as shared
from FoT.kernels.plan import LOG2_E
from FoT.kernels.tiles import _NN, _dot, finish_softmax, init_softmax

__all__ = ["dkv_step", "dq_step", "finish_softmax", "init_softmax", "softmax_step"]


def _decay(c_q, c_k):
    """The base-2 decay bias of a tile.  The difference first: c reaches thousands on long
    rows of strongly decaying gates, and scaling each c before subtracting would round the
    bias to that magnitude's precision (errors near 1e-4 in the scores of nearby, heavily
    weighted keys)."""
    return (c_q - c_k) * LOG2_E


def softmax_step(carry, q, k, v, c_q, c_k, score_scale, mask=None):
    """Folds one key/value tile into the online softmax of a query tile."""
    return shared.softmax_step(carry, q, k, v, score_scale, mask, _decay(c_q, c_k))


def _probabilities_and_dscores(a, b, da, db, lse, delta, c_q, c_k, score_scale, mask):
    """``P`` and ``dS`` of one tile pair in either orientation.  ``dS`` is the gradient of the
    natural-unit logits, so it is also the gradient of ``c_i`` (and minus that of ``c_j``)
    through the pair."""
    return shared.probabilities_and_dscores(a, b, da, db, lse, delta, score_scale, mask,
                                            _decay(c_q, c_k))


def dq_step(carry, q, k, v, do, lse, delta, c_q, c_k, score_scale, mask=None):
    """Adds one key tile's contribution to ``(dQ / scale, dc_query)`` of a query tile
    (query-major: ``lse``, ``delta``, ``c_q`` are ``[block_q, 1]`` columns)."""
    dq, dc = carry
    _, ds = _probabilities_and_dscores(q, k, do, v, lse, delta, c_q, c_k, score_scale,
                                       mask)
    return dq + _dot(ds.astype(k.dtype), k, _NN), dc + jnp.sum(ds, axis=1, keepdims=True)


def dkv_step(carry, q, k, v, do, lse, delta, c_q, c_k, score_scale, mask=None):
    """Adds one query tile's contribution to ``(dK / scale, dV, dc_key)`` of a key tile.
    Key-major, so that no probability tile needs a transpose: scores are
    ``[block_k, block_q]``, ``lse``, ``delta``, ``c_q`` are ``[1, block_q]`` rows and ``c_k``,
    ``dc_key`` ``[block_k, 1]`` columns."""
    dk, dv, dc = carry
    p, ds = _probabilities_and_dscores(k, q, v, do, lse, delta, c_q, c_k, score_scale,
                                       mask)
    dv = dv + _dot(p.astype(do.dtype), do, _NN)
    dk = dk + _dot(ds.astype(q.dtype), q, _NN)
    return dk, dv, dc - jnp.sum(ds, axis=1, keepdims=True)
