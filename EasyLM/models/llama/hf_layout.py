"""Parameter names and layouts shared by the Hugging Face <-> toolkit converters.

A Hugging Face LLaMA tensor ``[out, in]`` becomes a Flax kernel ``[in, out]``; q/k rows are
un-permuted from HF's half-rotation layout to the native pair layout (FOT_SPEC section 1).
The export also writes the parameters of forgetting-attention (FoX) and linear attention
(SUPRA, GLA) layers, which only the exported FoT model reads; the import takes LLaMA tensors
only.
"""
import re

import numpy as np

from EasyLM.models.llama.rope import hf_to_native_rows, native_to_hf_rows

_LAYER = r"model\.layers\.(\d+)\."
# HF name pattern -> (toolkit path inside a layer or at top level, how to convert).
_HF_TO_NATIVE = (
    (r"model\.embed_tokens\.weight", ("transformer", "wte", "embedding"), "copy"),
    (r"model\.norm\.weight", ("transformer", "ln_f", "kernel"), "copy"),
    (r"lm_head\.weight", ("lm_head", "kernel"), "transpose"),
    (_LAYER + r"self_attn\.q_proj\.weight", ("attention", "wq", "kernel"), "query"),
    (_LAYER + r"self_attn\.k_proj\.weight", ("attention", "wk", "kernel"), "key"),
    (_LAYER + r"self_attn\.v_proj\.weight", ("attention", "wv", "kernel"), "transpose"),
    (_LAYER + r"self_attn\.o_proj\.weight", ("attention", "wo", "kernel"), "transpose"),
    (_LAYER + r"mlp\.gate_proj\.weight", ("feed_forward", "w1", "kernel"), "transpose"),
    (_LAYER + r"mlp\.up_proj\.weight", ("feed_forward", "w3", "kernel"), "transpose"),
    (_LAYER + r"mlp\.down_proj\.weight", ("feed_forward", "w2", "kernel"), "transpose"),
    (_LAYER + r"input_layernorm\.weight", ("attention_norm", "kernel"), "copy"),
    (_LAYER + r"post_attention_layernorm\.weight", ("ffn_norm", "kernel"), "copy"),
)
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_to_native(name, tensor, config):
    """``(path, array)`` of one HF tensor in the toolkit's tree, or ``None`` if not a weight."""
    if _IGNORED.match(name):
        return None
    for pattern, path, kind in _HF_TO_NATIVE:
        match = re.fullmatch(pattern, name)
        if match is None:
            continue
        if match.groups():
            path = ("transformer", "h", match.group(1)) + path
        if kind == "query":
            tensor = hf_to_native_rows(tensor, config.num_attention_heads).T
        elif kind == "key":
            tensor = hf_to_native_rows(tensor, config.num_key_value_heads).T
        elif kind == "transpose":
            tensor = tensor.T
        return path, np.ascontiguousarray(tensor)
    raise ValueError(f"unexpected tensor {name!r} in the Hugging Face checkpoint: not part of "
                     f"a LLaMA model")


def native_to_hf(params, config):
    """Yield ``(hf_name, array)`` for every weight of a toolkit parameter tree."""
    transformer = params["transformer"]
    yield "model.embed_tokens.weight", transformer["wte"]["embedding"]
    for i in range(config.num_hidden_layers):
        layer = transformer["h"][str(i)]
        attn, mlp = layer["attention"], layer["feed_forward"]
        prefix = f"model.layers.{i}."
        yield prefix + "self_attn.q_proj.weight", native_to_hf_rows(
            np.asarray(attn["wq"]["kernel"]).T, config.num_attention_heads)
        yield prefix + "self_attn.k_proj.weight", native_to_hf_rows(
            np.asarray(attn["wk"]["kernel"]).T, config.num_key_value_heads)
        yield prefix + "self_attn.v_proj.weight", np.asarray(attn["wv"]["kernel"]).T
        yield prefix + "self_attn.o_proj.weight", np.asarray(attn["wo"]["kernel"]).T
        yield prefix + "mlp.gate_proj.weight", np.asarray(mlp["w1"]["kernel"]).T
        yield prefix + "mlp.up_proj.weight", np.asarray(mlp["w3"]["kernel"]).T
        yield prefix + "mlp.down_proj.weight", np.asarray(mlp["w2"]["kernel"]).T
        for name, array in _forgetting_tensors(attn):
            yield prefix + "self_attn." + name, array
        for name, array in _linear_tensors(attn, config):
            yield prefix + "self_attn." + name, array
        yield prefix + "input_layernorm.weight", layer["attention_norm"]["kernel"]
        yield prefix + "post_attention_layernorm.weight", layer["ffn_norm"]["kernel"]
    yield "model.norm.weight", transformer["ln_f"]["kernel"]
    if not config.tie_word_embeddings:
        yield "lm_head.weight", np.asarray(params["lm_head"]["kernel"]).T


def _forgetting_tensors(attn):
    """``(name, array)`` of a forgetting (FoX) layer's own parameters, those it has, under the
    names of ``FoT.hf.forgetting_fot_llama``: gates as ``Linear`` weights ``[out, in]`` (and
    biases), norm scales as they are, the query and key norms' in the half layout the q/k
    rows take (they scale the rows' features)."""
    for gate in ("fgate", "kshift", "vshift", "ogate"):
        if gate in attn:
            yield gate + ".weight", np.asarray(attn[gate]["kernel"]).T
            if "bias" in attn[gate]:
                yield gate + ".bias", attn[gate]["bias"]
    for norm in ("q_norm", "k_norm"):
        if norm in attn:
            yield norm + ".weight", native_to_hf_rows(np.asarray(attn[norm]["kernel"])[:, None],
                                                      1)[:, 0]
    if "o_norm" in attn:
        yield "o_norm.weight", attn["o_norm"]["kernel"]


def _linear_tensors(attn, config):
    """``(name, array)`` of a linear attention (SUPRA, GLA) layer's own parameters under the
    names of ``FoT.hf.linear_fot_llama``.  Queries and keys come out of ``q_proj``/``k_proj``
    in the half layout, so what acts on their features follows it: SUPRA's feature maps on
    both sides (``P W^T P^T``, bias ``P b``), GLA's per-key-dimension gate on its outputs."""
    def half(rows, heads):
        return native_to_hf_rows(np.asarray(rows), heads)

    for name in ("feature_map", "key_feature_map"):
        if name in attn:
            weight = half(np.asarray(attn[name]["kernel"]).T, 1)
            yield name + ".weight", half(weight.T, 1).T
            yield name + ".bias", half(np.asarray(attn[name]["bias"])[:, None], 1)[:, 0]
    if "gate_up" in attn:
        heads = config.num_attention_heads
        yield "gate_down.weight", np.asarray(attn["gate_down"]["kernel"]).T
        yield "gate_up.weight", half(np.asarray(attn["gate_up"]["kernel"]).T, heads)
        yield "gate_up.bias", half(np.asarray(attn["gate_up"]["bias"])[:, None], heads)[:, 0]


def insert(tree, path, value):
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if path[-1] in node:
        raise ValueError(f"tensor for {'/'.join(path)} appears twice in the checkpoint")
    node[path[-1]] = value
