"""Run FoT continued pretraining from a JSON config.

    python -m running_utils.runner --config configs/setup_test.json [--pod_job] \
        [--workdir DIR] [--any.dotted.flag=value ...]

``--help`` lists every key with its default and meaning; ``--print_config`` prints the resolved
config and exits.  With ``--pod_job`` the same command runs on every host of a TPU pod or GPU
cluster (see :func:`running_utils.runner_utils.initialize_distributed`).  A misconfiguration
exits with status 2 and a message naming the key, before anything is compiled; a run that does
not fit in device memory exits with status 1 and a message saying which keys to change.
"""
import json
import sys

from EasyLM.config import ConfigError
from EasyLM.models.llama import llama_train
from running_utils.runner_utils import (apply_gpu_memory_fraction, build_config, help_text,
                                        initialize_distributed, out_of_memory_error,
                                        out_of_memory_message, parse_command_line, split_config)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _, _, actions = parse_command_line(argv)
        if "help" in actions:
            print(help_text())
            return None
        config = build_config(argv)
        runner, train = split_config(config)
        if "print_config" in actions:
            print(json.dumps(config.flatten(), indent=2))
            return None
        # Before anything starts JAX's backend, which reads it once.
        apply_gpu_memory_fraction(runner.gpu_memory_fraction)
        if runner.pod_job:
            initialize_distributed(runner.jax_distributed)
        llama_train.main(train)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        out_of_memory = out_of_memory_error(error)
        if out_of_memory is None:
            raise
        print(out_of_memory_message(out_of_memory, config), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
