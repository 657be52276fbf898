"""Per-chunk maths of the fused gated linear attention kernel, shared by its Triton and Mosaic
lowerings.

Each function computes one chunk of ``C`` tokens of one row and head.  It reads and writes
through an ``io`` object of its lowering, at positions relative to the chunk's start:
``io.load(name, start, size)`` gives ``[size, D]`` float32 rows of ``q``, ``k``, ``v``, ``c``
or ``do``, ``io.gate_row(start, size)`` a ``[1, size]`` row of ``c`` (one gate per head), and
``io.store(name, start, value)`` writes ``o``, ``dq``, ``dk``, ``dv`` or ``db``.  The state a
chunk starts from (``h``) and the gradient its end receives (``dh``) come in as values,
``[Dk, Dv]``, or ``[Dv, Dk]`` with ``transposed`` (the Mosaic lowering keeps the state that way,
so that a decay per key dimension scales its last axis).

``c`` is the running sum of the log gates inside each sub-chunk of ``S`` tokens.  Every
exponent taken is a sum of few terms and at most zero (:class:`Chunk`), as in
:mod:`EasyLM.linear.chunked`, except in a "mild" chunk (gates per key dimension summing to more
than ``-MILD_LIMIT`` in every dimension), whose pairs factor as ``exp(F_i) * exp(-F_j)`` of the
running sum from the chunk's start and become whole-chunk matmuls.  Matmuls take the input
dtype and accumulate in float32 (float32 inputs: float32 products).
"""
import dataclasses

import jax.numpy as jnp
from jax import lax

# A chunk whose gates sum to more than -MILD_LIMIT in every key dimension takes whole-chunk
# matmuls with factored decays (exp(F_i) and exp(-F_j) within exp(+-40) of 1); a stronger one,
# sixteen tokens at a time with every exponent <= 0.
MILD_LIMIT = 40.0

NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def dot(a, b, dims, dtype):
    """``a`` and ``b`` cast to ``dtype`` (the input dtype), float32 accumulation; float32
    inputs get float32 products (Triton's default for them is TF32)."""
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                           preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes and tiling of one call: ``chunk`` tokens a chunk, ``sub`` a sub-chunk,
    ``block_v`` value columns per program of the Triton lowering's sequential kernels."""
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
    per_head: bool = False  # one gate per head: c has a last axis of 1

    @property
    def n_chunks(self):
        return self.length // self.chunk

    @property
    def n_sub(self):
        return self.chunk // self.sub


class Chunk:
    """The gate sums one chunk's tiles need, from its sub-chunk totals ``T_K`` (``[1, Dk]``
    rows of ``c`` at each sub-chunk's last token)."""

    def __init__(self, plan, io):
        self.plan = plan
        self.totals = [io.load("c", (j + 1) * plan.sub - 1, 1) for j in range(plan.n_sub)]

    def total(self):
        """``[1, Dk]``: the log decay over the whole chunk."""
        return sum(self.totals[1:], self.totals[0])

    def mild(self):
        """Whether every key dimension decays by less than ``exp(-MILD_LIMIT)`` over the chunk:
        then ``exp(F_i) * exp(-F_j)`` of the running sum ``F`` from the chunk's start stays in
        float32's range, and the chunk's pairs are whole-chunk matmuls."""
        return jnp.min(self.total()) > -MILD_LIMIT

    def _sub_of_row(self, rows):
        return lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), self.plan.sub)

    def from_start(self, c):
        """``[C, Dk]``: log decay from the chunk's start through each token (inclusive)."""
        sub = self._sub_of_row(c.shape[0])
        return c + sum(jnp.where(sub > j, t, 0.0) for j, t in enumerate(self.totals))

    def to_end(self, c):
        """``[C, Dk]``: log decay after each token to the chunk's end."""
        sub = self._sub_of_row(c.shape[0])
        rest = sum(jnp.where(sub == j, t - c, 0.0) for j, t in enumerate(self.totals))
        return rest + sum(jnp.where(sub < j, t, 0.0) for j, t in enumerate(self.totals))

    def pair_exponents(self, c, c_row, strict):
        """``[C, C]`` log decay between query ``i`` (rows) and key ``j`` (columns) of a chunk
        with one gate per head (``c [C, 1]``, ``c_row [1, C]``): ``c_i - c_j`` inside a
        sub-chunk, else the query's sub-chunk up to it, the sub-chunks between and the rest
        of the key's; ``-inf`` above the diagonal (and on it if ``strict``)."""
        size = c.shape[0]
        i = lax.broadcasted_iota(jnp.int32, (size, size), 0)
        j = lax.broadcasted_iota(jnp.int32, (size, size), 1)
        sub_i, sub_j = lax.div(i, self.plan.sub), lax.div(j, self.plan.sub)
        key_sub = lax.div(lax.broadcasted_iota(jnp.int32, (1, size), 1), self.plan.sub)
        rest = sum(jnp.where(key_sub == m, t - c_row, 0.0) for m, t in enumerate(self.totals))
        spanned = sum(jnp.where((sub_j < m) & (m < sub_i), t, 0.0)
                      for m, t in enumerate(self.totals))
        gap = jnp.where(sub_i == sub_j, c - c_row, c + rest + spanned)
        return jnp.where(j < i if strict else j <= i, gap, -jnp.inf)


