"""Long-context inference with FoT memory in JAX, on a toolkit checkpoint's parameters.

The same windowed inference as the exported PyTorch model (:mod:`FoT.hf`, FOT_SPEC section 5):
the input is consumed in pieces of ``last_context_length`` (``W``) tokens
(:func:`~FoT.hf.windows_fot_llama.plan_windows`); every layer attends causally within its
local window at positions relative to the window's start, and memory layers also attend, in
the same softmax, to the keys (rotated as if at position 0) and values of every token that
left the local window.  For ``W``-aligned inputs this equals the training model with
cross-batch attention over the windows of one document.

Each piece runs as one jitted function over the whole model; the local windows and the
memory stay on device in fixed-size buffers (memory grows by doubling, which recompiles), so
a long input compiles twice (a full piece and a one-token step) and then only streams.

:func:`load_model` also wraps an exported PyTorch directory behind the same small interface
(``token_losses``, ``generate``) for the evaluations in ``eval/``.
"""
import copy
import dataclasses
import functools
import json
import math
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from EasyLM.checkpoint import (default_window, load_llama_config, load_params,
                               parse_checkpoint_spec)
from EasyLM.models.llama.llama_model import LLaMAMLP, RMSNorm
from EasyLM.models.llama.rope import apply_rope, inverse_frequencies
from EasyLM.tokenizer import load_tokenizer
from FoT.cross_batch import MASK_VALUE
from FoT.hf.windows_fot_llama import plan_windows


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """How to run the windowed inference (the PyTorch config fields of the same names)."""
    last_context_length: int
    use_memory: bool = True
    mem_positionals: bool = True
    mem_dtype: Optional[str] = None  # e.g. "bfloat16"; None: the activation dtype
    attention_grouping: Optional[Tuple[int, int]] = None  # (heads, queries) in memory layers
    dtype: str = "float32"  # activations

    def __post_init__(self):
        if self.last_context_length < 1:
            raise ValueError(f"last_context_length must be >= 1, got {self.last_context_length}")
        grouping = self.attention_grouping
        if grouping is not None and (len(grouping) != 2 or min(grouping) < 1):
            raise ValueError(f"attention_grouping must be (heads, queries) >= 1, got {grouping}")


def _attention(q, keys, values, visible, grouping):
    """One softmax over ``keys`` ``[B, S, KV, D]`` for ``q`` ``[B, n, H, D]``; ``visible``
    ``[n, S]``.  ``grouping = (heads, queries)`` bounds the score tensor."""
    batch, num_queries, num_heads, head_dim = q.shape
    group = num_heads // keys.shape[2]
    heads, queries = grouping or (num_heads, num_queries)
    per_head = []
    for h0 in range(0, num_heads, heads):
        kv = np.arange(h0, min(h0 + heads, num_heads)) // group
        k_h, v_h = keys[:, :, kv], values[:, :, kv]
        per_query = []
        for i0 in range(0, num_queries, queries):
            q_c = q[:, i0:i0 + queries, h0:h0 + heads]
            scores = jnp.einsum("bqhd,bkhd->bhqk", q_c, k_h,
                                preferred_element_type=jnp.float32) / math.sqrt(head_dim)
            scores = jnp.where(visible[None, None, i0:i0 + queries], scores, MASK_VALUE)
            probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
            per_query.append(jnp.einsum("bhqk,bkhd->bqhd", probs, v_h,
                                        preferred_element_type=jnp.float32))
        per_head.append(jnp.concatenate(per_query, axis=1))
    return jnp.concatenate(per_head, axis=2).astype(q.dtype)


def _slide(window, new, local_length, evict):
    """Local window ``[B, W, ...]`` after appending ``new`` at ``local_length`` and dropping
    the ``evict`` oldest entries (slots past the valid ones hold stale values, never seen)."""
    width = window.shape[1]
    padded = jnp.concatenate([window, jnp.zeros_like(new)], axis=1)
    padded = jax.lax.dynamic_update_slice_in_dim(padded, new, local_length, axis=1)
    return jax.lax.dynamic_slice_in_dim(padded, evict, width, axis=1)


