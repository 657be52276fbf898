"""Keys of configs written for the original LongLLaMA FoT code (EasyLM flags and LLaMA config
fields) that have no key of the same name here.

One table per kind of config: runner flags (a JSON config file and the command line, read by
:func:`translate_flags`) and model-config fields (``update_llama_config``, the original
``llama.*`` flags and ``json::`` model configs, read by :func:`translate_model_fields`).  Each
legacy key is either mapped to the key that replaced it, accepted with a one-line warning where
it has no effect (the value that changed nothing in the original code either), or refused with a
``ConfigError`` naming what replaced it.  Model fields that are run flags here
(``remat_block``) move from ``update_llama_config`` and ``llama.*`` to their flag.  Both run
before the config is validated.
"""
import ast
import logging
import re

from EasyLM.config import ConfigError, parse_object

log = logging.getLogger("EasyLM")
# Model fields are translated where the runner builds a config and again where it is
# validated (which also takes configs built without the runner): each warning is logged
# once.
_warned = set()

_TRUE = ("1", "true", "yes", "on")


def _is_true(value):
    return value.strip().lower() in _TRUE if isinstance(value, str) else bool(value)


def _is_zero(value):
    try:
        return float(value) == 0
    except (TypeError, ValueError):
        return False


def _is_empty(value):
    return value in (None, "", "none", "None") or value is False


def _warn_once(message, *args):
    if (message, repr(args)) not in _warned:
        _warned.add((message, repr(args)))
        log.warning(message, *args)


def _rename(new_key):
    def action(key, value):
        _warn_once("legacy config key %s=%r read as %s", key, value, new_key)
        return {new_key: value}
    return action


def _ignore_if(is_noop, refusal, effect="has no effect here"):
    """Accept ``key`` with a warning when ``is_noop(value)``, else refuse with ``refusal``."""
    def action(key, value):
        if not is_noop(value):
            raise ConfigError(f"legacy config key {key}={value!r}: {refusal}")
        _warn_once("legacy config key %s=%r %s; ignored", key, value, effect)
        return {}
    return action


def _refuse(why):
    def action(key, value):
        raise ConfigError(f"legacy config key {key}={value!r}: {why}")
    return action


def _warn(effect):
    def action(key, value):
        _warn_once("legacy config key %s=%r %s; ignored", key, value, effect)
        return {}
    return action


_PALM = ("the PaLM optimizer (unfactored Adafactor with an inverse-square-root schedule) is not "
         "available: use optimizer.type=adafactor (adafactor_optimizer.multiply_by_parameter_"
         "scale=true, momentum=<palm b1>, a large min_dim_size_to_factor for unfactored moments) "
         "or optimizer.type=adamw")

# Runner flags: (regular expression matched against the whole dotted key, action).
FLAG_RULES = (
    ("logger_dir", _rename("workdir")),
    ("checkpointer\\.float_dtype", _ignore_if(
        lambda v: str(v).lower() in ("fp32", "float32"),
        "train checkpoints keep the parameters in their own dtype (fp32) for exact resume; for "
        "smaller weights export with python -m EasyLM.models.llama.convert_easylm_to_hf "
        "--dtype bf16", "is how train checkpoints store parameters anyway")),
    ("checkpointer\\.save_optimizer_state", _ignore_if(
        _is_true, "train checkpoints always hold the optimizer state (exact resume); for the "
        "weights alone load params::RUN/checkpoints/step_<N> or export with "
        "convert_easylm_to_hf", "is always the case: train checkpoints hold the optimizer "
        "state")),
    ("optimizer\\.type", lambda key, value: (
        _refuse(_PALM)(key, value) if str(value).lower() == "palm" else {key: value})),
    ("optimizer\\.palm_optimizer\\..+", _warn(
        "belongs to the PaLM optimizer, which is not available (optimizer.type=palm is refused)")),
    ("optimizer\\.adamw_optimizer\\.multiply_by_parameter_scale", _ignore_if(
        lambda v: not _is_true(v), "AdamW here does not scale updates by the parameters' "
        "scale: use optimizer.type=adafactor with adafactor_optimizer.multiply_by_parameter_"
        "scale=true")),
    ("jax_distributed\\.initialize_jax_distributed", _rename("pod_job")),
    ("\\w+_dataset\\.\\w+_dataset\\.always_start_with_bos", _ignore_if(
        lambda v: not _is_true(v), "rows are not given a BOS each: a row that continues a "
        "document starts with the document's next token (the FoT memory holds what came "
        "before); each document starts with BOS through <dataset>.text_processor.add_bos_token "
        "(default true)", "is the only behaviour here")),
)

