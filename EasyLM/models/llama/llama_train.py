"""Flags of a FoT continued-pretraining run, their validation, and ``main``: config -> library.

Use it through ``python -m running_utils.runner --config configs/X.json`` (JSON of the dotted
flag names below), or call :func:`main` with a config from :func:`get_default_config`.
The maths lives in :mod:`EasyLM.trainer`, the run's life (run directory, resume, logging) in
:mod:`EasyLM.run`; this file only declares and checks the flags and wires the parts.

Flags own the run settings (:meth:`LLaMAConfig.run_settings`: cross-batch range and stepping,
implementations, remat, scans, block sizes); ``load_llama_config`` and ``update_llama_config``
give the architecture only.

:func:`validate` reads what needs reading once (the model overrides, each dataset's pipeline
name) into :class:`RunSettings`, which ``main`` hands to the data and the model config.
"""
import dataclasses
import os
from typing import Optional

from EasyLM import checkpoint, logging_utils, optimizers, run
from EasyLM import tokenizer as tokenizer_lib
from EasyLM.config import ConfigDict, ConfigError, JsonObject, Option, check_ranges, parse_object
from EasyLM.data import DatasetFactory, read_pipeline
from EasyLM.hooks import parse_profile_steps
from EasyLM.jax_utils import float_dtype, get_jax_mesh, parse_mesh_dim
from EasyLM.legacy_keys import translate_model_fields
from EasyLM.losses import DEFAULT_LOSS_CHUNK_TOKENS
from EasyLM.models.llama.llama_model import LLaMAConfig, with_cross_batch
from EasyLM.trainer import LoopSettings, Trainer, data_split
from FoT.data_pipeline import PipelineSpec
from FoT.slots import check_whole_groups


def get_default_config(updates=None):
    config = ConfigDict(
        seed=Option(42, "parameter initialisation when no checkpoint is loaded"),
        mesh_dim=Option("1,-1,1", "device mesh sizes dp,fsdp,mp (one may be -1); rows are split "
                        "over dp x fsdp, parameters over fsdp and mp"),
        dtype=Option("fp32", "compute dtype (fp32, bf16, fp16); parameters and optimizer state "
                     "stay float32"),
        total_steps=Option(10000, "optimizer updates of the whole run"),
        load_llama_config=Option("", "model: a standard name ('debug_fot', '3b_FoT', '7b_FoT', "
                                 "...), 'json::PATH' or 'hf::PATH'; '' = the config stored with "
                                 "load_checkpoint"),
        update_llama_config=Option(JsonObject(), "JSON object (or the string of one, or of a "
                                   "Python dict literal) of architecture overrides, e.g. "
                                   "'{\"vocab_size\": 512}'; run settings (remat_block, "
                                   "cross-batch ...) are flags of their own"),
        load_checkpoint=Option("", "params::PATH (weights only), trainstate::PATH (weights, "
                               "optimizer state, step, data position) or "
                               "trainstate_params::PATH (the weights of a train checkpoint)"),
        load_dataset_state=Option("", "JSON data-pipeline state to start from; "
                                  "'{process_index}' is replaced per process"),
        train_log_freq=Option(50, "log every N steps (also at every evaluation, checkpoint and "
                              "the last step)"),
        eval_freq=Option(100, "evaluate every N steps and at step 0; 0 never evaluates"),
        eval_steps=Option(0, "eval batches per evaluation; 0 disables evaluation"),
        save_model_freq=Option(0, "rolling checkpoint every N steps and at the end "
                               "(checkpointer.keep_last kept); 0 = none"),
        save_milestone_freq=Option(0, "checkpoint every N steps, never deleted; 0 = none"),
        workdir=Option("./workdir", "each run gets workdir/<timestamp>/"),
        resume=Option(True, "continue the newest run under workdir from its last complete "
                      "checkpoint; false starts a fresh run"),
        log_all_worker=Option(False, "every process logs (to RUN/worker_<i>/), not only "
                              "process 0"),
        skip_nonfinite_steps=Option(False, "drop updates whose loss or gradient norm is not "
                                    "finite (counted as train/skipped_steps)"),
        profile_steps=Option("", "'FIRST,LAST': a jax.profiler trace of the steps after FIRST "
                             "up to LAST into RUN/profile/ (TensorBoard's profile plugin, "
                             "Perfetto); '' = none"),
        peak_flops_per_device=Option(0.0, "peak FLOP/s of one device, for MFU; 0 = look the "
                                     "device up in EasyLM/flops.py's table"),
        train_cross_batch_range=Option(1, "FoT cross-batch range C of the train model: memory "
                                       "layers also attend to the C previous rows of the "
                                       "batch; 0 = local context only"),
        train_cross_batch_stepping=Option(True, "with doc_aware_kN data, a document's later rows "
                                          "see more of the C slots than its first (as in "
                                          "FoT); false: every row sees all C"),
        eval_cross_batch_range=Option(0, "cross-batch range C of the eval model"),
        eval_cross_batch_stepping=Option(True, "cross-batch stepping of the eval model"),
        **{name: Option(default, meaning)
           for name, (default, meaning) in LLaMAConfig.run_flags().items()},
        loss_chunk_tokens=Option(DEFAULT_LOSS_CHUNK_TOKENS, "the loss runs over slices of at "
                                 "most this many tokens of the global batch, without full "
                                 "logits; 0 = full logits (faster, more memory)"),
        z_loss=Option(0.0, "coefficient of the z-loss, the mean logsumexp(logits)^2 added to "
                      "the objective (logged apart as z_loss; SUPRA uptraining uses 1e-4); "
                      "0 = none"),
        tokenizer=tokenizer_lib.get_default_config(),
        train_dataset=DatasetFactory.get_default_config(),
        eval_dataset=DatasetFactory.get_default_config(),
        optimizer=optimizers.get_default_config(),
        checkpointer=checkpoint.get_default_config(),
        logging=logging_utils.get_default_config(),
    )
    return config.copy_and_update(updates)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What :func:`validate` read from a run's config, for ``main`` to hand down."""
    model_overrides: dict  # update_llama_config: architecture fields of the model config
    train_pipeline: PipelineSpec  # train_dataset's data_pipeline
    eval_pipeline: Optional[PipelineSpec]  # eval_dataset's, None when nothing is evaluated


