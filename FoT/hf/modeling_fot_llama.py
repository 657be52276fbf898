"""PyTorch LLaMA with Focused Transformer (FoT) memory layers, for inference on long inputs
and for training (fine-tuning) on inputs of any number of windows.

Inputs are processed in windows of ``config.last_context_length`` (``W``) tokens
(:func:`plan_windows`).  Every layer attends causally within its local window, at positions
relative to the window's start.  Memory layers also attend, in the same softmax, to the
memory: keys (rotated as if at position 0) and values of all tokens that left the local
window.  ``generate()`` keeps the last ``W`` tokens in the local cache and moves older ones
into memory.  Weights use Hugging Face Llama names and RoPE layout, so this model and a
plain ``LlamaForCausalLM`` load the same tensors.  Padding (a ``0`` in ``attention_mask``) is
not supported: memory has no notion of it.  With autograd on, the memory grows by
concatenation (gradients flow into earlier windows' keys and values, as in the cross-batch
training model); without it, in place in preallocated room.  Activation checkpointing
recomputes each layer's window from the same local and memory tensors.

This file is copied into exported model directories: only relative imports of its own files.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (LlamaMLP, LlamaRMSNorm,
                                                      LlamaRotaryEmbedding)

from .cache_fot_llama import FoTCache, join
from .configuration_fot_llama import FoTLlamaConfig


# Decoding keeps off cuDNN attention: it builds a plan per shape, and the key length changes
# with every generated token; re-planning cost ~1.7 ms per call on an H200, more than the
# attention itself.  (Window-sized prefill shapes repeat, and there cuDNN is the fastest.)
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _identity(x):
    return x


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LocalRope:
    """cos/sin of the local positions ``0 .. W-1`` (Hugging Face's rotate-half layout)."""

    def __init__(self, rotary, like, window):
        positions = torch.arange(window, device=like.device)[None]
        cos, sin = rotary(like, positions)
        self.cos, self.sin = cos[:, None], sin[:, None]  # [1, 1, W, D]

    def rotate(self, x, start):
        """Rotate ``x`` ``[B, heads, L, D]`` at positions ``start .. start + L - 1``."""
        end = start + x.shape[2]
        return x * self.cos[:, :, start:end] + rotate_half(x) * self.sin[:, :, start:end]

    def rotate_as_first(self, x):
        return x * self.cos[:, :, :1] + rotate_half(x) * self.sin[:, :, :1]


def _heads(x, start, end, num_heads):
    """Key/value heads ``[B, KV, S, D]`` serving query heads ``start .. end - 1``."""
    group = num_heads // x.shape[1]
    if start % group == 0 and end % group == 0:
        return x[:, start // group:end // group]
    index = torch.arange(start, end, device=x.device) // group
    return x.index_select(1, index)


def _attend(q, k, v, use_sdpa):
    """Softmax attention where query ``i`` of ``n`` sees keys ``j <= S - n + i`` of ``S``.

    ``k``/``v`` may have fewer heads than ``q`` (GQA).  That bottom-right-aligned causal
    mask lets the memory (the first keys) be seen by every query.
    """
    num_queries, num_keys = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    if use_sdpa and num_queries == 1:
        with sdpa_kernel(DECODE_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)
    if use_sdpa and num_queries == num_keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    if group > 1:  # the bottom-right causal bias does not take GQA
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v,
                                              attn_mask=causal_lower_right(num_queries, num_keys))
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * q.shape[-1] ** -0.5
    hidden = torch.ones(num_queries, num_keys, dtype=torch.bool, device=q.device).triu(
        num_keys - num_queries + 1)
    probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def windowed_attention(q, k, v, grouping=None, use_sdpa=True):
    """Attention of ``q`` ``[B, H, n, D]`` (the last ``n`` positions) over ``k``/``v``
    ``[B, KV, S, D]`` (memory, then the local window), in one softmax per query.

    ``grouping = (heads, queries)`` processes that many heads and queries at a time, which
    bounds the score tensor; each query chunk reads only the keys some query of it can see.
    """
    num_heads, num_queries = q.shape[1], q.shape[2]
    num_keys = k.shape[2]
    heads, queries = grouping or (num_heads, num_queries)
    if heads >= num_heads and queries >= num_queries:
        return _attend(q, k, v, use_sdpa)
    out = torch.empty_like(q)
    for h0 in range(0, num_heads, heads):
        h1 = min(h0 + heads, num_heads)
        k_h, v_h = _heads(k, h0, h1, num_heads), _heads(v, h0, h1, num_heads)
        for i0 in range(0, num_queries, queries):
            i1 = min(i0 + queries, num_queries)
            visible = num_keys - num_queries + i1
            out[:, h0:h1, i0:i1] = _attend(q[:, h0:h1, i0:i1], k_h[:, :, :visible],
                                           v_h[:, :, :visible], use_sdpa)
    return out


class FoTLlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden, past_keys, past_values, memory_keys, memory_values, rope,
                positional=True, memory=None):
        """``hidden`` ``[B, n, hidden]`` of one piece attends to the local window (un-rotated
        ``past_keys``/``past_values`` ``[B, KV, *, D]`` or ``None``, then the piece) and, in a
        memory layer, to ``memory_keys``/``memory_values`` (``None`` when empty).
        ``positional=False`` uses no RoPE.  ``memory``, the :class:`MemoryBuffer` holding
        those tensors, is given only without autograd: the local keys are then written after
        the memory in its spare room instead of concatenating a copy of the memory.  Returns
        the output and the piece's un-rotated keys and values; changes no state."""
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        keys, values = join(past_keys, k), join(past_values, v)
        if positional:
            q = rope.rotate(q, keys.shape[2] - length)
            keys = rope.rotate(keys, 0)
        grouping = None
        if memory_keys is not None:
            grouping = self.config.mem_attention_grouping
            if memory is not None:
                keys, values = memory.with_local(keys, values)
            else:
                keys, values = join(memory_keys, keys), join(memory_values, values)
        out = windowed_attention(q, keys, values, grouping, self.config.torch_attention)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), k, v


