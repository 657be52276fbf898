"""LLaMA with FoT memory layers: config, Flax modules and partition rules.

The parameter tree follows EasyLM's names (``transformer/h/<i>/attention/wq/kernel`` ...), so
sharding rules and converters address parameters by regex on those paths.  Memory layers
(``mem_layers``) have the same parameters as ordinary layers; only their attention differs:
with ``cross_batch_range > 0`` they run cross-batch attention (:mod:`FoT.cross_batch`).

Given per-layer caches and a :class:`~FoT.inference.Piece`, the same modules run one piece of
windowed inference (FOT_SPEC 5): every attention layer attends over its local window and, in
memory layers, its memory, and returns its updated cache (see :mod:`FoT.inference`).
"""
import dataclasses
import json
import logging
import os
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as PS

from EasyLM.jax_utils import BATCH_AXES, with_sharding_constraint
from EasyLM.legacy_keys import translate_model_fields
from EasyLM.models.llama.rope import apply_rope, apply_rope_as_first, inverse_frequencies
from FoT.cross_batch import FALLBACK_ORDER, MASK_VALUE
from FoT.cross_batch import IMPLEMENTATIONS as CROSS_BATCH_IMPLEMENTATIONS
from FoT.cross_batch import attend, cross_batch_core
from FoT.cross_batch import check_supported as check_cross_batch_support
from FoT.sharded import sharded_cross_batch
from FoT.slots import check_whole_groups

# The residual stream is sharded over rows only: it is what every tensor-parallel (mp) shard
# needs whole, and constraining its hidden axis to "mp" also miscompiled on XLA:CPU.
RESIDUAL_SPEC = PS(BATCH_AXES, None, None)
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# Primitives whose outputs are an attention's result and softmax statistics: the fused
# kernels' forward (Pallas, cuDNN).  Saving them spares re-running the kernel in the backward.
ATTENTION_PRIMITIVES = ("pallas_call", "dot_product_attention_fwd")


def _dots_and_attention_saveable(prim, *avals, **params):
    return (prim.name in ATTENTION_PRIMITIVES
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params))


