"""Test-session setup: 8 fake CPU devices for the sharding tests, float32 matmuls, the ``gpu``
marker's skip, and a report of the fast lane's expensive tests.

The lanes (markers declared in pytest.ini):

- ``python -m pytest -m "not slow" tests``: the developers' quick check, under a minute on
  2 cores (42 s of pytest, 2026-12-06).  It still builds, trains, converts and decodes tiny
  models, reads data and checks the command-line errors; what takes seconds per test is left
  to the full run.
- ``python -m pytest tests``: everything (CI, ``.ci/run``).
- ``@pytest.mark.slow`` (or a module's ``pytestmark``) sits on the test where it is defined:
  subprocess runs of the runner, benchmarks or scripts, Pallas kernels in interpret mode,
  sharded and multi-device models, anything of seconds.
- ``@pytest.mark.gpu``: needs a GPU; skipped here on other backends with
  ``helpers.GPU_SKIP_REASON``.

A fast-lane run ends with the unmarked tests that used more than ``FAST_TEST_CPU_SECONDS`` of
CPU (this process and its subprocesses, which other users' load hardly changes), so a test
that grew expensive is seen at the next quick check.
"""
import os
import resource

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per PyTorch op: its pool costs the tiny models more than it gains, and competes
# with XLA's (half the CPU time of the PyTorch tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import GPU_SKIP_REASON  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FAST_TEST_CPU_SECONDS = 5.0


@pytest.fixture(scope="session")
def docs_page_run(tmp_path_factory):
    """``run(path) -> (checkout, completed process)``: the ``cpu`` blocks of a README or docs
    page run once per session in a fresh copy of the checkout
    (``test_readme_commands.run_page``), for every test that reads what they wrote."""
    runs = {}

    def run(path):
        path = os.path.abspath(path)
        if path not in runs:
            from test_readme_commands import run_page

            runs[path] = run_page(path, tmp_path_factory.mktemp("docs_page"))
        return runs[path]
    return run


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))


def _cpu_seconds():
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_expensive = {}  # node id -> CPU seconds of an unmarked test over the limit


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = _cpu_seconds()
    try:
        return (yield)
    finally:
        used = _cpu_seconds() - start
        if used > FAST_TEST_CPU_SECONDS and "slow" not in item.keywords:
            _expensive[item.nodeid] = used


def pytest_terminal_summary(terminalreporter):
    if not _expensive:
        return
    terminalreporter.write_sep("=", f"unmarked tests of more than {FAST_TEST_CPU_SECONDS:g} "
                                    "CPU seconds: make them cheaper or mark them slow")
    for nodeid, used in sorted(_expensive.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{used:6.1f}s  {nodeid}")
