"""Dependencies: every package requirements.txt installs is imported by the project or is a
tool the README names; every third-party import is installed by it or documented as optional;
the freeze file pins every requirement; pyproject.toml installs the same requirements (its
``dev`` extra the tools the installed code does not import); a missing optional package is a
config error."""
import ast
import importlib.metadata
import importlib.util
import os
import re
import sys
import tomllib

import pytest

from EasyLM import logging_utils
from EasyLM.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Installed but never imported: what they are for, and the README text that says so.
RUNTIME_ONLY = {"tensorboard": "tensorboard --logdir", "gcsfs": "gs://",
                "accelerate": "transformers.Trainer"}
# Installed but never imported: tools that CI (.ci/run) runs, and how it runs them.
CI_TOOLS = {"ruff": "ruff check ."}
# Imported only when a setting asks for them, not installed by requirements.txt: the README
# text that tells how to install them.
# Imported by code that runs only where the package is present: the W&B logger, and the
# forgetting-attention benchmark's PyTorch peer (fla-core, whose Triton kernels need a GPU).
OPTIONAL = {"wandb": "pip install wandb", "fla": "fla-core"}


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(lines):
    """``{canonical name: version specifier ('' when unpinned)}`` of requirement lines."""
    lines = (line.split("#")[0].strip() for line in lines)
    return {canonical(name): specifier.strip() for name, specifier in
            (re.match(r"([A-Za-z0-9._-]+)(.*)", line).groups() for line in lines if line)}


def requirements(path):
    with open(path) as f:
        return parse_requirements(f)


def python_files():
    for directory, subdirectories, files in os.walk(REPO):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")
                             and d != "__pycache__"
                             and not os.path.exists(os.path.join(directory, d, "pyvenv.cfg"))]
        yield from (os.path.join(directory, f) for f in files if f.endswith(".py"))


def is_local(module, path):
    """A package or module of this repository (``tokenizers/`` holds data, not the package
    of that name: a regular package elsewhere wins over a directory without __init__.py)."""
    if os.path.exists(os.path.join(os.path.dirname(path), f"{module}.py")):
        return True  # a sibling script, e.g. one test importing another
    spec = importlib.util.find_spec(module)
    if spec is None:
        return False
    places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    return all(os.path.abspath(p).startswith(REPO + os.sep) for p in places)


def third_party_imports():
    """``{distribution name: [files importing it]}``."""
    distributions = importlib.metadata.packages_distributions()
    found = {}
    for path in python_files():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in (m.split(".")[0] for m in modules):
                if module in sys.stdlib_module_names or is_local(module, path):
                    continue
                for name in distributions.get(module, [module]):
                    found.setdefault(canonical(name), []).append(
                        os.path.relpath(path, REPO))
    return found


@pytest.fixture(scope="module")
def readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


@pytest.fixture(scope="module")
def imported():
    return third_party_imports()


def test_every_requirement_is_used_and_every_import_is_required(readme, imported):
    listed = set(requirements(os.path.join(REPO, "requirements.txt")))
    unlisted = {name: files for name, files in imported.items()
                if name not in listed and name not in OPTIONAL}
    assert not unlisted, f"imported but not in requirements.txt: {unlisted}"
    unused = listed - set(imported) - set(RUNTIME_ONLY) - set(CI_TOOLS)
    assert not unused, f"in requirements.txt but imported nowhere: {sorted(unused)}"
    for name, text in RUNTIME_ONLY.items():
        assert name in listed and text in readme, name
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = f.read()
    for name, command in CI_TOOLS.items():
        assert name in listed and command in ci, name
    for name, text in OPTIONAL.items():
        assert name not in listed and name in imported and text in readme, name


def test_freeze_pins_every_requirement_at_the_same_version():
    frozen = requirements(os.path.join(REPO, "requirements.freeze.txt"))
    for name, specifier in requirements(os.path.join(REPO, "requirements.txt")).items():
        assert name in frozen, f"{name} is missing from requirements.freeze.txt"
        assert re.fullmatch(r"==[^,]+", frozen[name]), (name, frozen[name])
        assert specifier in ("", frozen[name]), (name, specifier, frozen[name])


def test_pyproject_installs_what_requirements_txt_does(imported):
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    installed = parse_requirements(pyproject["project"]["dependencies"])
    dev = parse_requirements(pyproject["project"]["optional-dependencies"]["dev"])
    assert not set(installed) & set(dev), sorted(set(installed) & set(dev))
    assert dict(installed, **dev) == requirements(os.path.join(REPO, "requirements.txt")), \
        "pyproject.toml's dependencies and dev extra differ from requirements.txt"
    packages = tuple(p.rstrip("*") + os.sep
                     for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"])
    needed = {name for name, files in imported.items() if any(f.startswith(packages)
                                                              for f in files)}
    assert not needed & set(dev), f"the installed code imports dev tools: {needed & set(dev)}"
    assert not needed - set(installed) - set(OPTIONAL), sorted(needed - set(installed))


def test_wandb_enabled_without_wandb_is_a_config_error(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else find_spec(name, *args))
    config = logging_utils.get_default_config({"wandb": True, "tensorboard": False})
    with pytest.raises(ConfigError, match=r"logging\.wandb=true .*pip install wandb"):
        logging_utils.MetricsLogger(str(tmp_path), config)
