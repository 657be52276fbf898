"""Checkpoints on orbax: model parameters with their config, and ``load_checkpoint`` specs.

Layout of a checkpoint directory ``PATH``::

    PATH/llama_config.json   the model config (LLaMAConfig fields)
    PATH/params/             orbax PyTree of the Flax variables {"params": ...}   (params::)
    PATH/state/              orbax PyTree of the whole train state               (trainstate::)

``load_checkpoint`` strings name what to load: ``params::PATH`` starts from weights (e.g. a
converted Hugging Face model), ``trainstate::PATH`` resumes everything, and
``trainstate_params::PATH`` takes only the weights out of a training checkpoint.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "llama_config.json"
PARAMS_ITEM = "params"
STATE_ITEM = "state"
CHECKPOINT_KINDS = ("params", "trainstate", "trainstate_params")


def parse_checkpoint_spec(spec, key="load_checkpoint"):
    """``'params::PATH'`` -> ``('params', abs PATH)``, checking that the checkpoint exists."""
    kind, sep, path = str(spec).partition("::")
    if not sep or kind not in CHECKPOINT_KINDS:
        raise ValueError(f"{key}={spec!r}: expected one of "
                         f"{', '.join(k + '::PATH' for k in CHECKPOINT_KINDS)}")
    path = os.path.abspath(os.path.expanduser(path)) if "://" not in path else path
    item = PARAMS_ITEM if kind == "params" else STATE_ITEM
    if "://" not in path and not os.path.isdir(os.path.join(path, item)):
        raise FileNotFoundError(f"{key}={spec!r}: no {kind} checkpoint at {path} "
                                f"(expected a directory {os.path.join(path, item)})")
    return kind, path


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
    from EasyLM.models.llama.llama_model import LLaMAConfig
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"checkpoint {path} has no {CONFIG_FILE}")
    with open(config_path) as f:
        return LLaMAConfig.from_dict(json.load(f))


def load_params(spec, shardings=None, key="load_checkpoint"):
    """Flax variables ``{"params": ...}`` from a ``params::`` or ``trainstate*::`` spec.

    With ``shardings`` (a tree of ``NamedSharding`` matching the variables) each host reads
    only its shards; without, arrays come back as host numpy arrays.
    """
    kind, path = parse_checkpoint_spec(spec, key)
    checkpointer = ocp.PyTreeCheckpointer()
    item = os.path.join(path, PARAMS_ITEM if kind == "params" else STATE_ITEM)
    metadata = checkpointer.metadata(item)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
    if kind != "params":
        tree = {"params": tree["params"]}
    restore_args = _restore_args(tree, shardings)
    restored = checkpointer.restore(
        item, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                          partial_restore=True))
    return {"params": restored["params"]}


def _restore_args(tree, shardings):
    if shardings is None:
        return jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return jax.tree_util.tree_map(lambda _, s: ocp.ArrayRestoreArgs(sharding=s), tree,
                                  shardings)