# Our policies beside ``jax.checkpoint_policies``.
EXTRA_REMAT_POLICIES = {"dots_and_attention_saveable": _dots_and_attention_saveable}
REMAT_POLICIES = ("", "none", "nothing_saveable", "everything_saveable", "dots_saveable",
                  "checkpoint_dots", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots_with_no_batch_dims") + tuple(EXTRA_REMAT_POLICIES)


def remat_policy(name):
    """The ``jax.checkpoint`` policy called ``name`` (``remat_block``)."""
    return EXTRA_REMAT_POLICIES.get(name) or getattr(jax.checkpoint_policies, name)


def _run_setting(default, meaning, set_by=None):
    """A field that says how a run executes the model, not what the model is: a run sets it
    from ``set_by`` (by default the run flag of the field's name, declared from ``meaning``),
    ``llama_config.json`` does not store it and ``update_llama_config`` may not set it."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "set_by": set_by})


@dataclasses.dataclass
class LLaMAConfig:
    """The architecture (what a checkpoint's ``llama_config.json`` stores) and the run settings
    (:func:`_run_setting` fields) that the modules read."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    max_sequence_length: int = 2048
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    # FoT memory layers (FOT_SPEC section 2).
    mem_layers: tuple = ()
    # Cross-batch training: the train and eval models of one run differ here.
    cross_batch_range: int = _run_setting(
        0, "FoT cross-batch range C: memory layers also attend to the C previous rows",
        "--train_cross_batch_range / --eval_cross_batch_range")
    cross_batch_stepping: bool = _run_setting(
        False, "a document's later rows see more of the C slots than its first",
        "--train_cross_batch_stepping / --eval_cross_batch_stepping")
    dataset_packing: int = _run_setting(
        1, "consecutive rows per document",
        "the data pipeline (train_dataset.<type>_dataset.data_pipeline=doc_aware_kN)")
    scan_cross_batch: bool = _run_setting(
        False, "blockwise cross-batch attention (bounded score memory) where "
        "cross_batch_implementation is auto")
    flip_sharding_in_cross_batch: bool = _run_setting(
        False, "on a batch-sharded mesh, exchange rows for heads (all-to-all) inside "
        "cross-batch attention instead of passing each device the previous rows' keys and "
        "values (halo); used where each device's key/value heads split over the batch devices")
    cross_batch_implementation: str = _run_setting(
        "auto", "memory layers' attention: auto (pallas on GPU/TPU, reference on CPU, "
        "blockwise with scan_cross_batch), " + ", ".join(CROSS_BATCH_IMPLEMENTATIONS))
    cross_batch_block_size: int = _run_setting(
        512, "query/key block of the blockwise cross-batch attention")
    attention_implementation: str = _run_setting(
        "auto", "ordinary layers' attention: auto (cuDNN fused on GPU, XLA elsewhere), xla, "
        "cudnn")
    remat_block: str = _run_setting(
        "", "jax.checkpoint policy of each decoder layer ('' = none): nothing_saveable, "
        "dots_saveable, dots_and_attention_saveable (also keeps fused attention outputs), ...")
    # Parameters stay stored per layer as h/<i>; they are stacked inside the step.
    scan_layers: bool = _run_setting(
        False, "run each run of consecutive ordinary layers as one lax.scan: same numbers, "
        "fewer layer bodies to compile, slower per step on the H200")

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.mem_layers = tuple(int(i) for i in (self.mem_layers or ()))
        self.validate()

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        bad = [i for i in self.mem_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mem_layers {list(self.mem_layers)}: indices {bad} are out of "
                             f"range for a model of {self.num_hidden_layers} layers "
                             f"(valid: 0..{self.num_hidden_layers - 1})")
        for name, least in (("cross_batch_range", 0), ("dataset_packing", 1),
                            ("cross_batch_block_size", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} {getattr(self, name)} must be >= {least}")
        if self.cross_batch_implementation not in ("auto",) + CROSS_BATCH_IMPLEMENTATIONS:
            raise ValueError(f"cross_batch_implementation {self.cross_batch_implementation!r}: "
                             f"choose one of {('auto',) + CROSS_BATCH_IMPLEMENTATIONS}")
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention_implementation {self.attention_implementation!r}: "
                             f"choose one of {ATTENTION_IMPLEMENTATIONS}")
        if self.remat_block not in REMAT_POLICIES:
            raise ValueError(f"remat_block {self.remat_block!r}: choose one of "
                             f"{REMAT_POLICIES}")
        inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)

    def replace(self, **updates):
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(updates) - fields)
        if unknown:
            raise ValueError(f"unknown LLaMA config fields {unknown}; valid fields: "
                             f"{sorted(fields)}")
        return dataclasses.replace(self, **updates)

    @classmethod
    def run_settings(cls):
        """``{field: what sets it}`` of the run settings."""
        return {f.name: f.metadata["set_by"] or f"--{f.name}" for f in dataclasses.fields(cls)
                if "meaning" in f.metadata}

    @classmethod
    def run_flags(cls):
        """``{field: (default, meaning)}`` of the run settings set by a run flag of their name:
        the run declares its flags from these."""
        return {f.name: (f.default, f.metadata["meaning"]) for f in dataclasses.fields(cls)
                if "meaning" in f.metadata and f.metadata["set_by"] is None}

    def to_dict(self):
        """The architecture: what ``llama_config.json`` stores."""
        out = dataclasses.asdict(self)
        for name in self.run_settings():
            del out[name]
        out["mem_layers"] = list(self.mem_layers)
        return out

    def to_json_file(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_dict(cls, values):
        """Our architecture fields; those of the original LLaMA config are translated
        (``legacy_keys``).  Run settings, which older checkpoints stored too, are left to the
        run that loads the model, with a warning where they differ from the defaults."""
        values = translate_model_fields(values or {}, "model config")
        run = cls.run_settings()
        defaults = cls()
        dropped = [f"{name}={value!r} ({run[name]})" for name, value in values.items()
                   if name in run and value != getattr(defaults, name)]
        if dropped:
            logging.getLogger("EasyLM").warning(
                "model config: run settings %s ignored; the run sets them", ", ".join(dropped))
        return cls().replace(**{k: v for k, v in values.items() if k not in run})

    @classmethod
    def from_hf_config(cls, hf, **overrides):
        """A Hugging Face ``LlamaConfig`` (object or ``config.json`` dict) -> ``LLaMAConfig``."""
        hf = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = hf.get("model_type")
        architectures = hf.get("architectures") or []
        if model_type not in ("llama", "fot_llama", "longllama") or any(
                "Llama" not in a for a in architectures):
            raise ValueError(f"unsupported Hugging Face architecture: model_type={model_type!r}, "
                             f"architectures={architectures}; only LLaMA-family models "
                             f"(model_type 'llama', LlamaForCausalLM; FoT exports; LongLLaMA "
                             f"'longllama') can be converted")
        if model_type == "longllama" and not hf.get("mem_positionals", True):
            raise ValueError("LongLLaMA config sets mem_positionals=false (memory layers without "
                             "RoPE); memory layers here always rotate their keys, so this "
                             "checkpoint cannot be imported")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"Hugging Face config sets {flag}=true; LLaMA layers here "
                                 f"have no biases")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (LLaMA: silu)")
        values = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            # FoT exports and LongLLaMA checkpoints run in windows of last_context_length
            # tokens (positions restart in every window): that is their local context.
            max_sequence_length=(hf.get("last_context_length")
                                 if model_type in ("fot_llama", "longllama") else None)
            or hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            initializer_range=hf.get("initializer_range", 0.02),
            rope_theta=_hf_rope_theta(hf), rope_scaling=_hf_rope_scaling(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=_first_id(hf.get("bos_token_id"), 1),
            eos_token_id=_first_id(hf.get("eos_token_id"), 2),
            mem_layers=tuple(hf.get("mem_layers") or ()),
        )
        if values["hidden_size"] // values["num_attention_heads"] != hf.get(
                "head_dim", values["hidden_size"] // values["num_attention_heads"]):
            raise ValueError("Hugging Face config sets head_dim != hidden_size / "
                             "num_attention_heads; not supported")
        values.update(overrides)
        return cls(**values)

    def to_hf_dict(self):
        """``config.json`` contents of the equivalent Hugging Face ``LlamaForCausalLM``."""
        out = dict(
            architectures=["LlamaForCausalLM"], model_type="llama",
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_sequence_length, rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range, rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, hidden_act="silu",
            attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        )
        if self.rope_scaling is None:
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            out["rope_parameters"] = dict(self.rope_scaling, rope_theta=self.rope_theta)
        return out

    @classmethod
    def load_config(cls, spec, **overrides):
        """A standard name (``'7b_FoT'``), ``json::PATH`` (our fields) or ``hf::PATH``
        (a Hugging Face ``config.json`` or the directory holding it)."""
        if spec in STANDARD_CONFIGS:
            return cls(**dict(STANDARD_CONFIGS[spec], **overrides))
        kind, sep, path = spec.partition("::")
        if not sep:
            raise ValueError(f"unknown model config {spec!r}: use one of "
                             f"{sorted(STANDARD_CONFIGS)}, 'json::PATH' or 'hf::PATH'")
        if kind == "hf" and os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"model config file {path!r} does not exist")
        with open(path) as f:
            values = json.load(f)
        if kind == "json":
            return cls.from_dict(dict(values, **overrides))
        if kind == "hf":
            return cls.from_hf_config(values, **overrides)
        raise ValueError(f"unknown model config source {kind!r} in {spec!r} (json:: or hf::)")


