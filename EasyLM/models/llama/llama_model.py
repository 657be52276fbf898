"""LLaMA with FoT memory layers: config, the decoder's Flax modules and partition rules.

The parameter tree follows EasyLM's names (``transformer/h/<i>/attention/wq/kernel`` ...), so
sharding rules and converters address parameters by regex on those paths.  Each layer's
attention is a family of :mod:`EasyLM.models.llama.attention` (memory layers, ``mem_layers``:
FoT memory; the others: ``attention_type``, softmax by default, or forgetting attention),
chosen there from the config; the decoder calls every family the same way.  Arrays are
sharded by logical axis names (:mod:`FoT.logical_axes`).

Given per-layer states and a :class:`~FoT.inference.Piece`, the same modules run one piece of
windowed inference (FOT_SPEC 5): every attention layer attends over its local window and, in
memory layers, its memory, and returns its updated state (see :mod:`FoT.inference`).  Every
module returns a :class:`~EasyLM.models.llama.attention.interface.LayerOutput` in every mode.
"""
import dataclasses
import json
import logging
import os
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from EasyLM.jax_utils import with_logical_constraint
from EasyLM.legacy_keys import translate_model_fields
from EasyLM import forgetting, linear
from EasyLM.models.llama.attention import (attention_family, check_attention_types,
                                           layer_attention_types)
from EasyLM.models.llama.attention.interface import LayerOutput, RMSNorm, dense_layer
from EasyLM.models.llama.attention.softmax import ATTENTION_IMPLEMENTATIONS
from EasyLM.models.llama.rope import inverse_frequencies
# Re-exported: the benchmarks and tests read the implementation choices here.
from EasyLM.models.llama.attention.fot_memory import (  # noqa: F401
    resolve_cross_batch_implementation)
from EasyLM.models.llama.attention.softmax import resolve_attention_implementation  # noqa: F401
from FoT.cross_batch import IMPLEMENTATIONS as CROSS_BATCH_IMPLEMENTATIONS
from FoT.logical_axes import logical_spec
from FoT.slots import check_whole_groups

# The residual stream's layout (FoT.logical_axes says why its width is not split).
RESIDUAL_AXES = ("batch", "length", "activation_embed")
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


# The architecture's switches of forgetting (FoX) layers.
FORGETTING_SWITCHES = ("forgetting_use_rope", "forgetting_kv_shift", "forgetting_qk_norm",
                       "forgetting_output_gate")


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
    # The attention family of the other layers (a name of attention.ATTENTION_FAMILIES), or
    # a list of one family per layer (a memory layer's entry: softmax or fot_memory).
    attention_type: Any = "softmax"
    # Forgetting attention (FoX) layers: RoPE (off as in FoX; on for a model uptrained from a
    # LLaMA that relies on it) and the parts of the "Pro" block (attention/forgetting.py).
    forgetting_use_rope: bool = False
    forgetting_kv_shift: bool = False
    forgetting_qk_norm: bool = False
    forgetting_output_gate: bool = False
    # Linear attention layers (attention/linear.py): SUPRA's RoPE after its feature map, and
    # the gate of gated linear attention (GLA): a rank-``gla_gate_rank`` projection whose
    # log-sigmoid is divided by ``gla_gate_normaliser``.
    supra_use_rope: bool = True
    gla_gate_rank: int = 16
    gla_gate_normaliser: float = 16.0
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
    forgetting_implementation: str = _run_setting(
        "auto", "forgetting (FoX) layers' attention: auto (the first of the fallback order "
        "that takes the rows: pallas on GPU/TPU, blockwise, reference), "
        + ", ".join(forgetting.IMPLEMENTATIONS))
    linear_implementation: str = _run_setting(
        "auto", "linear attention (SUPRA, GLA) layers: auto (the first of the fallback order "
        "that takes the layer: pallas on GPU, chunked, scan), " + ", ".join(linear.IMPLEMENTATIONS))
    linear_chunk_size: int = _run_setting(
        linear.DEFAULT_CHUNK_SIZE, "tokens per chunk of the chunked linear attention (a "
        f"multiple of {linear.DEFAULT_SUBCHUNK})")
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
        if isinstance(self.attention_type, (list, tuple)):
            self.attention_type = tuple(self.attention_type)
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
        if not isinstance(self.attention_type, (str, tuple)):
            raise ValueError(f"attention_type {self.attention_type!r}: give a family name or a "
                             f"list of one per layer")
        check_attention_types(self.attention_type, self.num_hidden_layers, self.mem_layers)
        for name in FORGETTING_SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} {getattr(self, name)!r} must be true or false")
        if self.forgetting_implementation not in ("auto",) + forgetting.IMPLEMENTATIONS:
            raise ValueError(f"forgetting_implementation {self.forgetting_implementation!r}: "
                             f"choose one of {('auto',) + forgetting.IMPLEMENTATIONS}")
        if self.linear_implementation not in ("auto",) + linear.IMPLEMENTATIONS:
            raise ValueError(f"linear_implementation {self.linear_implementation!r}: choose "
                             f"one of {('auto',) + linear.IMPLEMENTATIONS}")
        if self.linear_chunk_size < 1 or self.linear_chunk_size % linear.DEFAULT_SUBCHUNK:
            raise ValueError(f"linear_chunk_size {self.linear_chunk_size} must be a positive "
                             f"multiple of {linear.DEFAULT_SUBCHUNK}")
        if self.linear_implementation == "pallas" and self.linear_chunk_size not in (16, 32, 64,
                                                                                     128):
            raise ValueError(f"linear_chunk_size {self.linear_chunk_size}: the pallas linear "
                             f"attention kernel takes 16, 32, 64 or 128")
        if not isinstance(self.supra_use_rope, bool):
            raise ValueError(f"supra_use_rope {self.supra_use_rope!r} must be true or false")
        if self.gla_gate_rank < 1 or self.gla_gate_normaliser <= 0:
            raise ValueError(f"gla_gate_rank {self.gla_gate_rank} must be >= 1 and "
                             f"gla_gate_normaliser {self.gla_gate_normaliser} > 0")
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
        if isinstance(self.attention_type, tuple):
            out["attention_type"] = list(self.attention_type)
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