def written_keys(plan, io, chunk):
    """``[C, Dk]``: the chunk's keys decayed to its end, as the state takes them."""
    return io.load("k", 0, plan.chunk) * jnp.exp(chunk.to_end(io.load("c", 0, plan.chunk)))


def decayed_queries(plan, io, chunk):
    """``[C, Dk]``: the chunk's (scaled) queries decayed from its start, as they read the state
    it starts from."""
    return io.load("q", 0, plan.chunk) * (plan.scale * jnp.exp(
        chunk.from_start(io.load("c", 0, plan.chunk))))


class Decays:
    """A chunk's pair decays for whole-chunk matmuls: one gate per head, an exact ``[C, C]``
    matrix; a gate per key dimension (a mild chunk), the factors ``exp(F_i)`` of the query
    and ``exp(-F_j)`` of the key, ``F`` the running sum from the chunk's start."""

    def __init__(self, plan, chunk, io, c):
        self.per_head = plan.per_head
        self.from_start = chunk.from_start(c)
        self.to_end = jnp.exp(chunk.to_end(c))
        size = plan.chunk
        if plan.per_head:
            c_row = io.gate_row(0, size)
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


def chunk_outputs(plan, io, h, transposed=False):
    """Writes ``o`` of one chunk that starts from state ``h``."""
    chunk = Chunk(plan, io)
    if plan.per_head:
        _whole_chunk_outputs(plan, io, chunk, h, transposed)
        return
    mild = chunk.mild()
    io.when(mild, lambda: _whole_chunk_outputs(plan, io, chunk, h, transposed))
    io.when(jnp.logical_not(mild), lambda: _sub_chunk_outputs(plan, io, chunk, h, transposed))


GRAD_PARTS = ("all", "dq", "dkdv")


def chunk_grads(plan, io, h, dh, transposed=False, part="all"):
    """Writes ``dq``, ``dk``, ``dv`` and ``db = q * dq - k * dk`` (each token's pair with
    itself left out of ``db``: its weight is exactly 1 and has no gate gradient) of one chunk
    that starts from state ``h`` and whose end state's gradient is ``dh``.

    ``part``: ``"all"``; ``"dq"``, only ``dq`` and ``db = q * dq`` (``dh`` unused); or
    ``"dkdv"``, only ``dk``, ``dv`` and ``db = -k * dk`` (``h`` unused): two programs that
    each hold fewer tiles, their ``db`` summed by the caller."""
    if part not in GRAD_PARTS:
        raise ValueError(f"part must be one of {GRAD_PARTS}, not {part!r}")
    chunk = Chunk(plan, io)
    if plan.per_head:
        _whole_chunk_grads(plan, io, chunk, h, dh, transposed, part)
        return
    mild = chunk.mild()
    io.when(mild, lambda: _whole_chunk_grads(plan, io, chunk, h, dh, transposed, part))
    io.when(jnp.logical_not(mild),
            lambda: _sub_chunk_grads(plan, io, chunk, h, dh, transposed, part))


def _state_product(x, state, dims, plan, transposed):
    """``x @ state`` (``dims`` NN) or ``x @ state.T`` (NT) of a ``[Dk, Dv]`` state, given in
    either layout."""
    if transposed:
        dims = NT if dims == NN else NN
    return dot(x, state, dims, plan.dtype)


def _whole_chunk_outputs(plan, io, chunk, h, transposed):
    size, dt = plan.chunk, plan.dtype
    q = io.load("q", 0, size) * plan.scale
    decays = Decays(plan, chunk, io, io.load("c", 0, size))
    q_decayed = q * decays.query_factor()
    k = decays.key_side(io.load("k", 0, size))
    scores = decays.weigh(dot(q if plan.per_head else q_decayed, k, NT, dt), strict=False)
    out = (_state_product(q_decayed, h, NN, plan, transposed)
           + dot(scores, io.load("v", 0, size), NN, dt))
    io.store("o", 0, out)


