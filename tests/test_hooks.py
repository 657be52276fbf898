"""The training loop's hooks (:mod:`EasyLM.hooks`) on a stand-in trainer (no model, no
compilation): each fires at its frequency, at step 0 and the last step where the loop does
so; train metrics are logged before a hook that pauses training; a run stopped for a signal
ends without the summary; a hook of one's own can be registered and its metrics logged."""
import logging
import os

import numpy as np
import pytest

from EasyLM.hooks import Checkpointing, Hook, parse_profile_steps
from EasyLM.trainer import LoopSettings, fit

import helpers


class StandInTrainer:
    """Train steps that count; the loss of step ``n`` (1-based) is ``n``; eval loss 0.5."""
    model_config = helpers.tiny_config()

    def train_step(self, state, batch):
        step = state["step"] + 1
        metrics = {"loss": float(step), "accuracy": 0.0, "learning_rate": 0.1,
                   "gradient_norm": 1.0, "param_norm": 1.0, "skipped_steps": 0}
        return {"step": step, "params": None}, metrics

    def eval_step(self, params, batch):
        return {"loss_sum": 1.0, "correct": 0.0, "count": 2.0}

    def global_batch(self, batch, rows):
        return batch


class CountingData:
    """Batches that carry nothing; the position is the number of batches read."""
    batch_size, seq_length = 2, 4

    def __init__(self):
        self.position = 0

    def __iter__(self):
        while True:
            self.position += 1
            yield {}, {"batches_read": self.position}

    def get_state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class Records:
    def __init__(self):
        self.records = {}

    def write(self, step, record):
        if record:
            self.records[step] = dict(record)


class Saver:
    """A checkpointer that notes what it was asked to save and when it was waited for."""

    def __init__(self):
        self.saved, self.waits = [], 0

    def save(self, step, state, llama_config, metadata, dataset_state, milestone):
        self.saved.append((step, milestone))
        return f"step_{step}"

    def wait(self):
        self.waits += 1


def train(total_steps, start=0, hooks=(), stop=None, **frequencies):
    """``fit`` of the stand-ins from step ``start``; ``(records by step, saver, final step)``."""
    logger, saver = Records(), Saver()
    settings = LoopSettings(total_steps=total_steps, show_progress=False,
                            peak_flops_per_device=1e12, **frequencies)
    state = fit(StandInTrainer(), {"step": start, "params": None}, CountingData(), settings, logger,
                eval_data=CountingData(), checkpointing=Checkpointing(saver, None),
                stop=stop, hooks=hooks)
    return logger.records, saver, state["step"]


def train_steps(records):
    """Steps whose record holds train metrics, with their loss: the mean step number of the
    window of steps it averages."""
    return {step: r["train/loss"] for step, r in records.items() if "train/loss" in r}


def test_hooks_fire_at_their_frequencies_and_at_the_last_step():
    records, saver, final = train(7, log_freq=3, eval_freq=4, eval_steps=1,
                                  save_model_freq=5, save_milestone_freq=6)
    assert final == 7
    assert sorted(s for s, r in records.items() if "eval/loss" in r) == [0, 4]
    assert records[0]["eval/loss"] == 0.5 and "train/loss" not in records[0]
    # Every 3rd step, and before each evaluation (4) and save (5, 6, 7): the loss of a
    # window is the mean of its steps' losses.
    assert train_steps(records) == {3: 2.0, 4: 4.0, 5: 5.0, 6: 6.0, 7: 7.0}
    assert saver.saved == [(5, False), (6, True), (7, False)]
    assert saver.waits >= 1
    assert records[3]["train/dataset/batches_read"] == 3
    assert records[3]["train/mfu"] > 0 and records[3]["train/step_time"] > 0


def test_without_save_frequencies_nothing_is_saved_and_a_resumed_run_does_not_evaluate_first():
    records, saver, final = train(6, start=2, log_freq=2, eval_freq=3, eval_steps=1)
    assert final == 6 and saver.saved == []
    assert sorted(s for s, r in records.items() if "eval/loss" in r) == [3, 6]
    assert train_steps(records) == {3: 3.0, 4: 4.0, 6: 5.5}