def _piece_forward(params, state, tokens, num_valid, local_length, memory_length, memory_limit,
                   *, config, options, memory_layers):
    """Logits ``[B, n, V]`` of one piece (its first ``num_valid`` tokens are real) and the new
    state.  ``local_length``/``memory_length`` are the valid entries of the buffers; memory
    layers see only the newest ``memory_limit`` of the memory's entries."""
    dtype = jnp.dtype(options.dtype)
    mem_dtype = jnp.dtype(options.mem_dtype or options.dtype)
    window = options.last_context_length
    batch, length = tokens.shape
    heads, kv_heads, head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                 config.head_dim)
    evict = jnp.maximum(0, local_length + num_valid - window)
    kept = local_length - evict
    inv_freq = inverse_frequencies(head_dim, config.rope_theta, config.rope_scaling)
    query_pos = jnp.broadcast_to(kept + jnp.arange(length), (batch, length))
    key_pos = jnp.broadcast_to(jnp.arange(window), (batch, window))
    local_visible = jnp.arange(window)[None, :] <= (kept + jnp.arange(length))[:, None]
    weights = params["transformer"]
    norm = RMSNorm(config.rms_norm_eps, dtype)
    hidden = weights["wte"]["embedding"].astype(dtype)[tokens]
    new_state = {name: list(buffers) for name, buffers in state.items()}
    for i in range(config.num_hidden_layers):
        layer = weights["h"][str(i)]
        attn = layer["attention"]
        x = norm.apply({"params": layer["attention_norm"]}, hidden)
        q, k, v = (x @ attn[name]["kernel"].astype(dtype) for name in ("wq", "wk", "wv"))
        q = q.reshape(batch, length, heads, head_dim)
        k = k.reshape(batch, length, kv_heads, head_dim)
        v = v.reshape(batch, length, kv_heads, head_dim)
        old_k, old_v = state["local_k"][i], state["local_v"][i]
        local_k = new_state["local_k"][i] = _slide(old_k, k, local_length, evict)
        local_v = new_state["local_v"][i] = _slide(old_v, v, local_length, evict)
        keys, values, visible = local_k, local_v, local_visible
        positional = i not in memory_layers or options.mem_positionals
        if positional:
            q = apply_rope(q, query_pos, inv_freq)
            keys = apply_rope(local_k, key_pos, inv_freq)
        if i in memory_layers:
            # The evicted tokens are the first `evict` of the old window; writing `length`
            # slots keeps the shape static (the rest lands past the memory, never seen).
            gone_k, gone_v = old_k[:, :length], old_v[:, :length]
            if positional:
                gone_k = apply_rope(gone_k, jnp.zeros_like(query_pos), inv_freq)
            j = memory_layers.index(i)
            mem_k = new_state["mem_k"][j] = jax.lax.dynamic_update_slice_in_dim(
                state["mem_k"][j], gone_k.astype(mem_dtype), memory_length, axis=1)
            mem_v = new_state["mem_v"][j] = jax.lax.dynamic_update_slice_in_dim(
                state["mem_v"][j], gone_v.astype(mem_dtype), memory_length, axis=1)
            keys = jnp.concatenate([mem_k.astype(dtype), keys], axis=1)
            values = jnp.concatenate([mem_v.astype(dtype), values], axis=1)
            stored = jnp.arange(mem_k.shape[1])
            mem_visible = ((stored < memory_length + evict)
                           & (stored >= memory_length + evict - memory_limit))
            visible = jnp.concatenate(
                [jnp.broadcast_to(mem_visible, (length, mem_k.shape[1])), local_visible], axis=1)
        grouping = options.attention_grouping if i in memory_layers else None
        out = _attention(q, keys, values, visible, grouping).reshape(batch, length, -1)
        hidden = hidden + out @ attn["wo"]["kernel"].astype(dtype)
        x = norm.apply({"params": layer["ffn_norm"]}, hidden)
        hidden = hidden + LLaMAMLP(config, dtype).apply({"params": layer["feed_forward"]}, x)
    hidden = norm.apply({"params": weights["ln_f"]}, hidden)
    if config.tie_word_embeddings:
        head = weights["wte"]["embedding"].T
    else:
        head = params["lm_head"]["kernel"]
    return hidden @ head.astype(dtype), new_state


