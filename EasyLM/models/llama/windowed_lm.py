"""Long-context inference with FoT memory in JAX, on a toolkit checkpoint's parameters.

The same windowed inference as the exported PyTorch model (:mod:`FoT.hf`, FOT_SPEC section 5),
run by the training model's own modules: each piece of at most ``W = last_context_length``
tokens goes through :class:`~EasyLM.models.llama.llama_model.FlaxLLaMAForCausalLMModule` with
every layer's :class:`~FoT.inference.LayerCache`, whose attention slides its local window and
reads and extends its memory (:mod:`FoT.inference`).  For ``W``-aligned inputs this equals the
training model with cross-batch attention over the windows of one document.

Each piece runs as one jitted call over the whole model; the local windows and the memory stay
on device in fixed-size buffers (memory grows by doubling, which recompiles), so a long input
compiles twice (a full piece and a one-token step) and then only streams.
"""
import copy
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from EasyLM.checkpoint import (default_window, load_llama_config, load_params,
                               parse_checkpoint_spec)
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from FoT.hf.windows_fot_llama import plan_windows
from FoT.inference import LayerCache, MemoryOptions, Piece


def _score(logits, targets):
    """Per-token negative log-likelihood ``[B, n]`` in float32 and the argmax token."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class InferenceState:
    """Device buffers (one :class:`~FoT.inference.LayerCache` per layer) and how many of
    their entries are valid."""
    caches: tuple
    local_length: int = 0
    memory_length: int = 0

    @property
    def capacity(self):
        memories = [cache.mem_k for cache in self.caches if cache.has_memory]
        return memories[0].shape[1] if memories else 0


class WindowedLM:
    """A toolkit checkpoint's parameters run window by window with FoT memory."""

    def __init__(self, params, config, options):
        self.params = jax.device_put(params.get("params", params))
        self.config, self.options = config, options
        self.memory_layers = tuple(sorted(config.mem_layers)) if options.use_memory else ()
        model = FlaxLLaMAForCausalLMModule(config, jnp.dtype(options.dtype))
        self._forward = jax.jit(functools.partial(self._piece_forward, model, options))
        self._score = jax.jit(_score)
        self.memory_limit = None

    @staticmethod
    def _piece_forward(model, options, params, caches, tokens, num_valid, local_length,
                       memory_length, memory_limit):
        """Logits ``[B, n, V]`` of one piece (its first ``num_valid`` tokens are real) and the
        updated caches; memory layers see only the newest ``memory_limit`` memory entries."""
        piece = Piece(local_length, memory_length, num_valid, memory_limit,
                      options.last_context_length, options.mem_positionals,
                      options.attention_grouping)
        out = model.apply({"params": params}, tokens, caches=caches, piece=piece)
        return out.logits, out.caches

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
        caches = []
        for i in range(cfg.num_hidden_layers):
            kept = [jnp.zeros(local, dtype), jnp.zeros(local, dtype)]
            if i in self.memory_layers:
                kept += [jnp.zeros(memory, mem_dtype), jnp.zeros(memory, mem_dtype)]
            caches.append(LayerCache(*kept))
        return InferenceState(tuple(caches))

    def _round_capacity(self, tokens):
        # Powers of two windows, so that growing memory recompiles only log-many times.
        windows = max(1, -(-tokens // self.options.last_context_length))
        return self.options.last_context_length * 2 ** math.ceil(math.log2(windows))

    def _reserve(self, state, tokens):
        needed = state.memory_length + tokens
        if not self.memory_layers or needed <= state.capacity:
            return
        extra = ((0, 0), (0, self._round_capacity(needed) - state.capacity), (0, 0), (0, 0))
        state.caches = tuple(
            cache._replace(mem_k=jnp.pad(cache.mem_k, extra), mem_v=jnp.pad(cache.mem_v, extra))
            if cache.has_memory else cache for cache in state.caches)

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
            logits, state.caches = self._forward(self.params, state.caches, piece, end - start,
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

