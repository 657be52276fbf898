"""Test-session setup: 8 fake CPU devices for the sharding tests, float32 matmuls, the ``gpu``
marker's skip, and a report of the fast lane's expensive tests.

The lanes (markers declared in pytest.ini):

- ``python -m pytest -m "not slow" tests``: the developers' quick check, under a minute on
  2 cores (47 s of pytest, 2026-12-07).  It still builds, trains, converts and decodes tiny
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
import sys
from concurrent.futures import ThreadPoolExecutor

from helpers import cpu_xla_flags  # imports no JAX: the flags are set before JAX loads

os.environ.setdefault("XLA_FLAGS", cpu_xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per PyTorch op: its pool costs the tiny models more than it gains, and competes
# with XLA's (half the CPU time of the PyTorch tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import GPU_SKIP_REASON, REPO  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FAST_TEST_CPU_SECONDS = 5.0


def pages_wanted(items):
    """The docs pages the selected tests read through ``docs_page_run``, in the order they
    are first read: a test_readme_commands test names its page as the parameter ``path``,
    other modules list theirs in ``DOCS_PAGES`` (paths from the repository's root)."""
    pages = []
    for item in items:
        if "docs_page_run" not in getattr(item, "fixturenames", ()):
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "path" in callspec.params:
            wanted = [callspec.params["path"]]
        else:
            wanted = [os.path.join(REPO, p) for p in getattr(item.module, "DOCS_PAGES", ())]
        pages += [os.path.abspath(p) for p in wanted if os.path.abspath(p) not in pages]
    return pages


@pytest.fixture(scope="session", autouse=True)
def docs_pages_ahead(request, tmp_path_factory):
    """``{path: future of run_page}``: the pages the session will read start at once, one at a
    time in a background thread, while the in-process tests run beside them (each page is a
    chain of subprocesses; on 2 cores the full run went from 26 min 49 s to 25 min 43 s, both
    cores being busy either way).  A page still
    running when the session ends (an interrupt) is killed."""
    pages = pages_wanted(request.session.items)
    if not pages:
        yield {}
        return
    from test_readme_commands import run_page, stop_pages

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docs-page")
    futures = {p: pool.submit(run_page, p, tmp_path_factory.mktemp("docs_page")) for p in pages}
    try:
        yield futures
    finally:
        for future in futures.values():
            future.cancel()
        stop_pages()
        pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def docs_page_run(tmp_path_factory, docs_pages_ahead):
    """``run(path) -> (checkout, completed process)``: the ``cpu`` blocks of a README or docs
    page run once per session in a fresh copy of the checkout
    (``test_readme_commands.run_page``), for every test that reads what they wrote; pages the
    session was known to need at its start are already running (``docs_pages_ahead``)."""
    runs = {}

    def run(path):
        path = os.path.abspath(path)
        if path not in runs:
            if path in docs_pages_ahead:
                runs[path] = docs_pages_ahead[path].result()
            else:
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
    # Less the docs pages run in the background, which end during whichever test is running.
    pages = getattr(sys.modules.get("test_readme_commands"), "REAPED_CPU_SECONDS", [0.0])[0]
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime - pages


_expensive = {}  # node id -> CPU seconds of an unmarked test over the limit


@pytest.fixture
def x64():
    """64-bit types on for the test (``jax_enable_x64``, as a user's program may set it:
    Python ints become int64), off again after it."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


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
