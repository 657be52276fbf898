"""Checkpoints on orbax: model parameters with their config, train checkpoints of a run, and
``load_checkpoint`` specs.

Layout of a checkpoint directory ``PATH``::

    PATH/llama_config.json   the model config (LLaMAConfig fields)
    PATH/params/             orbax PyTree of the Flax variables {"params": ...}   (params::)
    PATH/state/              orbax PyTree of the whole train state               (trainstate::)
    PATH/metadata.json       train checkpoints: step, milestone flag, resolved run config
    PATH/dataset_<p>.json    train checkpoints: data-pipeline state of process p

A run keeps its train checkpoints as ``RUN/checkpoints/step_<N>/`` (see :class:`TrainCheckpointer`);
:mod:`EasyLM.run_dirs` names and lists runs and their checkpoints.

``load_checkpoint`` strings name what to load: ``trainstate::PATH`` the whole train state
(resume everything), ``params::PATH`` the weights only.  For weights, ``PATH`` may hold either
layout: a converted model's ``params/`` or a run's train checkpoint (``state/``), so
``params::RUN/checkpoints/step_<N>`` starts from (or evaluates, or exports) that step's weights.
A bare ``PATH`` means ``params::PATH``; ``trainstate_params::PATH`` (from the original FoT
configs) is the same.
"""
import json
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from EasyLM.config import ConfigDict, Option
from EasyLM.models.llama.llama_model import LLaMAConfig
from EasyLM.run_dirs import (PARAMS_ITEM, STATE_ITEM, is_complete, list_train_checkpoints,
                             newest_checkpoint_in, train_checkpoint_dir, train_checkpoints_dir)

CONFIG_FILE = "llama_config.json"
METADATA_FILE = "metadata.json"
CHECKPOINT_KINDS = ("params", "trainstate", "trainstate_params")


def parse_checkpoint_spec(spec, key="load_checkpoint"):
    """``'params::PATH'`` -> ``('params', abs PATH)``; a bare ``PATH`` is ``params::PATH``, and
    a run directory or a workdir stands for its newest complete train checkpoint.
    Checks that ``PATH`` holds what the kind needs: a train state for ``trainstate``, weights
    in either layout otherwise."""
    kind, sep, path = str(spec).partition("::")
    if not sep:
        kind, path = "params", kind
    if kind not in CHECKPOINT_KINDS or not path:
        raise ValueError(f"{key}={spec!r}: expected a checkpoint directory, optionally "
                         f"prefixed by one of {', '.join(k + '::' for k in CHECKPOINT_KINDS)}")
    if "://" in path:
        return kind, path
    path = newest_checkpoint_in(os.path.abspath(os.path.expanduser(path)))
    state, params = os.path.join(path, STATE_ITEM), os.path.join(path, PARAMS_ITEM)
    if kind == "trainstate" and not os.path.isdir(state):
        hint = (f"; it holds weights only: use params::{path}" if os.path.isdir(params)
                else "")
        raise FileNotFoundError(f"{key}={spec!r}: no trainstate checkpoint at {path} "
                                f"(expected a directory {state}){hint}")
    if not (os.path.isdir(params) or os.path.isdir(state)):
        raise FileNotFoundError(f"{key}={spec!r}: no {kind} checkpoint at {path} (expected a "
                                f"directory {params} or {state})")
    return kind, path


def _weights_item(kind, path):
    """The orbax item holding the weights: ``params/``, else the train state's ``state/``."""
    if "://" in path:  # not listable here: the kind says which layout it is
        return os.path.join(path, PARAMS_ITEM if kind == "params" else STATE_ITEM)
    params = os.path.join(path, PARAMS_ITEM)
    return params if os.path.isdir(params) else os.path.join(path, STATE_ITEM)


def _stored_params_tree(checkpointer, item):
    """``{"params": metadata tree}`` of an item, which holds the weights or a train state."""
    metadata = checkpointer.metadata(item)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
    return {"params": tree["params"]}


def save_params(path, variables, llama_config):
    """Write ``{"params": ...}`` and the model config under ``path`` (created if needed)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    target = os.path.join(path, PARAMS_ITEM)
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists; choose a new output path")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, variables)
    checkpointer.wait_until_finished()
    llama_config.to_json_file(os.path.join(path, CONFIG_FILE))


def load_llama_config(path):
    """The model config stored in a checkpoint directory."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"checkpoint {path} has no {CONFIG_FILE}")
    with open(config_path) as f:
        return LLaMAConfig.from_dict(json.load(f))


def load_params(spec, shardings=None, key="load_checkpoint"):
    """Flax variables ``{"params": ...}`` of any checkpoint spec (the weights of a train state).

    With ``shardings`` (a tree of ``NamedSharding`` matching the variables) each host reads
    only its shards; without, arrays come back as host numpy arrays.
    """
    item = _weights_item(*parse_checkpoint_spec(spec, key))
    checkpointer = ocp.PyTreeCheckpointer()
    tree = _stored_params_tree(checkpointer, item)
    restore_args = _restore_args(tree, shardings)
    restored = checkpointer.restore(
        item, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                          partial_restore=True))
    return {"params": restored["params"]}


