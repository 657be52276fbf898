"""Flags of a FoT continued-pretraining run, their validation, and ``main``: config -> library.

Use it through ``python -m running_utils.runner --config configs/X.json`` (JSON of the dotted
flag names below), or call :func:`main` with a config from :func:`get_default_config`.
The maths lives in :mod:`EasyLM.trainer`; this file only checks the flags and wires the parts.
"""
import ast
import json
import logging
import os
import sys

import jax

from EasyLM import checkpoint, logging_utils, optimizers
from EasyLM import tokenizer as tokenizer_lib
from EasyLM.config import ConfigDict, ConfigError, Option, check_ranges
from EasyLM.data import DatasetFactory
from EasyLM.jax_utils import float_dtype, get_jax_mesh, parse_mesh_dim
from EasyLM.legacy_keys import translate_model_fields
from EasyLM.losses import DEFAULT_LOSS_CHUNK_TOKENS
from EasyLM.models.llama.llama_model import LLaMAConfig, with_cross_batch
from EasyLM.trainer import Checkpointing, LoopSettings, Trainer, data_split, fit
from FoT.data_pipeline import dataset_packing_for

log = logging.getLogger("EasyLM")
log.propagate = False  # our own handlers; a root handler would print each line twice


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
        update_llama_config=Option("", "JSON object (or Python dict literal) of LLaMAConfig "
                                   "overrides, e.g. '{\"remat_block\": \"nothing_saveable\"}'"),
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
        peak_flops_per_device=Option(0.0, "peak FLOP/s of one device, for MFU; 0 = look the "
                                     "device up in the trainer's table"),
        train_cross_batch_range=Option(1, "FoT cross-batch range C of the train model: memory "
                                       "layers also attend to the C previous rows of the "
                                       "batch; 0 = local context only"),
        train_cross_batch_stepping=Option(True, "with doc_aware_kN data, a document's later rows "
                                          "see more of the C slots than its first (as in "
                                          "FoT); false: every row sees all C"),
        eval_cross_batch_range=Option(0, "cross-batch range C of the eval model"),
        eval_cross_batch_stepping=Option(True, "cross-batch stepping of the eval model"),
        flip_sharding_in_cross_batch=Option(False, "shard heads instead of rows inside "
                                            "cross-batch attention"),
        scan_cross_batch=Option(False, "blockwise cross-batch attention (bounded score memory) "
                                "instead of the default kernel"),
        loss_chunk_tokens=Option(DEFAULT_LOSS_CHUNK_TOKENS, "the loss runs over slices of at "
                                 "most this many tokens of the global batch, without full "
                                 "logits; 0 = full logits (faster, more memory)"),
        tokenizer=tokenizer_lib.get_default_config(),
        train_dataset=DatasetFactory.get_default_config(),
        eval_dataset=DatasetFactory.get_default_config(),
        optimizer=optimizers.get_default_config(),
        checkpointer=checkpoint.get_default_config(),
        logging=logging_utils.get_default_config(),
    )
    return config.copy_and_update(updates)