def _hf_rope_theta(hf):
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _hf_rope_scaling(hf):
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    if not scaling:
        return None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    return scaling


def _first_id(value, default):
    if value is None:
        return default
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _size(hidden, intermediate, layers, heads, kv=None, max_len=2048, **extra):
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv or heads,
                max_sequence_length=max_len, **extra)


STANDARD_CONFIGS = {
    "debug": _size(128, 256, 2, 4, max_len=1024),
    "debug_fot": _size(128, 256, 2, 4, max_len=1024, mem_layers=(0,)),
    # Small FoT models of the "Does FoT work?" experiments (README); memory layers at about
    # the same depths as LongLLaMA 3B's 6, 12, 18 of 26.
    "25m_FoT": _size(512, 1408, 8, 8, mem_layers=(2, 4, 6)),
    "100m_FoT": _size(768, 2048, 12, 12, mem_layers=(3, 6, 9)),
    "1b": _size(2048, 5504, 22, 16),
    "3b": _size(3200, 8640, 26, 32),
    "3b_FoT": _size(3200, 8640, 26, 32, mem_layers=(6, 12, 18)),
    "7b": _size(4096, 11008, 32, 32),
    "7b_FoT": _size(4096, 11008, 32, 32, max_len=4096, mem_layers=(8, 16, 24),
                    rope_theta=1e6, vocab_size=32016),
    "13b": _size(5120, 13824, 40, 40),
    "30b": _size(6656, 17920, 60, 52),
    "65b": _size(8192, 22016, 80, 64),
}