def test_a_stopped_run_logs_its_last_step_waits_for_saves_and_skips_the_summary(caplog):
    with caplog.at_level(logging.INFO, logger="EasyLM"):
        logging.getLogger("EasyLM").addHandler(caplog.handler)
        try:
            records, saver, final = train(10, stop=lambda: True, log_freq=5,
                                          save_model_freq=5)
            stopped = caplog.text
            caplog.clear()
            train(2, log_freq=5)
            finished = caplog.text
        finally:
            logging.getLogger("EasyLM").removeHandler(caplog.handler)
    assert final == 1 and train_steps(records) == {1: 1.0}
    assert saver.saved == [] and saver.waits == 1  # the caller saves the stopping step
    assert "step 1/10 | loss 1.0000" in stopped and "finished" not in stopped
    assert "finished steps 1-2 of 2" in finished


class EveryOther(Hook):
    """A hook of one's own: notes the steps it ran at and logs a metric there."""

    def __init__(self, every, pauses_training=False):
        self.every, self.pauses_training = every, pauses_training
        self.started_at, self.steps, self.ended_at = None, [], None

    def start(self, info):
        self.started_at = info.step

    def __call__(self, info):
        self.steps.append(info.step)
        info.record["custom/state_step"] = info.state["step"]

    def end(self, info):
        self.ended_at = info.step


@pytest.mark.parametrize("pauses_training", [False, True])
def test_a_registered_hook_runs_at_its_frequency_and_its_metrics_are_logged(pauses_training):
    hook = EveryOther(2, pauses_training)
    records, _, _ = train(5, start=0, hooks=[hook], log_freq=5)
    assert (hook.started_at, hook.steps, hook.ended_at) == (0, [2, 4], 5)
    assert {s: r["custom/state_step"] for s, r in records.items()
            if "custom/state_step" in r} == {2: 2, 4: 4}
    # A hook that pauses training closes the train metrics' window before it runs.
    expected = {2: 1.5, 4: 3.5, 5: 5.0} if pauses_training else {5: 3.0}
    assert train_steps(records) == expected
    np.testing.assert_equal(sorted(records), [2, 4, 5])


def test_profile_steps_trace_their_range_in_a_window_of_their_own(tmp_path):
    directory = str(tmp_path / "profile")
    records, _, _ = train(6, log_freq=6, profile_steps=(2, 4), profile_dir=directory)
    traces = [os.path.join(root, name) for root, _, names in os.walk(directory)
              for name in names if name.endswith(".xplane.pb")]
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    # Steps 3-4 (traced) are a window of their own, between steps 1-2 and 5-6.
    assert train_steps(records) == {2: 1.5, 4: 3.5, 6: 5.5}


def test_a_run_resumed_or_stopped_inside_the_profiled_range_traces_what_it_ran(tmp_path):
    resumed = str(tmp_path / "resumed")
    train(6, start=3, log_freq=6, profile_steps=(2, 5), profile_dir=resumed)
    stopped = str(tmp_path / "stopped")
    _, _, final = train(10, stop=lambda: True, log_freq=6, profile_steps=(0, 5),
                        profile_dir=stopped)
    assert final == 1
    for directory in (resumed, stopped):
        assert any(name.endswith(".xplane.pb") for _, _, names in os.walk(directory)
                   for name in names), directory


@pytest.mark.parametrize("text, message", [
    ("5", "give 'FIRST,LAST'"), ("a,b", "give 'FIRST,LAST'"),
    ("4,4", "0 <= FIRST < LAST <= total_steps"), ("2,11", "total_steps \\(10\\)")])
def test_bad_profile_steps_say_what_to_give(text, message):
    with pytest.raises(ValueError, match=f"profile_steps={text!r}: .*{message}"):
        parse_profile_steps(text, 10)
    assert parse_profile_steps("", 10) is None and parse_profile_steps("0,10", 10) == (0, 10)
