"""Where runs and their checkpoints lie on disk: naming a new run directory, listing the runs
of a workdir and the train checkpoints of a run, and finding the newest complete one.

A workdir holds run directories named by their start time, ``<YYYY-mm-dd_HH-MM-SS>[_<n>]``;
a run keeps its train checkpoints as ``RUN/checkpoints/step_<N>/``.  A checkpoint directory
holds its weights in ``params/`` (converted models) or its whole train state in ``state/``
(train checkpoints); what else it holds and how it is read is :mod:`EasyLM.checkpoint`'s.
Run directories are POSIX paths (for a multi-host run, one that every host sees: NFS, Lustre,
or a gcsfuse mount of a bucket).
"""
import os
import re
import time

PARAMS_ITEM = "params"
STATE_ITEM = "state"
TRAIN_CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
RUN_NAME_FORMAT = "%Y-%m-%d_%H-%M-%S"
_RUN_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(?:_(\d+))?$")


def train_checkpoints_dir(run_dir):
    return os.path.join(os.path.abspath(run_dir), TRAIN_CHECKPOINTS_DIR)


def train_checkpoint_dir(run_dir, step):
    return os.path.join(train_checkpoints_dir(run_dir), f"step_{int(step)}")


def is_complete(step_dir):
    """Whether a train checkpoint finished writing.

    Orbax writes the state into a temporary directory and renames it to ``state`` when every
    process is done; the small JSON files are written before the state, so a finished state
    means a usable checkpoint.
    """
    return os.path.isdir(os.path.join(step_dir, STATE_ITEM))


def list_train_checkpoints(run_dir):
    """``[(step, path, complete)]`` of ``run_dir/checkpoints/step_<N>``, by step."""
    root = os.path.join(run_dir, TRAIN_CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match:
            path = os.path.join(root, name)
            found.append((int(match.group(1)), path, is_complete(path)))
    return sorted(found)


def latest_train_checkpoint(run_dir):
    """Path of the newest complete train checkpoint of a run, or ``None``."""
    complete = [path for _, path, ok in list_train_checkpoints(run_dir) if ok]
    return complete[-1] if complete else None


def _run_order(name):
    match = _RUN_NAME.match(name)
    return name[:19], int(match.group(1) or 0)


def list_runs(workdir):
    """Time-stamped run directories under ``workdir``, oldest first, as absolute paths (orbax
    refuses relative ones, and a relative ``workdir`` is the default)."""
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        return []
    names = [n for n in os.listdir(workdir)
             if _RUN_NAME.match(n) and os.path.isdir(os.path.join(workdir, n))]
    return [os.path.join(workdir, n) for n in sorted(names, key=_run_order)]


def find_resumable_run(workdir):
    """``(run_dir, checkpoint)`` of the newest run under ``workdir`` that has a complete train
    checkpoint (its newest), or ``(None, None)``."""
    for run_dir in reversed(list_runs(workdir)):
        checkpoint = latest_train_checkpoint(run_dir)
        if checkpoint is not None:
            return run_dir, checkpoint
    return None, None


def new_run_dir(workdir, now=None):
    """A fresh ``workdir/<YYYY-mm-dd_HH-MM-SS>[_<n>]`` name (not created)."""
    base = time.strftime(RUN_NAME_FORMAT, time.localtime(now))
    name, n = base, 0
    while os.path.exists(os.path.join(workdir, name)):
        n += 1
        name = f"{base}_{n}"
    return os.path.join(os.path.abspath(workdir), name)


def newest_checkpoint_in(path):
    """``path`` itself when it is a checkpoint (or nothing is there); else the newest complete
    train checkpoint of the run directory, or of the newest run of the workdir, it names."""
    if any(os.path.isdir(os.path.join(path, item)) for item in (STATE_ITEM, PARAMS_ITEM)):
        return path
    return latest_train_checkpoint(path) or find_resumable_run(path)[1] or path
