"""Keys of the original LongLLaMA FoT configs: mapped, accepted with a one-line warning, or
refused with a message naming what replaced them; from a config file, the command line,
``update_llama_config``, ``llama.*`` flags and ``json::`` model configs."""
import json
import logging

import pytest

from EasyLM import legacy_keys
from EasyLM.config import ConfigError
from EasyLM.models.llama import llama_train
from EasyLM.models.llama.llama_model import LLaMAConfig
from running_utils.runner_utils import build_config, split_config

from helpers import REPO, SETUP



class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings(monkeypatch):
    """The warnings the 'EasyLM' logger gives (it does not propagate to pytest's handler)."""
    monkeypatch.setattr(legacy_keys, "_warned", set())
    handler = _Lines()
    logger = logging.getLogger("EasyLM")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def from_file(tmp_path, values, *argv):
    path = tmp_path / "original.json"
    path.write_text(json.dumps(values))
    return build_config(["--config", str(path), *argv])


# Runner flags.

@pytest.mark.parametrize("key, value, new_key, new_value", [
    ("logger_dir", "/tmp/original_logs", "workdir", "/tmp/original_logs"),
    ("jax_distributed.initialize_jax_distributed", True, "pod_job", True),
])
@pytest.mark.parametrize("source", ["file", "command line"])
def test_flags_mapped_to_their_replacement(tmp_path, warnings, key, value, new_key, new_value,
                                           source):
    if source == "file":
        config = from_file(tmp_path, {key: value})
    else:
        config = build_config([f"--{key}={json.dumps(value).strip(chr(34))}"])
    assert config.flatten()[new_key] == new_value
    assert len(warnings) == 1 and key in warnings[0] and new_key in warnings[0]


NO_OP_FLAGS = [
    ("checkpointer.float_dtype", "fp32"),
    ("checkpointer.save_optimizer_state", True),
    ("optimizer.palm_optimizer.lr", 1e-3),
    ("optimizer.palm_optimizer.weight_decay", 1e-4),
    ("optimizer.adamw_optimizer.multiply_by_parameter_scale", False),
    ("train_dataset.json_dataset.always_start_with_bos", False),
    ("eval_dataset.json_dataset.always_start_with_bos", "false"),
]


@pytest.mark.parametrize("key, value", NO_OP_FLAGS)
def test_flags_without_effect_are_accepted_with_one_warning(tmp_path, warnings, key, value):
    config = from_file(tmp_path, {key: value})
    assert config.flatten() == build_config([]).flatten()
    assert len(warnings) == 1 and key in warnings[0]


@pytest.mark.parametrize("key, value, replacement", [
    ("checkpointer.float_dtype", "bf16", "convert_easylm_to_hf --dtype bf16"),
    ("checkpointer.save_optimizer_state", False, "params::RUN/checkpoints/step_<N>"),
    ("optimizer.type", "palm", "optimizer.type=adafactor"),
    ("optimizer.adamw_optimizer.multiply_by_parameter_scale", True,
     "adafactor_optimizer.multiply_by_parameter_scale=true"),
    ("train_dataset.json_dataset.always_start_with_bos", True,
     "text_processor.add_bos_token"),
])
@pytest.mark.parametrize("source", ["file", "command line"])
def test_flags_with_an_effect_we_lack_are_refused_naming_the_replacement(
        tmp_path, key, value, replacement, source):
    with pytest.raises(ConfigError, match=f"legacy config key {key}=") as error:
        if source == "file":
            from_file(tmp_path, {key: value})
        else:
            build_config([f"--{key}={str(value).lower()}"])
    assert replacement in str(error.value)


# Model-config fields.

