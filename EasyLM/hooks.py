"""Hooks of the training loop (:func:`EasyLM.trainer.fit`): the work done between steps, each
at its own frequency, as levanter's trainer hooks are.

The loop calls :meth:`Hook.start` of every hook before the first step, then after each step
the hooks whose :meth:`Hook.due` says so, both in the order the hooks were registered, and
:meth:`Hook.end` after the last step in reverse order (so the checkpoints are complete before
the logging hook's summary names them).  The hooks of one step share its :class:`StepInfo`:
what a hook puts in ``info.record`` is logged at that step, in one record with the others'.

:func:`EasyLM.trainer.fit` registers, in this order:

- :class:`TrainMetrics`: train metrics averaged over windows of steps, with their throughput;
- :class:`Evaluation`: eval loss and accuracy at step 0 of a fresh run and every ``eval_freq``
  steps;
- the caller's own hooks;
- :class:`LogRecords`: each step's record to the metrics files (JSON lines, TensorBoard,
  Weights & Biases) and as a console line, and the run's summary;
- :class:`SaveCheckpoints`: rolling and milestone checkpoints and the one of the last step;
- :class:`ProfileSteps`, when ``profile_steps`` is set: a ``jax.profiler`` trace of a range of
  steps.
"""
import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from EasyLM.logging_utils import WindowAggregator, with_prefix

# Metrics whose last value in a logging window is reported (the others are averaged).
LATEST_METRICS = ("learning_rate", "param_norm", "skipped_steps")


@dataclasses.dataclass
class StepInfo:
    """What the hooks of a step see (before the first step: the start step, no metrics)."""
    step: int  # updates done
    total_steps: int
    state: Any  # the train state after the step
    metrics: Optional[dict] = None  # the step's train metrics, device arrays
    data_metrics: dict = dataclasses.field(default_factory=dict)
    began: float = 0.0  # time.perf_counter() when the step started waiting for its batch
    data_wait: float = 0.0  # seconds it waited
    stopping: bool = False  # the run stops after this step for a signal
    pausing: bool = False  # a due hook pauses training (evaluates, saves)
    record: dict = dataclasses.field(default_factory=dict)  # logged at this step
    note: str = ""  # appended to this step's console line
    outputs: list = dataclasses.field(default_factory=list)  # at the end: paths the run wrote

    @property
    def last(self):
        return self.step == self.total_steps


class Hook:
    """Work the loop does between steps: after every ``every``-th step (0: none), unless
    :meth:`due` says otherwise.  A hook that ``pauses_training`` (evaluating, saving) makes
    the loop log the train metrics of the steps before it, so that step timings never
    include it."""
    every = 0
    pauses_training = False

    def due(self, info):
        return self.every > 0 and info.step % self.every == 0

    def start(self, info):
        """Before the first step."""

    def __call__(self, info):
        """After a step it is due at."""

    def end(self, info):
        """After the last step, or the step the run stops at (``info.stopping``)."""


