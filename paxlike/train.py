"""Command line: train a model from an experiment config.

    python -m paxlike.train --config=experiments/transformer.py:tiny --workdir=runs/tiny \
        [--cpu_devices=8] [--config.steps=500 --config.mesh.tensor=2 ...]

With no flags at all it trains the `tiny` Transformer on the Python standard library's source into
runs/transformer-tiny. Running the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import os

import logging as py_logging

from absl import flags, logging
from paxlike import cli
from paxlike.errors import UserError

_DEFAULT_CONFIG = cli.DEFAULT_CONFIG

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and config.json; default "
    "runs/<config file>-<size>. Running again with the same workdir resumes.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Emulate this many CPU devices (for meshes on a machine without accelerators).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host). On TPU pods and SLURM "
    "the arguments are detected; elsewhere give the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def default_workdir(config_arg: str) -> str:
    path, _, size = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}-{size}" if size else name)


def _setup_jax():
    import jax  # imported here so --cpu_devices applies before any JAX backend starts
    if _CPU_DEVICES.value is not None:
        if _CPU_DEVICES.value < 1:
            raise UserError(f"--cpu_devices={_CPU_DEVICES.value} must be >= 1")
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
        jax.config.update("jax_platforms", "cpu")
    if _DISTRIBUTED.value or _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(cfg):
    _setup_jax()
    from paxlike import loop  # after _setup_jax: importing the trainer touches no devices
    config_arg = cli.config_argument(_DEFAULT_CONFIG)
    workdir = _WORKDIR.value or default_workdir(config_arg)
    logging.info("training %s in %s", config_arg, workdir)
    loop.run(cfg, workdir)


def _quiet_library_logs(record) -> bool:
    """Keeps orbax's per-save INFO chatter out of the terminal (its warnings still show)."""
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def run_cli():
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_quiet_library_logs)
    cli.run(main, _DEFAULT_CONFIG)


if __name__ == "__main__":
    run_cli()
