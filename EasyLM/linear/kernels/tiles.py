"""Per-chunk maths of the fused gated linear attention kernel, shared by its Triton and Mosaic
lowerings.

Each function computes one chunk of ``C`` tokens of one row and head.  It reads and writes
through an ``io`` object of its lowering, at positions relative to the chunk's start:
``io.load(name, start, size, columns=None)`` gives ``[size, D]`` float32 rows of ``q``, ``k``,
``v``, ``c`` or ``do`` (or the value columns ``columns``, a ``pl.ds``, of ``v`` or ``do``),
``io.gate_row(start, size)`` a ``[1, size]`` row of ``c`` (one gate per head), and
``io.store(name, start, value, columns=None)`` writes ``o``, ``dq``, ``dk``, ``dv`` (or its
columns) or ``db``.  The state a chunk starts from (``h``) comes in as a value to
:func:`chunk_outputs`; :func:`chunk_grads` reads it and the gradient the chunk's end receives
(``dh``) as ``io.state(name, columns=None)``, whole or some value columns.  A state is
``[Dk, Dv]``, or ``[Dv, Dk]`` with ``transposed`` (the Mosaic lowering keeps the state that
way, so that a decay per key dimension scales its last axis).

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
from jax.experimental import pallas as pl

from FoT.kernels.indices import index_div

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
    ``block_v`` value columns and ``block_k`` key rows of the state per program of the Triton
    lowering's sequential kernels (``block_k`` None: all of them)."""
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
    block_k: int | None = None

    @property
    def key_block(self):
        return self.key_dim if self.block_k is None else self.block_k

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

    def _div(self, index):
        return index_div(index, self.plan.sub)

    def _sub_of_row(self, rows):
        return self._div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0))

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
        sub_i, sub_j = self._div(i), self._div(j)
        key_sub = self._div(lax.broadcasted_iota(jnp.int32, (1, size), 1))
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
_STATES_OF_PART = dict(all=("h", "dh"), dq=("h",), dkdv=("dh",))


def chunk_grads(plan, io, transposed=False, part="all", block_v=None):
    """Writes ``dq``, ``dk``, ``dv`` and ``db = q * dq - k * dk`` (each token's pair with
    itself left out of ``db``: its weight is exactly 1 and has no gate gradient) of one chunk
    that starts from state ``h`` and whose end state's gradient is ``dh`` (``io.state``).

    ``part``: ``"all"``; ``"dq"``, only ``dq`` and ``db = q * dq`` (``dh`` unused); or
    ``"dkdv"``, only ``dk``, ``dv`` and ``db = -k * dk`` (``h`` unused): two programs that
    each hold fewer tiles, their ``db`` summed by the caller.

    ``block_v``: ``None``, the states are read whole, once, and the value columns taken at
    once; else ``block_v`` value columns at a time (:func:`_over_value_blocks`), each block's
    columns of the states read where they are used: ``dv`` is written block by block, and
    ``dq``, ``dk`` and each token's pair with itself, sums over the value columns, are summed
    over the blocks (states ``[Dk, Dv]`` only, not ``transposed``)."""
    if part not in GRAD_PARTS:
        raise ValueError(f"part must be one of {GRAD_PARTS}, not {part!r}")
    if block_v is None:
        held = {name: io.state(name) for name in _STATES_OF_PART[part]}

        def state(name, columns):
            return held[name]
    else:
        state = io.state
    chunk = Chunk(plan, io)
    if plan.per_head:
        _whole_chunk_grads(plan, io, chunk, state, transposed, part, block_v)
        return
    mild = chunk.mild()
    io.when(mild, lambda: _whole_chunk_grads(plan, io, chunk, state, transposed, part, block_v))
    io.when(jnp.logical_not(mild),
            lambda: _sub_chunk_grads(plan, io, chunk, state, transposed, part, block_v))


def _over_value_blocks(plan, block_v, body, sums):
    """``body(columns, sums) -> sums`` over the value columns: at once (``block_v`` None,
    ``columns`` None), or a loop over blocks of ``block_v`` (``columns`` a ``pl.ds``), not
    unrolled code."""
    if block_v is None:
        return body(None, sums)
    return lax.fori_loop(0, plan.value_dim // block_v,
                         lambda b, sums: body(pl.ds(b * block_v, block_v), sums), sums)


def _initial_sums(block_v, *shapes):
    """What :func:`_over_value_blocks` sums starts from: float32 zeros of ``shapes`` in
    blocks; at once, ``None`` (:func:`_plus`: the one block's terms are the sums, no zero
    added).  A shape ``None``: a sum not taken (stays ``None``)."""
    return tuple(None if block_v is None or shape is None else jnp.zeros(shape, jnp.float32)
                 for shape in shapes)


