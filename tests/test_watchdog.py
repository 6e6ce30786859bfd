"""The watchdog and cross-process preemption, with real processes: a killed process is named by
the survivor, which exits within watchdog.timeout_s; a process slow in its data loading is
reported as the straggler; SIGTERM to one of two processes makes both save the same step and
exit 0, and the run resumes from it; a stopped (frozen) process is named and the launcher ends
the job. The verdict logic itself is checked first, on a fake key-value store and clock."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from configs import ROOT, cli_overrides, free_port, subprocess_env
from paxlike import metrics
from paxlike.watchdog import EXIT_STATUS, Watchdog, lost_a_peer

TIMEOUT_S = 4.0


# ------------------------------------------------------------------ the verdicts, in process
class _Store:
    """The coordination service's key-value store, as the watchdog uses it."""

    def __init__(self):
        self.values, self.reachable = {}, True

    def key_value_set(self, key, value, allow_overwrite=False):
        if not self.reachable:
            raise RuntimeError("DEADLINE_EXCEEDED")
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        if not self.reachable:
            raise RuntimeError("DEADLINE_EXCEEDED")
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _config(**overrides):
    return ml_collections.ConfigDict({"timeout_s": 10.0, "step_timeout_s": 30.0,
                                      "straggler_ratio": 3.0, "straggler_min_s": 0.05,
                                      **overrides})


def _pair(**overrides):
    store, clock = _Store(), _Clock()
    dogs = [Watchdog(_config(**overrides), process_index=i, num_processes=2, client=store,
                     clock=clock) for i in range(2)]
    for dog in dogs:
        dog._changed_at = {p: clock() for p in range(2)}   # what start() does, without threads
        dog.update(phase="train", step=5, fingerprint="abc")
    return dogs, store, clock


def _tick(clock, dogs, seconds):
    for _ in range(int(seconds)):
        clock.now += 1
        for dog in dogs:
            dog.exchange()


def test_a_silent_process_is_named_after_the_timeout():
    (d0, d1), _, clock = _pair()
    _tick(clock, [d0, d1], 3)             # process 0 reads process 1's last beat at 104 s
    _tick(clock, [d0], 11)
    assert d0.verdict() is None           # silent for exactly the timeout: not yet
    _tick(clock, [d0], 1)
    assert "process 1 (pid" in d0.verdict() and "no heartbeat for 11.0 s" in d0.verdict()
    d1.update(phase="done")               # a process that finished is not stuck
    d1.exchange()
    _tick(clock, [d0], 20)
    assert d0.verdict() is None


def test_an_unreachable_store_names_process_0():
    (d0, d1), store, clock = _pair()
    _tick(clock, [d0, d1], 2)
    store.reachable = False
    clock.now += 11
    with pytest.raises(RuntimeError):
        d1.exchange()
    assert "has not answered for 11.0 s: process 0 is stuck or gone" in d1.verdict()


def test_no_step_anywhere_names_the_processes_at_the_lowest_step():
    (d0, d1), _, clock = _pair()
    d1.update(step=4)
    _tick(clock, [d0, d1], 2)             # from here on, process 0 sees both at their steps
    _tick(clock, [d0, d1], 30)
    assert d0.verdict() is None
    _tick(clock, [d0, d1], 1)
    assert "no train step finished for 31.0 s" in d0.verdict()
    assert d0.verdict().endswith("process 1 at step 4")
    d0.update(phase="eval")               # an eval is not a stuck step: the clock restarts
    _tick(clock, [d0, d1], 31)
    assert d0.verdict() is None


def test_different_programs_are_named():
    (d0, d1), _, clock = _pair()
    d1.update(fingerprint="def")
    _tick(clock, [d0, d1], 2)
    assert "compiled different train steps (process 0: abc; process 1: def)" in d1.verdict()


def test_a_failed_process_is_named_unless_this_one_failed_too():
    (d0, d1), _, clock = _pair()
    d1.report_failure(OSError("disk full"))
    _tick(clock, [d0, d1], 2)             # process 0 reads the failure on the second tick
    _tick(clock, [d0, d1], 2)
    assert d0.verdict() is None           # 2 intervals of grace for this process's own error
    _tick(clock, [d0, d1], 1)
    assert d0.verdict() == f"process 1 (pid {os.getpid()} on {socket.gethostname()}) failed at " \
        "step 5: its log has the error"
    d0.report_failure(OSError("disk full"))
    assert d0.verdict() is None and d1.verdict() is None