# Model-config fields of the original LLaMA config with no field here.
MODEL_FIELD_RULES = (
    ("(resid|embd|attn)_pdrop", _ignore_if(
        _is_zero, "dropout is not implemented here (the FoT models train without it); set 0 "
        "or drop the key")),
    ("use_cache", _warn("has no effect here (windowed inference with memory caches is "
                        "EasyLM/models/llama/windowed_lm.py)")),
    ("remat_(attention|mlp)", _ignore_if(
        _is_empty, "only whole decoder layers are rematerialised here: set remat_block to a "
        "jax.checkpoint policy (nothing_saveable, dots_saveable, dots_and_attention_saveable, "
        "...)")),
    ("scan_(attention|mlp)", _ignore_if(
        lambda v: not _is_true(v), "blockwise (scanned) attention and MLP of ordinary layers "
        "are not implemented: attention_implementation picks the attention of ordinary layers "
        "(cuDNN fused on GPU), scan_cross_batch / cross_batch_implementation='blockwise' bounds "
        "the memory layers' score memory, remat_block and loss_chunk_tokens save memory")),
    ("scan_\\w+_chunk_size", _warn("has no effect here (scan_attention / scan_mlp are not "
                                   "implemented; see cross_batch_block_size)")),
    ("fcm_(min|max)_ratio", _ignore_if(
        _is_zero, "forgetful causal masking is not implemented here; set 0 or drop the key")),
)


# Fields of the original LLaMA config that are run flags of the same name here (run settings
# are not model fields: EasyLM.models.llama.llama_model.LLaMAConfig.run_settings).
RUN_FLAG_FIELDS = ("remat_block",)


def _action(rules, key):
    for pattern, action in rules:
        if re.fullmatch(pattern, key):
            return action
    return None


def translate_model_fields(values, source="update_llama_config"):
    """``values`` (model-config fields) with the legacy fields mapped, warned about or refused
    (``ConfigError`` naming ``source``)."""
    out = {}
    for key, value in values.items():
        action = _action(MODEL_FIELD_RULES, key)
        if action is None:
            out[key] = value
            continue
        try:
            out.update(action(key, value))
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    return out


def _literal(value):
    """A command-line value (always a string) of a ``llama.*`` flag as a Python value."""
    if not isinstance(value, str):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(value)
    except (SyntaxError, ValueError):
        return value


def _take_run_flags(fields, source):
    """Remove from ``fields`` (model-config fields) those that are run flags here, returned as
    flags."""
    flags = {}
    for name in RUN_FLAG_FIELDS:
        if name in fields:
            flags[name] = fields.pop(name)
            _warn_once("legacy config key %s %s=%r read as the run flag --%s", source, name,
                       flags[name], name)
    return flags


def translate_flags(values):
    """``(flags, model_fields)`` of a flat ``{dotted key: value}`` from a config file or the
    command line: legacy flags mapped, warned about or refused; ``update_llama_config`` read
    into a dict of model-config fields; the original ``llama.<field>`` flags gathered as
    model-config fields (the base that ``update_llama_config`` updates); the original model
    fields that are run flags here (``RUN_FLAG_FIELDS``) moved to their flags."""
    flags, model_fields, moved = {}, {}, {}
    for key, value in values.items():
        if key.startswith("llama."):
            fields = translate_model_fields({key[len("llama."):]: _literal(value)}, source=key)
            moved.update(_take_run_flags(fields, "llama.*"))
            model_fields.update(fields)
            continue
        if key == "update_llama_config":
            # Read here, once: the fields go on as a dict (the flag's JsonObject value).
            value = translate_model_fields(parse_object(value, key), key)
            moved.update(_take_run_flags(value, key))
        action = _action(FLAG_RULES, key)
        flags.update(action(key, value) if action else {key: value})
    for name, value in moved.items():
        if name in flags and flags[name] != value:
            raise ConfigError(f"{name}={flags[name]!r} and the legacy model field "
                              f"{name}={value!r} disagree: keep only the run flag {name}")
    return dict(flags, **moved), model_fields
