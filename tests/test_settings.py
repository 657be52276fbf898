"""Architecture versus run settings: run flags own the execution settings, a JSON override of
one is refused naming its flag, checkpoints store the architecture only, and each rule (packing,
range, dtype names) is checked by one validator."""
import json
import re

import pytest

from EasyLM import checkpoint, legacy_keys
from EasyLM.config import ConfigError, JsonObject
from EasyLM.jax_utils import dtype_name, float_dtype
from EasyLM.models.llama import llama_train
from EasyLM.models.llama.llama_model import LLaMAConfig
from FoT.data_pipeline import PipelineSpec
from FoT.slots import check_whole_groups
from running_utils import runner
from running_utils.runner_utils import MEMORY_FRACTION_VARIABLES, build_config, split_config

from helpers import SETUP, capture_warnings


def test_json_override_of_run_settings_is_refused_naming_the_flags(tmp_path, capsys,
                                                                  monkeypatch):
    """The flags would silently win over both keys."""
    for name in MEMORY_FRACTION_VARIABLES:  # runner.main sets one in this process
        monkeypatch.delenv(name, raising=False)
    text = '{"scan_cross_batch": true, "cross_batch_range": 5}'
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--config", SETUP, f"--update_llama_config={text}",
                     "--workdir", str(tmp_path / "work")])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "scan_cross_batch is a run setting: use --scan_cross_batch" in message
    assert "cross_batch_range is a run setting: use --train_cross_batch_range" in message
    assert not (tmp_path / "work").exists()
    _, train = split_config(build_config(["--config", SETUP]))
    train.update_llama_config = '{"attention_implementation": "xla"}'
    with pytest.raises(ConfigError, match="use --attention_implementation"):
        llama_train.validate(train)


@pytest.mark.parametrize("field", sorted(LLaMAConfig.run_settings()))
def test_every_run_setting_is_refused_in_update_llama_config(field):
    with pytest.raises(ConfigError, match=f"^update_llama_config: {field} is a run setting: "
                                          f"use "):
        llama_train.parse_llama_overrides(json.dumps({field: getattr(LLaMAConfig(), field)}))


def test_run_flags_reach_the_train_and_eval_models(monkeypatch):
    _, train = split_config(build_config([
        "--config", SETUP, "--cross_batch_implementation=blockwise",
        "--attention_implementation=xla", "--remat_block=nothing_saveable",
        "--scan_cross_batch=true", "--cross_batch_block_size=64"]))
    llama_train.validate(train)

    class Tokenizer:
        vocab_size, bos_token_id, eos_token_id = 512, 1, 2

    llama = llama_train.build_llama_config(train, Tokenizer())
    assert (llama.cross_batch_implementation, llama.attention_implementation,
            llama.remat_block, llama.scan_cross_batch, llama.cross_batch_block_size) == (
        "blockwise", "xla", "nothing_saveable", True, 64)
    assert llama.vocab_size == 512


@pytest.mark.parametrize("flag, value", [
    ("cross_batch_implementation", "fast"), ("attention_implementation", "flash"),
    ("remat_block", "dots_only"), ("cross_batch_block_size", 0),
    ("train_cross_batch_range", -1), ("eval_cross_batch_range", -2), ("profile_steps", "3"),
])
def test_bad_run_flags_name_the_flag(flag, value):
    _, train = split_config(build_config(["--config", SETUP, f"--{flag}={value}"]))
    with pytest.raises(ConfigError, match=f"^{flag}="):
        llama_train.validate(train)


def test_legacy_remat_block_in_update_llama_config_becomes_the_run_flag(tmp_path, monkeypatch):
    """The original EasyLM config had remat_block among the model fields."""
    monkeypatch.setattr(legacy_keys, "_warned", set())
    with capture_warnings() as warnings:
        config = build_config(["--config", SETUP, "--update_llama_config",
                               "dict(vocab_size=512, remat_block='nothing_saveable')"])
    assert config.remat_block == "nothing_saveable"
    assert llama_train.parse_llama_overrides(config.update_llama_config) == {"vocab_size": 512}
    assert any("--remat_block" in line for line in warnings)
    config = build_config(["--config", SETUP, "--llama.remat_block=dots_saveable"])
    assert config.remat_block == "dots_saveable"
    with pytest.raises(ConfigError, match="keep only the run flag remat_block"):
        build_config(["--config", SETUP, "--remat_block=dots_saveable",
                      "--update_llama_config={\"remat_block\": \"nothing_saveable\"}"])


