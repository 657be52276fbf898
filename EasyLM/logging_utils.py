"""Metric aggregation and writers: JSON lines, TensorBoard, optional Weights & Biases, loss plot,
and the console (one readable line per logged step, a progress bar on terminals only).

A run directory receives ``metrics.jsonl`` (one object per logged step, keys such as ``step``,
``train/loss``, ``eval/loss``), ``tensorboard/`` event files and, when the run ends,
``loss_curve.png``.  When a run resumes from a checkpoint at step ``S``, records of steps after
``S`` (written before the interruption, and about to be recomputed) are dropped from
``metrics.jsonl`` and purged from TensorBoard, so every step appears once.

Console lines go to the ``EasyLM`` logger, whose handlers (set up by the training CLI) write
the console and ``train.log``.
"""
import contextlib
import importlib.util
import json
import logging
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from EasyLM.config import ConfigDict, ConfigError, Option

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
log = logging.getLogger("EasyLM")


def get_default_config(updates=None):
    config = ConfigDict(
        tensorboard=Option(True, "write TensorBoard events to RUN/tensorboard/"),
        plot=Option(True, "plot the loss curve to RUN/loss_curve.png when the run ends"),
        wandb=Option(False, "log to Weights & Biases (imported only when enabled)"),
        wandb_project=Option("fot-continued-pretraining", "Weights & Biases project"),
        wandb_entity=Option("", "Weights & Biases entity; '' = your default"),
        wandb_mode=Option("offline", "'online' uploads; 'offline' keeps the run for "
                          "`wandb sync`"),
    )
    return config.copy_and_update(updates)


def validate(config, key="logging"):
    """Writers that cannot work fail as configuration errors, not in the middle of a run."""
    if config.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"{key}.wandb=true needs the wandb package, which requirements.txt "
                          f"does not install: pip install wandb (or set {key}.wandb=false)")


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


def with_prefix_removed(metrics, prefix):
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def to_python(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class MetricsLogger:
    """Writes one record per logged step to every enabled writer; a no-op when disabled
    (processes other than 0, unless ``log_all_worker``)."""

    def __init__(self, log_dir, config=None, enabled=True, resume_step=None, run_config=None,
                 run_name=None):
        self.config = get_default_config() if config is None else config
        validate(self.config)
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

    def outputs(self):
        """What this logger writes, as names inside ``log_dir`` (empty when disabled)."""
        if not self.enabled:
            return []
        names = [METRICS_FILE]
        if self._tensorboard is not None:
            names.append("tensorboard/")
        if self._wandb is not None:
            names.append("wandb/")
        if self.config.plot:
            names.append(PLOT_FILE)
        return names

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


def format_record(step, total_steps, record):
    """One console line for a logged record: losses, learning rate, gradient norm, speed."""
    parts = [f"step {step}/{total_steps}"]

    def add(key, text):
        if key in record:
            parts.append(text.format(record[key]))
    add("train/loss", "loss {:.4f}")
    add("train/accuracy", "acc {:.3f}")
    add("train/z_loss", "z-loss {:.3g}")
    add("eval/loss", "eval loss {:.4f}")
    add("eval/accuracy", "eval acc {:.3f}")
    add("train/learning_rate", "lr {:.2e}")
    add("train/gradient_norm", "grad norm {:.3g}")
    parts += format_throughput(with_prefix_removed(record, "train/"))
    if record.get("train/skipped_steps"):
        add("train/skipped_steps", "{:.0f} non-finite steps skipped")
    return " | ".join(parts)


def format_throughput(timing):
    """``tok/s``, MFU (and TFLOP/s per device when the device's peak is unknown), step time
    and, when it matters, the share of it spent waiting for data."""
    parts = []
    if "tokens_per_second" in timing:
        parts.append(f"{timing['tokens_per_second']:,.0f} tok/s")
    if "mfu" in timing:
        parts.append(f"MFU {100 * timing['mfu']:.3g}%")
    elif "tflops_per_device" in timing:  # the device's peak is unknown
        parts.append(f"{timing['tflops_per_device']:.3g} TFLOP/s/device | MFU n/a")
    if "step_time" in timing:
        parts.append(f"{timing['step_time']:.3g} s/step")
        wait = timing.get("data_wait_time", 0.0) / max(timing["step_time"], 1e-12)
        if wait >= 0.05:  # an input-bound run should say so
            parts.append(f"data wait {wait:.0%}")
    return parts


class ConsoleProgress:
    """A training loop's progress for people: one line per logged record through the
    ``EasyLM`` logger (console and ``train.log``) and a summary at the end.

    A tqdm bar is shown only when stderr is a terminal, with the log lines printed above it:
    in a redirected log (batch jobs) a bar is one endless ``\\r``-joined line with every
    warning glued onto it."""

    def __init__(self, start_step, total_steps, show_bar=True):
        self.start_step, self.total_steps = start_step, total_steps
        self.show_bar = show_bar and sys.stderr.isatty()
        self.last = {}  # "train" / "eval" -> (step, metrics without the prefix)
        self._bar = None
        self._stack = contextlib.ExitStack()
        self._started = time.perf_counter()

    def __enter__(self):
        if self.show_bar:
            self._stack.enter_context(logging_redirect_tqdm([log]))
            self._bar = self._stack.enter_context(tqdm(
                initial=self.start_step, total=self.total_steps, dynamic_ncols=True,
                desc="train"))
        return self

    def __exit__(self, *error):
        self._stack.close()
        self._bar = None

    def advance(self):
        if self._bar is not None:
            self._bar.update(1)

    def record(self, step, record, note=""):
        if not record:
            return
        for split in ("train", "eval"):
            if f"{split}/loss" in record:
                self.last[split] = (step, with_prefix_removed(record, f"{split}/"))
        log.info("%s%s", format_record(step, self.total_steps, record), note)
        if self._bar is not None and "train/loss" in record:
            self._bar.set_postfix(loss=f"{record['train/loss']:.4f}", refresh=False)

    def summary(self, step, throughput=None, throughput_steps=None, outputs=()):
        """Log where the run ended, its last losses, its throughput (timing metrics over the
        steps ``throughput_steps = (first, last)``) and the paths of its ``outputs``."""
        if step == self.start_step:
            log.info("nothing to train: the state is at step %d of %d", step, self.total_steps)
        else:
            log.info("finished steps %d-%d of %d in %s", self.start_step + 1, step,
                     self.total_steps, _duration(time.perf_counter() - self._started))
        losses = [f"final {split} loss {self.last[split][1]['loss']:.4f} "
                  f"(acc {self.last[split][1]['accuracy']:.3f}) at step {self.last[split][0]}"
                  for split in ("train", "eval") if split in self.last]
        if losses:
            log.info("%s", " | ".join(losses))
        if throughput:
            first, last = throughput_steps
            compiled = "" if first > self.start_step + 1 else ", compilation included"
            hint = "" if "mfu" in throughput else "; set peak_flops_per_device for MFU"
            log.info("throughput %s (steps %d-%d%s%s)",
                     " | ".join(format_throughput(throughput)), first, last, compiled, hint)
        paths = [h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)]
        paths += [os.path.abspath(p) for p in outputs]
        if paths:
            root = os.path.commonpath(paths)
            root = root if len(paths) > 1 else os.path.dirname(root)
            names = [os.path.relpath(p, root) + ("/" if os.path.isdir(p) else "") for p in paths]
            log.info("outputs in %s: %s", root, ", ".join(names))


def _duration(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