# Forgetting attention in every layer outside mem_layers (no RoPE), and the "Pro" block.
_FOX = dict(attention_type="forgetting")
_FOX_PRO = dict(_FOX, forgetting_kv_shift=True, forgetting_qk_norm=True,
                forgetting_output_gate=True)

# Linear attention in every layer outside mem_layers: SUPRA (uptraining's target; from
# scratch too) and gated linear attention.
_SUPRA = dict(attention_type="supra")
_GLA = dict(attention_type="gla")

STANDARD_CONFIGS = {
    "debug": _size(128, 256, 2, 4, max_len=1024),
    "debug_fot": _size(128, 256, 2, 4, max_len=1024, mem_layers=(0,)),
    "debug_fox": _size(128, 256, 2, 4, max_len=1024, **_FOX),
    "debug_fox_pro": _size(128, 256, 2, 4, max_len=1024, **_FOX_PRO),
    "debug_supra": _size(128, 256, 2, 4, max_len=1024, **_SUPRA),
    "debug_gla": _size(128, 256, 2, 4, max_len=1024, **_GLA),
    # Small FoT models of the "Does FoT work?" experiments (docs/experiments.md); memory
    # layers at about the same depths as LongLLaMA 3B's 6, 12, 18 of 26.  The plain sizes
    # are their baselines without memory, beside the same sizes with FoX layers.
    "25m": _size(512, 1408, 8, 8),
    "25m_FoT": _size(512, 1408, 8, 8, mem_layers=(2, 4, 6)),
    "25m_fox": _size(512, 1408, 8, 8, **_FOX),
    "25m_fox_pro": _size(512, 1408, 8, 8, **_FOX_PRO),
    "25m_supra": _size(512, 1408, 8, 8, **_SUPRA),
    "25m_gla": _size(512, 1408, 8, 8, **_GLA),
    "100m": _size(768, 2048, 12, 12),
    "100m_FoT": _size(768, 2048, 12, 12, mem_layers=(3, 6, 9)),
    "100m_fox": _size(768, 2048, 12, 12, **_FOX),
    "100m_fox_pro": _size(768, 2048, 12, 12, **_FOX_PRO),
    "100m_supra": _size(768, 2048, 12, 12, **_SUPRA),
    "100m_gla": _size(768, 2048, 12, 12, **_GLA),
    "1b": _size(2048, 5504, 22, 16),
    "1b_fox": _size(2048, 5504, 22, 16, **_FOX),
    "1b_fox_pro": _size(2048, 5504, 22, 16, **_FOX_PRO),
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
    """Regex on parameter paths -> PartitionSpec of the parameter's logical axes."""
    return (
        ("transformer/wte/embedding", logical_spec("vocab", "embed")),
        ("attention/(wq|wk|wv)/kernel", logical_spec("embed", "heads")),
        ("attention/wo/kernel", logical_spec("heads", "embed")),
        ("feed_forward/(w1|w3)/kernel", logical_spec("embed", "mlp")),
        ("feed_forward/w2/kernel", logical_spec("mlp", "embed")),
        ("(attention_norm|ffn_norm|ln_f)/kernel", logical_spec(None)),
        ("lm_head/kernel", logical_spec("embed", "vocab")),
        # Forgetting layers.  A gate's outputs (a few per head) stay whole: a mesh's mp need
        # not divide the number of heads.
        ("attention/(fgate|kshift|vshift)/kernel", logical_spec("embed", None)),
        ("attention/(fgate|kshift|vshift)/bias", logical_spec(None)),
        ("attention/ogate/kernel", logical_spec("embed", "heads")),
        ("attention/(q_norm|k_norm|o_norm)/kernel", logical_spec(None)),
        # Linear attention layers: SUPRA's feature maps act on one head's features (shared by
        # the heads), GLA's gate projections are small; both stay whole.
        ("attention/(feature_map|key_feature_map)/(kernel|bias)", logical_spec(None)),
        ("attention/gate_down/kernel", logical_spec("embed", None)),
        ("attention/gate_up/(kernel|bias)", logical_spec(None)),
    )


class CausalLMOutput(NamedTuple):
    logits: Any
    hidden_states: Any = None
    caches: Any = None  # windowed inference: every layer's updated state


class LLaMAMLP(nn.Module):
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = dense_layer(cfg.intermediate_size, cfg, self.dtype, self.param_dtype, "w1")(x)
        up = dense_layer(cfg.intermediate_size, cfg, self.dtype, self.param_dtype, "w3")(x)
        hidden = with_logical_constraint(nn.silu(gate) * up, "batch", "length", "mlp")
        return dense_layer(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "w2")(hidden)


class LLaMABlock(nn.Module):
    """One decoder layer: its attention family (``attention_type``, a name registered in
    :mod:`EasyLM.models.llama.attention`) and the MLP, each behind a pre-norm residual."""
    config: LLaMAConfig
    attention_type: str = "softmax"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, position_ids, attention_mask, state=None, piece=None):
        """The layer's output and, with a ``state`` (windowed inference), its updated state."""
        cfg = self.config
        norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="attention_norm")
        attention = attention_family(self.attention_type)(cfg, self.dtype, self.param_dtype,
                                                          name="attention")
        attended, state = attention(norm(hidden), position_ids, attention_mask, state, piece)
        hidden = hidden + attended
        norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="ffn_norm")
        hidden = hidden + LLaMAMLP(cfg, self.dtype, self.param_dtype, name="feed_forward")(
            norm(hidden))
        return LayerOutput(with_logical_constraint(hidden, *RESIDUAL_AXES), state)


