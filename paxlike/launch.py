"""Command line: run a multi-process `jax.distributed` job on this machine.

    python -m paxlike.launch --processes=N [--cpu_devices_per_process=K] [--port=P]
        [--grace_s=10] [--module=paxlike.train] -- [paxlike.train flags ...]

Starts N processes of `python -m paxlike.train` (or --module) that join one job through a
coordinator on 127.0.0.1 (a free port unless --port is given): process i gets
`--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i`, plus `--cpu_devices=K`
and JAX_PLATFORMS=cpu when K is given. It is a multi-host run in miniature, for rehearsing one
(and its failures) without a cluster.

Each output line of process i (stdout and stderr merged) is printed live as `[i] line`. When a
process exits with a non-zero status the job cannot go on (its collectives would wait for the
missing process until jax's heartbeat timeout), so the others get SIGTERM, then SIGKILL after
--grace_s seconds, and the launcher exits with the first failing process's status (128+signal
for a process killed by a signal, as shells report it); 0 when every process exits 0. SIGINT and
SIGTERM sent to the launcher are forwarded to every process (paxlike.train saves a checkpoint
and stops on SIGTERM); if the launcher itself dies, even by SIGKILL, its processes are killed
with it (Linux).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from paxlike import cli

_PROCESSES = flags.DEFINE_integer("processes", None, "How many processes to start (required).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices_per_process", None, "Give each process this many emulated CPU devices "
    "(--cpu_devices=K and JAX_PLATFORMS=cpu); default: each sees this machine's accelerators.")
_PORT = flags.DEFINE_integer("port", None, "Coordinator port on 127.0.0.1; default: a free one.")
_GRACE_S = flags.DEFINE_float("grace_s", 10.0, "After one process fails, seconds the others get "
                              "between SIGTERM and SIGKILL.")
_MODULE = flags.DEFINE_string("module", "paxlike.train", "Python module each process runs "
                              "(`python -m MODULE`); it must accept the flags described above.")

_SET_BY_LAUNCHER = ("coordinator_address", "num_processes", "process_id")

# Linux: a child gets SIGKILL when the launcher dies, even by SIGKILL (prctl PR_SET_PDEATHSIG), so
# that a killed launcher leaves no half job behind holding devices and the port.
_prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform.startswith("linux") else None


def _die_with_launcher():  # runs in the child between fork and exec: nothing but the call
    _prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_status(returncode: int) -> int:
    """A Popen returncode as a shell reports it: -N (killed by signal N) becomes 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def parse(argv: list[str]) -> tuple[int, int | None, int, list[str]]:
    """(processes, cpu devices per process or None, port, the flags after `--`); bad input exits
    with the one-line `paxlike: error: ...`."""
    cut = argv.index("--") if "--" in argv else len(argv)
    own, rest = argv[:cut], argv[cut + 1:]
    hint = "the trainer's flags go after --, e.g. paxlike.launch --processes=2 -- --config.steps=9"
    try:
        leftover = flags.FLAGS(own)
    except flags.UnrecognizedFlagError as e:
        cli.fail(f"{e}; {hint}")
    except flags.Error as e:
        cli.fail(str(e))
    if len(leftover) > 1:
        cli.fail(f"unexpected arguments {leftover[1:]}; {hint}")
    n, k = _PROCESSES.value, _CPU_DEVICES.value
    if n is None or n < 1:
        cli.fail(f"--processes=N (N >= 1, how many processes to start) is required; got {n}")
    if k is not None and k < 1:
        cli.fail(f"--cpu_devices_per_process={k} must be >= 1")
    if _PORT.value is not None and not 0 < _PORT.value < 65536:
        cli.fail(f"--port={_PORT.value} must be a TCP port, 1 to 65535")
    for arg in rest:
        name = arg.lstrip("-").partition("=")[0]
        if name in _SET_BY_LAUNCHER or (k is not None and name == "cpu_devices"):
            cli.fail(f"{arg} after -- is set by the launcher for each process; remove it")
    return n, k, _PORT.value or free_port(), rest


def start(i: int, n: int, k: int | None, port: int, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", _MODULE.value, f"--coordinator_address=127.0.0.1:{port}",
               f"--num_processes={n}", f"--process_id={i}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines arrive as printed, not per 8 KiB
    if k is not None:
        command.append(f"--cpu_devices={k}")
        env["JAX_PLATFORMS"] = "cpu"
    command += extra
    # Each process leads its own process group: a terminal's Ctrl-C reaches it once (forwarded
    # by us, not also from the terminal), and a signal to the group reaches its own children.
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, process_group=0,
                            preexec_fn=_die_with_launcher if _prctl else None)


def relay(i: int, proc: subprocess.Popen, lock: threading.Lock) -> None:
    """Copies the process's output to ours line by line, prefixed `[i] ` (bytes: any encoding)."""
    prefix = f"[{i}] ".encode()
    for line in iter(proc.stdout.readline, b""):
        with lock:  # whole lines from different processes, never interleaved mid-line
            sys.stdout.buffer.write(prefix + line + (b"" if line.endswith(b"\n") else b"\n"))
            sys.stdout.buffer.flush()


def signal_all(procs: list[subprocess.Popen], signum: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signum)
            except ProcessLookupError:  # exited between poll and kill
                pass


def supervise(procs: list[subprocess.Popen], grace_s: float) -> int:
    """Waits for every process; on the first failure stops the rest. Returns the exit status."""
    failed, kill_at = None, None
    while True:
        codes = [p.poll() for p in procs]
        if failed is None:
            failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                others = "; stopping the others" if None in codes else ""
                print(f"paxlike.launch: process {failed[0]} exited with status "
                      f"{exit_status(failed[1])}{others}", file=sys.stderr, flush=True)
                signal_all(procs, signal.SIGTERM)
                kill_at = time.monotonic() + grace_s
        if None not in codes:
            return 0 if failed is None else exit_status(failed[1])
        if kill_at is not None and time.monotonic() >= kill_at:
            print(f"paxlike.launch: still running {grace_s:g} s after SIGTERM; sending SIGKILL",
                  file=sys.stderr, flush=True)
            signal_all(procs, signal.SIGKILL)
            kill_at = None
        time.sleep(0.05)


def main(parsed: tuple[int, int | None, int, list[str]]) -> int:
    n, k, port, extra = parsed
    procs: list[subprocess.Popen] = []
    for signum in (signal.SIGINT, signal.SIGTERM):  # before the first start: none is missed
        signal.signal(signum, lambda signum, _: signal_all(procs, signum))
    for i in range(n):  # no thread runs yet, so a fork with preexec_fn is safe
        procs.append(start(i, n, k, port, extra))
    lock = threading.Lock()
    relays = [threading.Thread(target=relay, args=(i, p, lock), daemon=True)
              for i, p in enumerate(procs)]
    for t in relays:
        t.start()
    status = supervise(procs, _GRACE_S.value)
    for t in relays:  # the last lines; a grandchild still holding the pipe must not hang us
        t.join(timeout=5)
    return status


def run_cli():
    app.run(lambda parsed: sys.exit(main(parsed)), flags_parser=parse)  # app: --help, --helpfull


if __name__ == "__main__":
    run_cli()