def get_partition_rules():
    """Regex on parameter paths -> PartitionSpec over the ``(dp, fsdp, mp)`` mesh."""
    return (
        ("transformer/wte/embedding", PS("mp", "fsdp")),
        ("attention/(wq|wk|wv)/kernel", PS("fsdp", "mp")),
        ("attention/wo/kernel", PS("mp", "fsdp")),
        ("feed_forward/(w1|w3)/kernel", PS("fsdp", "mp")),
        ("feed_forward/w2/kernel", PS("mp", "fsdp")),
        ("(attention_norm|ffn_norm|ln_f)/kernel", PS(None)),
        ("lm_head/kernel", PS("fsdp", "mp")),
    )


class CausalLMOutput(NamedTuple):
    logits: Any
    hidden_states: Any = None
    caches: Any = None  # windowed inference: every layer's updated LayerCache


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("kernel", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * weight.astype(jnp.float32)).astype(self.dtype)


def _dense(features, config, dtype, param_dtype, name):
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.normal(config.initializer_range), name=name)


def resolve_cross_batch_implementation(config, length, dtype=jnp.float32, padded=False):
    """The cross-batch variant a memory layer runs on rows of ``length`` tokens in ``dtype``
    (``padded``: with a padding mask).

    ``auto`` walks :data:`~FoT.cross_batch.FALLBACK_ORDER` (on CPU only the reference;
    ``scan_cross_batch`` puts blockwise first) and takes the first variant whose declaration,
    :func:`FoT.cross_batch.check_supported`, accepts the inputs.  An explicit choice is kept;
    only padded rows, which the kernel cannot take, move it down the same order.
    """
    configured = config.cross_batch_implementation
    if configured == "auto":
        order = FALLBACK_ORDER if jax.default_backend() in ("gpu", "tpu") else ("reference",)
        if config.scan_cross_batch:
            order = ("blockwise",) + tuple(name for name in order if name != "blockwise")
    elif padded:
        order = FALLBACK_ORDER[FALLBACK_ORDER.index(configured):]
    else:
        return configured
    for name in order[:-1]:
        try:
            check_cross_batch_support(name, length=length, head_dim=config.head_dim,
                                      dtype=dtype, padded=padded,
                                      block_size=config.cross_batch_block_size)
        except NotImplementedError:
            continue
        return name
    return order[-1]  # every order ends with the reference, which runs any input


def resolve_attention_implementation(config, dtype):
    if config.attention_implementation != "auto":
        return config.attention_implementation
    # cuDNN's fused attention takes half-precision inputs only.
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