class FoTLlamaDecoderLayer(GradientCheckpointingLayer):
    """One decoder layer; with activation checkpointing on, its forward (which changes no
    cache state: :meth:`LayerCache.advance` and ``push`` run outside it) is recomputed in
    backward from the same local and memory tensors."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = FoTLlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden, past_keys, past_values, memory_keys, memory_values, rope=None,
                positional=True, memory=None):
        """Tensors that may need gradients are positional (what reentrant checkpointing
        asks); returns the output and the piece's un-rotated keys and values."""
        attended, keys, values = self.self_attn(
            self.input_layernorm(hidden), past_keys, past_values, memory_keys, memory_values,
            rope, positional, memory)
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), keys, values


class FoTLlamaPreTrainedModel(PreTrainedModel):
    config_class = FoTLlamaConfig
    config: FoTLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["FoTLlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    supports_gradient_checkpointing = True


class FoTLlamaModel(FoTLlamaPreTrainedModel):
    """Embedding, decoder layers and final norm, run window by window."""

    def __init__(self, config):
        super().__init__(config)
        config.validate_fot()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FoTLlamaDecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        """``position_ids`` and other Hugging Face arguments are accepted and ignored:
        positions are always relative to the local window."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("FoT memory does not support padding (zeros in attention_mask); "
                             "run sequences of different lengths separately")
        cache = self._cache(past_key_values)
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rope = LocalRope(self.rotary_emb, hidden, self.config.last_context_length)
        length = hidden.shape[1]
        # With autograd, nothing that attention saved for backward may be written again: the
        # memory grows by concatenation instead of in its preallocated room.
        in_place = not torch.is_grad_enabled()
        outputs = []
        for start, end, evict in cache.plan(length):
            piece = hidden[:, start:end]
            for layer, layer_cache in zip(self.layers, cache.layers):
                memory = layer_cache.memory
                positional = memory is None or self.config.mem_positionals
                to_memory = rope.rotate_as_first if positional else _identity
                past_keys, past_values, memory_keys, memory_values = layer_cache.advance(
                    evict, length - start, to_memory, in_place)
                piece, keys, values = layer(
                    piece, past_keys, past_values, memory_keys, memory_values, rope=rope,
                    positional=positional, memory=memory if in_place else None)
                layer_cache.push(keys, values)
            outputs.append(self.norm(piece))
            cache.seen_tokens += end - start
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return BaseModelOutputWithPast(last_hidden_state=torch.cat(outputs, dim=1),
                                       past_key_values=cache if use_cache else None)

    def _cache(self, past_key_values):
        if isinstance(past_key_values, FoTCache):
            return past_key_values
        # `generate` hands over an empty DynamicCache; anything with content is not ours.
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError(f"past_key_values must be a FoTCache, got "
                             f"{type(past_key_values).__name__}")
        return FoTCache(self.config)


class FoTLlamaForCausalLM(FoTLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = FoTLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        """Causal-LM forward; ``logits_to_keep > 0`` computes only the last that many logits
        (what ``generate`` asks for, and what keeps 100k-token prefills small)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # As LlamaForCausalLM: ``num_items_in_batch`` (from Trainer, under gradient
            # accumulation) makes the loss a sum over that many tokens, not a mean.
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=out.past_key_values)