class TrainMetrics(Hook):
    """Train metrics and throughput of windows of steps, put in the record when a window
    closes: every ``every`` steps, at the last step, at a stop and before a hook that pauses
    training.  Cutting the windows there keeps evaluation and saving out of the step timings
    and keeps a resumed run's records identical to an uninterrupted one's."""

    def __init__(self, every, step_flops, peak_flops, tokens_per_step):
        self.every = every
        self.step_flops, self.peak_flops = step_flops, peak_flops
        self.tokens_per_step = tokens_per_step
        self.windows = []  # (last step, steps, seconds, data wait) of each closed window
        self._metrics = WindowAggregator(latest=LATEST_METRICS)
        self._began, self._data_wait = None, 0.0

    def due(self, info):
        return True  # every step's metrics go into its window

    def __call__(self, info):
        if self._began is None:
            self._began = info.began
        self._metrics.add(info.metrics)
        self._data_wait += info.data_wait
        if info.step % self.every and not (info.last or info.stopping or info.pausing):
            return
        steps = len(self._metrics)
        train = self._metrics.reduce()
        elapsed = time.perf_counter() - self._began
        self.windows.append((info.step, steps, elapsed, self._data_wait))
        train.update(self.throughput(steps, elapsed, self._data_wait))
        info.record.update(with_prefix(train, "train"))
        info.record.update(with_prefix(info.data_metrics, "train/dataset"))
        if len(self.windows) == 1:
            info.note = " (timings include compilation)"
        # The next window starts when the next step waits for its batch: after this step's
        # evaluation and save.
        self._began, self._data_wait = None, 0.0

    def throughput(self, steps, elapsed, data_wait):
        """Timing metrics of ``steps`` steps that took ``elapsed`` seconds."""
        out = {"step_time": elapsed / steps, "data_wait_time": data_wait / steps,
               "tokens_per_second": self.tokens_per_step * steps / elapsed,
               "tflops_per_device": (self.step_flops * steps / elapsed / jax.device_count()
                                     / 1e12)}
        if self.peak_flops:
            out["mfu"] = self.step_flops * steps / elapsed / (jax.device_count()
                                                               * self.peak_flops)
        return out

    def run_throughput(self):
        """``(timing metrics, (first step, last step))`` over the windows after the first,
        which includes compilation (over that one when it is the only one); ``(None, None)``
        without windows."""
        timed = self.windows[1:] or self.windows
        if not timed:
            return None, None
        steps, elapsed, data_wait = (sum(w[i] for w in timed) for i in (1, 2, 3))
        first = timed[0][0] - timed[0][1] + 1
        return self.throughput(steps, elapsed, data_wait), (first, timed[-1][0])


def evaluate(trainer, state, eval_data, eval_steps, start_state):
    """Token-weighted eval loss/accuracy over the first ``eval_steps`` batches of the eval data
    (restarted from ``start_state`` each time, so every evaluation sees the same tokens)."""
    eval_data.load_state_dict(start_state)
    iterator = iter(eval_data)
    totals, data_metrics = [], {}
    for _ in range(eval_steps):
        batch, data_metrics = next(iterator)
        totals.append(trainer.eval_step(state["params"],
                                        trainer.global_batch(batch, eval_data.batch_size)))
    totals = jax.tree_util.tree_map(lambda *x: float(np.sum(x)), *jax.device_get(totals))
    count = max(totals["count"], 1.0)
    out = {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count,
           "tokens": totals["count"]}
    out.update(with_prefix(data_metrics, "dataset"))
    return with_prefix(out, "eval")


class Evaluation(Hook):
    """:func:`evaluate` at step 0 of a fresh run and every ``every`` steps, into the record."""
    pauses_training = True

    def __init__(self, trainer, eval_data, every, eval_steps):
        self.trainer, self.eval_data = trainer, eval_data
        self.every, self.eval_steps = every, eval_steps
        self.start_state = eval_data.get_state_dict()

    def start(self, info):
        if info.step == 0:
            self(info)

    def __call__(self, info):
        info.record.update(evaluate(self.trainer, info.state, self.eval_data, self.eval_steps,
                                    self.start_state))


class LogRecords(Hook):
    """Each step's record to ``logger.write(step, record)`` and, as one readable line, to the
    ``EasyLM`` logger through ``console`` (:class:`EasyLM.logging_utils.ConsoleProgress`);
    at the end of a run that was not stopped, the summary, naming the files of
    ``logger.outputs()`` (when the logger has that method) and the other hooks' outputs.
    ``train_metrics``: the :class:`TrainMetrics` whose windows give the run's throughput."""

    def __init__(self, logger, console, train_metrics):
        self.logger, self.console, self.train_metrics = logger, console, train_metrics

    def due(self, info):
        return True  # any hook may have put something in the record

    def start(self, info):
        self._write(info)

    def __call__(self, info):
        self._write(info)
        self.console.advance()

    def _write(self, info):
        self.logger.write(info.step, info.record)
        self.console.record(info.step, info.record, info.note)

    def end(self, info):
        if info.stopping:  # the caller saves and says where the run stopped
            return
        self.console.summary(info.step, *self.train_metrics.run_throughput(),
                             outputs=self._logger_outputs() + info.outputs)

    def _logger_outputs(self):
        if not hasattr(self.logger, "outputs"):
            return []
        return [os.path.join(self.logger.log_dir, name) for name in self.logger.outputs()]