def stored_param_shapes(spec, key="load_checkpoint"):
    """``{'transformer/wte/embedding': shape, ...}`` of a checkpoint's weights, read from its
    metadata: no array is loaded."""
    item = _weights_item(*parse_checkpoint_spec(spec, key))
    return param_shapes(_stored_params_tree(ocp.PyTreeCheckpointer(), item)["params"])


def param_shapes(tree):
    """``{'a/b/kernel': shape}`` of a parameter tree of arrays, ``ShapeDtypeStruct``s or orbax
    array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _restore_args(tree, shardings):
    if shardings is None:
        return jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return jax.tree_util.tree_map(lambda _, s: ocp.ArrayRestoreArgs(sharding=s), tree,
                                  shardings)


def get_default_config(updates=None):
    """``checkpointer.*``: how train checkpoints are kept (when is set by ``save_*_freq``) and
    whether a signal that stops the run saves one (:class:`EasyLM.run.StopSignals`)."""
    config = ConfigDict(
        keep_last=Option(2, "rolling (non-milestone) checkpoints kept; older ones are deleted "
                         "once a newer one is complete; 0 keeps every checkpoint"),
        async_save=Option(True, "write in a background thread after copying the state to host "
                          "memory"),
        save_on_signal=Option(True, "on SIGTERM or SIGINT, finish the step, save a checkpoint "
                              "at it and exit (a second signal exits at once, keeping the last "
                              "complete checkpoint); false exits after the step without saving"),
    )
    return config.copy_and_update(updates)


def dataset_state_file(process_index):
    return f"dataset_{process_index}.json"


def read_metadata(step_dir):
    with open(os.path.join(step_dir, METADATA_FILE)) as f:
        return json.load(f)


def load_dataset_state(step_dir, process_index=0):
    """The data-pipeline state process ``process_index`` saved with a checkpoint, or ``None``."""
    path = os.path.join(step_dir, dataset_state_file(process_index))
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def restore_train_state(step_dir, abstract_state):
    """The train state of a checkpoint, placed as ``abstract_state`` (``ShapeDtypeStruct``s with
    shardings) says; each host reads only its shards."""
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    return checkpointer.restore(os.path.join(os.path.abspath(step_dir), STATE_ITEM),
                                args=ocp.args.StandardRestore(abstract_state))


def write_json(path, value):
    # Write-then-rename, so a reader never sees half a file.
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


class TrainCheckpointer:
    """Saves train checkpoints of one run without stalling training, and prunes old ones.

    ``save`` copies the state to host memory and returns while orbax writes it in the
    background; the next ``save`` (or ``wait``) waits for that write first. A save that is
    killed half-way leaves only a temporary directory, never touches earlier checkpoints, and
    is removed by the next prune. Milestones are never pruned. All processes call ``save``;
    only process 0 writes the shared files, every process writes its own data-pipeline state.
    """

    def __init__(self, run_dir, config=None, process_index=None):
        config = get_default_config() if config is None else config
        self.run_dir = os.path.abspath(run_dir)
        self.root = train_checkpoints_dir(run_dir)
        self.keep_last = int(config.keep_last)
        self.process_index = jax.process_index() if process_index is None else process_index
        handler = ocp.StandardCheckpointHandler()
        self._checkpointer = (ocp.AsyncCheckpointer(handler) if config.async_save
                              else ocp.Checkpointer(handler))
        self._remove_incomplete()

    def _remove_incomplete(self):
        """Delete what saves killed in an earlier life of this run left behind."""
        if self.process_index == 0 and os.path.isdir(self.root):
            for _, path, ok in list_train_checkpoints(self.run_dir):
                if not ok:
                    _remove(path)
            for name in os.listdir(self.root):
                if name.endswith(".deleting"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("train_checkpointer_cleanup")

    def step_dir(self, step):
        return train_checkpoint_dir(self.run_dir, step)

    def save(self, step, state, llama_config, metadata, dataset_state=None, milestone=False):
        """Start writing checkpoint ``step``; returns its directory."""
        self.wait()
        path = self.step_dir(step)
        if is_complete(path):
            return path
        os.makedirs(path, exist_ok=True)
        if self.process_index == 0:
            llama_config.to_json_file(os.path.join(path, CONFIG_FILE))
            write_json(os.path.join(path, METADATA_FILE),
                        dict(metadata, step=int(step), milestone=bool(milestone),
                             saved_at=time.strftime("%Y-%m-%d %H:%M:%S")))
        if dataset_state is not None:
            write_json(os.path.join(path, dataset_state_file(self.process_index)),
                        dataset_state)
        self._checkpointer.save(os.path.join(path, STATE_ITEM), args=ocp.args.StandardSave(state))
        return path

    def wait(self):
        """Block until the last save is complete, then prune."""
        if hasattr(self._checkpointer, "wait_until_finished"):
            self._checkpointer.wait_until_finished()
        self._prune()

    def close(self):
        self.wait()
        self._checkpointer.close()

    def _prune(self):
        if self.process_index != 0:
            return
        if self.keep_last <= 0:
            return
        rolling = [path for _, path, ok in list_train_checkpoints(self.run_dir)
                   if ok and not read_metadata(path).get("milestone")]
        for path in rolling[:-self.keep_last]:
            _remove(path)


def _remove(path):
    # Renamed first, so a kill during the deletion never leaves a half-deleted checkpoint
    # under a name that looks like a checkpoint.
    doomed = f"{path}.deleting"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
