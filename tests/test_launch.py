"""The local launcher (paxlike.launch), whose two processes train exactly like one process with
the same 8 devices, and the multi-host recipes of BUILD.md, each rehearsed with local processes
that see the environment the recipe's scheduler would give them: two processes of 2 CPU devices
each join one `jax.distributed` job and train 3 steps. The recipe runs share one shape, so after
the first the compiled programs come from the session's compilation cache.

Run as a module (`python -m test_launch`), this file is also the child program of the launcher's
supervision tests: see `_child` at the end."""

import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import ROOT, assert_one_line_error, cli_overrides, free_port, subprocess_env

STEPS = 3
TRAIN = cli_overrides(steps=STEPS)
_SCHEDULER_VARS = re.compile(r"^(SLURM_|OMPI_|PMI_|KUBERNETES_|TPU_|MEGASCALE_|JAX_COORDINATOR|"
                             r"JAX_LOCAL_DEVICE_IDS|JOB_COMPLETION_INDEX)")


def _env(**extra) -> dict[str, str]:
    """subprocess_env() without the scheduler variables of the machine running the tests."""
    env = {k: v for k, v in subprocess_env().items() if not _SCHEDULER_VARS.match(k)}
    return {**env, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), **extra}


def _run_together(jobs, timeout=240) -> list[tuple[int, str]]:
    """Starts every (command, env) at once, as a scheduler would; [(exit status, output)]."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd, env in jobs]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def _assert_trained_as_one_job(results, workdir):
    """Both processes exit 0, each says it is process i of 2 with 2 of the job's 4 devices and no
    GPU restriction from jax, and the job's metrics hold every step."""
    for i, (status, out) in enumerate(results):
        assert status == 0, out[-3000:]
        assert (f"distributed: process {i} of 2, 2 local devices of 4 (cpu), visible GPUs: all"
                in out), out[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == list(range(1, STEPS + 1))


def _train(*flags) -> list[str]:
    return [sys.executable, "-m", "paxlike.train", *flags, *TRAIN]


# ---------------------------------------------------------------------------------- the launcher
def test_launcher_trains_two_processes_exactly_like_one(tmp_path):
    # Two processes of 4 CPU devices each, the data axis spanning the processes (DCN) and fsdp
    # inside each, train exactly like one process with 8 devices.
    mesh = {"mesh.data": 2, "mesh.fsdp": 4}
    reference = _reference_losses(str(tmp_path / "one_process"), mesh)
    workdir = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-m", "paxlike.launch", "--processes=2", "--cpu_devices_per_process=4",
         "--", f"--workdir={workdir}", *cli_overrides(steps=STEPS, **mesh, **{"mesh.dcn.data": 2})],
        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith(("[0] ", "[1] ")) for line in lines), lines[:5]
    by_process = ["\n".join(line[4:] for line in lines if line.startswith(f"[{i}] "))
                  for i in range(2)]
    for i, out in enumerate(by_process):
        assert f"distributed: process {i} of 2, 4 local devices of 8 (cpu)" in out, out[-3000:]
    assert f"step {STEPS}/{STEPS}" in by_process[0]  # progress: process 0 only
    assert not re.search(r"step \d+/\d+", by_process[1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS)))


def _reference_losses(workdir: str, mesh: dict) -> list[float]:
    """The same training in this process, on its 8 devices (imported here: the launcher tests'
    child program, this module, must start quickly)."""
    from configs import small_test_config
    from paxlike import loop
    return loop.run(small_test_config(steps=STEPS, **mesh), workdir)


