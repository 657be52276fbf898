"""What several test files share: repository paths, the tiny model config, warnings of the
``EasyLM`` logger, the environment of a CPU subprocess and the fresh-process resume harness."""
import contextlib
import json
import logging
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(REPO, "configs", "setup_test.json")
TINY_SP = os.path.join(REPO, "tokenizers", "tiny_sp.model")
TINY_CORPUS = os.path.join(REPO, "data", "tiny_corpus.jsonl")
# The suite runs JAX on CPU (tests/conftest.py) unless JAX_PLATFORMS says otherwise.
GPU_SKIP_REASON = ("needs a GPU; the suite runs JAX on CPU unless JAX_PLATFORMS is set: "
                   "JAX_PLATFORMS=cuda XLA_FLAGS= python -m pytest -m gpu tests")
# Compiling, not running, is most of the suite's CPU time: its programs are tiny. XLA's CPU
# backend without LLVM's optimisation passes compiles them about a quarter faster (measured on
# 2 cores: the model, linear, cross-batch and FoX model tests took 401 s of user time instead
# of 527 s), and nothing the tests compare depends on them. Set for the suite and every CPU
# subprocess it starts; a run with XLA_FLAGS of its own (the GPU lane's empty one) keeps it.
CPU_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cpu_xla_flags(devices):
    """``XLA_FLAGS`` of a CPU process with ``devices`` fake devices, compiling as the suite does."""
    return f"--xla_force_host_platform_device_count={devices} {CPU_COMPILE_FLAGS}"

# Small enough to compile in a second or two, big enough for GQA (4 query heads, 2 key/value
# heads), a memory layer between ordinary ones and a rotary embedding of head_dim 8.
TINY_MODEL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_sequence_length=64,
                  mem_layers=(1,))


def tiny_config(**updates):
    """The tiny ``LLaMAConfig`` with ``updates``."""
    from EasyLM.models.llama.llama_model import LLaMAConfig
    return LLaMAConfig(**dict(TINY_MODEL, **updates))


@contextlib.contextmanager
def capture_warnings():
    """The messages of the warnings the ``EasyLM`` logger gives in the block (it does not
    propagate to pytest's handler)."""
    lines = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("EasyLM")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def cpu_env(devices=1, **extra):
    """The environment of a subprocess that runs JAX on ``devices`` fake CPU devices."""
    return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
                XLA_FLAGS=cpu_xla_flags(devices), **extra)


# The fresh-process resume harness: the parent saves pipeline states, a new Python process
# (the test file run as a script) restores each and writes the batches that follow, and the
# parent compares them with the batches of the uninterrupted pipeline.

def batches_after_restore(test_file, cases, tmp_path):
    """``{"<case>/<batch>/<key>": array}`` that ``python test_file CASES OUT`` writes (with
    :func:`save_batches`) for ``cases`` (a JSON-able list)."""
    cases_file, out_file = tmp_path / "cases.json", tmp_path / "out.npz"
    cases_file.write_text(json.dumps(cases))
    subprocess.run([sys.executable, test_file, str(cases_file), str(out_file)], check=True)
    return np.load(out_file)


def save_batches(out_file, batches_per_case):
    """Child side: the batches (dicts of arrays) of each case into ``out_file``."""
    np.savez(out_file, **{f"{i}/{j}/{key}": value
                          for i, batches in enumerate(batches_per_case)
                          for j, batch in enumerate(batches) for key, value in batch.items()})


def assert_same_batches(resumed, expected, names):
    """``expected[i]``: the ``(batch, metrics)`` pairs case ``names[i]`` should give."""
    for i, batches in enumerate(expected):
        for j, (batch, _) in enumerate(batches):
            for key, value in batch.items():
                np.testing.assert_array_equal(resumed[f"{i}/{j}/{key}"], value,
                                              err_msg=f"{names[i]} batch {j} {key}")


class MarkingProcessor:
    """A record processor for tokenizer-pool tests: writes ``DIR/start_N`` when it takes record
    ``{"n": N}``, sleeps ``seconds``, then writes ``DIR/end_N`` and returns N (picklable, so
    spawned workers run it)."""

    def __init__(self, directory, seconds):
        self.directory, self.seconds = str(directory), seconds

    def __call__(self, example):
        import time

        n = example["n"]
        open(os.path.join(self.directory, f"start_{n}"), "w").close()
        time.sleep(self.seconds)
        open(os.path.join(self.directory, f"end_{n}"), "w").close()
        return n
