"""The device memory JAX may take in a benchmark's subprocesses: what a training run gets from
the runner (``gpu_memory_fraction`` at its default, unless ``XLA_PYTHON_CLIENT_MEM_FRACTION``
or ``XLA_CLIENT_MEM_FRACTION`` is already in the environment), or an explicit cap in GiB.

Imports no JAX: the driver of a benchmark never starts a backend, its subprocesses do.
"""
import os
import subprocess

from running_utils.runner_utils import (DEFAULT_GPU_MEMORY_FRACTION, MEMORY_FRACTION_VARIABLES,
                                        apply_gpu_memory_fraction, gpu_memory_setting)


def device_total_gib():
    """Total memory of the first GPU as nvidia-smi reports it, or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
        return float(out[0]) / 1024
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def gpu_count():
    """How many GPUs nvidia-smi lists, or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(line.startswith("GPU ") for line in out.splitlines())


def subprocess_environment(cap_gib=0.0, environ=os.environ):
    """``(environment for a subprocess that starts JAX, its memory setting in words)``.

    ``cap_gib`` (a benchmark's ``--memory-gib``) replaces any value in ``environ``; without it
    the runner's rule applies: a value already in ``environ`` stays, else the runner's default.
    """
    env = dict(environ)
    if cap_gib:
        total = device_total_gib()
        if total is None:
            raise SystemExit(f"--memory-gib {cap_gib:g}: nvidia-smi did not report the GPU's "
                             "total memory, of which the cap is a share")
        for name in MEMORY_FRACTION_VARIABLES:  # JAX refuses both names at once
            env.pop(name, None)
        env[MEMORY_FRACTION_VARIABLES[0]] = f"{min(cap_gib / total, 0.99):.4f}"
        return env, f"{gpu_memory_setting(env)} (--memory-gib {cap_gib:g} of {total:.1f} GiB)"
    apply_gpu_memory_fraction(DEFAULT_GPU_MEMORY_FRACTION, env)
    from_environment = any(name in environ for name in MEMORY_FRACTION_VARIABLES)
    source = ("set in the environment" if from_environment
              else "the runner's default gpu_memory_fraction")
    return env, f"{gpu_memory_setting(env)} ({source})"