class LLaMABlockCollection(nn.Module):
    """The decoder layers, named ``h/<i>`` as in EasyLM checkpoints.

    With ``scan_layers`` each maximal run of consecutive layers of one family that allows it
    (``AttentionLayer.scannable``: ordinary layers, not memory layers) is one ``lax.scan`` over
    its layers' parameters, stacked from the per-layer tree on the fly, so checkpoints and
    converters keep the unrolled layout; the other layers run on their own.  Initialisation
    always runs unrolled (it creates the parameters), and so does windowed inference
    (``states``: one per layer, as its family declares), whose result carries the updated
    states.
    """
    config: LLaMAConfig
    block_class: Any = LLaMABlock
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: Optional[str] = None

    @nn.compact
    def __call__(self, hidden, position_ids, attention_mask, states=None, piece=None):
        cfg = self.config
        types = layer_attention_types(cfg)
        if states is not None:
            return self._windowed(hidden, position_ids, types, states, piece)
        if cfg.scan_layers and not self.is_initializing():
            return LayerOutput(self._scanned(hidden, position_ids, attention_mask, types))
        for i, attention_type in enumerate(types):
            hidden = self.block_class(cfg, attention_type, self.dtype, self.param_dtype,
                                      name=str(i))(hidden, position_ids, attention_mask).hidden
        return LayerOutput(hidden)

    def _windowed(self, hidden, position_ids, types, states, piece):
        # The plain block class: rematerialisation only matters for gradients.
        updated = []
        for i, (attention_type, state) in enumerate(zip(types, states)):
            hidden, state = LLaMABlock(self.config, attention_type, self.dtype, self.param_dtype,
                                       name=str(i))(hidden, position_ids, None, state, piece)
            updated.append(state)
        return LayerOutput(hidden, tuple(updated))

    def _scanned(self, hidden, position_ids, attention_mask, types):
        cfg = self.config
        params = self.variables["params"]
        bodies = {}  # one scan body per family

        def scan_body(attention_type):
            plain = LLaMABlock(cfg, attention_type, self.dtype, self.param_dtype)

            def body(carry, layer_params):
                out = plain.apply({"params": layer_params}, carry, position_ids, attention_mask)
                return out.hidden, None

            if self.remat_policy:
                body = jax.checkpoint(body, policy=remat_policy(self.remat_policy))
            return body

        alone = [i for i, name in enumerate(types) if not attention_family(name).scannable]
        for start, stop in layer_segments(cfg.num_hidden_layers, alone, types):
            if stop - start == 1:
                hidden = self.block_class(cfg, types[start], self.dtype, self.param_dtype,
                                          name=str(start))(
                    hidden, position_ids, attention_mask).hidden
                continue
            if types[start] not in bodies:
                bodies[types[start]] = scan_body(types[start])
            stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                             *[self._for_compute(params[str(i)])
                                               for i in range(start, stop)])
            hidden, _ = jax.lax.scan(bodies[types[start]], hidden, stacked)
        return hidden

    def _for_compute(self, layer_params):
        """Matmul kernels cast to the compute dtype before stacking (the dense layers cast
        them anyway, so the numbers are unchanged and the stacked copy is smaller); norm
        scales stay as stored."""
        return jax.tree_util.tree_map(
            lambda p: p.astype(self.dtype) if p.ndim == 2 else p, layer_params)