def _sub_chunk_outputs(plan, io, chunk, h, transposed):
    """Sixteen query tokens at a time, each key dimension's decay explicit inside a sub-chunk:
    exact however strong the gates.  The sub-chunks, the earlier sub-chunks each reads and
    the keys inside it are loops, not unrolled code: this path is taken by few chunks, and
    its size is the kernel's compile time."""
    s, dt = plan.sub, plan.dtype
    column = lax.broadcasted_iota(jnp.int32, (s, s), 1)
    query = lax.broadcasted_iota(jnp.int32, (s, 1), 0)
    zero = jnp.zeros((1, plan.key_dim), jnp.float32)

    def sub_chunk(i, before):  # before: [1, Dk], the log decay of the sub-chunks before i
        first = i * s
        q = io.load("q", first, s) * plan.scale
        c = io.load("c", first, s)
        acc = _state_product(q * jnp.exp(c + before), h, NN, plan, transposed)
        q_hat = q * jnp.exp(c)

        def earlier(t, carry):  # sub-chunk j = i - 1 - t, nearest first
            acc, between = carry  # between: the log decay of the sub-chunks after j, before i
            j_first = (i - 1 - t) * s
            c_j, total_j = io.load("c", j_first, s), io.load("c", j_first + s - 1, 1)
            k_hat = io.load("k", j_first, s) * jnp.exp((total_j - c_j) + between)
            acc += dot(dot(q_hat, k_hat, NT, dt), io.load("v", j_first, s), NN, dt)
            return acc, between + total_j

        acc, _ = lax.fori_loop(0, i, earlier, (acc, zero))

        def key(t, scores):
            k_t, c_t = io.load("k", first + t, 1), io.load("c", first + t, 1)
            e = jnp.exp(jnp.where(query >= t, c - c_t, -jnp.inf))
            weight = jnp.sum(q * k_t * e, axis=1, keepdims=True)
            return jnp.where(column == t, weight, scores)

        scores = lax.fori_loop(0, s, key, jnp.zeros((s, s), jnp.float32))
        acc += dot(scores, io.load("v", first, s), NN, dt)
        io.store("o", first, acc)
        return before + io.load("c", first + s - 1, 1)

    lax.fori_loop(0, plan.n_sub, sub_chunk, zero)


def _store_grads(plan, io, first, q, k, v, do, dq, dk, dv, part):
    """``db`` from dq and dk (those of ``part``) without each token's pair with itself, then
    that pair added."""
    if part == "all":
        io.store("db", first, q * dq - k * dk)
    elif part == "dq":
        io.store("db", first, q * dq)
    else:
        io.store("db", first, -(k * dk))
    self_dscore = jnp.sum(do * v, axis=1, keepdims=True)
    if part != "dkdv":
        io.store("dq", first, (dq + self_dscore * k) * plan.scale)
    if part != "dq":
        io.store("dk", first, dk + self_dscore * q)
        io.store("dv", first, dv)


def _whole_chunk_grads(plan, io, chunk, h, dh, transposed, part):
    size, dt = plan.chunk, plan.dtype
    q = io.load("q", 0, size) * plan.scale
    k, v, do = io.load("k", 0, size), io.load("v", 0, size), io.load("do", 0, size)
    decays = Decays(plan, chunk, io, io.load("c", 0, size))
    query_factor = decays.query_factor()
    q_side = q if plan.per_head else q * query_factor
    k_side = decays.key_side(k)
    dscores = decays.weigh(dot(do, v, NT, dt), strict=True)
    dq = dk = dv = None
    if part != "dkdv":
        from_keys = dot(dscores, k_side, NN, dt)
        if not plan.per_head:  # the factor left outside the product
            from_keys = from_keys * query_factor
        dq = query_factor * _state_product(do, h, NT, plan, transposed) + from_keys
    if part != "dq":
        scores = decays.weigh(dot(q_side, k_side, NT, dt), strict=False)
        from_queries = dot(dscores, q_side, TN, dt)
        if not plan.per_head:
            from_queries = from_queries * jnp.exp(-decays.from_start)
        dk = decays.to_end * _state_product(v, dh, NT, plan, transposed) + from_queries
        dv = (_state_product(k * decays.to_end, dh, NN, plan, transposed)
              + dot(scores, do, TN, dt))
    _store_grads(plan, io, 0, q, k, v, do, dq, dk, dv, part)


