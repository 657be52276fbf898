"""The documents of the tiny lm-eval tasks (fot_tiny_*.yaml): JSONL files next to this one,
read as an in-memory ``datasets.DatasetDict`` so that the tasks need no network, no
``datasets`` cache and no particular working directory."""
import json
import os

import datasets


def load(data_file, **_):
    """``{"test": the rows of data_file}``; lm-eval passes the model's arguments too."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), data_file)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