def test_launcher_refuses_bad_input():
    for args, message in [
            ([], r"--processes=N \(N >= 1.*required"),
            (["--processes=0"], r"--processes=N \(N >= 1"),
            (["--processes=2", "--cpu_devices_per_process=0"], r"--cpu_devices_per_process=0 must"),
            (["--processes=2", "--config.steps=3"], r"config\.steps.*go after --"),
            (["--processes=2", "--", "--process_id=1"], r"--process_id=1 after -- is set by the")]:
        result = subprocess.run([sys.executable, "-m", "paxlike.launch", *args], env=_env(),
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert_one_line_error(result, message)


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (one awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_one_failing_process_stops_the_job():
    # Process 1 exits with status 3; process 0 ignores SIGTERM and has a child of its own: the
    # launcher must SIGKILL it after --grace_s and leave nobody behind.
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "paxlike.launch", "--processes=2", "--module=test_launch",
         "--grace_s=1", "--", "--mode=fail"],
        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stdout + result.stderr
    assert "process 1 exited with status 3; stopping the others" in result.stderr
    assert "sending SIGKILL" in result.stderr
    assert elapsed < 15, elapsed
    pids = [int(p) for p in re.findall(r"^\[\d\] pid (\d+)$", result.stdout, re.M)]
    assert len(pids) == 3, result.stdout  # process 0, its child, process 1
    assert not any(_alive(p) for p in pids)


def test_interrupt_is_forwarded_once():
    # Ctrl-C in a terminal signals the launcher's whole process group; each process must see it
    # once (through the launcher), stop, and the launcher exit with their status.
    launcher = subprocess.Popen(
        [sys.executable, "-m", "paxlike.launch", "--processes=2", "--module=test_launch", "--",
         "--mode=wait"], env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, process_group=0)
    ready = []
    while len(ready) < 2:
        line = launcher.stdout.readline()
        assert line, launcher.stderr.read()
        ready += re.findall(r"^\[\d\] ready$", line)
    os.killpg(launcher.pid, signal.SIGINT)
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 0, out + err
    for i in range(2):
        assert f"[{i}] interrupted 1 time(s)" in out, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_launcher_takes_its_processes_along():
    launcher = subprocess.Popen(
        [sys.executable, "-m", "paxlike.launch", "--processes=2", "--module=test_launch", "--",
         "--mode=wait"], env=_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pids = []
    while len(pids) < 2:
        line = launcher.stdout.readline()
        assert line
        pids += [int(p) for p in re.findall(r"^\[\d\] pid (\d+)$", line)]
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


# ----------------------------------------------------------------------------------- the recipes
def _slurm_env(procid: int, job_id: int) -> dict[str, str]:
    """What `srun --nodes=2 --ntasks-per-node=1` sets in task `procid` (the nodes are named with
    a bracketed range as SLURM writes them; `127.0.0.[1-2]` stands for `gpu[017-018]`)."""
    nodes = "127.0.0.[1-2]"
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": nodes, "SLURM_NODELIST": nodes,
            "SLURM_STEP_NODELIST": nodes, "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
            "SLURM_PROCID": str(procid), "SLURM_NODEID": str(procid), "SLURM_LOCALID": "0"}


def _slurm_job_id() -> int:
    """A job id whose coordinator port (jax: 61440 + id mod 4096) is free here."""
    while True:
        port = random.randrange(61440, 65536)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return 7_000_000 + (port - 61440) - 7_000_000 % 4096


def test_slurm_one_task_per_node_keeps_every_gpu(tmp_path):
    # BUILD.md: srun --nodes=4 --ntasks-per-node=1 ... python -m paxlike.train --distributed.
    # Without paxlike's fix jax restricts each process to GPU SLURM_LOCALID ("visible GPUs: 0").
    workdir = str(tmp_path / "run")
    job_id = _slurm_job_id()
    results = _run_together([(_train("--distributed", "--cpu_devices=2", f"--workdir={workdir}"),
                              _env(**_slurm_env(i, job_id))) for i in range(2)])
    _assert_trained_as_one_job(results, workdir)


def test_kubernetes_indexed_job(tmp_path):
    # BUILD.md: an Indexed Job (JOB_COMPLETION_INDEX) behind a headless Service, the coordinator in
    # JAX_COORDINATOR_ADDRESS, the command run by `sh -c` so that the shell expands the index.
    workdir = str(tmp_path / "run")
    port = free_port()
    command = "exec " + shlex.join(_train("--num_processes=2", "--cpu_devices=2",
                                          f"--workdir={workdir}")) + \
        " --process_id=$JOB_COMPLETION_INDEX"
    results = _run_together([(["sh", "-c", command], _env(
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JOB_COMPLETION_INDEX=str(i),
        HOSTNAME=f"paxlike-{i}", KUBERNETES_SERVICE_HOST="10.96.0.1",
        KUBERNETES_SERVICE_PORT="443")) for i in range(2)])
    _assert_trained_as_one_job(results, workdir)


def test_distributed_without_a_cluster_is_one_clear_error():
    result = subprocess.run(_train("--distributed", "--cpu_devices=1"), env=_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, r"cannot join the distributed job: coordinator_address should "
                                  r"be defined.*--coordinator_address=HOST:PORT")


def _scheduler_env(monkeypatch, env: dict[str, str]) -> None:
    for key in [k for k in os.environ if _SCHEDULER_VARS.match(k)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_slurm_arguments_for_jax(monkeypatch):
    """What paxlike passes and what jax then derives, per SLURM layout (jax's own detection)."""
    from jax._src import clusters
    from paxlike.train import distributed_args

    def derived(env, **flags):
        _scheduler_env(monkeypatch, env)
        args = distributed_args(os.environ, **flags)
        return args, clusters.ClusterEnv.auto_detect_unset_distributed_params(
            args["coordinator_address"], args["num_processes"], args["process_id"],
            args.get("local_device_ids"), None, 300)

    per_node = {**_slurm_env(1, 1234), "SLURM_STEP_NODELIST": "gpu[017-020]",
                "SLURM_STEP_NUM_NODES": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "3"}
    # One task per node: every GPU stays (jax: an empty list restricts nothing).
    assert derived(per_node) == ({"coordinator_address": None, "num_processes": None,
                                  "process_id": None, "local_device_ids": []},
                                 ("gpu017:62674", 4, 3, []))  # 61440 + 1234 % 4096
    # What jax 0.12 does on its own in that step: one GPU per process, the bug fixed here.
    assert clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 300)[3] == [0]
    # One task per GPU (8 per node): jax's own choice, GPU SLURM_LOCALID, is kept.
    per_gpu = {**per_node, "SLURM_NTASKS": "32", "SLURM_PROCID": "13", "SLURM_LOCALID": "5"}
    args, detected = derived(per_gpu)
    assert "local_device_ids" not in args and detected == ("gpu017:62674", 32, 13, [5])
    # JAX_LOCAL_DEVICE_IDS, read by jax, wins over paxlike's choice.
    args, detected = derived({**per_node, "JAX_LOCAL_DEVICE_IDS": "0,1"})
    assert "local_device_ids" not in args
    # Explicit flags are passed through, and still keep every GPU in a one-task-per-node step.
    assert derived(per_node, coordinator_address="h:1", num_processes=4, process_id=3)[1] == (
        "h:1", 4, 3, [])
    # No scheduler: the flags as given, nothing detected.
    assert derived({}, coordinator_address="h:1", num_processes=2, process_id=0) == (
        {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}, ("h:1", 2, 0, None))


def test_tpu_pod_arguments_for_jax(monkeypatch):
    """What jax derives on a TPU VM of a multislice job (two v5p-128 slices, 16 hosts each) from
    the GCE metadata server, as BUILD.md describes; the metadata lookup is replaced by its
    documented answers for worker 5 of slice 1 (no network). paxlike passes nothing extra."""
    from jax._src.clusters import cloud_tpu_cluster as tpu
    from paxlike.train import distributed_args

    _scheduler_env(monkeypatch, {})
    workers = ",".join(f"t1v-n-{w:02x}-w-{w}:{w}:10.130.0.{10 + w}" for w in range(16))
    metadata = {"agent-worker-number": "5", "worker-network-endpoints": workers,
                "tpu-env": "MEGASCALE_COORDINATOR_ADDRESS: '10.130.0.10:8080'\n"
                           "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n"}
    monkeypatch.setattr(tpu, "get_metadata", lambda key: (metadata[key], 200))
    gce = tpu.GceTpuCluster
    assert gce.get_process_count() == 32
    assert gce.get_process_id() == 16 + 5
    assert gce.get_coordinator_address(timeout_secs=10, override_coordinator_port=None) == \
        "10.130.0.10:8482"
    assert distributed_args(os.environ) == {
        "coordinator_address": None, "num_processes": None, "process_id": None}


# ------------------------------------------------------------- child program of the launcher tests
def _child(argv: list[str]) -> int:
    """`--mode=fail`: process 1 exits 3 after process 0 is up; process 0 ignores SIGTERM and starts
    a child of its own, then waits. `--mode=wait`: counts SIGINTs, exits 0 after the first."""
    args = dict(a.lstrip("-").partition("=")[::2] for a in argv[1:])
    i, mode = int(args["process_id"]), args["mode"]
    print(f"pid {os.getpid()}", flush=True)
    if mode == "fail" and i == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"pid {grandchild.pid}", flush=True)
        time.sleep(60)
    if mode == "fail":
        time.sleep(1)
        return 3
    interrupts = []
    signal.signal(signal.SIGINT, lambda *_: interrupts.append(1))
    print("ready", flush=True)
    give_up = time.monotonic() + 60  # a test that failed to stop us leaves nothing running long
    while not interrupts and time.monotonic() < give_up:
        time.sleep(0.05)
    time.sleep(1)  # a second delivery (the terminal's, not forwarded) would arrive meanwhile
    print(f"interrupted {len(interrupts)} time(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv))