def parse_llama_overrides(text, key="update_llama_config"):
    """``'{"vocab_size": 512}'``, ``"{'vocab_size': 512}"`` or ``"dict(vocab_size=512)"``;
    fields of the original LLaMA config translated (:mod:`EasyLM.legacy_keys`)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            node = ast.parse(text, mode="eval").body
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict"
                    and not node.args):
                value = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            else:
                value = ast.literal_eval(node)
        except (SyntaxError, ValueError):
            raise ConfigError(f"{key}={text!r}: expected a JSON object such as "
                              f'{{"vocab_size": 32000}}') from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={text!r}: expected a JSON object of LLaMAConfig fields")
    return translate_model_fields(value, key)


def _dataset_source(config, name):
    dataset = config[name]
    key = f"{name}.type"
    if dataset.type not in ("json", "huggingface"):
        raise ConfigError(f"{key}={dataset.type!r}: use 'json' or 'huggingface'")
    return dataset[f"{dataset.type}_dataset"], f"{name}.{dataset.type}_dataset"


def _check_dataset(config, name, shards, mesh_key, micro_batches=1):
    source, prefix = _dataset_source(config, name)
    check_ranges(source, f"{prefix}.", seq_length=">= 1", batch_size=">= 1",
                 min_example_length=">= 0", tokenizer_processes=">= 1",
                 tokenizer_parallel_chunk_size=">= 1", tokenizer_parallel_batch_size=">= 1",
                 throughput_average_window_size=">= 1")
    try:
        packing = dataset_packing_for(source.data_pipeline)
    except ValueError as error:
        raise ConfigError(f"{prefix}.data_pipeline: {error}") from None
    batch = source.batch_size
    if batch % packing:
        raise ConfigError(f"{prefix}.batch_size={batch} is not divisible by the packing factor "
                          f"{packing} of {prefix}.data_pipeline={source.data_pipeline!r}")
    if batch % shards:
        raise ConfigError(f"{prefix}.batch_size={batch} is not divisible by the {shards} "
                          f"data-parallel shards (dp x fsdp) of {mesh_key}")
    if micro_batches > 1:
        key = "optimizer.accumulate_gradient_steps"
        micro = batch // micro_batches
        if batch % micro_batches or micro % packing or micro % shards:
            raise ConfigError(
                f"{key}={micro_batches}: micro-batches of {prefix}.batch_size={batch} must be "
                f"whole multiples of dataset_packing={packing} rows and of the {shards} "
                f"data-parallel shards")


def validate(config):
    """Checks that need no model, data or device work: fail in the first second."""
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
                 train_cross_batch_range=">= 0", eval_cross_batch_range=">= 0",
                 loss_chunk_tokens=">= 0", peak_flops_per_device=">= 0")
    check_ranges(config.checkpointer, "checkpointer.", keep_last=">= 0")
    shards = dims[0] * dims[1]
    mesh_key = f"mesh_dim={config.mesh_dim!r}"
    _check_dataset(config, "train_dataset", shards, mesh_key,
                   config.optimizer.accumulate_gradient_steps)
    if config.eval_steps > 0:
        _check_dataset(config, "eval_dataset", shards, mesh_key)
    if config.load_checkpoint:
        try:
            checkpoint.parse_checkpoint_spec(config.load_checkpoint)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None
    if config.load_dataset_state:
        path = _dataset_state_path(config.load_dataset_state)
        if not os.path.exists(path):
            raise ConfigError(f"load_dataset_state={config.load_dataset_state!r}: {path} does "
                              f"not exist")
    parse_llama_overrides(config.update_llama_config)


def _dataset_state_path(template):
    return template.replace("{process_index}", str(jax.process_index()))


def build_llama_config(config, tokenizer):
    """The model config: named / file config or the checkpoint's, overrides, tokenizer ids."""
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
    llama = llama.replace(scan_cross_batch=config.scan_cross_batch,
                          flip_sharding_in_cross_batch=config.flip_sharding_in_cross_batch, **ids)
    if llama.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"vocab_size {llama.vocab_size} of the model (load_llama_config / "
                          f"update_llama_config) is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} (tokenizer.vocab_file); set "
                          f'update_llama_config=\'{{"vocab_size": {tokenizer.vocab_size}}}\'')
    return llama


# The LLaMAConfig fields that decide the parameter shapes.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


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


def _agree(text):
    """Process 0's ``text`` on every process (run directories are named by its clock)."""
    if jax.process_count() == 1:
        return text
    import numpy as np
    from jax.experimental import multihost_utils
    data = np.zeros(4096, np.uint8)
    raw = text.encode()
    data[:len(raw)] = np.frombuffer(raw, np.uint8)
    data = multihost_utils.broadcast_one_to_all(data)
    return bytes(np.asarray(data)).rstrip(b"\0").decode()


def select_run(config):
    """``(run_dir, checkpoint to resume or None)``, the same on every process."""
    choice = ""
    if jax.process_index() == 0:
        run_dir, resume_from = (checkpoint.find_resumable_run(config.workdir) if config.resume
                                else (None, None))
        if run_dir is None:
            run_dir = checkpoint.new_run_dir(config.workdir)
            os.makedirs(run_dir)
        choice = json.dumps([run_dir, resume_from])
    run_dir, resume_from = json.loads(_agree(choice))
    return run_dir, resume_from


def _setup_logging(log_dir, enabled):
    log.setLevel(logging.INFO)
    log.handlers.clear()
    if not enabled:
        return
    os.makedirs(log_dir, exist_ok=True)
    formatter = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s")
    for handler in (logging.StreamHandler(), logging.FileHandler(os.path.join(log_dir,
                                                                              "train.log"))):
        handler.setFormatter(formatter)
        log.addHandler(handler)