def parse_llama_overrides(value, key="update_llama_config"):
    """The architecture overrides of ``update_llama_config``: its dict, or a string
    ``'{"vocab_size": 512}'``, ``"{'vocab_size': 512}"`` or ``"dict(vocab_size=512)"``; fields
    of the original LLaMA config translated (:mod:`EasyLM.legacy_keys`).  A run setting is
    refused, naming what sets it: its flag would silently win."""
    values = translate_model_fields(parse_object(value, key), key)
    owners = LLaMAConfig.run_settings()
    owned = [f"{name} is a run setting: use {owners[name]}" for name in values if name in owners]
    if owned:
        raise ConfigError(f"{key}: {'; '.join(owned)}")
    return values


def _flag_fields(model):
    """``{run flag: LLaMAConfig field}`` of the ``model`` ("train" or "eval") model."""
    return dict({name: name for name in LLaMAConfig.run_flags()},
                **{f"{model}_{name}": name
                   for name in ("cross_batch_range", "cross_batch_stepping")})


def _check_run_settings(config):
    """The run flags through the model config's own checks, each error naming its flag."""
    for model in ("train", "eval"):
        for flag, field in _flag_fields(model).items():
            try:
                LLaMAConfig(**{field: config[flag]})
            except ValueError as error:
                raise ConfigError(f"{flag}={config[flag]!r}: {error}") from None


def _dataset_source(config, name):
    dataset = config[name]
    key = f"{name}.type"
    if dataset.type not in ("json", "huggingface"):
        raise ConfigError(f"{key}={dataset.type!r}: use 'json' or 'huggingface'")
    return dataset[f"{dataset.type}_dataset"], f"{name}.{dataset.type}_dataset"


