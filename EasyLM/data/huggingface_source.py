"""A Hugging Face ``datasets`` dataset as a source of records, forever."""
import os

from EasyLM.config import ConfigError, Option
from EasyLM.data.dataset import common_config, _DocumentDataset


class HuggingfaceDataset(_DocumentDataset):
    """A ``datasets`` dataset (``load_dataset`` or a ``save_to_disk`` directory), forever;
    with ``shuffle`` each pass uses the seed ``seed + pass``."""

    RECORDS = "examples"

    @staticmethod
    def get_default_config(updates=None):
        config = common_config(
            path=Option("", "dataset name, builder ('json', 'parquet') or save_to_disk "
                        "directory"),
            name=Option("", "dataset configuration name"),
            split=Option("train", "split to read"),
            data_files=Option("", "comma list, for builders such as 'json'"),
            cache_dir=Option("", "Hugging Face datasets cache; '' = its default"),
            streaming=Option(False, "read without downloading the whole dataset first"),
            shuffle=Option(False, "shuffle each pass with the seed seed + pass"),
            seed=Option(42, "shuffle seed of the first pass"),
            shuffle_buffer_size=Option(10000, "examples in the shuffle buffer (streaming "
                                       "only)"),
        )
        return config.copy_and_update(updates)

    def __init__(self, config, tokenizer, text_processor, process_index=0, process_count=1,
                 name="huggingface_dataset", pipeline_spec=None):
        super().__init__(self.get_default_config(config), tokenizer, text_processor,
                         process_index, process_count, name, pipeline_spec)
        self._dataset = self._load()
        self._check_data()

    def _load(self):
        import datasets

        config = self.config
        if not config.path:
            raise ConfigError(f"{self.prefix}.path is empty; give a dataset name, a builder such "
                              "as 'json' with data_files, or a save_to_disk directory")
        if os.path.isdir(config.path) and any(os.path.exists(os.path.join(config.path, f))
                                              for f in ("state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(config.path)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[config.split]
            return dataset.to_iterable_dataset() if config.streaming else dataset
        data_files = ([f.strip() for f in config.data_files.split(",")] if config.data_files
                      else None)
        try:
            return datasets.load_dataset(
                config.path, config.name or None, split=config.split or None,
                data_files=data_files, streaming=config.streaming,
                cache_dir=config.cache_dir or None)
        except FileNotFoundError as error:
            raise ConfigError(f"{self.prefix}.path / {self.prefix}.data_files: {error}") from None

    def _initial_position(self):
        return {"pass": 0, "row": 0}

    def _parts(self):
        return [(self._first_records(), self.config.path)]

    def _first_records(self):
        # Unshuffled: any records show the fields, and shuffling a whole dataset costs.
        for row, example in enumerate(self._dataset):
            yield {"pass": 0, "row": row + 1}, f"{self.config.path} row {row}", example

    def _records(self, position):
        pass_, row = position["pass"], position["row"]
        while True:
            dataset = self._dataset
            if self.config.shuffle:
                seed = self.config.seed + pass_
                dataset = (dataset.shuffle(seed=seed, buffer_size=self.config.shuffle_buffer_size)
                           if self.config.streaming else dataset.shuffle(seed=seed))
            for example in dataset.skip(row) if row else dataset:
                yield {"pass": pass_, "row": row + 1}, f"{self.config.path} row {row}", example
                row += 1
            if row == 0:
                raise ValueError(f"{self.prefix}.path: {self.config.path} holds no examples")
            pass_, row = pass_ + 1, 0
