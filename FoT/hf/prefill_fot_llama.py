"""Prefill of several whole windows at once (inference, rows alike, the ``aligned`` rule).

Run window by window, a long prompt costs every layer's kernels once per window (hundreds of
small launches and their Python for each 2048 tokens) and makes memory layers attend through
one bottom-right-causal kernel per window.  Here a *chunk* of ``K`` consecutive windows, each
starting with an empty local window, goes through each layer at once:

* token-wise work (norms, projections, MLP) runs on ``K * W`` tokens per row;
* local attention sees the chunk as ``B * K`` rows of ``W`` tokens (one causal call);
* a memory layer's softmax for a query of window ``j`` runs over three sets of keys, each
  attended to separately and merged exactly through their log-sum-exps:
  the memory before the chunk (all queries together, in blocks of fixed size), the chunk's
  earlier windows (un-rotated: they are memory by then) and its own window (rotated, causal).

Fixed shapes matter on CUDA: cuDNN's attention, the fastest on Hopper (about 600 TFLOP/s
on an H100 where FlashAttention 2 reaches 340), builds a plan per new shape (about 70 ms,
once per process), so it gets the shapes that repeat: windows, pairs of windows, memory
blocks of whole windows; FlashAttention (no plans) takes any other memory block.  Chunks
hold ``config.prefill_chunk_tokens`` tokens.  Every backend returns the log-sum-exp the merge
needs (``torch.ops.aten`` forms of what ``scaled_dot_product_attention`` calls).  The result
is the window-by-window computation's (tests compare them); the cache ends in the same state.

This file is copied into exported model directories and must import nothing from the toolkit.
"""
import torch

from .decode_fot_llama import rotate

# Memory keys attended to per call (rounded down to whole windows; see memory_blocks).
MEMORY_BLOCK = 32768
# Windows per chunk at most: a chunk of K windows attends to its earlier windows in K - 1
# shapes, each a cuDNN plan (about 70 ms once): small windows would otherwise make dozens.
MAX_CHUNK_WINDOWS = 8
# Queries per score tensor of the explicit float32 path (``torch_attention=False``).
EXACT_QUERIES = 512

_CUDNN_FAILED = set()


def chunk_windows(tokens, batch, window):
    """Windows per chunk of at most ``tokens`` tokens (``config.prefill_chunk_tokens``) for
    ``batch`` rows: at least one, at most :data:`MAX_CHUNK_WINDOWS`, none when ``tokens`` is
    0.  The default 8192 holds about 0.4 GB of activations in a 2048-wide bfloat16 model and
    makes matrix products large."""
    return min(MAX_CHUNK_WINDOWS, max(1, tokens // (batch * window))) if tokens else 0


def _exact(q, k, v, causal):
    """Float32 softmax attention and its log-sum-exp, a few queries at a time."""
    outs, lses = [], []
    keys, values = k.float(), v.float()
    for start in range(0, q.shape[2], EXACT_QUERIES):
        end = min(start + EXACT_QUERIES, q.shape[2])
        scores = torch.matmul(q[:, :, start:end].float(), keys.transpose(2, 3))
        scores = scores * q.shape[-1] ** -0.5
        if causal:
            later = torch.ones(end - start, k.shape[2], dtype=torch.bool, device=q.device)
            scores = scores.masked_fill(later.triu(start + 1), float("-inf"))
        lse = scores.logsumexp(-1)
        outs.append(torch.matmul((scores - lse[..., None]).exp(), values))
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def _cudnn(q, k, v, causal):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False)[:2]
    return out, lse.reshape(q.shape[:3])


def partial_attention(q, k, v, causal, steady=False, exact=False):
    """Attention of ``q`` ``[B, H, n, D]`` over ``k``/``v`` ``[B, H, S, D]`` (``causal``:
    top-left aligned, ``n == S``) and its log-sum-exp ``[B, H, n]`` in float32.

    ``steady``: the shape repeats from call to call (cuDNN on CUDA in half precision);
    ``exact``: an explicit float32 softmax (the reference path).
    """
    if exact:
        return _exact(q, k, v, causal)
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal)
        return out, lse
    if q.dtype not in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal)[:2]
        return out, lse[..., :q.shape[2]]
    if steady and q.device not in _CUDNN_FAILED:
        try:
            return _cudnn(q, k, v, causal)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # no cuDNN attention for this GPU or shape: FlashAttention
            _CUDNN_FAILED.add(q.device)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[:2]
    return out, lse


