"""Run FoT continued pretraining from a JSON config.

    python -m running_utils.runner --config configs/setup_test.json [--pod_job] \
        [--workdir DIR] [--any.dotted.flag=value ...]

With ``--pod_job`` the same command runs on every host of a TPU pod or GPU cluster (see
:func:`running_utils.runner_utils.initialize_distributed`).  A misconfiguration exits with
status 2 and a message naming the key, before anything is compiled.
"""
import sys

from EasyLM.config import ConfigError
from EasyLM.models.llama import llama_train
from running_utils.runner_utils import build_config, initialize_distributed, split_config


def main(argv=None):
    try:
        runner, train = split_config(build_config(sys.argv[1:] if argv is None else argv))
        if runner.pod_job:
            initialize_distributed(runner.jax_distributed)
        return llama_train.main(train)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
