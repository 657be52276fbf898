"""The installed package: ``pip install`` of the sources pyproject.toml names gives, outside the
checkout, the toolkit's packages, the PyTorch model files an export copies next to the weights,
and the console commands.

The install is offline (``--no-index --no-deps --no-build-isolation``: the environment's
setuptools builds it, the environment provides the dependencies) and of a copy of the sources,
so the checkout gets no ``build/`` directory."""
import ast
import configparser
import glob
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

import helpers

PACKAGES = ("EasyLM", "FoT", "running_utils", "eval", "experiments", "benchmarks")
COMMANDS = {
    "fot-train": "running_utils.runner:main",
    "fot-import-hf": "EasyLM.models.llama.convert_hf_to_easylm:main",
    "fot-export-hf": "EasyLM.models.llama.convert_easylm_to_hf:main",
    "fot-passkey": "eval.passkey:main",
    "fot-loss-by-position": "eval.loss_by_position:main",
    "fot-dictionary-lookup": "eval.dictionary_lookup:main",
    "fot-window-rules": "eval.window_rules:main",
}
# Run outside the checkout, against the install only: where each module comes from, where the
# model files an export copies are, and what each console command resolves to.
PROBE = """import importlib.metadata, json, sys
from EasyLM.models.llama.windowed_lm import WindowedLM
import EasyLM.models.llama.convert_easylm_to_hf, FoT.hf, running_utils.runner, eval.passkey
import benchmarks.bench_train
modules = {m: sys.modules[m].__file__ for m in ("EasyLM", "FoT", "FoT.hf", "running_utils",
                                                "eval", "benchmarks")}


def load(entry_point):
    try:
        return callable(entry_point.load())
    except ImportError as error:
        return repr(error)


commands = {ep.name: [ep.value, load(ep)]
            for ep in importlib.metadata.entry_points(group="console_scripts")
            if ep.dist.name == sys.argv[1]}
print(json.dumps({"modules": modules, "model_files": list(FoT.hf.MODEL_FILES),
                  "commands": commands}))
"""


def pyproject():
    with open(os.path.join(helpers.REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The directory ``pip install --target`` filled (packages, ``*.dist-info``, ``bin/``)."""
    # The build backend pyproject.toml names (tensorboard brings it along).
    pytest.importorskip("setuptools", minversion="64")
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", pyproject()["project"]["readme"]):
        shutil.copy(os.path.join(helpers.REPO, name), source)
    for package in PACKAGES:
        shutil.copytree(os.path.join(helpers.REPO, package), source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    target = root / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                             "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
                             "--target", str(target), str(source)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return target


def outside(installed, *command):
    """``command`` run in an empty directory with only the install on ``PYTHONPATH``."""
    cwd = installed.parent / "elsewhere"
    cwd.mkdir(exist_ok=True)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(installed)))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_pyproject_declares_the_packages_and_commands():
    project = pyproject()
    assert project["project"]["scripts"] == COMMANDS
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(patterns) == sorted(f"{p}*" for p in PACKAGES)


@pytest.fixture(scope="module")
def probed(installed):
    """What :data:`PROBE` found."""
    name = pyproject()["project"]["name"]
    return json.loads(outside(installed, sys.executable, "-c", PROBE, name))


@pytest.mark.slow
def test_the_install_imports_outside_the_checkout_with_the_model_files(installed, probed):
    for module, path in probed["modules"].items():
        assert path.startswith(str(installed) + os.sep), (module, path)
    # An export copies FoT.hf.MODEL_FILES next to the weights: they are in the install.
    assert probed["model_files"]
    for path in probed["model_files"]:
        assert path.startswith(str(installed / "FoT" / "hf")) and os.path.isfile(path), path
    shipped = {os.path.basename(p) for p in glob.glob(os.path.join(helpers.REPO, "FoT", "hf",
                                                                   "*.py"))}
    assert {os.path.basename(p) for p in glob.glob(str(installed / "FoT" / "hf" / "*.py"))} \
        == shipped

    (dist_info,) = glob.glob(str(installed / "*.dist-info"))
    with open(os.path.join(dist_info, "top_level.txt")) as f:
        assert sorted(f.read().split()) == sorted(PACKAGES)  # tests and data stay out
    entry_points = configparser.ConfigParser()
    entry_points.read(os.path.join(dist_info, "entry_points.txt"))
    assert dict(entry_points["console_scripts"]) == COMMANDS
    for command in COMMANDS:
        assert os.access(installed / "bin" / command, os.X_OK), command


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_resolves_in_the_install(probed, command):
    assert probed["commands"][command] == [COMMANDS[command], True]


@pytest.mark.slow
def test_the_train_command_runs_from_the_install(installed):
    assert "--checkpointer.save_on_signal=" in outside(installed,
                                                      str(installed / "bin" / "fot-train"),
                                                      "--help")


def _returned_values(target):
    """The ``return`` statements of a command's function that give a value."""
    module, function = target.split(":")
    path = os.path.join(helpers.REPO, *module.split(".")) + ".py"
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    (main,) = [node for node in tree.body
               if isinstance(node, ast.FunctionDef) and node.name == function]
    return [ast.unparse(node.value) for node in ast.walk(main)
            if isinstance(node, ast.Return) and node.value is not None
            and not (isinstance(node.value, ast.Constant) and node.value.value is None)]


# A console command runs ``sys.exit(main())``: a value main returns (a run directory, an
# accuracy) is printed to stderr and becomes exit status 1 after a run that worked.
@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_exits_0_after_it_worked(command):
    assert not _returned_values(COMMANDS[command])
