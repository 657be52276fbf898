"""A training run's life around the loop: which run directory (a fresh one or the newest to
resume), the log files, the starting state (resume, load or initialise) and the loop itself
with its metrics writers and checkpointer.

Library code, usable without flags: :mod:`EasyLM.models.llama.llama_train` builds the trainer
and data from its flags and calls :func:`select_run` and :func:`train`.  A run directory is
``workdir/<timestamp>/`` holding ``config.json``, ``train.log``, the metrics files and
``checkpoints/step_<N>/``.

SIGTERM or SIGINT during training stops the run after the step in progress, saving a checkpoint
at that step (``checkpointer.save_on_signal``), and exits with status 128 + the signal's number
(143 for SIGTERM, 130 for SIGINT): see :class:`StopSignals`.
"""
import dataclasses
import json
import logging
import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as PS

from EasyLM import checkpoint, logging_utils, run_dirs
from EasyLM.hooks import Checkpointing
from EasyLM.trainer import fit

log = logging.getLogger("EasyLM")
log.propagate = False  # our own handlers; a root handler would print each line twice


@dataclasses.dataclass
class StartFrom:
    """Where a run that does not resume gets its state: ``load_checkpoint`` (a checkpoint spec
    of :mod:`EasyLM.checkpoint`), else fresh parameters from ``seed``; ``load_dataset_state``
    (a JSON data-pipeline state; ``{process_index}`` is replaced per process) overrides the
    data position."""
    load_checkpoint: str = ""
    load_dataset_state: str = ""
    seed: int = 42


def dataset_state_path(template):
    return template.replace("{process_index}", str(jax.process_index()))


def _agree(text):
    """Process 0's ``text`` on every process (run directories are named by its clock)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils
    data = np.zeros(4096, np.uint8)
    raw = text.encode()
    data[:len(raw)] = np.frombuffer(raw, np.uint8)
    data = multihost_utils.broadcast_one_to_all(data)
    return bytes(np.asarray(data)).rstrip(b"\0").decode()


def select_run(workdir, resume=True):
    """``(run_dir, checkpoint to resume or None)``, the same on every process: the newest run
    under ``workdir`` with a complete checkpoint when ``resume``, else a new directory."""
    choice = ""
    if jax.process_index() == 0:
        run_dir, resume_from = (run_dirs.find_resumable_run(workdir) if resume
                                else (None, None))
        if run_dir is None:
            run_dir = run_dirs.new_run_dir(workdir)
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
    it on the console as it leaves the run, and train.log should say how the run ended."""
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


def initial_state(trainer, start, resume_from=None):
    """``(train state, train data-pipeline state or None)``: resume ``resume_from``, else load
    or initialise as ``start`` (:class:`StartFrom`) says."""
    dataset_state = None
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
        state = checkpoint.restore_train_state(resume_from, trainer.abstract_state())
        return state, checkpoint.load_dataset_state(resume_from, jax.process_index())
    if start.load_checkpoint:
        kind, path = checkpoint.parse_checkpoint_spec(start.load_checkpoint)
        log.info("loading %s", start.load_checkpoint)
        if kind == "trainstate":
            state = checkpoint.restore_train_state(path, trainer.abstract_state())
            dataset_state = checkpoint.load_dataset_state(path, jax.process_index())
        else:
            state = trainer.state_from_params(
                checkpoint.load_params(start.load_checkpoint, trainer.params_shardings))
    else:
        state = trainer.init_state(start.seed)
    if start.load_dataset_state:
        with open(dataset_state_path(start.load_dataset_state)) as f:
            dataset_state = json.load(f)
    return state, dataset_state


class Stopped(SystemExit):
    """:func:`train` stopped for a signal; the exit status is 128 + the signal's number."""

    def __init__(self, signum):
        super().__init__(128 + signum)
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGINT while training, as a context manager around the loop.

    The first signal only sets a flag; :meth:`requested`, which the loop calls after each
    step, says when to stop.  A second signal ends the process at once, by the signal (a save
    it interrupts leaves the last complete checkpoint, see :class:`EasyLM.checkpoint.
    TrainCheckpointer`).  In a pod job a signal often reaches the processes at different
    steps, or one process only, while saving is collective: every process sends its flag to
    the others after each step and all stop one step later, together, at the same step.  The
    exchange is a tiny all-reduce read only once the next step is queued behind it, so the
    devices never wait for it.  Outside the main thread (where Python cannot handle signals)
    no handler is installed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, mesh):
        self.mesh = mesh
        self.received = 0  # the number of the first signal, 0 before one
        self.signum = 0  # the signal the run stops for, once requested() said so
        self._previous = {}
        self._pending = None  # the all-reduce of the flags after the last step
        self._flags = NamedSharding(mesh, PS(tuple(mesh.axis_names)))  # one per device
        self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PS()))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *error):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received:  # the second: die of it now, as without a handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signum

    def requested(self):
        """Whether to stop after this step, the same on every process; sets :attr:`signum`."""
        if jax.process_count() == 1:
            self.signum = self.received
            return bool(self.signum)
        previous, self._pending = self._pending, None
        if previous is not None:
            self.signum = int(previous.addressable_data(0))
        if not self.signum:
            self._pending = self._max(self._all_flags())
        return bool(self.signum)

    def _all_flags(self):
        """A global array holding this process's :attr:`received` on each of its devices."""
        shards = [jax.device_put(np.full((1,), self.received, np.int32), device)
                  for device in self._flags.addressable_devices]
        return jax.make_array_from_single_device_arrays((self.mesh.size,), self._flags, shards)


