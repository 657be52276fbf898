"""One-token decoding steps of the FoT model with static shapes, replayed as a CUDA graph.

A generation step feeds one token per row.  Run eagerly, it costs a few hundred kernel launches
and their Python around them (22 layers of a 1B model), far more than the GPU needs to read
the weights and the memory.  :class:`StaticDecoder` runs the step as one fixed computation
over the cache's preallocated buffers: per-row positions and lengths live in device tensors,
the new keys/values are written at per-row offsets, and attention reads each layer's whole
buffer with a mask of the valid entries, so nothing depends on host values and the step can
be captured once in a CUDA graph and replayed for every token.  Steps where a row's local
window moves to memory (one in ``W``) and steps that need a larger buffer run eagerly
(:class:`FoTLlamaModel`'s piece path); the graph is captured again only when a buffer was
reallocated.  The computation is the eager one's (tests compare them).

This file is copied into exported model directories and must import nothing from the toolkit.
"""
import weakref

import torch


class StaticDecoder:
    """Static one-token steps of ``model`` (a ``FoTLlamaModel``) over ``cache`` (a
    :class:`FoTCache` in inference form, no eviction due); ``use_graph`` captures them in a
    CUDA graph (CUDA only)."""

    def __init__(self, model, cache, rope, use_graph):
        # The cache holds this decoder: a weak reference back keeps them out of a cycle, so
        # that a dropped cache frees its buffers (and the graph's) at once, not at the next
        # garbage collection.
        self.model, self._cache, self.use_graph = model, weakref.ref(cache), use_graph
        # The graph reads the tables it was captured with: this decoder keeps its own.
        self.rope = rope
        batch = len(cache.local_lengths)
        device = model.embed_tokens.weight.device
        self.local = torch.zeros(batch, dtype=torch.long, device=device)
        self.memory = torch.zeros(batch, dtype=torch.long, device=device)
        self.rows = torch.arange(batch, device=device)
        self.graph = self.hidden = None
        self.buffers = self.synced = None

    @property
    def cache(self):
        return self._cache()

    def ready(self):
        """Whether the next token of every row can take a static step: no row's window is
        full, and every buffer has room for one more token."""
        cache = self.cache
        if any(local >= cache.local_capacity for local in cache.local_lengths):
            return False
        needed = max(m + l for m, l in zip(cache.memory_lengths, cache.local_lengths)) + 1
        return all(layer.keys is not None and
                   (layer.keys.shape[2] >= needed if layer.has_memory else True)
                   for layer in cache.layers)

    def step(self, hidden_in):
        """Final hidden states ``[B, 1, hidden]`` of one token per row (embedded
        ``hidden_in``); updates the cache's lengths."""
        cache = self.cache
        lengths = (list(cache.local_lengths), list(cache.memory_lengths))
        if lengths != self.synced:
            # Only after eager steps: a copy from host memory waits for the GPU to catch up,
            # which would otherwise serialise every step with the host's work.
            self.local.copy_(torch.tensor(lengths[0]))
            self.memory.copy_(torch.tensor(lengths[1]))
        if not self.use_graph:
            out = self._compute(hidden_in)
        else:
            buffers = [(layer.keys.data_ptr(), layer.keys.shape) for layer in cache.layers]
            if self.graph is None or buffers != self.buffers:
                self._capture(hidden_in)
                self.buffers = buffers
            self.input.copy_(hidden_in)
            self.graph.replay()
            out = self.hidden.clone()
        for row in range(len(cache.local_lengths)):
            cache.local_lengths[row] += 1
        self.synced = (list(cache.local_lengths), list(cache.memory_lengths))
        return out

    def _capture(self, hidden_in):
        self.input = hidden_in.clone()
        stream = _side_stream(hidden_in.device)
        stream.wait_stream(torch.cuda.current_stream())
        # Warm-up outside the graph (kernel selection, workspace allocation); it writes the
        # same entries the replay will write again.
        local = self.local.clone()
        with torch.cuda.stream(stream):
            self._compute(self.input)
        torch.cuda.current_stream().wait_stream(stream)
        self.local.copy_(local)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.hidden = self._compute(self.input)

    def _compute(self, hidden):
        # Every kernel of a replayed step costs a few microseconds however small its work, so
        # the step keeps them few: what all layers share is computed once (rotation at each
        # row's local position, the masks of local-only and memory layers), norms are one
        # fused kernel each, queries and keys rotate together.
        model = self.model
        cos = self.rope.cos[0, 0][self.local][:, None, None]  # [B, 1, 1, D]
        sin = self.rope.sin[0, 0][self.local][:, None, None]
        self.cos, self.sin = cos, sin
        self.shared = {}
        for has_memory in {layer.has_memory for layer in self.cache.layers}:
            position = self.local + self.memory if has_memory else self.local  # [B]
            size = max(layer.keys.shape[2] for layer in self.cache.layers
                       if layer.has_memory == has_memory)
            hidden_entries = torch.arange(size, device=position.device)[None] > position[:, None]
            bias = torch.zeros(hidden_entries.shape, device=position.device).masked_fill(
                hidden_entries, float("-inf"))
            self.shared[has_memory] = position, bias[:, None, None]  # [B, 1, 1, size]
        for layer, layer_cache in zip(model.layers, self.cache.layers):
            normed = fused_rms_norm(layer.input_layernorm, hidden)
            hidden = hidden + self._attention(layer.self_attn, normed, layer_cache)
            hidden = hidden + layer.mlp(fused_rms_norm(layer.post_attention_layernorm, hidden))
        self.local += 1  # on device: the next step needs no copy from the host
        return fused_rms_norm(model.norm, hidden)

    def _attention(self, attn, x, layer):
        batch = x.shape[0]
        q, k, v = attn._project(x)  # [B, H, 1, D], [B, KV, 1, D]
        raw_k = k
        heads = q.shape[1]
        if layer.rotated:
            rotated = rotate(torch.cat([q, k], 1), self.cos, self.sin)
            q, k = rotated[:, :heads], rotated[:, heads:]
        position, bias = self.shared[layer.has_memory]
        layer.keys[self.rows, :, position] = k[:, :, 0].to(layer.keys.dtype)
        layer.values[self.rows, :, position] = v[:, :, 0].to(layer.values.dtype)
        if layer.raw_keys is not None:
            layer.raw_keys[self.rows, :, self.local] = raw_k[:, :, 0]
        # One query per row: two batched matrix-vector products over the whole buffer read
        # each key and value once (attention kernels parallelise over queries and would
        # leave most of the GPU idle), with the scores' softmax in float32 as the eager
        # attention of Hugging Face models.  Entries past a row's position are masked (the
        # -inf bias); they are stale or zero (buffers start zeroed: 0 * NaN would reach the
        # output).
        keys, values = layer.keys.to(q.dtype), layer.values.to(q.dtype)
        kv_heads, head_dim = keys.shape[1], keys.shape[3]
        queries = (q * head_dim ** -0.5).view(batch, kv_heads, heads // kv_heads, head_dim)
        scores = torch.matmul(queries, keys.transpose(2, 3)) + bias[..., :keys.shape[2]]
        out = torch.matmul(scores.softmax(-1).to(values.dtype), values)  # [B, KV, G, D]
        return attn.o_proj(out.reshape(batch, 1, -1))


_SIDE_STREAMS = {}


def _side_stream(device):
    """One side stream per device for every capture: cuBLAS keeps a workspace (32 MiB on
    Hopper) for each stream it has run on until the process ends, so a new stream per
    capture leaked that much GPU memory per generation."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def fused_rms_norm(module, x):
    """``module`` (Hugging Face's ``LlamaRMSNorm``) as one fused kernel."""
    return torch.nn.functional.rms_norm(x, module.weight.shape, module.weight,
                                        module.variance_epsilon)


def rotate(x, cos, sin):
    """RoPE in Hugging Face's rotate-half layout, ``cos``/``sin`` broadcast to ``x``:
    ``x * cos + cat(-x2, x1) * sin`` written half by half (four kernels that read ``x``
    twice, where the formula's negation, concatenation and three products read it five
    times: rotation was a tenth of a long prefill's time); the formula under autograd."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if torch.is_grad_enabled() and x.requires_grad:  # out= takes no gradients
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
    out = torch.empty(torch.broadcast_shapes(x.shape, cos.shape), dtype=x.dtype,
                      device=x.device)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos[..., :half], out=out1)
    out1.addcmul_(x2, sin[..., :half], value=-1)
    torch.mul(x2, cos[..., half:], out=out2)
    out2.addcmul_(x1, sin[..., half:])
    return out
