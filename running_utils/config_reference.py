"""docs/config_keys.md: every key of a run with its default and meaning, written from the
declarations (:func:`running_utils.runner_utils.get_default_config` and the run settings of
:class:`~EasyLM.models.llama.llama_model.LLaMAConfig`), so the reference cannot drift from
what ``--help`` says.
"""
import dataclasses
import json

from EasyLM.models.llama.llama_model import LLaMAConfig
from running_utils.runner_utils import get_default_config

# Keys are grouped by their first dotted part; groups not named here come under "Run".
GROUPS = (
    ("tokenizer", "Tokenizer"),
    ("train_dataset", "Training data"),
    ("eval_dataset", "Evaluation data (the same keys as the training data)"),
    ("optimizer", "Optimizer"),
    ("checkpointer", "Checkpoints"),
    ("logging", "Logging"),
    ("jax_distributed", "Several hosts"),
)
# The eval data's keys repeat the train data's: listed once, under the train data.
REPEATED = {"eval_dataset": "train_dataset"}

HEADER = """\
# Config keys

Written by `python -m running_utils.docs` from the declarations in the code (the same text as
`python -m running_utils.runner --help`); do not edit by hand (`tests/test_docs.py` fails when
this file differs from what the command writes). How keys are given (a JSON file of dotted
keys, `--key=value` on the command line) and the keys of the original LongLLaMA configs are in
[training.md](training.md). The same list, from the code at hand:

```text
python -m running_utils.runner --help
```
"""


def _cell(text):
    """Markdown table cell: ``|`` would end the cell."""
    return str(text).replace("|", "\\|")


def _default(value):
    return f"`{json.dumps(value)}`" if value != "" else '`""`'


def _table(rows):
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{_cell(key)}` | {_cell(_default(value))} | {_cell(meaning)} |"
              for key, value, meaning in rows]
    return "\n".join(lines) + "\n"


def _run_settings_table():
    """The model's run settings: what sets each (a flag, the data pipeline)."""
    run = LLaMAConfig.run_settings()
    lines = ["| model field | set by | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(LLaMAConfig):
        if field.name in run:
            lines.append(f"| `{field.name}` | {_cell(run[field.name])} | "
                         f"{_cell(_default(field.default))} | "
                         f"{_cell(field.metadata['meaning'])} |")
    return "\n".join(lines) + "\n"


def render():
    """The text of docs/config_keys.md."""
    config = get_default_config()
    values, meanings = config.flatten(), config.describe()
    groups = {prefix: [] for prefix, _ in GROUPS}
    run = []
    for key, value in values.items():
        prefix = key.split(".", 1)[0]
        (groups[prefix] if prefix in groups else run).append((key, value, meanings[key]))
    parts = [HEADER, "\n## Run\n\n", _table(run)]
    for prefix, title in GROUPS:
        parts.append(f"\n## {title}\n\n")
        if prefix in REPEATED:
            parts.append(f"`{prefix}.*` takes every `{REPEATED[prefix]}.*` key below its "
                         f"prefix, with the same defaults.\n")
        else:
            parts.append(_table(groups[prefix]))
    parts += ["\n## Run settings of the model\n\n",
              "Fields of `LLaMAConfig` that say how a run executes the model, not what the "
              "model is: a checkpoint's `llama_config.json` does not store them and "
              "`update_llama_config` refuses them, naming what sets them.\n\n",
              _run_settings_table()]
    return "".join(parts)
