"""The generated docs are what their generator writes from the code and the measurements, and
the docs' links and the spec the code cites resolve."""
import json
import os
import re
import shutil

import pytest
from helpers import REPO

from running_utils import config_reference, docs, results_tables


@pytest.mark.parametrize("path", sorted(docs.generated()))
def test_committed_generated_docs_equal_what_the_generator_writes(path):
    with open(os.path.join(REPO, path)) as f:
        committed = f.read()
    assert committed == docs.generated()[path], (
        f"{path} is stale: run python -m running_utils.docs and commit the result")


def test_check_names_a_stale_doc_and_a_changed_measurement_changes_the_table(tmp_path):
    for folder in ("benchmarks/results", "experiments/results", "docs"):
        shutil.copytree(os.path.join(REPO, folder), tmp_path / folder)
    assert docs.stale(tmp_path) == []
    source = tmp_path / "benchmarks/results/bench_train_2xh200_2026-11-24.json"
    cases = json.loads(source.read_text())
    cases[0]["step_ms"] = 999.25
    source.write_text(json.dumps(cases))
    assert docs.stale(tmp_path) == ["docs/results.md"]
    assert "| 999.2 |" in results_tables.render(tmp_path)


def test_every_declared_key_and_run_setting_is_in_the_reference():
    from EasyLM.models.llama.llama_model import LLaMAConfig
    from running_utils.runner_utils import get_default_config

    text = config_reference.render()
    for key, meaning in get_default_config().describe().items():
        if key.startswith("eval_dataset."):
            continue  # listed once, under train_dataset
        assert f"| `{key}` |" in text and meaning.replace("|", "\\|") in text, key
    for name in LLaMAConfig.run_settings():
        assert f"| `{name}` |" in text, name


def test_tables_name_their_device_date_command_and_an_existing_source():
    for _, tables in results_tables.SECTIONS:
        for table in tables:
            assert os.path.exists(os.path.join(REPO, table.source)), table.source
            assert table.device and table.command and table.rows(REPO), table.title


def _markdown_files():
    folder = os.path.join(REPO, "docs")
    return [os.path.join(REPO, "README.md")] + sorted(
        os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".md"))


@pytest.mark.parametrize("path", _markdown_files(), ids=os.path.basename)
def test_relative_links_resolve(path):
    with open(path) as f:
        text = f.read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        assert os.path.exists(resolved), f"{os.path.basename(path)} links to missing {target}"


def test_the_spec_sections_the_code_cites_exist():
    """``FOT_SPEC 2.4`` in the code is the heading ``### 2.4`` of docs/FOT_SPEC.md, and
    ``FOT_SPEC section 5`` the heading ``## 5.``."""
    with open(os.path.join(REPO, "docs", "FOT_SPEC.md")) as f:
        numbers = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", f.read(), re.MULTILINE))
    cited = set()
    for package in ("FoT", "EasyLM", "eval", "experiments", "benchmarks", "running_utils",
                    "tests"):
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(root, name)) as f:
                        cited |= set(re.findall(r"FOT_SPEC (?:section )?(\d+(?:\.\d+)?)",
                                                f.read()))
    assert cited and cited <= numbers, sorted(cited - numbers)