class LLaMAAttention(nn.Module):
    config: LLaMAConfig
    is_memory_layer: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, position_ids, attention_mask, cache=None, piece=None):
        """The attention's output; given a ``cache`` (a :class:`~FoT.inference.LayerCache`)
        and the ``piece`` it runs, ``(output, updated cache)`` of windowed inference."""
        cfg = self.config
        batch, length, _ = hidden.shape
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(heads * head_dim, cfg, self.dtype, self.param_dtype, "wq")(hidden)
        k = _dense(kv_heads * head_dim, cfg, self.dtype, self.param_dtype, "wk")(hidden)
        v = _dense(kv_heads * head_dim, cfg, self.dtype, self.param_dtype, "wv")(hidden)
        q = q.reshape(batch, length, heads, head_dim)
        k = k.reshape(batch, length, kv_heads, head_dim)
        v = v.reshape(batch, length, kv_heads, head_dim)
        head_spec = PS(BATCH_AXES, None, "mp", None)
        q, k, v = (with_sharding_constraint(x, head_spec) for x in (q, k, v))
        inv_freq = inverse_frequencies(head_dim, cfg.rope_theta, cfg.rope_scaling)
        if cache is not None:
            out, cache = _windowed_attention(q, k, v, position_ids, cache, piece, inv_freq)
        else:
            q_rot = apply_rope(q, position_ids, inv_freq)
            k_rot = apply_rope(k, position_ids, inv_freq)
            bias = _padding_bias(attention_mask, length)
            if self.is_memory_layer and cfg.cross_batch_range > 0:
                k_mem = apply_rope_as_first(k, position_ids, inv_freq)
                out = self._cross_batch(q_rot, k_rot, k_mem, v, bias)
            else:
                out = causal_attention(q_rot, k_rot, v, bias,
                                       resolve_attention_implementation(cfg, self.dtype))
        out = with_sharding_constraint(out, head_spec)
        out = out.reshape(batch, length, heads * head_dim)
        out = _dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "wo")(out)
        return out if cache is None else (out, cache)

    def _cross_batch(self, q, k_loc, k_mem, v, bias):
        cfg = self.config
        implementation = resolve_cross_batch_implementation(cfg, q.shape[1], q.dtype,
                                                            padded=bias is not None)
        # Each device attends for its own rows (FoT.sharded); flip_sharding_in_cross_batch
        # asks for the all-to-all over heads instead of the halo of neighbouring rows.
        return sharded_cross_batch(q, k_loc, k_mem, v, cross_batch_range=cfg.cross_batch_range,
                                   cross_batch_stepping=cfg.cross_batch_stepping,
                                   dataset_packing=cfg.dataset_packing, local_bias=bias,
                                   implementation=implementation,
                                   block_size=cfg.cross_batch_block_size,
                                   layout="heads" if cfg.flip_sharding_in_cross_batch else "auto")


def _windowed_attention(q, k, v, query_positions, cache, piece, inv_freq):
    """FOT_SPEC 5 for one layer: the piece's queries over the local window (after the planned
    eviction and the piece's entry) and, with a memory, over the memory in the same softmax;
    returns the output and the updated cache."""
    batch, length = q.shape[:2]
    local_k, local_v = piece.enter(cache.local_k, k), piece.enter(cache.local_v, v)
    keys, values, visible = local_k, local_v, piece.local_visible(length)
    key_positions = piece.key_positions(batch)
    positional = not cache.has_memory or piece.mem_positionals
    if positional:
        q = apply_rope(q, query_positions, inv_freq)
        keys = apply_rope(keys, key_positions, inv_freq)
    if not cache.has_memory:
        return attend(q, keys, values, visible), cache._replace(local_k=local_k, local_v=local_v)
    # An eviction takes the whole window as it was before the piece.
    evicted_k = cache.local_k
    if positional:
        evicted_k = apply_rope_as_first(evicted_k, key_positions, inv_freq)
    mem_k = piece.remember(cache.mem_k, evicted_k)
    mem_v = piece.remember(cache.mem_v, cache.local_v)
    capacity = mem_k.shape[1]
    keys = jnp.concatenate([mem_k.astype(keys.dtype), keys], axis=1)
    values = jnp.concatenate([mem_v.astype(values.dtype), values], axis=1)
    memory_visible = jnp.broadcast_to(piece.memory_visible(capacity)[:, None],
                                      (batch, length, capacity))
    visible = jnp.concatenate([memory_visible, visible], axis=2)
    out = attend(q, keys, values, visible, chunks=piece.attention_grouping)
    return out, cache._replace(local_k=local_k, local_v=local_v, mem_k=mem_k, mem_v=mem_v)


def _padding_bias(attention_mask, length):
    """Additive ``[B, 1, L, L]`` causal + key-padding bias, or ``None`` for plain causal."""
    if attention_mask is None:
        return None
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(allowed, 0.0, MASK_VALUE).astype(jnp.float32)


def causal_attention(q, k, v, bias=None, implementation="xla"):
    """Ordinary causal self-attention ``[B, L, H, D]`` (GQA allowed).

    ``"xla"`` is the reference: cross-batch attention with no other rows.  ``"cudnn"`` is the
    fused kernel behind ``jax.nn.dot_product_attention``.
    """
    if implementation == "cudnn":
        mask = None if bias is None else bias > -1.0
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=bias is None,
                                            implementation="cudnn")
    return cross_batch_core(q, k, k, v, cross_batch_range=0, local_bias=bias)