def grouped_partial(q, k, v, **kwargs):
    """:func:`partial_attention` without a mask where ``k``/``v`` have fewer heads than ``q``
    (GQA): the query heads sharing a key head are read as more queries of it."""
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    if kv_heads == heads:
        return partial_attention(q, k, v, False, **kwargs)
    folded = q.reshape(batch, kv_heads, heads // kv_heads * length, dim)
    out, lse = partial_attention(folded, k, v, False, **kwargs)
    return out.reshape(q.shape), lse.reshape(batch, heads, length)


def repeat_heads(k, v, heads):
    """``k``/``v`` with as many heads as the queries (GQA: each key head repeated)."""
    group = heads // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def fold(acc, lse, out, part_lse):
    """Merge a partial attention (``out``, ``part_lse``) into the float32 running result
    ``acc`` ``[..., n, D]`` / ``lse`` ``[..., n]`` (views, updated in place)."""
    total = torch.logaddexp(lse, part_lse)
    acc.mul_((lse - total).exp_().unsqueeze(-1))
    acc.addcmul_(out, (part_lse - total).exp_().unsqueeze(-1))
    lse.copy_(total)


class Chunk:
    """``windows`` whole windows of ``window`` tokens per row (``batch`` rows), after
    ``memory`` memory tokens, with the rotation tables of their tokens ``[K*W, 1, D]``."""

    def __init__(self, batch, windows, window, memory, rope):
        self.batch, self.windows, self.window, self.memory = batch, windows, window, memory
        cos, sin = rope.cos[0, 0, :window], rope.sin[0, 0, :window]
        self.cos = cos.repeat(windows, 1)[:, None]
        self.sin = sin.repeat(windows, 1)[:, None]

    def rows(self, x):
        """``[B, K*W, heads, D]`` as ``[B*K, heads, W, D]`` (a view: one row per window)."""
        return x.view(self.batch * self.windows, self.window, *x.shape[2:]).transpose(1, 2)


def chunk_attention(attn, hidden, layer, chunk):
    """Output of ``attn`` (a ``FoTLlamaAttention``) for ``hidden`` ``[B, K*W, hidden]`` of
    ``chunk``; stores the chunk's keys and values in ``layer`` (an ``InferenceLayer``): all
    but the last window as memory (memory layers), the last as the local window."""
    config = attn.config
    batch, length, _ = hidden.shape
    heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    window, memory = chunk.window, chunk.memory
    q = attn.q_proj(hidden).view(batch, length, heads, dim)
    k = attn.k_proj(hidden).view(batch, length, kv_heads, dim)
    v = attn.v_proj(hidden).view(batch, length, kv_heads, dim)
    end = memory + length
    last = slice(length - window, length)
    if layer.has_memory:
        # The chunk's windows as memory (un-rotated keys), where later windows read them;
        # the last one stays local: its un-rotated keys aside, rotated ones below.
        layer.keys[:, :, memory:end] = k.transpose(1, 2)
        layer.values[:, :, memory:end] = v.transpose(1, 2)
        if layer.raw_keys is not None:
            layer.raw_keys[:, :, :window] = k[:, last].transpose(1, 2)
    if layer.rotated:
        q, k = rotate(q, chunk.cos, chunk.sin), rotate(k, chunk.cos, chunk.sin)
    exact = not config.torch_attention
    local_k, local_v = chunk.rows(k), chunk.rows(v)
    if not layer.has_memory:
        if exact:
            out = _exact(chunk.rows(q), *repeat_heads(local_k, local_v, heads), True)[0]
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                chunk.rows(q), local_k, local_v, is_causal=True, enable_gqa=kv_heads < heads)
        layer.write(None, 0, 0, k[:, last].transpose(1, 2), None, v[:, last].transpose(1, 2))
        out = out.transpose(1, 2).reshape(batch, length, heads * dim)
        return attn.o_proj(out)
    if layer.raw_keys is not None:
        layer.keys[:, :, end - window:end] = k[:, last].transpose(1, 2)
    # Own window: causal over the rotated keys; the running result (token-major, float32)
    # starts from it.  The rest reads keys and values from the buffer.
    windows, rows = chunk.windows, chunk.batch * chunk.windows
    out, part_lse = partial_attention(chunk.rows(q), *repeat_heads(local_k, local_v, heads),
                                      True, steady=True, exact=exact)
    acc = torch.empty(batch, windows, window, heads, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, windows, window, heads, dtype=torch.float32, device=q.device)
    acc.view(rows, window, heads, dim).copy_(out.transpose(1, 2))
    lse.view(rows, window, heads).copy_(part_lse.transpose(1, 2))
    del out, part_lse, k, v, local_k, local_v
    _earlier_windows(q, layer, memory, acc, lse, exact)
    _memory_blocks(q, layer, memory, acc, lse, exact)
    return attn.o_proj(acc.to(hidden.dtype).view(batch, length, heads * dim))