def test_a_collective_broken_by_a_lost_peer_waits_for_the_verdict_naming_it():
    """Process 1 stops beating; process 0's next collective fails with a broken connection
    (Gloo's words). Process 0 does not report itself as the failure: it waits for its checker,
    which names process 1 and ends it with EXIT_STATUS. Its own errors are reported at once."""
    class JaxRuntimeError(RuntimeError):
        pass
    store, exits = _Store(), []
    store.key_value_set("paxlike/watchdog/1", json.dumps(
        {"count": 1, "step": 5, "phase": "train", "step_time_s": 0.1, "host_s": 0.0,
         "fingerprint": "", "host": "other-host", "pid": 4321}))
    dog = Watchdog(_config(timeout_s=0.5), process_index=0, num_processes=2, client=store,
                   exit_fn=exits.append).start()
    try:
        dog.report_failure(JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: [pair.cc:547] "
                                           "Connection closed by peer [127.0.0.1]:21930"))
        assert exits == [EXIT_STATUS]
        assert "process 1 (pid 4321 on other-host)" in dog.verdict()
    finally:
        dog.close()
    assert not lost_a_peer(JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"))
    assert not lost_a_peer(OSError("Connection closed by peer"))   # not from a collective


def test_straggler_is_the_process_with_outlying_host_time():
    (d0, d1), _, clock = _pair()
    d0.update(host_s=0.004)
    d1.update(host_s=0.30)
    _tick(clock, [d0, d1], 2)
    assert d0.stragglers() == [{"process": 1, "host_s": 0.30, "others_median_host_s": 0.004}]
    d1.update(host_s=0.04)                # 10x, but only 36 ms above: noise, not a straggler
    _tick(clock, [d0, d1], 2)
    assert d0.stragglers() == []


# ------------------------------------------------------------------ real processes
_running: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """A failed test leaves no training process behind to slow the rest of the suite."""
    yield
    while _running:
        proc = _running.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(workdir, *, steps, faulty_process=None, fault=("PAXLIKE_TEST_DATA_DELAY_S", "0.3"),
           **overrides):
    """Two jax.distributed processes of 2 CPU devices each, data parallel across them;
    `faulty_process` loads its data as `fault` says (tests/faulty_data_train.py)."""
    port, env = free_port(), subprocess_env()
    procs = []
    for i in range(2):
        program = ("tests/faulty_data_train.py",) if i == faulty_process else ("-m", "paxlike.train")
        cmd = [sys.executable, *program,
               f"--workdir={workdir}", "--cpu_devices=2", f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={i}",
               *cli_overrides(steps=steps, **{"mesh.data": 2, "mesh.dcn.data": 2, "mesh.fsdp": 2,
                                              "watchdog.timeout_s": TIMEOUT_S, **overrides})]
        procs.append(subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(env, **dict([fault]))))
    _running.extend(procs)
    return procs


def _records(workdir):
    path = os.path.join(workdir, metrics.METRICS_FILE)
    return metrics.read_records(path) if os.path.exists(path) else []


def _wait_for(condition, procs, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            outputs = [[l for l in p.communicate()[0].splitlines() if "watchdog" in l][:3] for p in procs]
            raise AssertionError(f"{what} did not happen; outputs: {outputs}")
        time.sleep(0.05)


def _finish(proc, seconds):
    """The output of `proc` once it exits; past `seconds` it is killed and the test fails with the
    end of its output (what it was doing), not a bare TimeoutExpired."""
    try:
        return proc.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {seconds} s; its output ends:\n"
                             f"{proc.communicate()[0][-4000:]}") from None