def _score(logits, targets):
    """Per-token negative log-likelihood ``[B, n]`` in float32 and the argmax token."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class InferenceState:
    """Device buffers (local windows of every layer, memory of memory layers) and how many of
    their entries are valid."""
    buffers: dict
    local_length: int = 0
    memory_length: int = 0

    @property
    def capacity(self):
        mem = self.buffers["mem_k"]
        return mem[0].shape[1] if mem else 0


class WindowedLM:
    """A toolkit checkpoint's parameters run window by window with FoT memory."""

    def __init__(self, params, config, options):
        self.params = jax.device_put(params.get("params", params))
        self.config, self.options = config, options
        self.memory_layers = tuple(sorted(config.mem_layers)) if options.use_memory else ()
        self._forward = jax.jit(functools.partial(
            _piece_forward, config=config, options=options, memory_layers=self.memory_layers))
        self._score = jax.jit(_score)
        self.memory_limit = None

    @classmethod
    def from_checkpoint(cls, load_checkpoint, last_context_length=None, **options):
        """Any checkpoint spec (:mod:`EasyLM.checkpoint`); ``last_context_length`` defaults to
        the row length the checkpoint's run trained on, else the model's
        ``max_sequence_length``."""
        path = parse_checkpoint_spec(load_checkpoint)[1]
        config = load_llama_config(path)
        options = MemoryOptions(last_context_length or default_window(path, config), **options)
        return cls(load_params(load_checkpoint), config, options)

    @property
    def last_context_length(self):
        return self.options.last_context_length

    @property
    def vocab_size(self):
        return self.config.vocab_size

    def without_memory(self):
        """The same parameters, with memory layers run as ordinary local layers."""
        return WindowedLM(self.params, self.config,
                          dataclasses.replace(self.options, use_memory=False))

    def with_memory_limit(self, tokens):
        """The same model (and compiled code), with memory layers seeing only the newest
        ``tokens`` memory entries, as a memory of that capacity that forgets its oldest
        entries would (None: all)."""
        if tokens is not None and tokens < 0:
            raise ValueError(f"memory limit must be >= 0 tokens, got {tokens}")
        twin = copy.copy(self)
        twin.memory_limit = tokens
        return twin

    def new_state(self, batch_size, capacity=0):
        """Empty state; ``capacity`` memory tokens are allocated up front."""
        cfg, window = self.config, self.options.last_context_length
        local = (batch_size, window, cfg.num_key_value_heads, cfg.head_dim)
        dtype = jnp.dtype(self.options.dtype)
        mem_dtype = jnp.dtype(self.options.mem_dtype or self.options.dtype)
        memory = (batch_size, self._round_capacity(capacity)) + local[2:]
        layers, mems = cfg.num_hidden_layers, len(self.memory_layers)
        return InferenceState({
            "local_k": [jnp.zeros(local, dtype) for _ in range(layers)],
            "local_v": [jnp.zeros(local, dtype) for _ in range(layers)],
            "mem_k": [jnp.zeros(memory, mem_dtype) for _ in range(mems)],
            "mem_v": [jnp.zeros(memory, mem_dtype) for _ in range(mems)],
        })

    def _round_capacity(self, tokens):
        # Powers of two windows, so that growing memory recompiles only log-many times.
        windows = max(1, -(-tokens // self.options.last_context_length))
        return self.options.last_context_length * 2 ** math.ceil(math.log2(windows))

    def _reserve(self, state, tokens):
        needed = state.memory_length + tokens
        if not self.memory_layers or needed <= state.capacity:
            return
        extra = self._round_capacity(needed) - state.capacity
        for name in ("mem_k", "mem_v"):
            state.buffers[name] = [jnp.pad(m, ((0, 0), (0, extra), (0, 0), (0, 0)))
                                   for m in state.buffers[name]]

    def step(self, state, tokens):
        """Feed ``tokens`` ``[B, n]``; return their logits ``[B, n, V]`` (on device)."""
        tokens = np.asarray(tokens, np.int32)
        length = tokens.shape[1]
        self._reserve(state, state.local_length + length)
        pieces = []
        for start, end, evict in plan_windows(state.local_length, length,
                                              self.options.last_context_length):
            piece = tokens[:, start:end]
            if 1 < end - start < self.options.last_context_length:
                # Partial pieces are padded to a full window: one compilation for all of them.
                piece = np.pad(piece, ((0, 0), (0, self.options.last_context_length - end + start)))
            limit = np.iinfo(np.int32).max if self.memory_limit is None else self.memory_limit
            logits, state.buffers = self._forward(self.params, state.buffers, piece, end - start,
                                                  state.local_length, state.memory_length, limit)
            pieces.append(logits[:, :end - start])
            state.local_length += end - start - evict
            state.memory_length += evict
        return jnp.concatenate(pieces, axis=1)

    def logits(self, tokens):
        """Logits ``[B, N, V]`` of a whole input, as a numpy array."""
        tokens = np.atleast_2d(tokens)
        return np.asarray(self.step(self.new_state(len(tokens)), tokens))

    def token_losses(self, tokens):
        """Negative log-likelihood of ``tokens[:, 1:]`` ``[B, N - 1]`` (float32 numpy)."""
        return self.score(tokens)[0]

    def score(self, tokens):
        """``(losses, predictions)`` of ``tokens[:, 1:]``, both ``[B, N - 1]``: the
        negative log-likelihood (float32) and the most likely token (int32) at each position."""
        tokens = np.atleast_2d(np.asarray(tokens, np.int32))
        window = self.options.last_context_length
        state = self.new_state(len(tokens), tokens.shape[1])
        losses, predictions = [], []
        for start in range(0, tokens.shape[1] - 1, window):
            chunk = tokens[:, start:start + window]
            targets = tokens[:, start + 1:start + window + 1]
            logits = self.step(state, chunk)[:, :targets.shape[1]]
            loss, prediction = self._score(logits, jnp.asarray(targets))
            losses.append(np.asarray(loss))
            predictions.append(np.asarray(prediction))
        return np.concatenate(losses, axis=1), np.concatenate(predictions, axis=1)

    def generate(self, prompt, max_new_tokens, temperature=0.0, top_k=0, seed=0,
                 eos_token_id=None):
        """New tokens ``[B, <= max_new_tokens]`` after ``prompt`` ``[B, N]``: greedy with
        ``temperature=0``, else sampled (optionally from the ``top_k`` most likely).  Stops
        early once every row has produced ``eos_token_id``."""
        prompt = np.atleast_2d(np.asarray(prompt, np.int32))
        rng = np.random.default_rng(seed)
        state = self.new_state(len(prompt), prompt.shape[1] + max_new_tokens)
        logits = self.step(state, prompt)[:, -1]
        done = np.zeros(len(prompt), bool)
        out = []
        for _ in range(max_new_tokens):
            token = _choose(np.asarray(logits, np.float32), temperature, top_k, rng)
            if eos_token_id is not None:
                token = np.where(done, eos_token_id, token)
                done |= token == eos_token_id
            out.append(token)
            if done.all() or len(out) == max_new_tokens:
                break
            logits = self.step(state, token[:, None])[:, -1]
        return np.stack(out, axis=1)


def _choose(logits, temperature, top_k, rng):
    if temperature <= 0:
        return logits.argmax(axis=-1).astype(np.int32)
    logits = logits / temperature
    if top_k:
        cutoff = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], np.int32)


