"""Command line: train a model from an experiment config.

    python -m paxlike.train --config=experiments/transformer.py:tiny --workdir=runs/tiny \
        [--cpu_devices=8] [--config.steps=500 --config.mesh.tensor=2 ...]

With no flags at all it trains the `tiny` Transformer on the Python standard library's source into
runs/transformer-tiny. Running the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import sys

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

import experiments
from paxlike.errors import UserError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(experiments.__file__), "transformer.py") + ":tiny"

_CONFIG = None  # defined in run_cli: defining it already applies the --config.KEY overrides
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


def _fail(message: str) -> None:
    logging.flush()
    print(f"paxlike: error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_error(e: Exception) -> str:
    """One line describing why the config could not be loaded or overridden."""
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections: override of a missing key
        text = str(e).strip("'\"").replace("\\n", "; ").replace("\\'", "'")
        return f"unknown config key in --config.KEY=VALUE: {text}"
    root = e
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    if isinstance(root, OSError) and not isinstance(root, FileNotFoundError):
        return f"cannot load the --config file: {lines[-1] if lines else root}"
    if isinstance(root, FileNotFoundError):
        return f"--config file not found: {root.filename or root}"
    return f"--config: {lines[-1] if lines else type(root).__name__}"


def _parse_flags(argv):
    """absl flag parsing, with config problems reported as one line instead of a traceback."""
    global _CONFIG
    try:
        _CONFIG = config_flags.DEFINE_config_file(
            "config", _DEFAULT_CONFIG, "Experiment config file and size, e.g. "
            "experiments/transformer.py:tiny. Override any key with --config.KEY=VALUE.",
            lock_config=True)
        parsed = flags.FLAGS(argv)
        _CONFIG.value.to_dict()  # the config file loads lazily; make a broken one fail here
        return parsed
    except flags.Error as e:
        message = str(e)
        _fail(_config_error(e) if "parsing config file" in message else message)
    except Exception as e:  # noqa: BLE001 - every config failure becomes one clear line
        _fail(_config_error(e))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    try:
        _setup_jax()
        from paxlike import loop  # after _setup_jax: importing the trainer touches no devices
        config_arg = flags.FLAGS["config"].serialize().partition("=")[2] or _DEFAULT_CONFIG
        workdir = _WORKDIR.value or default_workdir(config_arg)
        logging.info("training %s in %s", config_arg, workdir)
        loop.run(_CONFIG.value, workdir)
    except UserError as e:
        _fail(str(e))


def _quiet_library_logs(record) -> bool:
    """Keeps orbax's per-save INFO chatter out of the terminal (its warnings still show)."""
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def run_cli():
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_quiet_library_logs)
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_cli()