def test_straggler_sigterm_resume_then_sigkill(tmp_path):
    """One job's life: process 1 (slow data loading) is reported as the straggler; SIGTERM to it
    makes both processes save the same step and exit 0; the rerun resumes from that step; SIGKILL
    to process 1 then makes the survivor name it and exit with the watchdog's status."""
    workdir = str(tmp_path / "run")
    procs = _start(workdir, steps=1000, faulty_process=1)
    stragglers = lambda: [r for r in _records(workdir) if r.get("event") == "straggler"]  # noqa: E731
    _wait_for(stragglers, procs, 240, "a straggler report")
    assert {r["process"] for r in stragglers()} == {1}
    first = stragglers()[0]
    assert first["host_s"] > 3 * first["others_median_host_s"] and first["host_s"] > 0.05

    procs[1].send_signal(signal.SIGTERM)
    outputs = [_finish(p, 120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    stopped = [int(o.rsplit("stopped at step ", 1)[1].split(";")[0]) for o in outputs]
    assert stopped[0] == stopped[1] < 1000, outputs[0][-2000:]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped[0])]

    procs = _start(workdir, steps=1000)
    _wait_for(lambda: len([r for r in _records(workdir) if "loss" in r]) >= stopped[0] + 2,
              procs, 240, "two steps after the resume")
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    out = _finish(procs[0], 60)
    detected_s = time.time() - killed_at
    procs[1].wait()
    assert f"resumed from step {stopped[0]}" in out, out[-3000:]
    assert procs[0].returncode == EXIT_STATUS, out[-3000:]
    assert "watchdog: process 1 (pid" in out and "it is stuck or gone" in out, out[-3000:]
    assert "Thread MainThread" in out          # this process's own Python stacks
    # The silence is timed from the last heartbeat process 0 read, which is up to one heartbeat
    # interval (0.8 s here) older than the kill; then up to one interval until the next check.
    assert TIMEOUT_S - 1 < detected_s < TIMEOUT_S + 3, detected_s
    steps = [r["step"] for r in _records(workdir) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= stopped[0] + 2
    print(f"SIGKILL detected after {detected_s:.1f} s (watchdog.timeout_s={TIMEOUT_S})")


def test_an_error_on_one_process_ends_the_job_at_once(tmp_path):
    # Process 0's data loading fails at batch 4; process 1 is then waiting for it in a collective.
    # Process 0 exits 1 with its traceback instead of waiting minutes at jax's shutdown barrier,
    # and process 1 learns of the failure through the watchdog and exits too.
    workdir = str(tmp_path / "run")
    procs = _start(workdir, steps=1000, faulty_process=0,
                   fault=("PAXLIKE_TEST_DATA_FAIL_AT", "4"))
    outputs = [_finish(p, 120) for p in procs]
    assert procs[0].returncode == 1, outputs[0][-3000:]
    assert "this process failed" in outputs[0] and "OSError: test: reading batch 4 failed" in \
        outputs[0], outputs[0][-3000:]
    assert procs[1].returncode == EXIT_STATUS, outputs[1][-3000:]
    assert re.search(r"watchdog: process 0 \(pid \d+ on .*\) failed at step \d: its log has the "
                     r"error", outputs[1]), outputs[1][-3000:]


def _child_with_process_id(launcher_pid: int, index: int) -> int:
    pids = set()
    for task in os.listdir(f"/proc/{launcher_pid}/task"):
        with open(f"/proc/{launcher_pid}/task/{task}/children") as f:
            pids |= {int(p) for p in f.read().split()}
    for pid in pids:
        with open(f"/proc/{pid}/cmdline") as f:
            if f"--process_id={index}" in f.read().split("\0"):
                return pid
    raise AssertionError(f"no child with --process_id={index} among {pids}")


def test_a_stopped_process_is_named_and_the_launcher_ends_the_job(tmp_path):
    workdir = str(tmp_path / "run")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "paxlike.launch", "--processes=2", "--cpu_devices_per_process=2",
         "--grace_s=2", "--", f"--workdir={workdir}",
         *cli_overrides(steps=1000, **{"mesh.data": 2, "mesh.dcn.data": 2, "mesh.fsdp": 2,
                                       "watchdog.timeout_s": TIMEOUT_S})],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    _running.append(launcher)    # killing it takes its processes along (PR_SET_PDEATHSIG)
    _wait_for(lambda: len(_records(workdir)) >= 3, [launcher], 240, "three logged steps")
    stopped = _child_with_process_id(launcher.pid, 1)
    os.kill(stopped, signal.SIGSTOP)
    stopped_at = time.time()
    out = _finish(launcher, 60)
    elapsed = time.time() - stopped_at
    named = [line for line in out.splitlines()
             if line.startswith("[0] ") and "watchdog: process 1 (pid" in line]
    assert named and f"pid {stopped} on" in named[0], out[-3000:]
    assert launcher.returncode == EXIT_STATUS, out[-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(stopped, 0)                    # the stopped process is gone too
    # The watchdog's timeout and one heartbeat interval, then the launcher's 2 s grace period.
    assert elapsed < TIMEOUT_S + 1 + 2 + 2, elapsed
    print(f"SIGSTOP: job ended {elapsed:.1f} s later (watchdog.timeout_s={TIMEOUT_S})")