@dataclasses.dataclass
class Checkpointing:
    """What a save writes: the checkpointer, the model config stored beside the state and a
    function giving the metadata (e.g. the resolved run config)."""
    checkpointer: Any
    llama_config: Any
    metadata: Callable[[], dict] = dict

    def save(self, step, state, train_data, milestone=False):
        """Start writing checkpoint ``step`` with ``train_data``'s position; its directory."""
        return self.checkpointer.save(step, state, self.llama_config, self.metadata(),
                                      dataset_state=train_data.get_state_dict(),
                                      milestone=milestone)


class SaveCheckpoints(Hook):
    """Saves through ``checkpointing`` (:class:`Checkpointing`) every ``every`` steps and at
    the last step (rolling checkpoints, when ``every > 0``) and every ``milestone_every``
    steps (milestones, never pruned); at the end, waits for the last save."""
    pauses_training = True

    def __init__(self, checkpointing, train_data, every, milestone_every):
        self.checkpointing, self.train_data = checkpointing, train_data
        self.every, self.milestone_every = every, milestone_every
        self.last_saved = None

    def _milestone(self, step):
        return self.milestone_every > 0 and step % self.milestone_every == 0

    def due(self, info):
        return (self._milestone(info.step)
                or (self.every > 0 and (info.step % self.every == 0 or info.last)))

    def __call__(self, info):
        self.last_saved = self.checkpointing.save(info.step, info.state, self.train_data,
                                                  self._milestone(info.step))

    def end(self, info):
        self.checkpointing.checkpointer.wait()
        if self.last_saved:
            info.outputs.append(self.last_saved)


def parse_profile_steps(text, total_steps):
    """``'FIRST,LAST'`` -> ``(FIRST, LAST)``: trace the steps after step FIRST up to step LAST
    (``0 <= FIRST < LAST <= total_steps``); ``''`` -> ``None``.  ValueError says what is
    wrong."""
    if not text:
        return None
    try:
        first, last = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"profile_steps={text!r}: give 'FIRST,LAST', two step numbers, e.g. "
                         f"'10,15' traces steps 11 to 15") from None
    if not 0 <= first < last <= total_steps:
        raise ValueError(f"profile_steps={text!r}: need 0 <= FIRST < LAST <= total_steps "
                         f"({total_steps})")
    return first, last


class ProfileSteps(Hook):
    """A ``jax.profiler`` trace (TensorBoard's profile plugin, Perfetto) of the steps after
    step ``first`` up to step ``last``, written under ``directory``.  It pauses training where
    it starts and stops, so the traced steps form a window of their own in the train metrics
    (tracing slows them) and the steps around them keep their timings.  A run resumed inside
    the range traces what is left of it; one stopped inside it ends the trace there."""
    pauses_training = True

    def __init__(self, directory, first, last):
        self.directory, self.first, self.last = directory, first, last
        self.tracing, self.written = False, False

    def due(self, info):
        return info.step in (self.first, self.last)

    def start(self, info):
        if self.first <= info.step < self.last:
            self._start()

    def __call__(self, info):
        if info.step == self.first and not self.tracing:
            self._start()
        elif info.step == self.last and self.tracing:
            self._stop(info)

    def end(self, info):
        if self.tracing:
            self._stop(info)
        if self.written:
            info.outputs.append(self.directory)

    def _start(self):
        jax.profiler.start_trace(self.directory)
        self.tracing = True

    def _stop(self, info):
        jax.block_until_ready(info.state)  # the traced steps' device work inside the trace
        jax.profiler.stop_trace()
        self.tracing, self.written = False, True
