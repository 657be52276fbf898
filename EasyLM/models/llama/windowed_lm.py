"""Long-context inference with FoT memory in JAX, on a toolkit checkpoint's parameters.

The same windowed inference as the exported PyTorch model (:mod:`FoT.hf`, FOT_SPEC section 5),
run by the training model's own modules: the input is cut into pieces by
:func:`~FoT.hf.windows_fot_llama.plan_windows` (the window rule of the
:class:`~FoT.inference.MemoryOptions`), and each piece goes through
:class:`~EasyLM.models.llama.llama_model.FlaxLLaMAForCausalLMModule` with every layer's
state, as its attention family declares it (:mod:`EasyLM.models.llama.attention`): an FoT
memory layer evicts its local window as planned and reads and extends its memory
(:mod:`FoT.inference`).  Under the default ``"aligned"`` rule a
token's logits equal the training model's with cross-batch attention over the windows of its
document, however the input is split into calls.

Rows of a batch are separate streams: a mask marks each row's real tokens (padding may sit
anywhere), every row plans its own pieces, and the rows' pieces run in lockstep, piece ``j``
of every row in one call.  Each call is one jitted pass over the whole model; the local
windows and the memory stay on device in fixed-size buffers (memory grows by doubling, which
recompiles), so a long input compiles twice (a full piece and a one-token step) and then only
streams.  Greedy generation chooses and feeds back its tokens on the device.
"""
import copy
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from EasyLM.checkpoint import load_llama_config, load_params, parse_checkpoint_spec
from EasyLM.models.llama.attention import attention_family, layer_attention_types
from EasyLM.models.llama.attention.interface import StateShape
from EasyLM.models.llama.inference_window import default_window
from EasyLM.models.llama.llama_model import FlaxLLaMAForCausalLMModule
from FoT.hf.windows_fot_llama import plan_windows
from FoT.inference import MemoryOptions, Piece