def test_checkpoint_config_stores_the_architecture_and_reads_older_ones(tmp_path):
    run_model = LLaMAConfig.load_config("debug_fot").replace(
        cross_batch_range=2, dataset_packing=2, remat_block="nothing_saveable")
    run_model.to_json_file(tmp_path / checkpoint.CONFIG_FILE)
    stored = json.loads((tmp_path / checkpoint.CONFIG_FILE).read_text())
    assert not set(stored) & set(LLaMAConfig.run_settings())
    assert checkpoint.load_llama_config(str(tmp_path)) == LLaMAConfig.load_config("debug_fot")
    # An older checkpoint's config held the run settings of its run: left to the new run.
    older = dict(stored, cross_batch_range=2, dataset_packing=2, scan_cross_batch=False)
    (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(older))
    with capture_warnings() as warnings:
        loaded = checkpoint.load_llama_config(str(tmp_path))
    assert loaded == LLaMAConfig.load_config("debug_fot")
    assert len(warnings) == 1 and "cross_batch_range=2" in warnings[0]
    assert "scan_cross_batch" not in warnings[0]  # its default: nothing lost


def test_one_packing_rule():
    check_whole_groups(8, 2, 2, "processes")
    with pytest.raises(ValueError, match="not divisible by dataset_packing 3"):
        check_whole_groups(8, 3)
    with pytest.raises(ValueError, match="into 4 micro-batches of whole groups of 2"):
        check_whole_groups(12, 2, 4, "micro-batches")
    _, train = split_config(build_config([
        "--config", SETUP, "--train_dataset.json_dataset.data_pipeline=doc_aware_k3"]))
    with pytest.raises(ConfigError, match=r"batch_size=8 .*packing factor 3"):
        llama_train.validate(train)


def test_one_dtype_table():
    assert dtype_name("bf16") == dtype_name("bfloat16") == "bfloat16"
    assert float_dtype("fp16") == float_dtype("float16")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        dtype_name("fp8")


def test_a_value_of_the_wrong_type_says_where_the_value_it_replaces_comes_from(tmp_path, capsys,
                                                                             monkeypatch):
    for name in MEMORY_FRACTION_VARIABLES:  # runner.main sets one in this process
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--config", SETUP, "--optimizer.adamw_optimizer.lr=abc",
                     "--workdir", str(tmp_path / "work")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "config error: config key 'optimizer.adamw_optimizer.lr': cannot use 'abc' where a "
        f"float is expected (the config file {SETUP} gives 0.003)"]
    assert not (tmp_path / "work").exists()
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"seed": 7}))
    bad.write_text(json.dumps({"total_steps": "many"}))
    for argv, given in ((["--config", str(good), "--seed=x"], f"the config file {good} gives 7"),
                        (["--config", str(bad)], "default 10000"),
                        (["--seed=1", "--total_steps=x"], "default 10000")):
        with pytest.raises(ConfigError, match=re.escape(f"({given})") + "$"):
            build_config(argv)
    defaults = llama_train.get_default_config()
    defaults.update_from({"seed": 3}, source="my script")
    with pytest.raises(ConfigError, match=r"\(my script gives 3\)$"):
        defaults.update_from({"seed": "x"})


def test_update_llama_config_is_read_once_into_a_dict(tmp_path):
    """A string (command line, config file) or a JSON object; the llama.* fields its base."""
    config = build_config(["--config", SETUP, "--llama.rope_theta=1e6",
                           "--update_llama_config", "dict(vocab_size=256)"])
    assert isinstance(config.update_llama_config, JsonObject)
    assert config.update_llama_config == {"rope_theta": 1e6, "vocab_size": 256}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"update_llama_config": {"vocab_size": 256}}))
    assert build_config(["--config", str(path)]).update_llama_config == {"vocab_size": 256}
    defaults = llama_train.get_default_config({"update_llama_config": '{"vocab_size": 256}'})
    assert defaults.update_llama_config == {"vocab_size": 256}
    for bad in ("[1]", "vocab_size=3"):
        with pytest.raises(ConfigError, match=r"^update_llama_config=.*expected a JSON object"):
            build_config([f"--update_llama_config={bad}"])
        with pytest.raises(ConfigError, match=r"^update_llama_config=.*expected a JSON object"):
            llama_train.get_default_config({"update_llama_config": bad})


def test_validate_gives_the_settings_it_read_for_the_run():
    _, train = split_config(build_config([
        "--config", SETUP, "--train_dataset.json_dataset.data_pipeline=doc_aware_k4_pad"]))
    assert llama_train.validate(train) == llama_train.RunSettings(
        model_overrides={"vocab_size": 512}, train_pipeline=PipelineSpec("doc_aware", 4, True),
        eval_pipeline=PipelineSpec("doc_aware", 1, False))
    train.eval_steps = 0
    assert llama_train.validate(train).eval_pipeline is None