def _plus(total, term):
    return term if total is None else total + term


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


def _store_grads(plan, io, first, q, k, self_dscore, dq, dk, part):
    """``db`` from dq and dk (those of ``part``) without each token's pair with itself, then
    that pair added (``self_dscore``: ``sum(do * v)`` of each token, ``[rows, 1]``)."""
    if part == "all":
        io.store("db", first, q * dq - k * dk)
    elif part == "dq":
        io.store("db", first, q * dq)
    else:
        io.store("db", first, -(k * dk))
    if part != "dkdv":
        io.store("dq", first, (dq + self_dscore * k) * plan.scale)
    if part != "dq":
        io.store("dk", first, dk + self_dscore * q)


def _whole_chunk_grads(plan, io, chunk, state, transposed, part, block_v):
    """Whole-chunk matmuls; v, dO, dv and the states' columns by :func:`_over_value_blocks`,
    which sums what dq and dk take from them (``dO @ v.T`` before its decays, ``dO @ h.T``,
    ``v @ dh.T``, and ``sum(dO * v)`` for each token's pair with itself)."""
    size, dt = plan.chunk, plan.dtype
    q = io.load("q", 0, size) * plan.scale
    k = io.load("k", 0, size)
    decays = Decays(plan, chunk, io, io.load("c", 0, size))
    query_factor = decays.query_factor()
    q_side = q if plan.per_head else q * query_factor
    k_side = decays.key_side(k)
    if part != "dq":
        scores = decays.weigh(dot(q_side, k_side, NT, dt), strict=False)
        keys_to_end = k * decays.to_end

    def value_block(columns, sums):
        products, from_h, from_dh, self_dscore = sums
        v, do = io.load("v", 0, size, columns), io.load("do", 0, size, columns)
        products = _plus(products, dot(do, v, NT, dt))
        self_dscore = _plus(self_dscore, jnp.sum(do * v, axis=1, keepdims=True))
        if part != "dkdv":
            from_h = _plus(from_h, _state_product(do, state("h", columns), NT, plan,
                                                  transposed))
        if part != "dq":
            dh = state("dh", columns)
            from_dh = _plus(from_dh, _state_product(v, dh, NT, plan, transposed))
            io.store("dv", 0, _state_product(keys_to_end, dh, NN, plan, transposed)
                     + dot(scores, do, TN, dt), columns)
        return products, from_h, from_dh, self_dscore

    rows = (size, plan.key_dim)
    products, from_h, from_dh, self_dscore = _over_value_blocks(
        plan, block_v, value_block, _initial_sums(
            block_v, (size, size), None if part == "dkdv" else rows,
            None if part == "dq" else rows, (size, 1)))
    dscores = decays.weigh(products, strict=True)
    dq = dk = None
    if part != "dkdv":
        from_keys = dot(dscores, k_side, NN, dt)
        if not plan.per_head:  # the factor left outside the product
            from_keys = from_keys * query_factor
        dq = query_factor * from_h + from_keys
    if part != "dq":
        from_queries = dot(dscores, q_side, TN, dt)
        if not plan.per_head:
            from_queries = from_queries * jnp.exp(-decays.from_start)
        dk = decays.to_end * from_dh + from_queries
    _store_grads(plan, io, 0, q, k, self_dscore, dq, dk, part)