def layer_segments(num_layers, alone, attention_types=None):
    """``[(start, stop), ...]`` in order: each layer of ``alone`` by itself, and each maximal
    run of the other layers that share their attention type (``attention_types``, one per
    layer; None: all alike)."""
    segments = []
    for i in range(num_layers):
        joins = (segments and i not in alone and i - 1 not in alone
                 and (attention_types is None or attention_types[i] == attention_types[i - 1]))
        segments.append((segments.pop()[0], i + 1) if joins else (i, i + 1))
    return segments


class TokenEmbedding(nn.Embed):
    """``nn.Embed`` (same parameter) whose lookup partitions without gathering the batch.

    The table is sharded (``vocab`` and ``embed`` axes) and the token ids over rows; left
    alone, the partitioner gathers every row's ids or embeddings onto every device.  Gathering
    the table's hidden axis first (what FSDP does for every other weight) leaves each device
    a lookup of its own rows in its vocabulary shard, summed over the vocabulary's devices.
    """

    def __call__(self, inputs):
        table = with_logical_constraint(self.embedding.astype(self.dtype), "vocab",
                                        "activation_embed")
        return jnp.take(table, inputs, axis=0)


class FlaxLLaMAModule(nn.Module):
    """Embedding, decoder layers and final norm: hidden states ``[B, L, hidden]`` and, in
    windowed inference, the layers' updated states (a :class:`LayerOutput`)."""
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, caches=None,
                 piece=None):
        """With ``caches`` (every layer's state) and ``piece`` (windowed inference,
        :mod:`FoT.inference`) the input is one piece and positions come from the piece."""
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
        hidden = with_logical_constraint(embed(input_ids.astype(jnp.int32)), *RESIDUAL_AXES)
        block, policy = LLaMABlock, None
        if cfg.remat_block not in ("", "none"):
            policy = cfg.remat_block
            block = nn.remat(LLaMABlock, policy=remat_policy(policy), prevent_cse=True)
        hidden, caches = LLaMABlockCollection(cfg, block, self.dtype, self.param_dtype, policy,
                                              name="h")(hidden, position_ids, attention_mask,
                                                        caches, piece)
        hidden = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="ln_f")(hidden)
        return LayerOutput(hidden, caches)


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
        hidden, caches = FlaxLLaMAModule(cfg, self.dtype, self.param_dtype, name="transformer")(
            input_ids, attention_mask, position_ids, caches, piece)
        if not compute_logits and not self.is_initializing():
            return CausalLMOutput(None, hidden, caches)
        if cfg.tie_word_embeddings:
            embedding = self.variables["params"]["transformer"]["wte"]["embedding"]
            logits = hidden @ embedding.T.astype(self.dtype)
        else:
            logits = dense_layer(cfg.vocab_size, cfg, self.dtype, self.param_dtype,
                                 "lm_head")(hidden)
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