class LLaMAMLP(nn.Module):
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.intermediate_size, cfg, self.dtype, self.param_dtype, "w1")(x)
        up = _dense(cfg.intermediate_size, cfg, self.dtype, self.param_dtype, "w3")(x)
        hidden = with_sharding_constraint(nn.silu(gate) * up, PS(BATCH_AXES, None, "mp"))
        return _dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "w2")(hidden)


class LLaMABlock(nn.Module):
    config: LLaMAConfig
    is_memory_layer: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, position_ids, attention_mask, cache=None, piece=None):
        """The layer's output; with a ``cache`` (windowed inference) also its updated cache."""
        cfg = self.config
        norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="attention_norm")
        attended = LLaMAAttention(cfg, self.is_memory_layer, self.dtype, self.param_dtype,
                                  name="attention")(norm(hidden), position_ids, attention_mask,
                                                    cache, piece)
        if cache is not None:
            attended, cache = attended
        hidden = hidden + attended
        norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="ffn_norm")
        hidden = hidden + LLaMAMLP(cfg, self.dtype, self.param_dtype, name="feed_forward")(
            norm(hidden))
        hidden = with_sharding_constraint(hidden, RESIDUAL_SPEC)
        return hidden if cache is None else (hidden, cache)


class LLaMABlockCollection(nn.Module):
    """The decoder layers, named ``h/<i>`` as in EasyLM checkpoints.

    With ``scan_layers`` each maximal run of consecutive ordinary (non-memory) layers is one
    ``lax.scan`` over its layers' parameters, stacked from the per-layer tree on the fly, so
    checkpoints and converters keep the unrolled layout.  Memory layers run on their own.
    Initialisation always runs unrolled (it creates the parameters), and so does windowed
    inference (``caches``: one :class:`~FoT.inference.LayerCache` per layer), which returns
    ``(hidden, updated caches)``.
    """
    config: LLaMAConfig
    block_class: Any = LLaMABlock
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: Optional[str] = None

    @nn.compact
    def __call__(self, hidden, position_ids, attention_mask, caches=None, piece=None):
        cfg = self.config
        if caches is not None:
            return self._windowed(hidden, position_ids, caches, piece)
        if cfg.scan_layers and not self.is_initializing():
            return self._scanned(hidden, position_ids, attention_mask)
        for i in range(cfg.num_hidden_layers):
            hidden = self.block_class(cfg, i in cfg.mem_layers, self.dtype, self.param_dtype,
                                      name=str(i))(hidden, position_ids, attention_mask)
        return hidden

    def _windowed(self, hidden, position_ids, caches, piece):
        # The plain block class: rematerialisation only matters for gradients.
        cfg, updated = self.config, []
        for i, cache in enumerate(caches):
            hidden, cache = LLaMABlock(cfg, i in cfg.mem_layers, self.dtype, self.param_dtype,
                                       name=str(i))(hidden, position_ids, None, cache, piece)
            updated.append(cache)
        return hidden, tuple(updated)

    def _scanned(self, hidden, position_ids, attention_mask):
        cfg = self.config
        params = self.variables["params"]
        plain = LLaMABlock(cfg, False, self.dtype, self.param_dtype)

        def body(carry, layer_params):
            out = plain.apply({"params": layer_params}, carry, position_ids, attention_mask)
            return out, None

        if self.remat_policy:
            body = jax.checkpoint(body, policy=remat_policy(self.remat_policy))
        for start, stop in layer_segments(cfg.num_hidden_layers, cfg.mem_layers):
            if stop - start == 1:
                hidden = self.block_class(cfg, start in cfg.mem_layers, self.dtype,
                                          self.param_dtype, name=str(start))(
                    hidden, position_ids, attention_mask)
                continue
            stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                             *[self._for_compute(params[str(i)])
                                               for i in range(start, stop)])
            hidden, _ = jax.lax.scan(body, hidden, stacked)
        return hidden

    def _for_compute(self, layer_params):
        """Matmul kernels cast to the compute dtype before stacking (the dense layers cast
        them anyway, so the numbers are unchanged and the stacked copy is smaller); norm
        scales stay as stored."""
        return jax.tree_util.tree_map(
            lambda p: p.astype(self.dtype) if p.ndim == 2 else p, layer_params)