def _stop(signum, state, saving, train_data, run_dir, save, total_steps):
    """Save (when ``save``) the state the loop stopped at for signal ``signum``, say which
    checkpoint the same command resumes from, and raise :class:`Stopped`."""
    step = int(jax.device_get(state["step"]))
    name = signal.Signals(signum).name
    if save:
        log.warning("%s at step %d of %d: saving checkpoint %s before exiting; another signal "
                    "exits at once, keeping the last complete checkpoint", name, step,
                    total_steps, saving.checkpointer.step_dir(step))
        saving.save(step, state, train_data)
        saving.checkpointer.wait()
    _, resume_from = run_dirs.find_resumable_run(os.path.dirname(run_dir))
    then = (f"running the same command again resumes from {resume_from}" if resume_from
            else "no checkpoint to resume: running the same command again starts a fresh run")
    log.warning("stopped by %s at step %d of %d%s; %s (with resume=true, the default)", name,
                step, total_steps, "" if save else " (checkpointer.save_on_signal=false)",
                then)
    raise Stopped(signum)


def train(trainer, llama_config, train_data, settings, *, run_dir, resume_from, start,
          run_config, logging_config, checkpointer_config, eval_data=None,
          log_all_worker=False):
    """Run the loop (:func:`EasyLM.trainer.fit`) in ``run_dir`` from :func:`select_run`;
    returns ``run_dir``.

    ``llama_config``: the model config stored with each checkpoint; ``settings``: the loop's
    :class:`EasyLM.trainer.LoopSettings`; ``run_config``: the flat config written to
    ``config.json`` and into each checkpoint's metadata; ``logging_config`` and
    ``checkpointer_config``: those of :mod:`EasyLM.logging_utils` and :mod:`EasyLM.checkpoint`.
    Process 0 logs (every process with ``log_all_worker``, to ``RUN/worker_<i>/``); a run
    that already reached ``settings.total_steps`` says how to extend it and returns.  A
    signal stops it as :class:`StopSignals` says, raising :class:`Stopped` (a ``SystemExit``
    of status 128 + the signal's number) after the checkpoint and a log line that names
    it."""
    writes = log_all_worker or jax.process_index() == 0
    log_dir = run_dir if jax.process_index() == 0 else os.path.join(
        run_dir, f"worker_{jax.process_index()}")
    _setup_logging(log_dir, writes)
    try:
        if resume_from is not None and _already_finished(resume_from, settings.total_steps):
            return run_dir
        if jax.process_index() == 0:
            checkpoint.write_json(os.path.join(run_dir, "config.json"), run_config)
        log.info("run directory %s (%d processes, %d devices, mesh %s)", run_dir,
                 jax.process_count(), jax.device_count(), dict(trainer.mesh.shape))
        trained, total = trainer.trainable_counts
        if trained < total:
            log.info("training %d of %d parameters (optimizer.trainable); the others stay "
                     "as loaded", trained, total)
        with jax.set_mesh(trainer.mesh):
            state, dataset_state = initial_state(trainer, start, resume_from)
            if dataset_state is not None:
                train_data.load_state_dict(dataset_state)
            begin = int(jax.device_get(state["step"]))
            logger = logging_utils.MetricsLogger(
                log_dir, logging_config, enabled=writes,
                resume_step=begin if resume_from is not None else None, run_config=run_config)
            checkpointer = checkpoint.TrainCheckpointer(run_dir, checkpointer_config)
            # train_seq_length: the default window of inference on the checkpoint.
            saving = Checkpointing(checkpointer, llama_config,
                                   lambda: {"config": run_config, "run_dir": run_dir,
                                            "train_seq_length": train_data.seq_length})
            with StopSignals(trainer.mesh) as signals:
                try:
                    state = fit(trainer, state, train_data,
                                dataclasses.replace(settings, show_progress=(
                                    settings.show_progress and writes)),
                                logger, eval_data, saving, stop=signals.requested)
                    if signals.signum:
                        _stop(signals.signum, state, saving, train_data, run_dir,
                              checkpointer_config.save_on_signal, settings.total_steps)
                finally:
                    checkpointer.close()
                    logger.close()
    except Stopped:
        raise
    except BaseException:
        _log_failure()
        raise
    return run_dir
