"""PyTorch LLaMA with Focused Transformer (FoT) memory layers, for inference on long inputs
and for training (fine-tuning) on inputs of any number of windows.

Inputs are processed in windows of ``config.last_context_length`` (``W``) tokens, cut by
``config.window_rule`` (:mod:`windows_fot_llama`; the default rule is causal: a token's output
depends only on the tokens before it).  Every layer attends causally within its local window,
at positions relative to the window's start.  Memory layers also attend, in the same softmax,
to the memory: keys (rotated as if at position 0) and values of all tokens that left the local
window.  Weights use Hugging Face Llama names and RoPE layout, so this model and a plain
``LlamaForCausalLM`` load the same tensors.  Layers that ``config.attention_type`` names
``"forgetting"`` are forgetting-attention (FoX) layers (:mod:`forgetting_fot_llama`, their own
gates beside those tensors), ``"supra"`` and ``"gla"`` linear attention layers
(:mod:`linear_fot_llama`, a recurrent state over the whole stream); they run in inference
only, window by window (no chunked prefill, no static decoding step).

Padding: without autograd, zeros in ``attention_mask`` (left, right or anywhere) mark columns
that are not tokens; each row consumes only its own tokens, so a padded batch gives every
real token the logits it has alone (pad positions get zero logits).  With autograd (training),
rows must hold the same tokens, padding allowed only at their ends (``labels`` -100 there).
With autograd on, the memory grows by concatenation (gradients flow into earlier windows'
keys and values, as in the cross-batch training model); activation checkpointing recomputes
each layer's window from the same local and memory tensors.

This file is copied into exported model directories: only relative imports of its own files.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (LlamaMLP, LlamaRMSNorm,
                                                      LlamaRotaryEmbedding)

# windowed_attention: re-exported, the inference benchmark checks it here.
from .attention_fot_llama import FoTLlamaAttention, windowed_attention  # noqa: F401
from .cache_fot_llama import FoTCache
from .configuration_fot_llama import FoTLlamaConfig
from .decode_fot_llama import StaticDecoder, fused_rms_norm, rotate
from .forgetting_fot_llama import FoTLlamaForgettingAttention
from .linear_fot_llama import LINEAR_LAYERS
from .prefill_fot_llama import Chunk, chunk_attention, chunk_windows


def _identity(x):
    return x


class LocalRope:
    """cos/sin of the local positions ``0 .. W-1`` (Hugging Face's rotate-half layout)."""

    def __init__(self, rotary, like, window):
        positions = torch.arange(window, device=like.device)[None]
        cos, sin = rotary(like, positions)
        self.cos, self.sin = cos[:, None], sin[:, None]  # [1, 1, W, D]

    def rotate(self, x, start):
        """Rotate ``x`` ``[B, heads, L, D]`` at positions ``start .. start + L - 1``."""
        end = start + x.shape[2]
        return rotate(x, self.cos[:, :, start:end], self.sin[:, :, start:end])

    def rotate_rows(self, x, starts):
        """Rotate ``x`` ``[B, heads, P, D]``, row ``b`` at positions ``starts[b] ..``."""
        if len(set(starts)) == 1:
            return self.rotate(x, starts[0])
        positions = (torch.tensor(starts, device=x.device)[:, None] +
                     torch.arange(x.shape[2], device=x.device))
        # Past a row's tokens (lockstep padding) positions may run off the table: clamped,
        # those outputs are discarded.
        positions = positions.clamp(max=self.cos.shape[2] - 1)
        cos, sin = self.cos[0, 0][positions][:, None], self.sin[0, 0][positions][:, None]
        return rotate(x, cos, sin)

    def rotate_as_first(self, x):
        return rotate(x, self.cos[:, :, :1], self.sin[:, :, :1])


class FoTLlamaDecoderLayer(GradientCheckpointingLayer):
    """One decoder layer; with activation checkpointing on, its forward (which changes no
    cache state: :meth:`LayerCache.advance` and ``push`` run outside it) is recomputed in
    backward from the same local and memory tensors."""

    def __init__(self, config, layer_idx):
        super().__init__()
        forgetting = layer_idx in config.forgetting_layers()
        linear = config.linear_layers().get(layer_idx)
        self.self_attn = (LINEAR_LAYERS[linear] if linear
                          else FoTLlamaForgettingAttention if forgetting
                          else FoTLlamaAttention)(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden, past_keys, past_values, memory_keys, memory_values, rope=None,
                positional=True):
        """Autograd form.  Tensors that may need gradients are positional (what reentrant
        checkpointing asks); returns the output and the piece's un-rotated keys and values."""
        attended, keys, values = self.self_attn(
            self.input_layernorm(hidden), past_keys, past_values, memory_keys, memory_values,
            rope, positional)
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), keys, values

    def infer(self, hidden, layer, step, rope):
        """Inference form (:meth:`FoTLlamaAttention.infer`), with one-kernel norms (the same
        values in float32; in half precision they round once, not after normalising)."""
        hidden = hidden + self.self_attn.infer(fused_rms_norm(self.input_layernorm, hidden),
                                               layer, step, rope)
        return hidden + self.mlp(fused_rms_norm(self.post_attention_layernorm, hidden))

    def infer_chunk(self, hidden, layer, chunk):
        """Inference form over whole windows (:func:`prefill_fot_llama.chunk_attention`);
        the MLP's activation and product are computed in place (the chunk's largest
        tensors: a third less memory at its peak)."""
        hidden = hidden + chunk_attention(
            self.self_attn, fused_rms_norm(self.input_layernorm, hidden), layer, chunk)
        mlp, normed = self.mlp, fused_rms_norm(self.post_attention_layernorm, hidden)
        gate = mlp.gate_proj(normed)
        if mlp.config.hidden_act == "silu":
            F.silu(gate, inplace=True)
        else:
            gate = mlp.act_fn(gate)
        return hidden + mlp.down_proj(gate.mul_(mlp.up_proj(normed)))