def layer_segments(num_layers, mem_layers):
    """``[(start, stop), ...]``: each memory layer alone, and each maximal run of ordinary
    layers between them, in order."""
    segments, start = [], 0
    for i in range(num_layers):
        if i in mem_layers:
            if start < i:
                segments.append((start, i))
            segments.append((i, i + 1))
            start = i + 1
    if start < num_layers:
        segments.append((start, num_layers))
    return segments


class TokenEmbedding(nn.Embed):
    """``nn.Embed`` (same parameter) whose lookup partitions without gathering the batch.

    The table is sharded (vocab over mp, hidden over fsdp) and the token ids over rows; left
    alone, the partitioner gathers every row's ids or embeddings onto every device.  Gathering
    the table's hidden axis first (what FSDP does for every other weight) leaves each device
    a lookup of its own rows in its vocabulary shard, summed over mp.
    """

    def __call__(self, inputs):
        table = with_sharding_constraint(self.embedding.astype(self.dtype), PS("mp", None))
        return jnp.take(table, inputs, axis=0)


class FlaxLLaMAModule(nn.Module):
    """Embedding, decoder layers and final norm; returns hidden states ``[B, L, hidden]``."""
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, caches=None,
                 piece=None):
        """With ``caches`` and ``piece`` (windowed inference, :mod:`FoT.inference`) the input
        is one piece, positions come from the piece, and the result is ``(hidden, updated
        caches)``."""
        cfg = self.config
        if caches is None:
            check_whole_groups(input_ids.shape[0], cfg.dataset_packing)
        if position_ids is None and piece is not None:
            position_ids = piece.query_positions(*input_ids.shape)
        elif position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        embed = TokenEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               embedding_init=nn.initializers.normal(cfg.initializer_range),
                               name="wte")
        hidden = with_sharding_constraint(embed(input_ids.astype(jnp.int32)), RESIDUAL_SPEC)
        block, policy = LLaMABlock, None
        if cfg.remat_block not in ("", "none"):
            policy = cfg.remat_block
            block = nn.remat(LLaMABlock, policy=remat_policy(policy), prevent_cse=True)
        hidden = LLaMABlockCollection(cfg, block, self.dtype, self.param_dtype, policy,
                                      name="h")(hidden, position_ids, attention_mask, caches,
                                                piece)
        if caches is not None:
            hidden, caches = hidden
        hidden = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="ln_f")(hidden)
        return hidden if caches is None else (hidden, caches)


class FlaxLLaMAForCausalLMModule(nn.Module):
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None,
                 return_hidden_states=False, compute_logits=True, caches=None, piece=None):
        """``compute_logits=False`` skips the output head: the result's ``logits`` is ``None``
        and ``hidden_states`` holds the final hidden states (for a chunked loss that applies
        :func:`output_head_kernel` itself).  ``caches`` and ``piece`` run one piece of
        windowed inference (:class:`FlaxLLaMAModule`); the result's ``caches`` are the
        updated ones."""
        cfg = self.config
        hidden = FlaxLLaMAModule(cfg, self.dtype, self.param_dtype, name="transformer")(
            input_ids, attention_mask, position_ids, caches, piece)
        if caches is not None:
            hidden, caches = hidden
        if not compute_logits and not self.is_initializing():
            return CausalLMOutput(None, hidden, caches)
        if cfg.tie_word_embeddings:
            embedding = self.variables["params"]["transformer"]["wte"]["embedding"]
            logits = hidden @ embedding.T.astype(self.dtype)
        else:
            logits = _dense(cfg.vocab_size, cfg, self.dtype, self.param_dtype, "lm_head")(hidden)
        return CausalLMOutput(logits, hidden if return_hidden_states else None, caches)


def output_head_kernel(params, config):
    """The ``[hidden, vocab]`` output projection in a parameter tree (the transposed input
    embedding when the head is tied)."""
    if config.tie_word_embeddings:
        return params["transformer"]["wte"]["embedding"].T
    return params["lm_head"]["kernel"]


def with_cross_batch(config, cross_batch_range, cross_batch_stepping=None, dataset_packing=None):
    """A copy of ``config`` with other cross-batch settings (e.g. the eval model's)."""
    updates = {"cross_batch_range": int(cross_batch_range)}
    if cross_batch_stepping is not None:
        updates["cross_batch_stepping"] = bool(cross_batch_stepping)
    if dataset_packing is not None:
        updates["dataset_packing"] = int(dataset_packing)
    return config.replace(**updates)
