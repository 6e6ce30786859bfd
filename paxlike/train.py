"""Command line: train a model from an experiment config.

    python -m paxlike.train --config=experiments/transformer.py:tiny --workdir=runs/tiny \
        [--cpu_devices=8] [--config.steps=500 --config.mesh.tensor=2 ...]

With no flags at all it trains the `tiny` Transformer on the Python standard library's source into
runs/transformer-tiny. Running the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping

from absl import flags, logging
from paxlike import cli
from paxlike.errors import UserError

_DEFAULT_CONFIG = cli.DEFAULT_CONFIG

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and config.json: a local path, or "
    "gs://BUCKET/PATH (pip install 'paxlike[gcs]'); default runs/<config file>-<size>. Running "
    "again with the same workdir resumes.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Emulate this many CPU devices (for meshes on a machine without accelerators).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host). On TPU pods and in "
    "SLURM srun steps the arguments are detected; elsewhere give the three flags below.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 (multi-host; or env JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")

# What jax's SLURM detection reads (jax/_src/clusters/slurm_cluster.py, is_env_present).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def default_workdir(config_arg: str) -> str:
    path, _, size = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}-{size}" if size else name)


def one_task_per_node(env: Mapping[str, str]) -> bool:
    """True in a SLURM job step that jax detects and that runs exactly one task on each node (srun
    sets SLURM_STEP_NUM_NODES with SLURM_STEP_NODELIST)."""
    return (all(v in env for v in _SLURM_VARS)
            and env["SLURM_NTASKS"] == env.get("SLURM_STEP_NUM_NODES"))


def distributed_args(env: Mapping[str, str], coordinator_address: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None) -> dict:
    """Keyword arguments for jax.distributed.initialize: the flags as given (None: jax detects it
    from the environment), plus `local_device_ids=[]` in a SLURM step with one task per node.

    jax assumes one SLURM task per GPU: when local_device_ids is None it restricts each process to
    the GPU numbered SLURM_LOCALID (clusters/cluster.py, auto_detect_unset_distributed_params), so
    `srun --ntasks-per-node=1 --gpus-per-node=8` would train on 1 GPU per node. jax only applies
    a non-empty list (distributed.py: `if local_device_ids:`) and only detects one that is None,
    so [] keeps every GPU of the node. JAX_LOCAL_DEVICE_IDS, when set, still wins."""
    args = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id)
    if one_task_per_node(env) and not env.get("JAX_LOCAL_DEVICE_IDS"):
        args["local_device_ids"] = []
    return args


def _setup_jax():
    import jax  # imported here so --cpu_devices applies before any JAX backend starts
    cli.emulate_cpu_devices(_CPU_DEVICES.value)
    given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not _DISTRIBUTED.value and given == (None, None, None):
        return
    args = distributed_args(os.environ, *given)
    try:
        jax.distributed.initialize(**args)
    except (ValueError, TypeError) as e:  # jax's checks of missing or inconsistent arguments
        raise UserError(f"cannot join the distributed job: {e} (no TPU pod or SLURM step was "
                        "detected for the missing values; give --coordinator_address=HOST:PORT "
                        "--num_processes=N --process_id=I)") from None
    # One line per process saying what it joined and which devices it kept: where a recipe's
    # promise (e.g. 8 GPUs per process) is seen kept or broken. jax has no public reader for the
    # GPU restriction it applied ("all", or the ids of local_device_ids).
    logging.info("distributed: process %d of %d, %d local devices of %d (%s), visible GPUs: %s",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.default_backend(),
                 jax.config._read("jax_cuda_visible_devices"))


def main(cfg):
    _setup_jax()
    cli.setup_compilation_cache(cfg.compilation_cache)
    from paxlike import loop  # after _setup_jax: importing the trainer touches no devices
    config_arg = cli.config_argument(_DEFAULT_CONFIG)
    workdir = _WORKDIR.value or default_workdir(config_arg)
    logging.info("training %s in %s", config_arg, workdir)
    try:
        loop.run(cfg, workdir)
    except BaseException as e:
        import jax
        if jax.process_count() > 1:
            _end_failed_process(e)
        raise


def _end_failed_process(error: BaseException) -> None:
    """Reports `error` as the CLI would and exits at once. At a normal exit jax waits at a
    shutdown barrier for every process, and the others, blocked in a collective with this one or
    dead, would hold it there for minutes; the watchdog has already told them this process failed."""
    if isinstance(error, UserError):
        cli.print_error(str(error))
        status = 2
    else:
        logging.error("this process failed:\n%s", "".join(traceback.format_exception(error)))
        status = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def run_cli():
    cli.log_info_quietly()
    cli.run(main, _DEFAULT_CONFIG)


if __name__ == "__main__":
    run_cli()