def _score(logits, targets):
    """Per-token negative log-likelihood ``[B, n]`` in float32 and the argmax token."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class InferenceState:
    """Device buffers (one state per layer, as its attention family declares it) and how
    many of each row's entries are valid: int32 ``[B]`` on the host, where the pieces are
    planned."""
    caches: tuple
    local_length: np.ndarray
    memory_length: np.ndarray

    @property
    def capacity(self):
        """Memory entries every memory holds (0 without memories)."""
        return max((cache.memory_capacity for cache in self.caches), default=0)


class WindowedLM:
    """A toolkit checkpoint's parameters run window by window with FoT memory."""

    def __init__(self, params, config, options):
        self.params = jax.device_put(params.get("params", params))
        self.config, self.options = config, options
        self.attention_families = tuple(map(attention_family, layer_attention_types(config)))
        model = FlaxLLaMAForCausalLMModule(config, jnp.dtype(options.dtype))
        # The caches are donated: each piece updates them in place instead of holding the old
        # and the new memory at once.
        self._forward = jax.jit(functools.partial(self._piece_forward, model, options),
                                donate_argnums=(1,))
        self._score = jax.jit(_score)
        self.memory_limit = None

    @staticmethod
    def _piece_forward(model, options, params, caches, tokens, num_valid, evict,
                       local_length, memory_length, memory_limit):
        """Logits ``[B, n, V]`` of one piece (the first ``num_valid[b]`` tokens of row ``b``
        are real, and ``evict[b]`` window entries leave before them) and the updated caches;
        memory layers see only the newest ``memory_limit`` memory entries."""
        piece = Piece(local_length, memory_length, num_valid, evict, memory_limit,
                      options.local_capacity, options.mem_positionals,
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
        options = self.options
        shape = StateShape(batch_size, options.local_capacity,
                           self._round_capacity(capacity) if options.use_memory else None,
                           jnp.dtype(options.dtype), jnp.dtype(options.mem_dtype or options.dtype))
        caches = tuple(family.empty_state(self.config, shape)
                       for family in self.attention_families)
        empty = np.zeros(batch_size, np.int32)
        return InferenceState(caches, empty, empty.copy())

    def _round_capacity(self, tokens):
        # Powers of two windows, so that growing memory recompiles only log-many times.
        windows = max(1, -(-tokens // self.options.last_context_length))
        return self.options.last_context_length * 2 ** math.ceil(math.log2(windows))

    def _reserve(self, state, tokens):
        """Grow the memories to hold ``tokens`` entries of the fullest row."""
        if tokens <= state.capacity:
            return
        capacity = self._round_capacity(tokens)
        state.caches = tuple(cache.with_memory_capacity(capacity) for cache in state.caches)

    def step(self, state, tokens, mask=None, last_only=False):
        """Feed ``tokens`` ``[B, n]``; return their logits ``[B, n, V]`` (on device), or with
        ``last_only`` the logits ``[B, 1, V]`` of each row's last real token (what generation
        needs: a long prompt's full logits would not fit in memory).

        ``mask`` ``[B, n]`` (default: all ones) marks each row's real tokens; padding may sit
        anywhere.  A row's real tokens, in order, continue that row's stream; padding
        positions get zero logits.
        """
        if isinstance(tokens, jax.Array) and mask is None and tokens.shape[-1:] == (1,):
            return self._token_step(state, tokens.reshape(-1, 1))
        tokens = np.atleast_2d(np.asarray(tokens, np.int32))
        mask = _as_mask(tokens, mask)
        options = self.options
        streams = [row[keep] for row, keep in zip(tokens, mask)]
        plans = [plan_windows(int(local), len(stream), options.last_context_length,
                              options.window_rule, options.local_window_limit)
                 for local, stream in zip(state.local_length, streams)]
        self._reserve(state, int((state.memory_length + state.local_length
                                  + mask.sum(axis=1)).max()))
        # source[b, c]: where row b's c-th real token's logits land in the pieces' outputs.
        source = np.zeros(tokens.shape, np.int32)
        outputs, offset = [], 0
        for j in range(max(map(len, plans), default=0)):
            planned = [plan[j] if j < len(plan) else (0, 0, 0) for plan in plans]
            longest = max(end - start for start, end, _ in planned)
            # Partial pieces are padded to a full window: one compilation for all of them.
            width = 1 if longest == 1 else options.local_capacity
            piece = np.zeros((len(tokens), width), np.int32)
            num_valid, evict = np.zeros((2, len(tokens)), np.int32)
            for row, (start, end, out) in enumerate(planned):
                piece[row, :end - start] = streams[row][start:end]
                num_valid[row], evict[row] = end - start, out
                source[row, start:end] = offset + np.arange(end - start)
            logits = self._advance(state, piece, num_valid, evict)
            if last_only:  # each row's last real token, not [B, N, V] logits
                last = jnp.take_along_axis(
                    logits, jnp.asarray(np.maximum(num_valid - 1, 0))[:, None, None], axis=1)
                final = jnp.asarray([j == len(plan) - 1 for plan in plans])[:, None, None]
                outputs = [jnp.where(final, last, outputs[0] if outputs else 0)]
            else:
                outputs.append(logits)
            offset += width
        if last_only:
            if not outputs:
                return jnp.zeros((len(tokens), 1, self.vocab_size), jnp.dtype(options.dtype))
            return outputs[0]
        if not outputs:
            return jnp.zeros(tokens.shape + (self.vocab_size,), jnp.dtype(options.dtype))
        logits = jnp.concatenate(outputs, axis=1)
        if mask.all() and offset == tokens.shape[1]:  # unpadded pieces, already in place
            return logits
        # Back to the input's positions: row b's c-th real token sits at its c-th mask entry.
        index = np.zeros(tokens.shape, np.int32)
        for row, keep in enumerate(mask):
            index[row, keep] = source[row, :keep.sum()]
        logits = jnp.take_along_axis(logits, jnp.asarray(index)[..., None], axis=1)
        return jnp.where(jnp.asarray(mask)[..., None], logits, 0)

    def _advance(self, state, piece, num_valid, evict):
        """Run one lockstep piece ``[B, width]`` (row ``b``: ``num_valid[b]`` tokens after
        evicting ``evict[b]`` window entries); its logits, the state updated."""
        limit = np.iinfo(np.int32).max if self.memory_limit is None else self.memory_limit
        logits, state.caches = self._forward(self.params, state.caches, piece, num_valid, evict,
                                             state.local_length, state.memory_length, limit)
        state.local_length = state.local_length - evict + num_valid
        state.memory_length = state.memory_length + evict
        return logits

    def _token_step(self, state, tokens):
        """One token per row, ``tokens`` ``[B, 1]`` left on the device (generation's own
        choices): only the rows' lengths are planned on the host, so the host never waits
        for the device between steps."""
        options = self.options
        evict = np.array([plan_windows(int(local), 1, options.last_context_length,
                                       options.window_rule, options.local_window_limit)[0][2]
                          for local in state.local_length], np.int32)
        self._reserve(state, int((state.memory_length + state.local_length).max()) + 1)
        return self._advance(state, tokens.astype(jnp.int32), np.ones_like(evict), evict)

    def logits(self, tokens, mask=None):
        """Logits ``[B, N, V]`` of a whole input (``mask`` as in :meth:`step`), as a numpy
        array."""
        tokens = np.atleast_2d(tokens)
        return np.asarray(self.step(self.new_state(len(tokens)), tokens, mask))

    def token_losses(self, tokens, mask=None):
        """Negative log-likelihood ``[B, N - 1]`` of each token but the first (float32 numpy),
        as in :meth:`score`."""
        return self.score(tokens, mask)[0]

    def score(self, tokens, mask=None):
        """``(losses, predictions)``, both ``[B, N - 1]``: at position ``t``, the negative
        log-likelihood (float32) of token ``t + 1`` and the most likely token (int32) there,
        given the row's real tokens before it.  With a ``mask`` (as in :meth:`step`) both are
        zero where token ``t + 1`` is padding or its row's first real token.  Each row's stream
        is fed in calls of ``last_context_length`` tokens."""
        tokens = np.atleast_2d(np.asarray(tokens, np.int32))
        mask = _as_mask(tokens, mask)
        counts = mask.sum(axis=1)
        # Each row's real tokens first, then padding: chunk c of every row is its stream's.
        order = np.argsort(~mask, axis=1, kind="stable")
        packed = np.take_along_axis(tokens, order, axis=1)[:, :max(counts.max(), 1)]
        real = np.arange(packed.shape[1])[None, :] < counts[:, None]
        window = self.options.last_context_length
        state = self.new_state(len(tokens), packed.shape[1])
        losses, predictions = [], []
        for start in range(0, packed.shape[1] - 1, window):
            chunk = packed[:, start:start + window]
            targets = packed[:, start + 1:start + window + 1]
            logits = self.step(state, chunk, real[:, start:start + window])
            loss, prediction = self._score(logits[:, :targets.shape[1]], jnp.asarray(targets))
            losses.append(np.asarray(loss))
            predictions.append(np.asarray(prediction))
        if not losses:
            empty = np.zeros((len(tokens), tokens.shape[1] - 1))
            return empty.astype(np.float32), empty.astype(np.int32)
        losses, predictions = np.concatenate(losses, axis=1), np.concatenate(predictions, axis=1)
        if mask.all():
            return losses, predictions
        # Token c of a row's stream (c >= 1) is scored one position before its own.
        out_losses = np.zeros((len(tokens), tokens.shape[1] - 1), np.float32)
        out_predictions = np.zeros(out_losses.shape, np.int32)
        for row, keep in enumerate(mask):
            at = np.flatnonzero(keep)[1:] - 1
            out_losses[row, at] = losses[row, :len(at)]
            out_predictions[row, at] = predictions[row, :len(at)]
        return out_losses, out_predictions

    def generate(self, prompt, max_new_tokens, temperature=0.0, top_k=0, seed=0,
                 eos_token_id=None, mask=None):
        """New tokens ``[B, <= max_new_tokens]`` after ``prompt`` ``[B, N]``: greedy with
        ``temperature=0``, else sampled (optionally from the ``top_k`` most likely).  Stops
        early once every row has produced ``eos_token_id``.  ``mask`` (as in :meth:`step`)
        marks each row's prompt tokens, e.g. of left-padded prompts of different lengths;
        each row continues its own stream."""
        prompt = np.atleast_2d(np.asarray(prompt, np.int32))
        mask = _as_mask(prompt, mask)
        if not mask.any(axis=1).all():
            raise ValueError("every prompt row needs at least one token")
        rng = np.random.default_rng(seed)
        state = self.new_state(len(prompt), int(mask.sum(axis=1).max()) + max_new_tokens)
        logits = self.step(state, prompt, mask, last_only=True)[:, 0]
        if temperature <= 0:
            return self._greedy(state, logits, max_new_tokens, eos_token_id)
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
            logits = self.step(state, token[:, None], last_only=True)[:, 0]
        return np.stack(out, axis=1)

    def _greedy(self, state, logits, max_new_tokens, eos_token_id, check_every=16):
        """Greedy generation with the tokens chosen and fed back on the device; the host
        looks at them (whether every row has ended) only every ``check_every`` steps, and
        the output is cut where :meth:`generate`'s host loop would have stopped."""
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        done = jnp.zeros(token.shape, bool)
        out = []
        while True:
            if eos_token_id is not None:
                token = jnp.where(done, eos_token_id, token)
                done = done | (token == eos_token_id)
            out.append(token)
            if len(out) == max_new_tokens:
                break
            if (eos_token_id is not None and len(out) % check_every == 0
                    and bool(done.all())):
                break
            logits = self._token_step(state, token[:, None])[:, 0]
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens = np.asarray(jnp.stack(out, axis=1))
        if eos_token_id is not None:  # after each row's end only eos follows
            ended = np.logical_or.accumulate(tokens == eos_token_id, axis=1).all(axis=0)
            if ended.any():
                tokens = tokens[:, :int(ended.argmax()) + 1]
        return tokens


def _as_mask(tokens, mask):
    """``mask`` as booleans of ``tokens``' shape; None: every token is real."""
    if mask is None:
        return np.ones(tokens.shape, bool)
    mask = np.atleast_2d(np.asarray(mask, bool))
    if mask.shape != tokens.shape:
        raise ValueError(f"mask shape {mask.shape} differs from tokens shape {tokens.shape}")
    return mask


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

