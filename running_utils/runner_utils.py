"""The runner's side of a run: JSON config + command line -> one validated config, and the
multi-host start-up (``jax.distributed``) of a pod job.

A config file is a flat JSON object of dotted flag names (``"optimizer.adamw_optimizer.lr"``);
keys starting with ``_`` (``"_comment"``) are documentation and ignored.  Command-line flags
``--key=value`` (or ``--key value``; a bare ``--key`` means true) override the file.  Any
unknown key fails at once, naming the closest valid keys.
"""
import json
import os

from EasyLM.config import ConfigDict, ConfigError
from EasyLM.models.llama import llama_train

RUNNER_KEYS = ("pod_job", "jax_distributed")


def get_default_config(updates=None):
    """The training flags plus the runner's own: ``pod_job`` and ``jax_distributed.*``."""
    config = ConfigDict(dict(
        llama_train.get_default_config(),
        # The identical program on every host; jax.distributed connects them.
        pod_job=False,
        # Empty / negative values: take JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
        # JAX_PROCESS_ID from the environment, else let JAX detect the cluster (TPU pods,
        # SLURM, Open MPI, Kubernetes).
        jax_distributed=dict(coordinator_address="", num_processes=0, process_id=-1,
                             local_device_ids="", cluster_detection_method="",
                             initialization_timeout=300),
    ))
    return config.copy_and_update(updates)


def parse_command_line(argv):
    """``(config file or None, {flag: value})`` from ``--config X --a.b=1 --flag ...``."""
    overrides, config_file, i = {}, None, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --key=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        if key == "config":
            config_file = value
        else:
            overrides[key] = value
        i += 1
    return config_file, overrides


def load_json_config(path):
    if not os.path.exists(path):
        raise ConfigError(f"--config {path}: file does not exist")
    with open(path) as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--config {path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of dotted flag names")
    return {k: v for k, v in values.items() if not k.startswith("_")}


def build_config(argv):
    """Defaults, then the JSON file, then the command line."""
    config_file, overrides = parse_command_line(list(argv))
    config = get_default_config()
    if config_file:
        config.update_from(load_json_config(config_file))
    config.update_from(overrides)
    return config


def split_config(config):
    """``(runner part, training part)`` of a full config."""
    train = ConfigDict({k: v for k, v in config.items() if k not in RUNNER_KEYS})
    runner = ConfigDict({k: config[k] for k in RUNNER_KEYS})
    return runner, train


def initialize_distributed(config):
    """``jax.distributed.initialize`` from ``jax_distributed.*`` flags or the environment."""
    import jax

    env = os.environ
    kwargs = {"initialization_timeout": config.initialization_timeout}
    address = config.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    if address:
        kwargs["coordinator_address"] = address
    num_processes = config.num_processes or int(env.get("JAX_NUM_PROCESSES", 0))
    if num_processes:
        kwargs["num_processes"] = num_processes
    process_id = config.process_id if config.process_id >= 0 else int(
        env.get("JAX_PROCESS_ID", -1))
    if process_id >= 0:
        kwargs["process_id"] = process_id
    if config.local_device_ids:
        kwargs["local_device_ids"] = [int(i) for i in config.local_device_ids.split(",")]
    if config.cluster_detection_method:
        kwargs["cluster_detection_method"] = config.cluster_detection_method
    jax.distributed.initialize(**kwargs)
