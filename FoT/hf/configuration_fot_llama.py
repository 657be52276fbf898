"""Configuration of a LLaMA model with Focused Transformer (FoT) memory layers and, optionally,
forgetting-attention (FoX) layers.

It is Hugging Face's ``LlamaConfig`` plus the memory and FoX fields, so every LLaMA field (RoPE
parameters, GQA, tied embeddings ...) keeps its meaning; the defaults are those of exports
made before FoX layers existed.  This file is copied into exported model directories and must
import nothing from the toolkit.
"""
from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

ATTENTION_TYPES = ("softmax", "forgetting", "supra", "gla")


@strict
class FoTLlamaConfig(LlamaConfig):
    r"""
    mem_layers (`list[int]`): 0-based indices of the memory layers.
    last_context_length (`int`, *optional*): local context window ``W``.  Inputs are processed
        in windows of ``W`` tokens, and generation keeps the last ``W`` tokens in the local
        cache; older tokens live in the memory of the memory layers.  Defaults to
        ``max_position_embeddings``.
    mem_positionals (`bool`): whether memory layers use RoPE (memory keys rotated as if at
        position 0).  ``False`` removes positional encoding from memory layers altogether,
        for models trained that way.
    mem_dtype (`str`, *optional*): torch dtype name in which memory keys/values are stored
        (e.g. ``"bfloat16"``); ``None`` stores them in the activation dtype.
    mem_attention_grouping (`(heads, queries)`, *optional*): memory layers attend for at
        most this many heads and queries at a time, which bounds their score tensor.
    window_rule (`str`): how inputs are cut into windows (``windows_fot_llama``):
        ``"aligned"`` (default; causal, as training sees windows) or ``"longllama"`` (the
        original LongLLaMA code's rule, for models published with it).
    local_window_limit (`int`, *optional*): under ``"longllama"``, the most tokens the local
        window holds in generation and the size of a prompt's memory windows (the original's
        ``max_position_embeddings``); defaults to ``last_context_length``.
    decode_graphs (`bool`): on CUDA, run one-token generation steps as a CUDA graph over
        preallocated buffers (``decode_fot_llama.StaticDecoder``).
    prefill_chunk_tokens (`int`): without autograd, whole windows of rows alike go through
        each layer together, up to this many tokens (all rows) at a time
        (``prefill_fot_llama``); more is faster and holds larger activations; ``0`` runs
        one window at a time.
    torch_attention (`bool`): use ``torch.nn.functional.scaled_dot_product_attention``;
        ``False`` uses an explicit float32 softmax (slower, a reference).
    attention_type (`list[str]`): the family of every layer outside ``mem_layers``:
        ``"softmax"``, ``"forgetting"`` (forgetting attention, FoX:
        ``forgetting_fot_llama``), ``"supra"`` or ``"gla"`` (linear attention:
        ``linear_fot_llama``); one name stands for every layer.  Memory layers are FoT
        memory layers whatever their entry.  Default: all ``"softmax"``.
    forgetting_use_rope (`bool`): FoX layers rotate queries and keys (default: no RoPE).
    forgetting_kv_shift (`bool`): FoX layers mix each key and value with the previous
        token's (gates ``kshift``, ``vshift``).
    forgetting_qk_norm (`bool`): FoX layers RMS-normalise queries and keys per head.
    forgetting_output_gate (`bool`): FoX layers normalise each head's output and gate it
        (``o_norm``, ``ogate``) before ``o_proj``.
    supra_use_rope (`bool`): SUPRA layers rotate queries and keys after the feature map.
    gla_gate_rank (`int`), gla_gate_normaliser (`float`): GLA layers' gate: the rank of its
        projection and the divisor of its log-sigmoid.
    """

    model_type = "fot_llama"

    mem_layers: list[int] | tuple[int, ...] = ()
    last_context_length: int | None = None
    mem_positionals: bool = True
    mem_dtype: str | None = None
    mem_attention_grouping: list[int] | tuple[int, ...] | None = None
    window_rule: str = "aligned"
    local_window_limit: int | None = None
    decode_graphs: bool = True
    prefill_chunk_tokens: int = 8192
    torch_attention: bool = True
    attention_type: list[str] | tuple[str, ...] | str | None = None
    forgetting_use_rope: bool = False
    forgetting_kv_shift: bool = False
    forgetting_qk_norm: bool = False
    forgetting_output_gate: bool = False
    supra_use_rope: bool = True
    gla_gate_rank: int = 16
    gla_gate_normaliser: float = 16.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.mem_layers = [int(i) for i in self.mem_layers or ()]
        types = self.attention_type or "softmax"
        if isinstance(types, str):
            types = [types] * self.num_hidden_layers
        self.attention_type = list(types)
        if self.last_context_length is None:
            self.last_context_length = self.max_position_embeddings
        if self.mem_attention_grouping is not None:
            self.mem_attention_grouping = [int(x) for x in self.mem_attention_grouping]

    def validate_fot(self):
        """Raise ``ValueError`` naming the field to change when the memory fields are wrong."""
        bad = [i for i in self.mem_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mem_layers {self.mem_layers}: {bad} out of range for "
                             f"{self.num_hidden_layers} layers")
        if self.last_context_length < 1:
            raise ValueError(f"last_context_length must be >= 1, got {self.last_context_length}")
        if self.window_rule not in ("aligned", "longllama"):
            raise ValueError(f"window_rule must be 'aligned' or 'longllama', got "
                             f"{self.window_rule!r}")
        limit = self.local_window_limit
        if limit is not None and limit < self.last_context_length:
            raise ValueError(f"local_window_limit ({limit}) must be >= last_context_length "
                             f"({self.last_context_length})")
        if self.prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be >= 0 (0: one window at a time), "
                             f"got {self.prefill_chunk_tokens}")
        grouping = self.mem_attention_grouping
        if grouping is not None and (len(grouping) != 2 or min(grouping) < 1):
            raise ValueError(f"mem_attention_grouping must be two positive integers "
                             f"(heads, queries), got {grouping}")
        types = self.attention_type
        if len(types) != self.num_hidden_layers or not set(types) <= set(ATTENTION_TYPES):
            raise ValueError(f"attention_type must name one of {ATTENTION_TYPES} for each of "
                             f"the {self.num_hidden_layers} layers, got {types}")

    def linear_layers(self):
        """``{index: family}`` of the linear attention layers (``supra``, ``gla``)."""
        return {i: name for i, name in enumerate(self.attention_type)
                if name in ("supra", "gla") and i not in self.mem_layers}

    def forgetting_layers(self):
        """Indices of the FoX layers: those of ``attention_type`` "forgetting" that are not
        memory layers."""
        return [i for i, name in enumerate(self.attention_type)
                if name == "forgetting" and i not in self.mem_layers]
