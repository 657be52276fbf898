"""The local window inference uses by default on a checkpoint: the row length its run trained
on (the memory was trained over windows of that length), else the model's
``max_sequence_length``.  Windowed inference (:mod:`EasyLM.models.llama.windowed_lm`) and the
FoT export (:mod:`EasyLM.models.llama.convert_easylm_to_hf`) read it."""
import os

from EasyLM.checkpoint import METADATA_FILE, read_metadata


def trained_row_length(path):
    """Tokens per batch row the run of a train checkpoint trained on, or ``None`` (converted
    weights carry no training record)."""
    if "://" in path or not os.path.exists(os.path.join(path, METADATA_FILE)):
        return None
    metadata = read_metadata(path)
    if "train_seq_length" in metadata:
        return int(metadata["train_seq_length"])
    # Checkpoints saved before train_seq_length was recorded carry the run's flags.
    flags = metadata.get("config", {})
    length = flags.get(f"train_dataset.{flags.get('train_dataset.type')}_dataset.seq_length")
    return int(length) if length else None


def default_window(path, llama_config):
    """Default local window of windowed inference on the checkpoint at ``path``."""
    return trained_row_length(path) or llama_config.max_sequence_length