def _earlier_windows(q, layer, memory, acc, lse, exact):
    """Fold into ``acc`` ``[B, K, W, H, D]`` / ``lse`` ``[B, K, W, H]`` what each window's
    queries (``q`` ``[B, K*W, H, D]``) see of the chunk's earlier windows (un-rotated, in
    ``layer``'s buffer after ``memory`` tokens), by distance: windows ``d..`` read windows
    ``..K-1-d``, one row per pair."""
    batch, windows, window, heads, dim = acc.shape

    def stored(buffer, count):  # [B, KV, cap, D] -> windows 0 .. count-1, a row each
        x = buffer[:, :, memory:memory + count * window].to(q.dtype)
        x = x.view(batch, x.shape[1], count, window, dim).transpose(1, 2)
        return x.reshape(batch * count, x.shape[2], window, dim)

    for distance in range(1, windows):
        count = windows - distance
        queries = q.view(batch, windows, window, heads, dim)[:, distance:]
        queries = queries.reshape(batch * count, window, heads, dim).transpose(1, 2)
        out, part_lse = grouped_partial(queries, stored(layer.keys, count),
                                        stored(layer.values, count), steady=True, exact=exact)
        fold(acc[:, distance:], lse[:, distance:],
             out.view(batch, count, heads, window, dim).transpose(2, 3),
             part_lse.view(batch, count, heads, window).transpose(2, 3))


def _memory_blocks(q, layer, memory, acc, lse, exact):
    """Fold into ``acc``/``lse`` what all queries see of the ``memory`` tokens before the
    chunk, in the blocks of :func:`memory_blocks`."""
    batch, windows, window, heads, dim = acc.shape
    length = windows * window
    for start, stop in memory_blocks(memory, window):
        part = grouped_partial(q.transpose(1, 2), layer.keys[:, :, start:stop].to(q.dtype),
                               layer.values[:, :, start:stop].to(q.dtype),
                               steady=(stop - start) % window == 0, exact=exact)
        fold(acc.view(batch, length, heads, dim).transpose(1, 2),
             lse.view(batch, length, heads).transpose(1, 2), *part)


def memory_blocks(memory, window):
    """``(start, stop)`` of the key blocks of a memory of ``memory`` tokens: whole blocks of
    :data:`MEMORY_BLOCK` (rounded down to whole windows), then the rest in blocks of a power
    of two windows, largest first, then what is left of a window.  Whole-window blocks come
    in at most ``log2(MEMORY_BLOCK / W) + 1`` sizes: few cuDNN plans for any length."""
    block = max(window, MEMORY_BLOCK // window * window)
    blocks, start = [], 0
    while start < memory:
        size = min(block, memory - start)
        if window <= size < block:
            size = window * 2 ** ((size // window).bit_length() - 1)
        blocks.append((start, start + size))
        start += size
    return blocks