def _sub_chunk_grads(plan, io, chunk, h, dh, transposed, part):
    """For each sub-chunk ``p`` in turn: its keys' dk and dv (from the later sub-chunks'
    queries, the chunk's end state gradient and its own), then its queries' dq (from the start
    state, the earlier sub-chunks' keys and its own); those of ``part``.  Loops, not unrolled
    code, as in :func:`_sub_chunk_outputs`."""
    s, dt = plan.sub, plan.dtype
    position = lax.broadcasted_iota(jnp.int32, (s, 1), 0)
    column = lax.broadcasted_iota(jnp.int32, (s, s), 1)
    zero = jnp.zeros((1, plan.key_dim), jnp.float32)

    def sub_chunk(p, before):  # before: [1, Dk], the log decay of the sub-chunks before p
        first = p * s
        q, k = io.load("q", first, s) * plan.scale, io.load("k", first, s)
        v, do, c = io.load("v", first, s), io.load("do", first, s), io.load("c", first, s)
        dq = dk = dv = None
        if part != "dq":
            rest = io.load("c", first + s - 1, 1) - c  # [S, Dk]: after each key to p's end

            def later(t, carry):  # the queries of sub-chunk i = p + 1 + t
                dk, dv, between = carry  # the log decay of the sub-chunks after p, before i
                i_first = first + (t + 1) * s
                q_i, do_i = io.load("q", i_first, s) * plan.scale, io.load("do", i_first, s)
                gap = jnp.exp(rest + between)
                q_hat = q_i * jnp.exp(io.load("c", i_first, s))
                scores = dot(q_hat, k * gap, NT, dt)  # [queries of i, keys of p]
                dv += dot(scores, do_i, TN, dt)
                dk += gap * dot(dot(do_i, v, NT, dt), q_hat, TN, dt)
                return dk, dv, between + io.load("c", i_first + s - 1, 1)

            dk, dv, after = lax.fori_loop(
                0, plan.n_sub - 1 - p, later,
                (jnp.zeros((s, plan.key_dim), jnp.float32),
                 jnp.zeros((s, plan.value_dim), jnp.float32), zero))
            end_gap = jnp.exp(rest + after)
            dk += end_gap * _state_product(v, dh, NT, plan, transposed)
            dv += _state_product(k * end_gap, dh, NN, plan, transposed)
        if part != "dkdv":
            def earlier(t, carry):  # the keys of sub-chunk j = p - 1 - t, nearest first
                dq, between = carry  # the log decay of the sub-chunks after j, before p
                j_first = first - (t + 1) * s
                c_j, total_j = io.load("c", j_first, s), io.load("c", j_first + s - 1, 1)
                k_hat = io.load("k", j_first, s) * jnp.exp((total_j - c_j) + between)
                dq += jnp.exp(c) * dot(dot(do, io.load("v", j_first, s), NT, dt), k_hat, NN,
                                       dt)
                return dq, between + total_j

            dq = jnp.exp(c + before) * _state_product(do, h, NT, plan, transposed)
            dq, _ = lax.fori_loop(0, p, earlier, (dq, zero))

        # The pairs inside p, one key t at a time (the part's gradients: None stays None); a
        # token's pair with itself is left out (_store_grads adds it) but counts in the scores
        # dv takes.
        def key(t, carry):
            dq, dk, scores = carry
            k_t, v_t = io.load("k", first + t, 1), io.load("v", first + t, 1)
            e = jnp.exp(jnp.where(position > t, c - io.load("c", first + t, 1), -jnp.inf))
            dscore = jnp.sum(do * v_t, axis=1, keepdims=True)  # [queries of p, 1]
            if dq is not None:
                dq = dq + dscore * e * k_t
            if dk is not None:
                dk_t = jnp.sum(dscore * e * q, axis=0, keepdims=True)
                dk = jnp.where(position == t, dk + dk_t, dk)
                weight = jnp.sum(q * k_t * e, axis=1, keepdims=True)
                scores = jnp.where(column == t, weight, scores)
            return dq, dk, scores

        scores = None if dk is None else jnp.zeros((s, s), jnp.float32)
        dq, dk, scores = lax.fori_loop(0, s, key, (dq, dk, scores))
        if dk is not None:
            scores = jnp.where(column == position, jnp.sum(q * k, axis=1, keepdims=True),
                               scores)
            dv += dot(scores, do, TN, dt)
        _store_grads(plan, io, first, q, k, v, do, dq, dk, dv, part)
        return before + io.load("c", first + s - 1, 1)

    lax.fori_loop(0, plan.n_sub, sub_chunk, zero)
