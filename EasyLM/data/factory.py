"""The dataset a config describes: its text processor and its source."""
from EasyLM.config import ConfigDict, ConfigError, Option
from EasyLM.data.huggingface_source import HuggingfaceDataset
from EasyLM.data.json_source import JsonDataset
from EasyLM.data.text import TextProcessor


class DatasetFactory:
    """Builds the configured dataset; ``type`` is ``json`` or ``huggingface``."""

    @staticmethod
    def get_default_config(updates=None):
        config = ConfigDict(
            type=Option("huggingface", "data source: 'json' (json_dataset.*) or 'huggingface' "
                        "(huggingface_dataset.*)"),
            text_processor=TextProcessor.get_default_config(),
            huggingface_dataset=HuggingfaceDataset.get_default_config(),
            json_dataset=JsonDataset.get_default_config(),
        )
        return config.copy_and_update(updates)

    @classmethod
    def load_dataset(cls, config, tokenizer, process_index=0, process_count=1, name="dataset",
                     pipeline_spec=None):
        """The dataset ``config`` describes; ``name`` (e.g. ``train_dataset``) prefixes the
        config keys named in error messages.  ``pipeline_spec``: its ``data_pipeline`` as
        the run read it (:func:`read_pipeline`); read here when not given."""
        config = cls.get_default_config(config)
        text_processor = TextProcessor(config.text_processor, tokenizer, f"{name}.text_processor")
        split = {"process_index": process_index, "process_count": process_count,
                 "pipeline_spec": pipeline_spec}
        if config.type == "json":
            return JsonDataset(config.json_dataset, tokenizer, text_processor,
                               name=f"{name}.json_dataset", **split)
        if config.type == "huggingface":
            return HuggingfaceDataset(config.huggingface_dataset, tokenizer, text_processor,
                                      name=f"{name}.huggingface_dataset", **split)
        raise ConfigError(f"{name}.type: unknown dataset type {config.type!r}; "
                          "use 'json' or 'huggingface'")
