"""What the command-line tools share, so that each behaves like the runner: a mistake in the
user's input is one line on stderr that names the flag and says what to change, with exit
status 2 (as argparse gives for its own errors), found before any work wherever it can be;
and what a command writes appears whole or not at all.

    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        cli.input_file("--data", args.data)             # raises UsageError
        cli.new_directory("--output", args.output)
        ...                                             # the work
        with cli.written_directory(args.output) as tmp:
            ...                                         # write into tmp

Outputs are written under a temporary name beside the final one (``NAME.tmp-<pid>``) and
renamed into place at the end, so a failure or a kill never leaves half an output under the
final name.  Files are created with ``open()``'s mode (the umask applies).
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import sys

from EasyLM.checkpoint import CONFIG_FILE, load_llama_config, parse_checkpoint_spec


class UsageError(ValueError):
    """An input of a command that cannot work; the message names the flag and what to change."""


@contextlib.contextmanager
def user_errors(prog, *kinds):
    """Turn a :class:`UsageError` (or one of ``kinds``, other errors that are about the user's
    input alone) raised in the block into ``PROG: error: MESSAGE`` on one line of stderr and
    exit status 2."""
    try:
        yield
    except (UsageError, *kinds) as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def reading(flag, path):
    """Errors raised while the block reads the user's ``path`` become a :class:`UsageError`
    naming ``flag``: whatever a library raises on a truncated or foreign file, the file is the
    thing to change."""
    try:
        yield
    except (UsageError, MemoryError):
        raise
    except Exception as error:
        raise UsageError(f"{flag}: {path} could not be read ({type(error).__name__}: {error}); "
                         f"check that it is complete and of the right kind") from error


def number_list(kind=int, count=None, low=None, high=None):
    """An argparse ``type``: a tuple of comma-separated numbers of ``kind`` (``count`` of them
    when given), each within ``low`` .. ``high`` where given; argparse names the flag."""
    noun = "integers" if kind is int else "numbers"

    def parse(text):
        try:
            values = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {noun}, got "
                                             f"{text!r}") from None
        if not values or (count is not None and len(values) != count):
            raise argparse.ArgumentTypeError(f"expected {count or 'some'} comma-separated "
                                             f"{noun}, got {text!r}")
        if any((low is not None and v < low) or (high is not None and v > high)
               for v in values):
            bounds = (f">= {low}" if high is None else f"<= {high}" if low is None
                      else f"between {low} and {high}")
            raise argparse.ArgumentTypeError(f"values must be {bounds}, got {text!r}")
        return values
    return parse


def fraction(text):
    """An argparse ``type``: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def integer(low):
    """An argparse ``type``: an integer ``>= low``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def input_file(flag, path):
    """``path``, refused unless it is an existing file."""
    if not os.path.exists(path):
        raise UsageError(f"{flag}: {path} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a directory; give a file")
    return path


def input_directory(flag, path):
    """``path``, refused unless it is an existing directory."""
    if not os.path.exists(path):
        raise UsageError(f"{flag}: {path} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a file; give a directory")
    return path


def input_path(flag, path):
    """``path``, refused unless it exists (a URL is left to the reader)."""
    if "://" not in path and not os.path.exists(path):
        raise UsageError(f"{flag}: {path} does not exist")
    return path


def checkpoint_argument(flag, spec):
    """``(path, LLaMAConfig)`` of the toolkit checkpoint ``spec`` names (see
    :mod:`EasyLM.checkpoint`), refused unless it holds weights and its model config; the
    weights themselves are read later, under :func:`reading`."""
    try:
        _, path = parse_checkpoint_spec(spec, key=flag)
    except (ValueError, FileNotFoundError) as error:  # the message names the flag
        directory = str(spec).rpartition("::")[2]
        hint = ("; it is a Hugging Face model directory (config.json), not a toolkit "
                "checkpoint" if os.path.exists(os.path.join(directory, "config.json")) else "")
        raise UsageError(f"{error}{hint}") from None
    if "://" not in path and not os.path.exists(os.path.join(path, CONFIG_FILE)):
        raise UsageError(f"{flag}: {path} has no {CONFIG_FILE}, so it is not a checkpoint this "
                         f"toolkit wrote; give a run's RUN/checkpoints/step_<N> or a converted "
                         f"model")
    with reading(flag, os.path.join(path, CONFIG_FILE)):
        return path, load_llama_config(path)


def hf_model_directory(flag, path):
    """The ``config.json`` of a Hugging Face model directory, refused unless ``path`` holds one
    and weights."""
    input_directory(flag, path)
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        hint = (" it is a toolkit checkpoint (llama_config.json);"
                if os.path.exists(os.path.join(path, CONFIG_FILE)) else "")
        raise UsageError(f"{flag}: {path} has no config.json;{hint} give a Hugging Face model "
                         f"directory")
    if not any(name.endswith(".safetensors") or re.fullmatch(r"pytorch_model.*\.bin", name)
               for name in os.listdir(path)):
        raise UsageError(f"{flag}: {path} holds no weights (*.safetensors or "
                         f"pytorch_model*.bin files)")
    with reading(flag, config_file), open(config_file) as f:
        return json.load(f)


def output_directory(flag, path):
    """Refuse a directory the command cannot write its files into (it is created if missing;
    other files in it are left alone)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a file; give a directory (created if missing)")
    _check_writable(flag, path)