def _check_dataset(config, name, shards, mesh_key, micro_batches=1):
    """The dataset ``name``'s source config checked; its :class:`PipelineSpec`."""
    source, prefix = _dataset_source(config, name)
    check_ranges(source, f"{prefix}.", seq_length=">= 1", batch_size=">= 1",
                 min_example_length=">= 0", tokenizer_processes=">= 1",
                 tokenizer_parallel_chunk_size=">= 1", tokenizer_parallel_batch_size=">= 1",
                 throughput_average_window_size=">= 1")
    pipeline = read_pipeline(source, prefix)
    packing = pipeline.packing
    batch = source.batch_size
    try:
        check_whole_groups(batch, packing)
    except ValueError as error:
        raise ConfigError(f"{prefix}.batch_size={batch} with {prefix}.data_pipeline="
                          f"{source.data_pipeline!r}: {error}") from None
    if batch % shards:
        raise ConfigError(f"{prefix}.batch_size={batch} is not divisible by the {shards} "
                          f"data-parallel shards (dp x fsdp) of {mesh_key}")
    if micro_batches > 1:
        key = "optimizer.accumulate_gradient_steps"
        try:
            check_whole_groups(batch, packing, micro_batches, "micro-batches")
        except ValueError as error:
            raise ConfigError(f"{key}={micro_batches} with {prefix}.batch_size={batch}: "
                              f"{error}") from None
        if (batch // micro_batches) % shards:
            raise ConfigError(f"{key}={micro_batches}: micro-batches of {prefix}.batch_size="
                              f"{batch} do not split over the {shards} data-parallel shards")
    return pipeline


def validate(config):
    """Checks that need no model, data or device work: fail in the first second.  Returns the
    :class:`RunSettings` read on the way."""
    try:
        dims = parse_mesh_dim(config.mesh_dim)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        float_dtype(config.dtype)
    except ValueError as error:
        raise ConfigError(f"dtype: {error}") from None
    optimizers.validate(config.optimizer)
    logging_utils.validate(config.logging)
    # A run of 0 steps would "finish" at once and look like success.
    check_ranges(config, total_steps=">= 1", train_log_freq=">= 1", eval_freq=">= 0",
                 eval_steps=">= 0", save_model_freq=">= 0", save_milestone_freq=">= 0",
                 loss_chunk_tokens=">= 0", peak_flops_per_device=">= 0", z_loss=">= 0")
    check_ranges(config.checkpointer, "checkpointer.", keep_last=">= 0")
    try:
        parse_profile_steps(config.profile_steps, config.total_steps)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check_run_settings(config)
    shards = dims[0] * dims[1]
    mesh_key = f"mesh_dim={config.mesh_dim!r}"
    train_pipeline = _check_dataset(config, "train_dataset", shards, mesh_key,
                                    config.optimizer.accumulate_gradient_steps)
    eval_pipeline = None
    if config.eval_steps > 0:
        eval_pipeline = _check_dataset(config, "eval_dataset", shards, mesh_key)
    if config.load_checkpoint:
        try:
            checkpoint.parse_checkpoint_spec(config.load_checkpoint)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None
    if config.load_dataset_state:
        path = run.dataset_state_path(config.load_dataset_state)
        if not os.path.exists(path):
            raise ConfigError(f"load_dataset_state={config.load_dataset_state!r}: {path} does "
                              f"not exist")
    return RunSettings(parse_llama_overrides(config.update_llama_config), train_pipeline,
                       eval_pipeline)


def build_llama_config(config, tokenizer, overrides=None):
    """The model config: named / file config or the checkpoint's, ``overrides`` (those of
    :class:`RunSettings`; read from ``update_llama_config`` when not given), tokenizer ids; the
    run settings shared by the train and eval models from their flags."""
    if overrides is None:
        overrides = parse_llama_overrides(config.update_llama_config)
    try:
        if config.load_llama_config:
            llama = LLaMAConfig.load_config(config.load_llama_config)
        elif config.load_checkpoint:
            llama = checkpoint.load_llama_config(
                checkpoint.parse_checkpoint_spec(config.load_checkpoint)[1])
        else:
            raise ConfigError("load_llama_config is empty and no load_checkpoint gives a model "
                              "config: set load_llama_config (e.g. '7b_FoT', 'json::PATH', "
                              "'hf::PATH')")
    except (ValueError, FileNotFoundError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"load_llama_config={config.load_llama_config!r}: {error}") from None
    try:
        llama = llama.replace(**overrides)
    except ValueError as error:
        raise ConfigError(f"update_llama_config: {error}") from None
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id")
           if getattr(tokenizer, k, None) is not None}
    llama = llama.replace(**{name: config[name] for name in LLaMAConfig.run_flags()}, **ids)
    if llama.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"vocab_size {llama.vocab_size} of the model (load_llama_config / "
                          f"update_llama_config) is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} (tokenizer.vocab_file); set "
                          f'update_llama_config=\'{{"vocab_size": {tokenizer.vocab_size}}}\'')
    return llama


# The LLaMAConfig fields that decide the parameter shapes.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings",
                "attention_type", "forgetting_kv_shift", "forgetting_qk_norm",
                "forgetting_output_gate")


