"""The runner's side of a run: JSON config + command line -> one validated config, the
multi-host start-up (``jax.distributed``) of a pod job, the device memory JAX may take, and
the messages of ``--help`` and of a run that does not fit in device memory.

A config file is a flat JSON object of dotted flag names (``"optimizer.adamw_optimizer.lr"``);
keys starting with ``_`` (``"_comment"``) are documentation and ignored.  Command-line flags
``--key=value`` (or ``--key value``; a bare ``--key`` means true) override the file.  Any
unknown key fails at once, naming the closest valid keys; keys of the original LongLLaMA FoT
configs are translated first (:mod:`EasyLM.legacy_keys`).
"""
import json
import os
import textwrap

from EasyLM.config import ConfigDict, ConfigError, JsonObject, Option, check_ranges
from EasyLM.legacy_keys import translate_flags

RUNNER_KEYS = ("pod_job", "jax_distributed", "gpu_memory_fraction")
COMMAND_LINE_ONLY = (
    ("--config FILE.json", "a flat JSON object of the keys below; the command line overrides "
                           "it"),
    ("--print_config", "print the resolved config (defaults, then the file, then the command "
                       "line) as a flat JSON object, itself a valid --config file, and exit"),
    ("-h, --help", "print this list and exit"),
)
# JAX reads either name (the second is the newer) and refuses both at once, so a value already
# in the environment is the user's and stays alone.
MEMORY_FRACTION_VARIABLES = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")
# JAX's own default (75%) stops at 59.4 GiB of an H100's 79.6, and the best 1b FoT setting
# of docs/benchmarks.md needs 62.8. The CUDA context, library handles and NCCL buffers live
# outside this pool, hence not 1.0. The benchmarks' subprocesses start JAX with it too.
DEFAULT_GPU_MEMORY_FRACTION = 0.95


def get_default_config(updates=None):
    """The training flags plus the runner's own: ``pod_job``, ``jax_distributed.*`` and
    ``gpu_memory_fraction``."""
    # Imported here: the benchmarks read the memory default above without importing JAX.
    from EasyLM.models.llama import llama_train

    config = ConfigDict(
        llama_train.get_default_config(),
        pod_job=Option(False, "multi-host run: the identical command on every host; "
                       "jax.distributed connects them"),
        jax_distributed=dict(
            coordinator_address=Option("", "host:port of process 0; '' = "
                                       "JAX_COORDINATOR_ADDRESS or JAX's cluster detection"),
            num_processes=Option(0, "processes in the job; 0 = JAX_NUM_PROCESSES or detected"),
            process_id=Option(-1, "this process's index; -1 = JAX_PROCESS_ID or detected"),
            local_device_ids=Option("", "comma list of the local devices this process uses; "
                                    "'' = all"),
            cluster_detection_method=Option("", "force a cluster type (gcetpu, slurm, ompi, "
                                            "mpi4py, gketpu); '' = the first JAX detects"),
            initialization_timeout=Option(300, "seconds to wait for every process to connect")),
        gpu_memory_fraction=Option(DEFAULT_GPU_MEMORY_FRACTION, "share of each GPU's memory "
                                   "JAX may take (XLA_PYTHON_CLIENT_MEM_FRACTION, set before "
                                   "JAX starts unless already in the environment); 0 = JAX's "
                                   "default 0.75"),
    )
    return config.copy_and_update(updates)


def parse_command_line(argv):
    """``(config file or None, {flag: value}, {'help', 'print_config'} requested)`` from
    ``--config X --a.b=1 --flag ...``."""
    overrides, config_file, actions, i = {}, None, set(), 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-h":
            arg = "--help"
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --key=value "
                              f"(--help lists them)")
        key, sep, value = arg[2:].partition("=")
        if key in ("help", "print_config"):
            actions.add(key)
        else:
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
    return config_file, overrides, actions


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
    """Defaults, then the JSON file, then the command line (``--help`` and
    ``--print_config`` are not config keys: see :func:`parse_command_line`); legacy keys
    translated by :func:`EasyLM.legacy_keys.translate_flags`."""
    config_file, overrides, _ = parse_command_line(list(argv))
    config = get_default_config()
    model_fields = {}
    # Named, so that a value of the wrong type says which layer gave the one it replaces.
    layers = [("the command line", overrides)]
    if config_file:
        layers.insert(0, (f"the config file {config_file}", load_json_config(config_file)))
    for source, values in layers:
        flags, fields = translate_flags(values)
        config.update_from(flags, source=source)
        model_fields.update(fields)
    if model_fields:
        # The original code's llama.<field> flags were the base that update_llama_config
        # updated.
        config.update_llama_config = JsonObject(model_fields, **config.update_llama_config)
    return config