class TorchWindowedLM:
    """An exported Hugging Face directory (FoT or plain LLaMA) behind :class:`WindowedLM`'s
    evaluation interface."""

    def __init__(self, model_dir, use_memory=True, dtype="fp32", device=None, **config_overrides):
        import torch
        from transformers import AutoModelForCausalLM
        self.torch = torch
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with open(os.path.join(model_dir, "config.json")) as f:
            is_fot = json.load(f).get("model_type") == "fot_llama"
        if is_fot:  # the toolkit's own copy of the model code: no remote code to trust
            from FoT.hf.modeling_fot_llama import FoTLlamaForCausalLM
            self.model = FoTLlamaForCausalLM.from_pretrained(model_dir, dtype=torch_dtype,
                                                             **config_overrides)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.is_fot, self.use_memory = is_fot, use_memory
        self.vocab_size = self.model.config.vocab_size
        self.last_context_length = (self.model.config.last_context_length if is_fot
                                    else self.model.config.max_position_embeddings)

    def without_memory(self):
        twin = copy.copy(self)
        twin.use_memory = False
        return twin

    def _cache(self):
        if not self.is_fot:
            return None
        from FoT.hf.cache_fot_llama import FoTCache
        return FoTCache(self.model.config, use_memory=self.use_memory)

    def token_losses(self, tokens):
        return self.score(tokens)[0]

    def score(self, tokens):
        """As :meth:`WindowedLM.score`."""
        torch = self.torch
        tokens = torch.as_tensor(np.atleast_2d(tokens), device=self.device)
        # Window-sized chunks through the cache give the same pieces as one call, without
        # materialising the logits of the whole input.
        chunk = self.last_context_length if self.is_fot else tokens.shape[1]
        cache, losses, predictions = self._cache(), [], []
        with torch.no_grad():
            for start in range(0, tokens.shape[1] - 1, chunk):
                targets = tokens[:, start + 1:start + chunk + 1]
                out = self.model(tokens[:, start:start + chunk], past_key_values=cache,
                                 use_cache=cache is not None)
                logits = out.logits[:, :targets.shape[1]].float()
                losses.append(torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), targets.long(), reduction="none").cpu().numpy())
                predictions.append(logits.argmax(-1).int().cpu().numpy())
        return np.concatenate(losses, axis=1), np.concatenate(predictions, axis=1)

    def generate(self, prompt, max_new_tokens, eos_token_id=None):
        torch = self.torch
        prompt = torch.as_tensor(np.atleast_2d(prompt), device=self.device)
        with torch.no_grad():
            out = self.model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False,
                                      past_key_values=self._cache(), eos_token_id=eos_token_id,
                                      pad_token_id=eos_token_id if eos_token_id is not None
                                      else 0, attention_mask=torch.ones_like(prompt))
        return out[:, prompt.shape[1]:].cpu().numpy()