NO_OP_FIELDS = [
    ("resid_pdrop", 0.0), ("embd_pdrop", 0), ("attn_pdrop", 0.0), ("use_cache", True),
    ("use_cache", False), ("remat_attention", ""), ("remat_mlp", ""),
    ("scan_attention", False), ("scan_mlp", False), ("scan_query_chunk_size", 1024),
    ("scan_key_chunk_size", 2048), ("scan_mlp_chunk_size", 1024), ("fcm_min_ratio", 0.0),
    ("fcm_max_ratio", 0),
]
REFUSED_FIELDS = [
    ("resid_pdrop", 0.1, "dropout is not implemented"),
    ("embd_pdrop", 0.05, "dropout is not implemented"),
    ("attn_pdrop", 0.1, "dropout is not implemented"),
    ("remat_attention", "nothing_saveable", "remat_block"),
    ("remat_mlp", "dots_saveable", "remat_block"),
    ("scan_attention", True, "attention_implementation"),
    ("scan_mlp", True, "remat_block and loss_chunk_tokens"),
    ("fcm_min_ratio", 0.1, "forgetful causal masking"),
    ("fcm_max_ratio", 0.2, "forgetful causal masking"),
]


def model_config_through(source, tmp_path, field, value):
    """The LLaMAConfig that ``field=value`` gives through each way a model config is read."""
    base = LLaMAConfig.load_config("debug_fot")
    if source == "update_llama_config":
        overrides = llama_train.parse_llama_overrides(json.dumps({field: value}))
        return base.replace(**overrides)
    if source == "llama flag":
        config = build_config([f"--llama.{field}={value}", "--llama.rope_theta=1e6"])
        return base.replace(**llama_train.parse_llama_overrides(config.update_llama_config))
    path = tmp_path / "model.json"
    path.write_text(json.dumps(dict(base.to_dict(), **{field: value})))
    return LLaMAConfig.load_config(f"json::{path}")


SOURCES = ["update_llama_config", "llama flag", "json model config"]


@pytest.mark.parametrize("field, value", NO_OP_FIELDS)
@pytest.mark.parametrize("source", SOURCES)
def test_model_fields_without_effect_are_accepted_with_one_warning(tmp_path, warnings, source,
                                                                    field, value):
    llama = model_config_through(source, tmp_path, field, value)
    expected = LLaMAConfig.load_config("debug_fot")
    if source == "llama flag":
        expected = expected.replace(rope_theta=1e6)
    assert llama == expected
    assert len(warnings) == 1 and field in warnings[0]


@pytest.mark.parametrize("field, value, replacement", REFUSED_FIELDS)
@pytest.mark.parametrize("source", SOURCES)
def test_model_fields_with_an_effect_we_lack_are_refused_naming_the_replacement(
        tmp_path, source, field, value, replacement):
    with pytest.raises(ConfigError, match=f"legacy config key {field}=") as error:
        model_config_through(source, tmp_path, field, value)
    assert replacement in str(error.value)


def test_llama_flags_are_the_base_that_update_llama_config_updates(tmp_path):
    config = from_file(tmp_path, {"llama.vocab_size": 256, "llama.rope_theta": 1e6,
                                  "update_llama_config": '{"vocab_size": 512}'},
                       "--llama.max_sequence_length=64")
    assert llama_train.parse_llama_overrides(config.update_llama_config) == {
        "vocab_size": 512, "rope_theta": 1e6, "max_sequence_length": 64}


def test_setup_test_with_every_no_op_legacy_key_validates(tmp_path, monkeypatch, warnings):
    monkeypatch.chdir(REPO)
    with open(SETUP) as f:
        values = json.load(f)
    values.update(NO_OP_FLAGS, logger_dir=str(tmp_path / "logs"))
    values.update({f"llama.{field}": value for field, value in NO_OP_FIELDS})
    values["jax_distributed.initialize_jax_distributed"] = False
    runner, train = split_config(from_file(tmp_path, values))
    llama_train.validate(train)
    assert train.workdir == str(tmp_path / "logs") and runner.pod_job is False
    fields = {field for field, _ in NO_OP_FIELDS}
    assert len(warnings) == len(NO_OP_FLAGS) + len(fields) + 2