def split_config(config):
    """``(runner part, training part)`` of a full config; the runner part is validated."""
    train = ConfigDict({k: v for k, v in config.items() if k not in RUNNER_KEYS})
    runner = ConfigDict({k: config[k] for k in RUNNER_KEYS})
    check_ranges(runner, gpu_memory_fraction=(">= 0", "<= 1"))
    return runner, train


def help_text():
    """Every key with its default and meaning, from the declarations."""
    config = get_default_config()
    defaults = config.flatten()
    keys = [(f"--{key}={json.dumps(defaults[key])}", meaning)
            for key, meaning in config.describe().items()]
    return "\n".join([
        "usage: python -m running_utils.runner --config FILE.json [--pod_job] [--key=value ...]",
        "", *_help_entries(COMMAND_LINE_ONLY), "",
        "Keys (--key=default, then what it means); a JSON config file uses the same dotted "
        "names:", *_help_entries(keys)])


def _help_entries(pairs):
    lines = []
    for flag, meaning in pairs:
        lines.append(f"  {flag}")
        lines += textwrap.wrap(meaning, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return lines


def apply_gpu_memory_fraction(fraction, environ=os.environ):
    """Let JAX take ``fraction`` of each GPU's memory, unless the environment already says.

    JAX reads the variable when its backend starts (the first ``jax.devices()``, array or
    ``jax.distributed.initialize``), so call this before any of them."""
    if fraction and not any(name in environ for name in MEMORY_FRACTION_VARIABLES):
        environ[MEMORY_FRACTION_VARIABLES[0]] = f"{fraction:g}"


def gpu_memory_setting(environ=os.environ):
    """The share of each GPU's memory JAX will take under ``environ``, in words."""
    return ", ".join(f"{name}={environ[name]}" for name in MEMORY_FRACTION_VARIABLES
                     if name in environ) or "JAX's default 0.75"


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


def out_of_memory_error(error):
    """The error in ``error``'s chain that is XLA running out of device memory, or None."""
    while error is not None:
        text = str(error)
        if isinstance(error, RuntimeError) and ("RESOURCE_EXHAUSTED" in text
                                                or "out of memory" in text.lower()):
            return error
        error = error.__cause__ or error.__context__
    return None


def out_of_memory_message(error, config, environ=os.environ):
    """What to change when a run does not fit (``error`` from :func:`out_of_memory_error`):
    a few lines instead of XLA's allocator dump."""
    what = str(error).strip().splitlines()[0][:300]
    data = config.train_dataset
    source = f"train_dataset.{data.type}_dataset"
    batch = data[f"{data.type}_dataset"].batch_size
    accumulate = config.optimizer.accumulate_gradient_steps
    now = gpu_memory_setting(environ)
    return "\n".join([
        f"out of device memory: {what}",
        "To fit, change one of:",
        f"  remat_block={config.remat_block!r}: nothing_saveable recomputes each layer's "
        "activations in the backward pass (dots_and_attention_saveable keeps more)",
        f"  {source}.batch_size={batch}: fewer rows per step, or keep the batch and raise "
        f"optimizer.accumulate_gradient_steps={accumulate} to run it in smaller micro-batches",
        f"  loss_chunk_tokens={config.loss_chunk_tokens}: smaller loss slices (0 materialises "
        "the full logits, the most memory)",
        f"  gpu_memory_fraction={config.gpu_memory_fraction}: more of each GPU for JAX (this "
        f"run: {now}; a value already in the environment wins over the key)",
    ])