def load_model(load_checkpoint=None, hf_model=None, last_context_length=None, use_memory=True,
               attention_grouping=None, dtype="fp32", mem_dtype=None):
    """A :class:`WindowedLM` (JAX checkpoint) or :class:`TorchWindowedLM` (HF directory)."""
    if (load_checkpoint is None) == (hf_model is None):
        raise ValueError("give exactly one of load_checkpoint (a toolkit checkpoint directory) "
                         "and hf_model (an exported directory)")
    if hf_model is not None:
        overrides = {k: v for k, v in dict(last_context_length=last_context_length,
                                           mem_attention_grouping=attention_grouping,
                                           mem_dtype=mem_dtype).items() if v is not None}
        return TorchWindowedLM(hf_model, use_memory, dtype, **overrides)
    jax_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    return WindowedLM.from_checkpoint(load_checkpoint, last_context_length,
                                      use_memory=use_memory, attention_grouping=attention_grouping,
                                      mem_dtype=mem_dtype, dtype=jax_dtype)


def add_model_arguments(parser):
    """Command-line flags choosing the model of an evaluation (see :func:`model_from_args`)."""
    group = parser.add_argument_group("model")
    group.add_argument("--load_checkpoint", default=None,
                       help="toolkit checkpoint directory (JAX): a run's "
                            "RUN/checkpoints/step_<N> or a converted model, optionally "
                            "prefixed params:: or trainstate::; needs --tokenizer")
    group.add_argument("--hf_model", default=None, help="exported Hugging Face directory")
    group.add_argument("--tokenizer", default=None,
                       help="SentencePiece .model, tokenizer.json or HF tokenizer directory "
                            "(default with --hf_model: the one in that directory)")
    group.add_argument("--last_context_length", type=int, default=None,
                       help="local window in tokens (default: the training row length of "
                            "a run's checkpoint, else the model's max_sequence_length; with "
                            "--hf_model, its config's last_context_length)")
    group.add_argument("--mem_attention_grouping", default=None,
                       type=lambda text: tuple(int(x) for x in text.split(",")),
                       help="HEADS,QUERIES processed at a time in memory layers")
    group.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    group.add_argument("--mem_dtype", default=None, choices=("float32", "bfloat16", "float16"))


def model_from_args(args, use_memory=True):
    """``(model, tokenizer)`` from the flags of :func:`add_model_arguments`; the tokenizer has
    the interface of :mod:`EasyLM.tokenizer` and adds no BOS itself (see :func:`encode`)."""
    tokenizer_path = args.tokenizer or (args.hf_model and _tokenizer_file(args.hf_model))
    if tokenizer_path is None:
        raise ValueError("--load_checkpoint needs --tokenizer")
    model = load_model(args.load_checkpoint, args.hf_model, args.last_context_length,
                       use_memory, args.mem_attention_grouping, args.dtype, args.mem_dtype)
    return model, load_tokenizer({"vocab_file": tokenizer_path})


def _tokenizer_file(model_dir):
    # A file rather than the directory: AutoTokenizer would read the config of an exported FoT
    # model, whose AutoConfig is remote code, and ask whether to trust it.
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.exists(os.path.join(model_dir, name)):
            return os.path.join(model_dir, name)
    return model_dir


def encode(tokenizer, text, bos=True):
    """Token ids of ``text``, after the tokenizer's BOS when ``bos`` and it has one."""
    ids = list(tokenizer.encode(text))
    if bos and tokenizer.bos_token_id is not None and tokenizer.bos_token_id >= 0:
        ids = [tokenizer.bos_token_id] + ids
    return ids