class _Step:
    """Where each row's lockstep piece goes: local tokens kept (``local``, after eviction),
    memory tokens (``memory``) and the piece's tokens (``lengths``); ``uniform`` when every
    row is alike (one slice, no per-row work)."""

    def __init__(self, local, memory, lengths, uniform):
        self.local, self.memory, self.lengths, self.uniform = local, memory, lengths, uniform


def _new_columns(attention_mask, length):
    """``[B, n]`` boolean mask of the new columns' tokens, ``None`` when all are tokens."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < length:
        raise ValueError(f"attention_mask must be [batch, past + new tokens] with at least "
                         f"{length} columns, got {tuple(attention_mask.shape)}")
    valid = attention_mask[:, -length:].bool()
    return None if bool(valid.all()) else valid


def _check_trailing_padding(valid):
    """Autograd form: all rows consume all columns, which is exact for tokens followed only
    by padding (the default rule is causal) and wrong otherwise."""
    if valid is None:
        return
    after_pad = valid[:, 1:] & ~valid[:, :-1]
    if bool(after_pad.any()):
        raise ValueError("with autograd on, padding is supported only at the end of rows "
                         "(right padding, labels -100 there); run left-padded or ragged "
                         "batches under torch.no_grad(), or pad on the right")


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
        self.layers = nn.ModuleList(FoTLlamaDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, keep_last=0, **kwargs):
        """``attention_mask`` ``[B, n]`` or ``[B, past + n]`` (as ``generate`` passes it): 1 for
        tokens, 0 for padding.  ``keep_last > 0`` may return only the last hidden states (at
        least that many): a long prefill then holds neither the whole input's embeddings nor
        its outputs.  ``position_ids`` and other Hugging Face arguments are accepted and
        ignored: positions are always relative to the local window."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        like = self.embed_tokens.weight if inputs_embeds is None else inputs_embeds
        batch, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        valid = _new_columns(attention_mask, length)
        cache = self._cache(past_key_values)
        autograd = torch.is_grad_enabled()
        cache.start(batch, autograd)
        rope = cache.rope
        if rope is None or rope.cos.device != like.device or rope.cos.dtype != like.dtype:
            # Built once per cache: its tables are the same for every call.
            rope = cache.rope = LocalRope(self.rotary_emb, like, cache.local_capacity)
        if not autograd and valid is None and cache.rows_alike() and length > 1:
            hidden = self._uniform_pieces(input_ids, inputs_embeds, cache, rope, keep_last)
        else:
            hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            if autograd:
                _check_trailing_padding(valid)
                hidden = self._autograd_pieces(hidden, cache, rope)
            elif length == 1 and valid is None and self._static_step_ready(cache, rope):
                hidden = cache.decoder.step(hidden)
            else:
                hidden = self._inference_pieces(hidden, valid, cache, rope)
        cache.seen_tokens += length
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return BaseModelOutputWithPast(last_hidden_state=hidden,
                                       past_key_values=cache if use_cache else None)

    def _static_step_ready(self, cache, rope):
        """Whether this one-token step runs through the cache's :class:`StaticDecoder`."""
        use = cache.static_decode
        if use is None:
            use = self.config.decode_graphs and rope.cos.is_cuda
        # FoX and linear layers take the eager piece path (their state is not in the static
        # step).
        if not use or cache.layers is None or cache.eager_only:
            return False
        if cache.decoder is None:
            cache.decoder = StaticDecoder(self, cache, rope, use_graph=rope.cos.is_cuda)
        return cache.decoder.ready()

    def _autograd_pieces(self, hidden, cache, rope):
        """Every row consumes all ``n`` columns with the same plan (the training form)."""
        outputs = []
        for start, end, evict in cache.plan(0, hidden.shape[1]):
            piece = hidden[:, start:end]
            for layer, layer_cache in zip(self.layers, cache.layers):
                positional = not layer_cache.has_memory or self.config.mem_positionals
                to_memory = rope.rotate_as_first if positional else _identity
                past_keys, past_values, memory_keys, memory_values = layer_cache.advance(
                    evict, to_memory)
                piece, keys, values = layer(piece, past_keys, past_values, memory_keys,
                                            memory_values, rope=rope, positional=positional)
                layer_cache.push(keys, values)
            outputs.append(self.norm(piece))
            for row in range(len(cache.local_lengths)):
                cache.move_to_memory(row, evict)
                cache.local_lengths[row] += end - start
        return torch.cat(outputs, dim=1)

    def _uniform_pieces(self, input_ids, inputs_embeds, cache, rope, keep_last):
        """Inference on rows that all hold the same tokens and consume all columns: the
        pieces are column slices, embedded as they come; with ``keep_last`` only the outputs
        of the last pieces are kept."""
        batch, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        self._reserve(cache, batch, cache.memory_lengths[0] + cache.local_lengths[0] + length,
                      rope.cos)
        outputs, kept = [], 0
        most = chunk_windows(self.config.prefill_chunk_tokens, batch, cache.window)
        for whole, pieces in self._chunks(cache, cache.plan(0, length), most):
            start, end = pieces[0][0], pieces[-1][1]
            if inputs_embeds is None:
                piece = self.embed_tokens(input_ids[:, start:end])
            else:
                piece = inputs_embeds[:, start:end]
            if whole:
                outputs.append(self._chunk_pieces(piece, cache, rope, pieces))
            else:
                outputs.append(self._inference_pieces(piece, None, cache, rope,
                                                      [[(0, end - start, pieces[0][2])]] * batch))
            kept += end - start
            while keep_last and kept - outputs[0].shape[1] >= keep_last:
                kept -= outputs.pop(0).shape[1]
        return torch.cat(outputs, dim=1)

    @staticmethod
    def _chunks(cache, plan, most):
        """``plan``'s pieces in groups ``(whole, pieces)``: runs of whole windows that start
        with an empty local window (``whole``: one chunk for :meth:`_chunk_pieces`, at most
        ``most`` windows long; none when ``most`` is 0), or single other pieces."""
        window = cache.window
        # FoX and linear layers have no chunk form: they run window by window.
        fits = (most and cache.rule == "aligned" and cache.local_capacity == window
                and not cache.eager_only)
        local, groups = cache.local_lengths[0], []
        for piece in plan:
            start, end, evict = piece
            local -= evict
            whole = fits and local == 0 and end - start == window
            if whole and groups and groups[-1][0] and len(groups[-1][1]) < most:
                groups[-1][1].append(piece)
            else:
                groups.append((whole, [piece]))
            local += end - start
        return groups

    def _chunk_pieces(self, hidden, cache, rope, pieces):
        """Whole windows ``pieces`` (``hidden`` ``[B, K*W, hidden]``, rows alike) through
        every layer at once; leaves the cache as the window-by-window path does."""
        batch, window, evict = hidden.shape[0], cache.window, pieces[0][2]
        for row in range(batch if evict else 0):
            for layer_cache in cache.layers:
                layer_cache.to_memory(row, cache.memory_lengths[row], evict)
            cache.move_to_memory(row, evict)
        chunk = Chunk(batch, len(pieces), window, cache.memory_lengths[0], rope)
        for layer, layer_cache in zip(self.layers, cache.layers):
            hidden = layer.infer_chunk(hidden, layer_cache, chunk)
        for row in range(batch):
            cache.local_lengths[row] += len(pieces) * window
            cache.move_to_memory(row, (len(pieces) - 1) * window)
        return fused_rms_norm(self.norm, hidden)

    def _reserve(self, cache, batch, tokens, like):
        """Buffers with room for ``tokens`` tokens per row (memory and local window)."""
        config = self.config
        head_dim = (getattr(config, "head_dim", None) or
                    config.hidden_size // config.num_attention_heads)
        like = like.new_empty(batch, config.num_key_value_heads, 0, head_dim)
        for layer_cache in cache.layers:
            layer_cache.reserve(like, tokens, cache.local_capacity)

    def _inference_pieces(self, hidden, valid, cache, rope, plans=None):
        """Each row consumes its own tokens (the columns ``valid`` marks) with its own plan
        (or ``plans``, one per row); the rows' ``j``-th pieces run together."""
        batch, length = hidden.shape[:2]
        uniform = valid is None and cache.rows_alike()
        if uniform:
            columns = None
            plans = plans or [cache.plan(0, length)] * batch
        else:
            if valid is None:
                valid = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
            columns = [row.nonzero().squeeze(1) for row in valid]
            plans = [cache.plan(row, len(cols)) for row, cols in enumerate(columns)]
        needed = max(m + l + n for m, l, n in zip(cache.memory_lengths, cache.local_lengths,
                                                  [len(c) for c in columns] if columns
                                                  else [length] * batch))
        self._reserve(cache, batch, needed, hidden)
        out = hidden.new_zeros(hidden.shape) if columns is not None else None
        outputs = []
        for j in range(max(len(plan) for plan in plans)):
            pieces = [plan[j] if j < len(plan) else (0, 0, 0) for plan in plans]
            for row, (_, _, evict) in enumerate(pieces):
                if evict:
                    for layer_cache in cache.layers:
                        layer_cache.to_memory(row, cache.memory_lengths[row], evict)
                    cache.move_to_memory(row, evict)
            lengths = [end - start for start, end, _ in pieces]
            step = _Step(list(cache.local_lengths), list(cache.memory_lengths), lengths,
                         uniform)
            if uniform:
                start, end, _ = pieces[0]
                piece = hidden[:, start:end]
            else:
                index = torch.zeros(batch, max(lengths), dtype=torch.long, device=hidden.device)
                for row, (start, end, _) in enumerate(pieces):
                    index[row, :end - start] = columns[row][start:end]
                piece = hidden[torch.arange(batch, device=hidden.device)[:, None], index]
            for layer, layer_cache in zip(self.layers, cache.layers):
                piece = layer.infer(piece, layer_cache, step, rope)
            piece = fused_rms_norm(self.norm, piece)
            if uniform:
                outputs.append(piece)
            else:
                for row, (start, end, _) in enumerate(pieces):
                    out[row, columns[row][start:end]] = piece[row, :end - start]
            for row, count in enumerate(lengths):
                cache.local_lengths[row] += count
        return torch.cat(outputs, dim=1) if uniform else out

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
                         use_cache=use_cache, keep_last=logits_to_keep)
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