def _sub_chunk_grads(plan, io, chunk, state, transposed, part, block_v):
    """For each sub-chunk ``p`` in turn: its queries' dq (from the start state, the earlier
    sub-chunks' keys and its own), then its keys' dk and dv (from its own queries, the later
    sub-chunks' and the chunk's end state gradient); those of ``part``.  Loops, not unrolled
    code, as in :func:`_sub_chunk_outputs`.  In value blocks the state products and the
    later sub-chunks' terms go block by block, dv written by blocks; the pairs inside ``p``
    take its ``[S, Dv]`` tiles whole (``S`` rows: small beside the states)."""
    s, dt = plan.sub, plan.dtype
    position = lax.broadcasted_iota(jnp.int32, (s, 1), 0)
    column = lax.broadcasted_iota(jnp.int32, (s, s), 1)
    zero = jnp.zeros((1, plan.key_dim), jnp.float32)
    width = plan.value_dim if block_v is None else block_v

    def sub_chunk(p, before):  # before: [1, Dk], the log decay of the sub-chunks before p
        first = p * s
        q, k = io.load("q", first, s) * plan.scale, io.load("k", first, s)
        v, do, c = io.load("v", first, s), io.load("do", first, s), io.load("c", first, s)
        self_dscore = jnp.sum(do * v, axis=1, keepdims=True)

        def columns_of(name, whole, columns):
            return whole if columns is None else io.load(name, first, s, columns)

        dq = None
        if part != "dkdv":
            def earlier(t, carry):  # the keys of sub-chunk j = p - 1 - t, nearest first
                dq, between = carry  # the log decay of the sub-chunks after j, before p
                j_first = first - (t + 1) * s
                c_j, total_j = io.load("c", j_first, s), io.load("c", j_first + s - 1, 1)
                k_hat = io.load("k", j_first, s) * jnp.exp((total_j - c_j) + between)
                dq += jnp.exp(c) * dot(dot(do, io.load("v", j_first, s), NT, dt), k_hat, NN,
                                       dt)
                return dq, between + total_j

            def from_h(columns, sums):
                (read,) = sums
                return (_plus(read, _state_product(columns_of("do", do, columns),
                                                   state("h", columns), NT, plan,
                                                   transposed)),)

            (read,) = _over_value_blocks(plan, block_v, from_h,
                                         _initial_sums(block_v, (s, plan.key_dim)))
            dq = jnp.exp(c + before) * read
            dq, _ = lax.fori_loop(0, p, earlier, (dq, zero))

        # The pairs inside p, one key t at a time (the part's gradients: None stays None); a
        # token's pair with itself is left out (_store_grads adds it) but counts in the scores
        # dv takes.  Each key's dk from them apart (own), added to the rest below.
        def key(t, carry):
            dq, own, scores = carry
            k_t, v_t = io.load("k", first + t, 1), io.load("v", first + t, 1)
            e = jnp.exp(jnp.where(position > t, c - io.load("c", first + t, 1), -jnp.inf))
            dscore = jnp.sum(do * v_t, axis=1, keepdims=True)  # [queries of p, 1]
            if dq is not None:
                dq = dq + dscore * e * k_t
            if own is not None:
                own_t = jnp.sum(dscore * e * q, axis=0, keepdims=True)
                own = jnp.where(position == t, own + own_t, own)
                weight = jnp.sum(q * k_t * e, axis=1, keepdims=True)
                scores = jnp.where(column == t, weight, scores)
            return dq, own, scores

        own = scores = dk = None
        if part != "dq":
            own, scores = (jnp.zeros((s, plan.key_dim), jnp.float32),
                           jnp.zeros((s, s), jnp.float32))
        dq, own, scores = lax.fori_loop(0, s, key, (dq, own, scores))
        if part != "dq":
            scores = jnp.where(column == position, jnp.sum(q * k, axis=1, keepdims=True),
                               scores)
            rest = io.load("c", first + s - 1, 1) - c  # [S, Dk]: after each key to p's end

            def keys_block(columns, dk):  # dk: from the blocks before
                v_b, do_b = columns_of("v", v, columns), columns_of("do", do, columns)

                def later(t, carry):  # the queries of sub-chunk i = p + 1 + t
                    dk, dv, between = carry  # the log decay of the sub-chunks after p, before i
                    i_first = first + (t + 1) * s
                    q_i = io.load("q", i_first, s) * plan.scale
                    do_i = io.load("do", i_first, s, columns)
                    gap = jnp.exp(rest + between)
                    q_hat = q_i * jnp.exp(io.load("c", i_first, s))
                    scores = dot(q_hat, k * gap, NT, dt)  # [queries of i, keys of p]
                    dv += dot(scores, do_i, TN, dt)
                    dk += gap * dot(dot(do_i, v_b, NT, dt), q_hat, TN, dt)
                    return dk, dv, between + io.load("c", i_first + s - 1, 1)

                dk, dv, after = lax.fori_loop(
                    0, plan.n_sub - 1 - p, later,
                    (dk, jnp.zeros((s, width), jnp.float32), zero))
                end_gap = jnp.exp(rest + after)
                dh = state("dh", columns)
                dk += end_gap * _state_product(v_b, dh, NT, plan, transposed)
                dv += _state_product(k * end_gap, dh, NN, plan, transposed)
                dv += dot(scores, do_b, TN, dt)
                io.store("dv", first, dv, columns)
                return dk

            dk = _over_value_blocks(plan, block_v, keys_block,
                                    jnp.zeros((s, plan.key_dim), jnp.float32)) + own
        _store_grads(plan, io, first, q, k, self_dscore, dq, dk, part)
        return before + io.load("c", first + s - 1, 1)

    lax.fori_loop(0, plan.n_sub, sub_chunk, zero)
