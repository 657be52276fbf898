"""Metric aggregation and writers: JSON lines, TensorBoard, optional Weights & Biases, loss plot.

A run directory receives ``metrics.jsonl`` (one object per logged step, keys such as ``step``,
``train/loss``, ``eval/loss``), ``tensorboard/`` event files and, when the run ends,
``loss_curve.png``.  When a run resumes from a checkpoint at step ``S``, records of steps after
``S`` (written before the interruption, and about to be recomputed) are dropped from
``metrics.jsonl`` and purged from TensorBoard, so every step appears once.
"""
import json
import logging
import os

import jax
import numpy as np

from EasyLM.config import ConfigDict

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
log = logging.getLogger("EasyLM")


def get_default_config(updates=None):
    config = ConfigDict(
        tensorboard=True,
        plot=True,
        wandb=False,  # imported only when enabled
        wandb_project="fot-continued-pretraining",
        wandb_entity="",
        wandb_mode="offline",  # "online" uploads; "offline" keeps the run for `wandb sync`
    )
    return config.copy_and_update(updates)


class WindowAggregator:
    """Collects per-step metric dicts (device arrays) and reduces them at log time.

    Keeping device arrays until a log step avoids a host sync per step. Keys in ``latest`` keep
    their last value (e.g. the learning rate); all others are averaged over the window.
    """

    def __init__(self, latest=()):
        self.latest = set(latest)
        self._items = []

    def add(self, metrics):
        self._items.append(metrics)

    def __len__(self):
        return len(self._items)

    def reduce(self):
        items = jax.device_get(self._items)
        self._items = []
        if not items:
            return {}
        out = {}
        for key in items[0]:
            values = [np.asarray(m[key], np.float64) for m in items]
            out[key] = float(values[-1] if key in self.latest else np.mean(values))
        return out


def with_prefix(metrics, prefix):
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def to_python(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class MetricsLogger:
    """Writes one record per logged step to every enabled writer; a no-op when disabled
    (processes other than 0, unless ``log_all_worker``)."""

    def __init__(self, log_dir, config=None, enabled=True, resume_step=None, run_config=None,
                 run_name=None):
        self.config = get_default_config() if config is None else config
        self.enabled = enabled
        self.log_dir = log_dir
        self._tensorboard = self._wandb = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, METRICS_FILE)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        if self.config.tensorboard:
            self._tensorboard = _tensorboard_writer(log_dir, resume_step)
        if self.config.wandb:
            import wandb
            run_name = run_name or os.path.basename(os.path.abspath(log_dir))
            self._wandb = wandb.init(
                project=self.config.wandb_project, entity=self.config.wandb_entity or None,
                mode=self.config.wandb_mode, dir=log_dir, name=run_name, id=run_name,
                resume="allow", config=run_config)

    def _truncate_after(self, step):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step, metrics):
        if not self.enabled or not metrics:
            return
        record = {"step": int(step)}
        record.update({k: to_python(v) for k, v in sorted(metrics.items())})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and np.ndim(v) == 0}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def close(self):
        if not self.enabled:
            return
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.config.plot:
            plot_losses(self.path, os.path.join(self.log_dir, PLOT_FILE))


def _tensorboard_writer(log_dir, resume_step):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        log.warning("tensorboardX is not installed; no TensorBoard events written "
                    "(metrics.jsonl has every record)")
        return None
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(os.path.join(log_dir, "tensorboard"), purge_step=purge)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path, output_path):
    """Train (and eval, when present) loss against step as a PNG; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss plot written")
        return None
    records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in ("train/loss", "eval/loss"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axis.plot(*zip(*points), label=key, marker="." if len(points) < 50 else None)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_path, dpi=100)
    plt.close(figure)
    return output_path
