"""Per-tile maths of the fused cross-batch attention, shared by the Triton and Mosaic lowerings.

Each function takes tiles already in registers / VMEM and returns updated float32
accumulators; which tiles are visited, and in what order, is the lowerings' business (see
:mod:`FoT.kernels.plan`).  Scores are in base 2 (``plan.score_scale``); row statistics are
``[rows, 1]`` columns so that the same code lowers on GPU and TPU.  Matmuls take the input
dtype (bf16 or float32) and accumulate in float32; probabilities are cast back to the value
dtype before the ``P @ V`` product, as the reference does.
"""
import jax.numpy as jnp
from jax import lax

# Applied to base-2 scores above the causal diagonal.  Finite, so that a tile row that is
# entirely masked before any visible key never forms inf - inf; any later visible score
# rescales its contribution to exactly zero.
MASKED_SCORE = -1e30

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
    # Float32 inputs get float32 products: with the default precision Triton uses TF32
    # (errors near 3e-4 instead of 1e-7).
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def init_softmax(block_q, head_dim):
    """Running max, running sum and unnormalised output of the online softmax."""
    return (jnp.full((block_q, 1), -jnp.inf, jnp.float32),
            jnp.zeros((block_q, 1), jnp.float32),
            jnp.zeros((block_q, head_dim), jnp.float32))


def softmax_step(carry, q, k, v, score_scale, mask=None, bias=None):
    """Folds one key/value tile into the online softmax of a query tile.  ``bias`` (base 2,
    broadcasting to the score tile) is added to the scores: the decay of forgetting attention's
    kernel, which shares these tiles."""
    m, l, acc = carry
    s = _scores(q, k, score_scale, bias)
    if mask is not None:
        s = jnp.where(mask, s, MASKED_SCORE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new)
    l = l * correction + jnp.sum(p, axis=1, keepdims=True)
    acc = acc * correction + _dot(p.astype(v.dtype), v, _NN)
    return m_new, l, acc


def finish_softmax(carry):
    """Normalised output tile (float32) and its base-2 log-sum-exp column."""
    m, l, acc = carry
    return acc / l, m + jnp.log2(l)


def _scores(a, b, score_scale, bias):
    s = _dot(a, b, _NT) * score_scale
    return s if bias is None else s + bias


def probabilities_and_dscores(a, b, da, db, lse, delta, score_scale, mask, bias=None):
    """Recomputed probabilities ``P = exp2(a b^T * scale + bias - lse)`` and
    ``dS = P * (da db^T - delta)`` of one tile pair, in whichever orientation (query-major
    or key-major) the operands are given.  Masked pairs are selected to 0 after ``exp2``, so
    a positive bias above the diagonal never sends an inf into the products."""
    p = jnp.exp2(_scores(a, b, score_scale, bias) - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    return p, p * (_dot(da, db, _NT) - delta)


def dq_step(dq, q, k, v, do, lse, delta, score_scale, mask=None):
    """Adds one key tile's contribution to ``dQ / scale`` of a query tile (query-major:
    ``lse``/``delta`` are ``[block_q, 1]`` columns, ``mask`` is ``[block_q, block_k]``)."""
    _, ds = probabilities_and_dscores(q, k, do, v, lse, delta, score_scale, mask)
    return dq + _dot(ds.astype(k.dtype), k, _NN)


def dkv_step(carry, q, k, v, do, lse, delta, score_scale, mask=None):
    """Adds one query tile's contribution to ``(dK / scale, dV)`` of a key tile.  Key-major,
    so that no probability tile needs a transpose: scores are ``[block_k, block_q]``,
    ``lse``/``delta`` are ``[1, block_q]`` rows and ``mask`` is ``[block_k, block_q]``."""
    dk, dv = carry
    p, ds = probabilities_and_dscores(k, q, v, do, lse, delta, score_scale, mask)
    dv = dv + _dot(p.astype(do.dtype), do, _NN)
    dk = dk + _dot(ds.astype(q.dtype), q, _NN)
    return dk, dv