def check_checkpoint_fits(config, llama, expected_params, spec, what):
    """Refuse a checkpoint whose weights do not fit the model that ``load_llama_config`` and
    ``update_llama_config`` give, naming the fields that differ, before anything is loaded.

    ``expected_params``: the model's parameter tree (shapes suffice); ``what``: how the
    message names the checkpoint (e.g. ``"load_checkpoint='params::X'"``)."""
    expected = checkpoint.param_shapes(expected_params)
    stored = checkpoint.stored_param_shapes(spec)
    if stored == expected:
        return
    try:
        theirs = checkpoint.load_llama_config(checkpoint.parse_checkpoint_spec(spec)[1])
        fields = [f"{name} {getattr(llama, name)} (checkpoint: {getattr(theirs, name)})"
                  for name in SHAPE_FIELDS if getattr(llama, name) != getattr(theirs, name)]
    except (FileNotFoundError, ValueError):  # no readable stored config: the shapes say it
        fields = []
    differences = []
    for name in sorted(set(expected) | set(stored)):
        if name not in stored:
            differences.append(f"{name} {expected[name]} (not in the checkpoint)")
        elif name not in expected:
            differences.append(f"{name} (only in the checkpoint)")
        elif stored[name] != expected[name]:
            differences.append(f"{name} {expected[name]} (checkpoint: {stored[name]})")
    more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
    raise ConfigError(
        f"{what} does not fit the model of load_llama_config={config.load_llama_config!r} and "
        f"update_llama_config={config.update_llama_config!r}: "
        f"{', '.join(fields) or 'its parameters differ'}; parameters: "
        f"{', '.join(differences[:3])}{more}. Change load_llama_config / update_llama_config "
        f"to match the checkpoint (load_llama_config='' takes the config stored with it)")


def main(config):
    """Run training as ``config`` (see :func:`get_default_config`) says; returns the run dir."""
    settings = validate(config)
    mesh = get_jax_mesh(config.mesh_dim)
    tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer)
    index, count = data_split(mesh)
    train_data = DatasetFactory.load_dataset(config.train_dataset, tokenizer, index, count,
                                             name="train_dataset",
                                             pipeline_spec=settings.train_pipeline)
    eval_data = None
    if settings.eval_pipeline is not None:
        eval_data = DatasetFactory.load_dataset(config.eval_dataset, tokenizer, index, count,
                                                name="eval_dataset",
                                                pipeline_spec=settings.eval_pipeline)
    llama = build_llama_config(config, tokenizer, settings.model_overrides)
    train_llama = with_cross_batch(llama, config.train_cross_batch_range,
                                   config.train_cross_batch_stepping,
                                   settings.train_pipeline.packing)
    eval_llama = (with_cross_batch(llama, config.eval_cross_batch_range,
                                   config.eval_cross_batch_stepping,
                                   settings.eval_pipeline.packing)
                  if eval_data is not None else None)
    trainer = Trainer(mesh, train_llama, config.optimizer, config.dtype, eval_llama,
                      config.skip_nonfinite_steps, config.loss_chunk_tokens, config.z_loss)
    if config.load_checkpoint:
        check_checkpoint_fits(config, llama, trainer.state_shapes["params"],
                              config.load_checkpoint,
                              f"load_checkpoint={config.load_checkpoint!r}")
    run_dir, resume_from = run.select_run(config.workdir, config.resume)
    if resume_from is not None:
        check_checkpoint_fits(config, llama, trainer.state_shapes["params"],
                              f"trainstate::{resume_from}",
                              f"the checkpoint to resume, {resume_from} (--resume=false starts "
                              f"a fresh run),")
    settings = LoopSettings(
        total_steps=config.total_steps, log_freq=config.train_log_freq,
        eval_freq=config.eval_freq, eval_steps=config.eval_steps,
        save_model_freq=config.save_model_freq, save_milestone_freq=config.save_milestone_freq,
        peak_flops_per_device=config.peak_flops_per_device or None,
        profile_steps=parse_profile_steps(config.profile_steps, config.total_steps),
        profile_dir=os.path.join(run_dir, "profile"))
    return run.train(
        trainer, llama, train_data, settings, run_dir=run_dir, resume_from=resume_from,
        start=run.StartFrom(config.load_checkpoint, config.load_dataset_state, config.seed),
        run_config=config.flatten(), logging_config=config.logging,
        checkpointer_config=config.checkpointer, eval_data=eval_data,
        log_all_worker=config.log_all_worker)
