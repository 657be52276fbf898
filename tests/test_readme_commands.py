"""The commands of README.md (and of docs/*.md) run as written.

Every fenced code block says what it is in its info string: ``sh`` or ``python`` followed by
one of

- ``cpu``: runs as written from a fresh checkout on a CPU machine; this test runs every such
  block of a file in order, in one copy of the checkout (``sh`` with bash, ``python`` as a
  script from the checkout's root). ``cpu needs=MODULE`` runs only where MODULE imports (an
  optional package of requirements-eval.txt);
- ``gpu`` (sized for a GPU or a downloaded model) or ``cluster`` (several hosts): the next
  command block that is neither must be their ``cpu`` twin;
- ``ci``: the test command, which must be the one ``.ci/run`` runs;
- ``install``: installs optional packages (``pip install -r FILE`` lines only);

or ``text`` / ``json`` for what is not a command. Files of the repository that any command
names must exist, so a README command cannot name a missing file again.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from importlib.util import find_spec

import pytest
from helpers import REPO

FENCE = re.compile(r"^```(.*)$")
KINDS = {"cpu", "gpu", "cluster", "ci", "install"}
REPO_PATH = re.compile(r"(?<![\w/.-])((?:configs|tokenizers|data|experiments|benchmarks|eval|"
                       r"tests|EasyLM|FoT|running_utils)/[\w./-]*[\w])")


def documents():
    docs = [os.path.join(REPO, "README.md")]
    docs_dir = os.path.join(REPO, "docs")
    if os.path.isdir(docs_dir):
        docs += sorted(os.path.join(docs_dir, n) for n in os.listdir(docs_dir)
                       if n.endswith(".md"))
    return docs


def blocks(path):
    """``[(line, language, tags, text)]`` of the fenced blocks of a Markdown file."""
    out, current = [], None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            match = FENCE.match(line.rstrip("\n"))
            if match and current is None:
                words = match.group(1).split()
                current = (number, words[0] if words else "", words[1:], [])
            elif match:
                out.append(current[:3] + ("".join(current[3]),))
                current = None
            elif current is not None:
                current[3].append(line)
    assert current is None, f"{path}: the block opened on line {current[0]} is not closed"
    return out


def commands(path):
    return [b for b in blocks(path) if b[1] in ("sh", "python")]


def kind(block):
    return block[2][0] if block[2] else None


def needs(block):
    return [t.split("=", 1)[1] for t in block[2][1:] if t.startswith("needs=")]


def ci_command():
    with open(os.path.join(REPO, ".ci", "run")) as f:
        return [line.strip() for line in f if line.startswith("pip install")][0]


@pytest.mark.parametrize("path", documents(), ids=os.path.basename)
def test_every_block_says_what_it_is_and_names_files_that_exist(path):
    found = blocks(path)
    assert found, f"{path} has no fenced block"
    for line, language, tags, text in found:
        where = f"{os.path.basename(path)}:{line}"
        assert language in ("sh", "python", "text", "json"), f"{where}: language {language!r}"
        if language in ("sh", "python"):
            assert tags and tags[0] in KINDS, f"{where}: say one of {sorted(KINDS)}"
        for name in REPO_PATH.findall(text):
            assert os.path.exists(os.path.join(REPO, name)), f"{where} names a missing {name}"
    runnable = commands(path)
    for index, block in enumerate(runnable):
        if kind(block) in ("gpu", "cluster"):
            following = [b for b in runnable[index + 1:] if kind(b) not in ("gpu", "cluster")]
            assert following and kind(following[0]) == "cpu", (
                f"{os.path.basename(path)}:{block[0]}: a {kind(block)} block needs its cpu "
                f"twin next")
        if kind(block) == "install":
            for command in block[3].splitlines():
                file = re.fullmatch(r"pip install -r (\S+)", command.strip())
                assert file and os.path.exists(os.path.join(REPO, file.group(1))), command


def test_readme_has_the_two_set_up_commands_and_the_ci_one():
    readme = commands(os.path.join(REPO, "README.md"))
    first, ci = readme[0], [b for b in readme if kind(b) == "ci"]
    assert kind(first) == "cpu" and first[3].strip() == (
        "pip install -r requirements.txt && python -m running_utils.runner "
        "--config configs/setup_test.json")
    assert [b[3].strip() for b in ci] == [ci_command()]
    assert readme[1] is ci[0], "the test command follows the job's"


def checkout_copy(target):
    """The repository's files as a fresh clone has them (tracked and not ignored)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in listed.splitlines():
        source = os.path.join(REPO, name)
        if os.path.isfile(source):
            os.makedirs(os.path.join(target, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, name))


