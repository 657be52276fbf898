"""GPU lowering of the fused gated linear attention kernel: Pallas through Triton.

Four kernels, two sequential along the row and two parallel over its chunks:

* ``states`` (one program per row, head and value block) runs the recurrence once per chunk
  and stores the state each chunk starts from, ``h [B, N, H, Dk, Dv]`` in the input dtype,
  and the final state (float32).
* ``outputs`` (one program per chunk, row and head) computes the chunk's outputs from the
  state it starts from and its own tokens, sixteen-token sub-chunks at a time.
* ``dstates`` (per row, head and value block) runs the recurrence of the state's gradient
  backwards and stores the gradient each chunk's end receives, and the initial state's.
* ``grads`` (per chunk, row and head) computes dq, dk, dv and the gradient of the gates'
  running sum ``db = q * dq - k * dk``, leaving each token's pair with itself out of that
  product: its weight is exactly 1 and has no gate gradient.

Inputs are the model's ``[B, L, H, D]`` layout, the keys and values already expanded to the
query heads, the row padded to whole chunks.  ``c [B, L, H, Dk]`` is the running sum of the
log gates inside each sub-chunk of ``S`` tokens and ``tot [B, N, H, Dk]`` each chunk's sum.
Every exponent taken is a sum of few terms and at most zero (the decays between two tokens
of the chunk are built from the rest of the key's sub-chunk, whole sub-chunks between, and the
query's sub-chunk up to the query), as in :mod:`EasyLM.linear.chunked`, so no gate strength
overflows.  Pairs inside one sub-chunk take each key dimension's decay explicitly, one key
(a ``[S, Dk]`` tile of exponentials) at a time; pairs across sub-chunks are ``[S, S]`` matrix
products.  Matmuls take the input dtype and accumulate in float32 (float32 inputs: float32
products).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from FoT.kernels.triton_lowering import _whole_array

# A chunk whose gates sum to more than -MILD_LIMIT in every key dimension takes whole-chunk
# matmuls with factored decays (exp(F_i) and exp(-F_j) within exp(+-40) of 1); a stronger one,
# sixteen tokens at a time with every exponent <= 0.
MILD_LIMIT = 40.0

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims, dtype):
    """``a`` and ``b`` cast to ``dtype`` (the input dtype), float32 accumulation; float32
    inputs get float32 products (Triton's default for them is TF32)."""
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                           preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes and tiling of one call: ``chunk`` tokens a chunk, ``sub`` a sub-chunk,
    ``block_v`` value columns per program of the sequential kernels."""
    batch: int
    length: int  # padded to whole chunks
    heads: int
    key_dim: int
    value_dim: int
    chunk: int
    sub: int
    block_v: int
    scale: float
    dtype: object
    per_head: bool = False  # one gate per head: c and tot have a last axis of 1

    @property
    def n_chunks(self):
        return self.length // self.chunk

    @property
    def n_sub(self):
        return self.chunk // self.sub


@dataclasses.dataclass(frozen=True)
class Options:
    """Warps and pipeline stages of the states, outputs, dstates and grads kernels."""
    num_warps: tuple = (4, 4, 4, 4)
    num_stages: tuple = (2, 1, 2, 1)

    def params(self, kernel):
        return plgpu.CompilerParams(num_warps=self.num_warps[kernel],
                                    num_stages=self.num_stages[kernel])


def _rows(ref, row, start, size, head, columns=None):
    """``size`` tokens of one row and head of a ``[B, L, H, D]`` ref: ``[size, D]`` float32
    (``columns``: a ``pl.ds`` of the last axis)."""
    cols = slice(None) if columns is None else columns
    return ref[row, pl.ds(start, size), head, cols].astype(jnp.float32)


class _Chunk:
    """The gate sums one chunk's tiles need, from its sub-chunk totals ``T_K`` (``[1, Dk]``
    rows, read from ``c`` at each sub-chunk's last token)."""

    def __init__(self, plan, c_ref, row, head, start):
        self.plan, self.start = plan, start
        self.totals = [c_ref[row, pl.ds(start + (j + 1) * plan.sub - 1, 1), head, :]
                       for j in range(plan.n_sub)]

    def mild(self):
        """Whether every key dimension decays by less than ``exp(-MILD_LIMIT)`` over the chunk:
        then ``exp(F_i) * exp(-F_j)`` of the running sum ``F`` from the chunk's start stays in
        float32's range, and the chunk's pairs are whole-chunk matmuls."""
        return jnp.min(sum(self.totals)) > -MILD_LIMIT

    def _sub_of_row(self, rows):
        return lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // self.plan.sub

    def from_start(self, c):
        """``[C, Dk]``: log decay from the chunk's start through each token (inclusive)."""
        sub = self._sub_of_row(c.shape[0])
        return c + sum(jnp.where(sub > j, t, 0.0) for j, t in enumerate(self.totals))

    def to_end(self, c):
        """``[C, Dk]``: log decay after each token to the chunk's end."""
        sub = self._sub_of_row(c.shape[0])
        rest = sum(jnp.where(sub == j, t - c, 0.0) for j, t in enumerate(self.totals))
        return rest + sum(jnp.where(sub < j, t, 0.0) for j, t in enumerate(self.totals))

    def before(self, i):
        """``[1, Dk]``: log decay over the sub-chunks before sub-chunk ``i``."""
        return sum(self.totals[:i], jnp.zeros_like(self.totals[0]))

    def pair_exponents(self, c, c_row, strict):
        """``[C, C]`` log decay between query ``i`` (rows) and key ``j`` (columns) of a chunk
        with one gate per head (``c [C, 1]``, ``c_row [1, C]``): ``c_i - c_j`` inside a
        sub-chunk, else the query's sub-chunk up to it, the sub-chunks between and the rest
        of the key's; ``-inf`` above the diagonal (and on it if ``strict``)."""
        size = c.shape[0]
        i = lax.broadcasted_iota(jnp.int32, (size, size), 0)
        j = lax.broadcasted_iota(jnp.int32, (size, size), 1)
        sub_i, sub_j = i // self.plan.sub, j // self.plan.sub
        key_sub = lax.broadcasted_iota(jnp.int32, (1, size), 1) // self.plan.sub
        rest = sum(jnp.where(key_sub == m, t - c_row, 0.0) for m, t in enumerate(self.totals))
        spanned = sum(jnp.where((sub_j < m) & (m < sub_i), t, 0.0)
                      for m, t in enumerate(self.totals))
        gap = jnp.where(sub_i == sub_j, c - c_row, c + rest + spanned)
        return jnp.where(j < i if strict else j <= i, gap, -jnp.inf)

    def key_gap(self, c_j, j, i):
        """``[S, Dk]``: log decay from each key of sub-chunk ``j`` to the start of sub-chunk
        ``i > j`` (the rest of ``j``, then the sub-chunks between)."""
        return (self.totals[j] - c_j) + sum(self.totals[j + 1:i], jnp.zeros_like(c_j))


def _states_kernel(k_ref, v_ref, c_ref, tot_ref, s0_ref, h_ref, final_ref, *, plan):
    vb, row, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    columns = pl.ds(vb * plan.block_v, plan.block_v)

    def body(n, state):
        start = n * plan.chunk
        h_ref[row, n, head, :, columns] = state.astype(h_ref.dtype)
        chunk = _Chunk(plan, c_ref, row, head, start)
        c = _rows(c_ref, row, start, plan.chunk, head)
        k = _rows(k_ref, row, start, plan.chunk, head) * jnp.exp(chunk.to_end(c))
        written = _dot(k, _rows(v_ref, row, start, plan.chunk, head, columns), _TN, plan.dtype)
        decay = jnp.exp(tot_ref[row, n, head, :])[:, None]
        return decay * state + written

    final_ref[row, head, :, columns] = lax.fori_loop(
        0, plan.n_chunks, body, s0_ref[row, head, :, columns])


def _gate_row(c_ref, row, start, size, head):
    """``[1, size]``: one gate per head's running sums as a row."""
    return c_ref[row, pl.ds(start, size), head, 0][None, :]


def _outputs_kernel(q_ref, k_ref, v_ref, c_ref, h_ref, o_ref, *, plan):
    n, row, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = n * plan.chunk
    chunk = _Chunk(plan, c_ref, row, head, start)
    h = h_ref[row, n, head, :, :]
    args = (plan, chunk, row, head, start, h, q_ref, k_ref, v_ref, c_ref, o_ref)
    if plan.per_head:
        _whole_chunk_outputs(*args)
    else:
        mild = chunk.mild()
        pl.when(mild)(lambda: _whole_chunk_outputs(*args))
        pl.when(jnp.logical_not(mild))(lambda: _sub_chunk_outputs(*args))


class _Decays:
    """A chunk's pair decays for whole-chunk matmuls: one gate per head, an exact ``[C, C]``
    matrix; a gate per key dimension (a mild chunk), the factors ``exp(F_i)`` of the query
    and ``exp(-F_j)`` of the key, ``F`` the running sum from the chunk's start."""

    def __init__(self, plan, chunk, c_ref, row, head, start, c):
        self.per_head = plan.per_head
        self.from_start = chunk.from_start(c)
        self.to_end = jnp.exp(chunk.to_end(c))
        size = plan.chunk
        if plan.per_head:
            c_row = _gate_row(c_ref, row, start, size, head)
            self.inclusive = jnp.exp(chunk.pair_exponents(c, c_row, strict=False))
            self.strict = jnp.exp(chunk.pair_exponents(c, c_row, strict=True))
        else:
            i = lax.broadcasted_iota(jnp.int32, (size, size), 0)
            j = lax.broadcasted_iota(jnp.int32, (size, size), 1)
            self.causal_inclusive, self.causal_strict = j <= i, j < i

    def query_factor(self):
        return jnp.exp(self.from_start)

    def key_side(self, k):
        """Keys as the score matmul takes them (factored: ``k * exp(-F)``)."""
        return k if self.per_head else k * jnp.exp(-self.from_start)

    def weigh(self, products, strict):
        """Pair products ``[C, C]`` (of the factored queries and keys, or plain) to weights."""
        if self.per_head:
            return products * (self.strict if strict else self.inclusive)
        return jnp.where(self.causal_strict if strict else self.causal_inclusive, products, 0.0)


def _whole_chunk_outputs(plan, chunk, row, head, start, h, q_ref, k_ref, v_ref, c_ref, o_ref):
    """A chunk's outputs from whole-chunk matmuls."""
    size, dt = plan.chunk, plan.dtype
    q = _rows(q_ref, row, start, size, head) * plan.scale
    decays = _Decays(plan, chunk, c_ref, row, head, start, _rows(c_ref, row, start, size, head))
    q_decayed = q * decays.query_factor()
    k = decays.key_side(_rows(k_ref, row, start, size, head))
    scores = decays.weigh(_dot(q_decayed if not plan.per_head else q, k, _NT, dt), strict=False)
    out = (_dot(q_decayed, h, _NN, dt)
           + _dot(scores, _rows(v_ref, row, start, size, head), _NN, dt))
    o_ref[row, pl.ds(start, size), head, :] = out.astype(o_ref.dtype)


def _sub_chunk_outputs(plan, chunk, row, head, start, h, q_ref, k_ref, v_ref, c_ref, o_ref):
    """A chunk's outputs sixteen query tokens at a time, each key dimension's decay explicit
    inside a sub-chunk: exact however strong the gates."""
    s = plan.sub
    column = lax.broadcasted_iota(jnp.int32, (s, s), 1)
    query = lax.broadcasted_iota(jnp.int32, (s, 1), 0)
    for i in range(plan.n_sub):
        first = start + i * s
        q = _rows(q_ref, row, first, s, head) * plan.scale
        c = _rows(c_ref, row, first, s, head)
        acc = _dot(q * jnp.exp(c + chunk.before(i)), h, _NN, plan.dtype)
        q_hat = q * jnp.exp(c)
        for j in range(i):
            key_first = start + j * s
            c_j = _rows(c_ref, row, key_first, s, head)
            k_hat = _rows(k_ref, row, key_first, s, head) * jnp.exp(chunk.key_gap(c_j, j, i))
            scores = _dot(q_hat, k_hat, _NT, plan.dtype)
            acc += _dot(scores, _rows(v_ref, row, key_first, s, head), _NN, plan.dtype)

        def key(t, scores):
            k_t = _rows(k_ref, row, first + t, 1, head)
            c_t = _rows(c_ref, row, first + t, 1, head)
            e = jnp.exp(jnp.where(query >= t, c - c_t, -jnp.inf))
            weight = jnp.sum(q * k_t * e, axis=1, keepdims=True)
            return jnp.where(column == t, weight, scores)

        scores = lax.fori_loop(0, s, key, jnp.zeros((s, s), jnp.float32))
        acc += _dot(scores, _rows(v_ref, row, first, s, head), _NN, plan.dtype)
        o_ref[row, pl.ds(first, s), head, :] = acc.astype(o_ref.dtype)


def _dstates_kernel(q_ref, do_ref, c_ref, tot_ref, dfinal_ref, dh_ref, ds0_ref, *, plan):
    vb, row, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    columns = pl.ds(vb * plan.block_v, plan.block_v)

    def body(t, dstate):
        n = plan.n_chunks - 1 - t
        start = n * plan.chunk
        dh_ref[row, n, head, :, columns] = dstate.astype(dh_ref.dtype)
        chunk = _Chunk(plan, c_ref, row, head, start)
        c = _rows(c_ref, row, start, plan.chunk, head)
        q = _rows(q_ref, row, start, plan.chunk, head) * (plan.scale * jnp.exp(
            chunk.from_start(c)))
        read = _dot(q, _rows(do_ref, row, start, plan.chunk, head, columns), _TN, plan.dtype)
        decay = jnp.exp(tot_ref[row, n, head, :])[:, None]
        return decay * dstate + read

    ds0_ref[row, head, :, columns] = lax.fori_loop(
        0, plan.n_chunks, body, dfinal_ref[row, head, :, columns])


def _grads_kernel(q_ref, k_ref, v_ref, c_ref, h_ref, do_ref, dh_ref, dq_ref, dk_ref, dv_ref,
                  db_ref, *, plan):
    """One chunk: for each sub-chunk ``p`` in turn, its keys' dk and dv (from the chunk's
    end state gradient, the later sub-chunks' queries and its own), then its queries' dq (from
    the start state, the earlier sub-chunks' keys and its own), then ``db``."""
    n, row, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = n * plan.chunk
    chunk = _Chunk(plan, c_ref, row, head, start)
    h, dh = h_ref[row, n, head, :, :], dh_ref[row, n, head, :, :]
    args = (plan, chunk, row, head, start, h, dh, q_ref, k_ref, v_ref, c_ref, do_ref, dq_ref,
            dk_ref, dv_ref, db_ref)
    if plan.per_head:
        _whole_chunk_grads(*args)
    else:
        mild = chunk.mild()
        pl.when(mild)(lambda: _whole_chunk_grads(*args))
        pl.when(jnp.logical_not(mild))(lambda: _sub_chunk_grads(*args))


def _sub_chunk_grads(plan, chunk, row, head, start, h, dh, q_ref, k_ref, v_ref, c_ref, do_ref,
                     dq_ref, dk_ref, dv_ref, db_ref):
    """The grads of a chunk sixteen tokens at a time (see :func:`_grads_kernel`)."""
    s, dt = plan.sub, plan.dtype
    position = lax.broadcasted_iota(jnp.int32, (s, 1), 0)
    column = lax.broadcasted_iota(jnp.int32, (s, s), 1)

    def tiles(i):
        first = start + i * s
        return (first, _rows(q_ref, row, first, s, head) * plan.scale,
                _rows(k_ref, row, first, s, head), _rows(v_ref, row, first, s, head),
                _rows(do_ref, row, first, s, head), _rows(c_ref, row, first, s, head))

    for p in range(plan.n_sub):
        first, q, k, v, do, c = tiles(p)
        # Keys of p: through the chunk's end state, then the queries of later sub-chunks.
        end_gap = jnp.exp(chunk.key_gap(c, p, plan.n_sub))
        dk = end_gap * _dot(v, dh, _NT, dt)
        dv = _dot(k * end_gap, dh, _NN, dt)
        for i in range(p + 1, plan.n_sub):
            _, q_i, _, _, do_i, c_i = tiles(i)
            gap = jnp.exp(chunk.key_gap(c, p, i))
            q_hat = q_i * jnp.exp(c_i)
            scores = _dot(q_hat, k * gap, _NT, dt)  # [queries of i, keys of p]
            dscores = _dot(do_i, v, _NT, dt)
            dv += _dot(scores, do_i, _TN, dt)
            dk += gap * _dot(dscores, q_hat, _TN, dt)
        # Queries of p: through the chunk's start state, then the keys of earlier sub-chunks.
        dq = jnp.exp(c + chunk.before(p)) * _dot(do, h, _NT, dt)
        for j in range(p):
            _, _, k_j, v_j, _, c_j = tiles(j)
            k_hat = k_j * jnp.exp(chunk.key_gap(c_j, j, p))
            dq += jnp.exp(c) * _dot(_dot(do, v_j, _NT, dt), k_hat, _NN, dt)

        # Pairs inside p, one key t at a time, the pair of a token with itself left out.
        def key(t, carry):
            dq, dk, scores = carry
            k_t = _rows(k_ref, row, first + t, 1, head)
            v_t = _rows(v_ref, row, first + t, 1, head)
            c_t = _rows(c_ref, row, first + t, 1, head)
            e = jnp.exp(jnp.where(position > t, c - c_t, -jnp.inf))  # [queries of p, Dk]
            dscore = jnp.sum(do * v_t, axis=1, keepdims=True)
            dq += dscore * e * k_t
            dk_t = jnp.sum(dscore * e * q, axis=0, keepdims=True)
            dk = jnp.where(position == t, dk + dk_t, dk)
            weight = jnp.sum(q * k_t * e, axis=1, keepdims=True)
            return dq, dk, jnp.where(column == t, weight, scores)

        dq, dk, scores = lax.fori_loop(0, s, key, (dq, dk, jnp.zeros((s, s), jnp.float32)))
        self_score = jnp.sum(q * k, axis=1, keepdims=True)
        scores = jnp.where(column == position, self_score, scores)
        dv += _dot(scores, do, _TN, dt)
        rows = pl.ds(first, s)
        db_ref[row, rows, head, :] = q * dq - k * dk
        self_dscore = jnp.sum(do * v, axis=1, keepdims=True)
        dq_ref[row, rows, head, :] = ((dq + self_dscore * k) * plan.scale).astype(dq_ref.dtype)
        dk_ref[row, rows, head, :] = (dk + self_dscore * q).astype(dk_ref.dtype)
        dv_ref[row, rows, head, :] = dv.astype(dv_ref.dtype)


def _whole_chunk_grads(plan, chunk, row, head, start, h, dh, q_ref, k_ref, v_ref, c_ref,
                       do_ref, dq_ref, dk_ref, dv_ref, db_ref):
    """The grads of a chunk from whole-chunk matmuls (:class:`_Decays`)."""
    size, dt = plan.chunk, plan.dtype
    q = _rows(q_ref, row, start, size, head) * plan.scale
    k, v = _rows(k_ref, row, start, size, head), _rows(v_ref, row, start, size, head)
    do = _rows(do_ref, row, start, size, head)
    decays = _Decays(plan, chunk, c_ref, row, head, start, _rows(c_ref, row, start, size, head))
    query_factor = decays.query_factor()
    q_side = q if plan.per_head else q * query_factor
    k_side = decays.key_side(k)
    scores = decays.weigh(_dot(q_side, k_side, _NT, dt), strict=False)
    dscores = decays.weigh(_dot(do, v, _NT, dt), strict=True)
    from_keys = _dot(dscores, k_side, _NN, dt)
    from_queries = _dot(dscores, q_side, _TN, dt)
    if not plan.per_head:  # the factors left outside the products
        from_keys = from_keys * query_factor
        from_queries = from_queries * jnp.exp(-decays.from_start)
    dq = query_factor * _dot(do, h, _NT, dt) + from_keys
    dk = decays.to_end * _dot(v, dh, _NT, dt) + from_queries
    dv = _dot(k * decays.to_end, dh, _NN, dt) + _dot(scores, do, _TN, dt)
    rows = pl.ds(start, size)
    db_ref[row, rows, head, :] = q * dq - k * dk
    self_dscore = jnp.sum(do * v, axis=1, keepdims=True)
    dq_ref[row, rows, head, :] = ((dq + self_dscore * k) * plan.scale).astype(dq_ref.dtype)
    dk_ref[row, rows, head, :] = (dk + self_dscore * q).astype(dk_ref.dtype)
    dv_ref[row, rows, head, :] = dv.astype(dv_ref.dtype)


def _sequential_grid(plan):
    return (plan.value_dim // plan.block_v, plan.batch, plan.heads)


def _chunk_grid(plan):
    return (plan.n_chunks, plan.batch, plan.heads)


def _call(kernel, plan, grid, inputs, outputs, options, index, interpret, name):
    return pl.pallas_call(
        functools.partial(kernel, plan=plan), grid=grid,
        in_specs=[_whole_array(x.shape) for x in inputs],
        out_specs=[_whole_array(o.shape) for o in outputs],
        out_shape=outputs, compiler_params=None if interpret else options.params(index),
        interpret=interpret, name=name)(*inputs)


def _state_shapes(plan):
    """The per-chunk states (or their gradients) in the input dtype: they only enter matmuls,
    which round them to it; the recurrence itself runs in float32.  The final state (or the
    initial state's gradient) is float32."""
    b, h, dk, dv = plan.batch, plan.heads, plan.key_dim, plan.value_dim
    return (jax.ShapeDtypeStruct((b, plan.n_chunks, h, dk, dv), plan.dtype),
            jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32))


def forward(plan, q, k, v, c, tot, initial_state, *, options, interpret):
    """``(out [B, L, H, Dv], chunk start states h, final state)``."""
    h, final = _call(_states_kernel, plan, _sequential_grid(plan),
                     [k, v, c, tot, initial_state], list(_state_shapes(plan)), options, 0,
                     interpret, "linear_states")
    (out,) = _call(_outputs_kernel, plan, _chunk_grid(plan), [q, k, v, c, h],
                   [jax.ShapeDtypeStruct(v.shape[:3] + (plan.value_dim,), q.dtype)], options,
                   1, interpret, "linear_outputs")
    return out, h, final


def backward(plan, q, k, v, c, tot, h, do, dfinal, *, options, interpret):
    """``(dq, dk, dv, db [B, L, H, Dk] float32, d initial state, dh)``: ``db = q * dq - k *
    dk``, ``dh [B, N, H, Dk, Dv]`` the gradient each chunk's end state receives."""
    dh, ds0 = _call(_dstates_kernel, plan, _sequential_grid(plan), [q, do, c, tot, dfinal],
                    list(_state_shapes(plan)), options, 2, interpret, "linear_dstates")
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    shapes.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
    dq, dk, dv, db = _call(_grads_kernel, plan, _chunk_grid(plan), [q, k, v, c, h, do, dh],
                           shapes, options, 3, interpret, "linear_grads")
    return dq, dk, dv, db, ds0, dh