def new_directory(flag, path, replaces=None):
    """Refuse an output directory the command cannot write whole: a file, or a directory with
    something in it, unless ``replaces`` is ``(what, test)`` and ``test(path)`` says it holds
    ``what`` (an earlier output of the command, which the new one replaces)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a file; give a directory to create")
    if os.path.isdir(path) and os.listdir(path):
        if replaces is None:
            raise UsageError(f"{flag}: {path} already exists and is not empty; choose a new "
                             f"directory or remove it")
        what, test = replaces
        if not test(path):
            raise UsageError(f"{flag}: {path} already exists and does not hold {what} (which "
                             f"would be replaced); choose a new directory")
    _check_writable(flag, path)


def _check_writable(flag, path):
    # The nearest existing directory on the way to path is where the command creates things.
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag}: {existing} is a file, so {path} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: no permission to write in {existing}; choose another path")


def _temporary_name(path):
    return f"{path}.tmp-{os.getpid()}"


@contextlib.contextmanager
def written_directory(path):
    """A fresh directory beside ``path`` for the block to write the output into.  When the
    block ends without an error it takes the place of ``path`` (an earlier one is replaced
    whole: see :func:`new_directory`); when the block raises it is removed."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run that had the same pid
    os.mkdir(tmp)
    try:
        yield tmp
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp, path):
    if not (os.path.isdir(path) and os.listdir(path)):
        os.replace(tmp, path)  # rename() replaces an empty directory
        return
    old = f"{path}.old-{os.getpid()}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old)


def set_open_mode(path):
    """Give ``path`` the mode ``open()`` would have: for files that a library writes through a
    private temporary file (mode 0600), as safetensors does."""
    umask = os.umask(0)  # reading the umask means setting it
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_files(directory, writers):
    """Write ``{name: write(path)}`` into ``directory`` (created if missing): each to a
    temporary name first, then all renamed into place, replacing files of those names and
    leaving the others alone.  Prints the absolute path of each, one a line, and returns them."""
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.abspath(os.path.join(directory, name)) for name in writers]
    try:
        for path, write in zip(paths, writers.values()):
            write(_temporary_name(path))
        for path in paths:
            os.replace(_temporary_name(path), path)
    except BaseException:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(_temporary_name(path))
        if created:
            with contextlib.suppress(OSError):  # not empty: a rename got through
                os.rmdir(directory)
        raise
    for path in paths:
        print(f"wrote {path}")
    return paths


def json_writer(value):
    """A writer for :func:`write_files`: ``value`` as indented JSON."""
    def write(path):
        with open(path, "w") as f:
            json.dump(value, f, indent=2)
    return write