def script(path, directory):
    """A bash script running the ``cpu`` blocks of ``path`` in order; ``python`` blocks are
    saved as scripts in ``directory`` (the checkout: a user runs them from its root)."""
    lines = ["set -euo pipefail"]
    for number, (line, language, tags, text) in enumerate(commands(path)):
        if kind((line, language, tags, text)) != "cpu":
            continue
        missing = [m for m in needs((line, language, tags, text)) if find_spec(m) is None]
        lines.append(f"echo '### {os.path.basename(path)}:{line}'")
        if missing:
            lines.append(f"echo 'skipped: needs {missing}'")
        elif language == "sh":
            lines.append(text)
        else:
            snippet = os.path.join(directory, f"readme_snippet_{number}.py")
            with open(snippet, "w") as f:
                f.write(text)
            lines.append(f"{sys.executable} {os.path.basename(snippet)}")
    return "\n".join(lines) + "\n"


PAGE_TIMEOUT = 1500  # seconds a page's commands may take together
RUNNING = {}  # pid -> Popen of each page being run, for stop_pages
REAPED_CPU_SECONDS = [0.0]  # CPU time of finished page runs (conftest's per-test accounting)


def run_page(path, tmp_path):
    """Runs the ``cpu`` blocks of ``path`` in order in a fresh copy of the checkout under
    ``tmp_path``; ``(checkout, completed process)`` with stdout and stderr together in
    ``stdout``.  Through the session fixture ``docs_page_run`` (conftest.py) each page runs
    once, ahead of the tests that read it: this module checks that it ran, and tests of what its
    commands wrote (tests/test_experiments.py) read the same outputs.  Thread-safe: conftest
    runs pages in a background thread while other tests run."""
    checkout = tmp_path / "checkout"
    checkout_copy(checkout)
    steps = script(os.path.join(checkout, os.path.relpath(path, REPO)), checkout)
    # One compilation cache for every command: the tiny models compile the same functions.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)  # as a user's shell has it: commands that want devices say so
    log = tmp_path / "output.log"
    with open(log, "w") as out:
        process = subprocess.Popen(["bash", "-c", steps], cwd=checkout, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    RUNNING[process.pid] = process
    timer = threading.Timer(PAGE_TIMEOUT, stop_pages, [[process]])
    timer.start()
    try:
        # wait4, not wait: the run's own CPU time, whichever test happens to be running.
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
        RUNNING.pop(process.pid, None)
    process.returncode = os.waitstatus_to_exitcode(status)
    REAPED_CPU_SECONDS[0] += usage.ru_utime + usage.ru_stime
    output = log.read_text()
    if process.returncode == -signal.SIGKILL:
        output += f"\nstopped: the page's commands ran past {PAGE_TIMEOUT} s or the session ended"
    return checkout, subprocess.CompletedProcess(steps, process.returncode, output, "")


def stop_pages(processes=None):
    """Kills the page runs (all running ones by default) with every process they started."""
    for process in list(RUNNING.values() if processes is None else processes):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("path", documents(), ids=os.path.basename)
def test_cpu_commands_run_as_written_in_a_fresh_checkout(path, docs_page_run):
    checkout, done = docs_page_run(path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