def _log_failure():
    """The exception being handled, with its traceback, into the log files only: Python prints
    it on the console as it leaves ``main``, and train.log should say how the run ended."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "run stopped by an exception",
                            (), sys.exc_info())
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _already_finished(resume_from, total_steps):
    """Whether the run to resume reached ``total_steps``; if so, says how to extend it."""
    step = checkpoint.read_metadata(resume_from)["step"]
    if step < total_steps:
        return False
    log.info("nothing to train: the newest run's last checkpoint %s is at step %d and "
             "total_steps=%d. To train further, raise total_steps (e.g. --total_steps=%d) and "
             "run the same command again; --resume=false starts a fresh run.",
             resume_from, step, total_steps, 2 * step)
    return True


def initial_state(trainer, config, resume_from):
    """``(train state, train data-pipeline state or None)``: resume, load, or initialise."""
    dataset_state = None
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
        state = checkpoint.restore_train_state(resume_from, trainer.abstract_state())
        return state, checkpoint.load_dataset_state(resume_from, jax.process_index())
    if config.load_checkpoint:
        kind, path = checkpoint.parse_checkpoint_spec(config.load_checkpoint)
        log.info("loading %s", config.load_checkpoint)
        if kind == "trainstate":
            state = checkpoint.restore_train_state(path, trainer.abstract_state())
            dataset_state = checkpoint.load_dataset_state(path, jax.process_index())
        else:
            state = trainer.state_from_params(
                checkpoint.load_params(config.load_checkpoint, trainer.params_shardings))
    else:
        state = trainer.init_state(config.seed)
    if config.load_dataset_state:
        with open(_dataset_state_path(config.load_dataset_state)) as f:
            dataset_state = json.load(f)
    return state, dataset_state


def main(config):
    """Run training as ``config`` (see :func:`get_default_config`) says; returns the run dir."""
    validate(config)
    mesh = get_jax_mesh(config.mesh_dim)
    tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer)
    index, count = data_split(mesh)
    train_data = DatasetFactory.load_dataset(config.train_dataset, tokenizer, index, count,
                                             name="train_dataset")
    eval_data = None
    if config.eval_steps > 0:
        eval_data = DatasetFactory.load_dataset(config.eval_dataset, tokenizer, index, count,
                                                name="eval_dataset")
    llama = build_llama_config(config, tokenizer)
    train_llama = with_cross_batch(llama, config.train_cross_batch_range,
                                   config.train_cross_batch_stepping, train_data.dataset_packing)
    eval_llama = (with_cross_batch(llama, config.eval_cross_batch_range,
                                   config.eval_cross_batch_stepping, eval_data.dataset_packing)
                  if eval_data is not None else None)
    trainer = Trainer(mesh, train_llama, config.optimizer, config.dtype, eval_llama,
                      config.skip_nonfinite_steps, config.loss_chunk_tokens)
    if config.load_checkpoint:
        check_checkpoint_fits(config, llama, trainer.state_shapes["params"],
                              config.load_checkpoint,
                              f"load_checkpoint={config.load_checkpoint!r}")

    run_dir, resume_from = select_run(config)
    if resume_from is not None:
        check_checkpoint_fits(config, llama, trainer.state_shapes["params"],
                              f"trainstate::{resume_from}",
                              f"the checkpoint to resume, {resume_from} (--resume=false starts "
                              f"a fresh run),")
    writes = config.log_all_worker or jax.process_index() == 0
    log_dir = run_dir if jax.process_index() == 0 else os.path.join(
        run_dir, f"worker_{jax.process_index()}")
    _setup_logging(log_dir, writes)
    try:
        if resume_from is not None and _already_finished(resume_from, config.total_steps):
            return run_dir
        flat = config.flatten()
        if jax.process_index() == 0:
            checkpoint.write_json(os.path.join(run_dir, "config.json"), flat)
        log.info("run directory %s (%d processes, %d devices, mesh %s)", run_dir,
                 jax.process_count(), jax.device_count(), dict(mesh.shape))
        with jax.set_mesh(mesh):
            state, dataset_state = initial_state(trainer, config, resume_from)
            if dataset_state is not None:
                train_data.load_state_dict(dataset_state)
            start = int(jax.device_get(state["step"]))
            logger = logging_utils.MetricsLogger(
                log_dir, config.logging, enabled=writes,
                resume_step=start if resume_from is not None else None, run_config=flat)
            checkpointer = checkpoint.TrainCheckpointer(run_dir, config.checkpointer)
            settings = LoopSettings(
                total_steps=config.total_steps, log_freq=config.train_log_freq,
                eval_freq=config.eval_freq, eval_steps=config.eval_steps,
                save_model_freq=config.save_model_freq,
                save_milestone_freq=config.save_milestone_freq,
                peak_flops_per_device=config.peak_flops_per_device or None,
                show_progress=writes)
            # train_seq_length: the default window of inference on the checkpoint.
            saving = Checkpointing(checkpointer, llama,
                                   lambda: {"config": flat, "run_dir": run_dir,
                                            "train_seq_length": train_data.seq_length})
            try:
                fit(trainer, state, train_data, settings, logger, eval_data, saving)
            finally:
                checkpointer.close()
                logger.close()
    except BaseException:
        _log_failure()
        raise
    return run_dir
