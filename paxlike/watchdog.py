"""Hang, straggler and program-mismatch detection across the processes of one job.

On a pod one stuck host blocks every other host in its next collective, forever. Following C4
(arXiv 2406.04594), each process publishes a heartbeat through the distributed runtime's
key-value store (the coordination service that `jax.distributed.initialize` starts on process 0)
and watches everyone else's:

    {"count": n, "step": s, "phase": "train", "step_time_s": t, "host_s": h,
     "fingerprint": hash of the compiled train step, "host": name, "pid": pid}

A background *publisher* thread writes this process's heartbeat and reads all of them every
`interval_s`; a *checker* thread judges what it last read, with this process's own clock (hosts'
clocks are never compared). It stops the job when

- a process's heartbeat has not changed for `timeout_s` (the process is stopped, dead, or its
  host is frozen: its threads no longer run),
- the key-value store has not answered for `timeout_s` (it lives in process 0: process 0 is stuck),
- every process is training and no step has finished anywhere for `step_timeout_s` (all alive
  but stuck in a collective or on a device),
- processes compiled different train-step programs (their configs or software differ: they
  would hang or silently diverge),
- another process reported that it failed (`report_failure`: an error it raised, whose traceback
  is in its own log), and has not been followed by this process failing too within
  `2 * interval_s` (the same error at the same step on every process is each one's own to report).
  A collective broken by a lost peer is not this process's own error: it waits for the verdict
  that names the peer (`lost_a_peer`, `report_failure`).

Stopping means: log which process is stuck and why, dump this process's Python stacks, and exit
with `EXIT_STATUS` without waiting for anything (a hung collective cannot be unwound). A
scheduler or `paxlike.launch` then stops what is left and the run can restart from its last
checkpoint. Stragglers, whose host-side time per step (waiting for data) is an outlier, are only
reported: `stragglers()` is read by the step loop on logging steps.
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import re
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable

from absl import logging

EXIT_STATUS = 75   # EX_TEMPFAIL: the job failed in a way a restart from a checkpoint may fix
_KEY = "paxlike/watchdog/"


def distributed_client():
    """The coordination-service client of `jax.distributed`, or None in a single-process run."""
    from jax._src import distributed  # the public API exposes no key-value store
    return distributed.global_state.client


def _exit_now(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


# How a collective reports that a peer went away mid-operation (Gloo on CPU, NCCL on GPU, the
# distributed runtime's RPCs): a broken connection, not this process's own fault.
_LOST_PEER = re.compile(r"connection (closed|reset|refused)|closed by peer|broken pipe|"
                        r"socket closed|UNAVAILABLE|remote process|peer", re.IGNORECASE)


def lost_a_peer(error: BaseException) -> bool:
    """Whether an error raised by a collective says that another process went away."""
    return bool(_LOST_PEER.search(f"{type(error).__name__}: {error}")) and \
        "RuntimeError" in type(error).__name__


class Watchdog:
    """One process's heartbeat publisher and checker; see the module docstring."""

    def __init__(self, cfg, *, process_index: int, num_processes: int, client=None,
                 exit_fn: Callable[[int], None] = _exit_now,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.process_index, self.num_processes = process_index, num_processes
        self.client, self.exit_fn, self.clock = client, exit_fn, clock
        self.interval_s = min(1.0, cfg.timeout_s / 5)
        self._own = {"count": 0, "step": 0, "phase": "start", "step_time_s": 0.0, "host_s": 0.0,
                     "fingerprint": "", "host": socket.gethostname(), "pid": os.getpid()}
        self._lock = threading.Lock()
        self._beats: dict[int, dict] = {}          # process -> last heartbeat read
        self._changed_at: dict[int, float] = {}    # process -> local time its heartbeat changed
        self._progress = (None, None)              # (steps and phases, local time they changed)
        self._answered_at = self.clock()           # local time the key-value store last answered
        self._failed_at: dict[int, float] = {}     # process -> local time it was seen failed
        self._stop = threading.Event()
        self._threads = []

    # ---------------------------------------------------------------- called by the step loop
    def update(self, **fields) -> None:
        """New values for this process's heartbeat (step, phase, step_time_s, host_s,
        fingerprint); published by the next beat."""
        with self._lock:
            self._own.update(fields)

    def report_failure(self, error: BaseException) -> None:
        """Tells the other processes that this one failed: they stop instead of waiting for it
        in their next collective. Process 0 then waits (at most 10 heartbeat intervals) until
        they have stopped: its exit takes the coordination service down, and a process that loses
        the service aborts with a C++ error naming no one. The watchdog itself stays armed."""
        if self.client is not None and self._threads and lost_a_peer(error):
            self._await_verdict(error)
        self.update(phase="failed")
        if self.client is None or not self._threads:
            return
        logging.error("this process failed (%s: %s); telling the other processes",
                      type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        deadline = self.clock() + 10 * self.interval_s
        while True:
            try:
                self.exchange()
            except Exception:   # noqa: BLE001 - the publisher tries again
                pass
            if self.process_index != 0 or self.clock() > deadline or self._others_stopped():
                return
            time.sleep(self.interval_s / 2)

    def _await_verdict(self, error: BaseException) -> None:
        """A collective failed with a broken connection: most likely another process died or
        stopped mid-step. Waits (at most timeout_s and two intervals) for the checker to name
        that process, which ends this one with EXIT_STATUS as any watchdog verdict does; if it
        names no one, the error is this process's own to report."""
        logging.warning("a collective failed (%s); waiting up to %.0f s for the watchdog to tell "
                        "which process is gone", str(error).splitlines()[0][:200],
                        self.cfg.timeout_s + 2 * self.interval_s)
        deadline = self.clock() + self.cfg.timeout_s + 2 * self.interval_s
        while self.clock() < deadline and any(t.is_alive() for t in self._threads):
            time.sleep(self.interval_s / 2)

    def _others_stopped(self) -> bool:
        """Every other process has finished, failed, or not beaten for 2 intervals."""
        now = self.clock()
        with self._lock:
            return all(self._beats.get(p, {}).get("phase") in ("done", "failed")
                       or now - self._changed_at.get(p, now) > 2 * self.interval_s
                       for p in range(self.num_processes) if p != self.process_index)

    def stragglers(self) -> list[dict]:
        """Processes whose host-side time per step is an outlier against the others' median:
        more than `straggler_ratio` times it and `straggler_min_s` above it."""
        with self._lock:
            host = {p: b["host_s"] for p, b in self._beats.items() if b.get("phase") == "train"}
        found = []
        for p, h in sorted(host.items()):
            others = [v for q, v in host.items() if q != p]
            if not others:
                continue
            typical = statistics.median(others)
            if h > self.cfg.straggler_ratio * typical and h - typical > self.cfg.straggler_min_s:
                found.append({"process": p, "host_s": h, "others_median_host_s": typical})
        return found

    # ---------------------------------------------------------------- threads
    def start(self) -> "Watchdog":
        if not self.cfg.timeout_s:     # watchdog.timeout_s=0: disabled, update() stays cheap
            return self
        self._changed_at = {p: self.clock() for p in range(self.num_processes)}
        targets = [self._check_loop] + ([self._publish_loop] if self.client is not None else [])
        for target in targets:
            thread = threading.Thread(target=target, name=f"watchdog-{target.__name__}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stops the threads after a last heartbeat in phase "done": peers still finishing
        (a final checkpoint) do not take this process's silence for a hang."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2 * self.interval_s + 1)
        if self._own["phase"] != "failed":
            self.update(phase="done")
        if self.client is not None and self._threads:
            try:
                self.exchange()
            except Exception:   # noqa: BLE001 - the job is ending; nothing left to warn
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *_):
        self.close()

    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.exchange()
            except Exception as e:   # noqa: BLE001 - an unreachable store is judged by the checker
                logging.log_every_n_seconds(py_logging.WARNING, "watchdog: heartbeat exchange "
                                            "failed: %s", 30, str(e).splitlines()[0])
            self._stop.wait(self.interval_s)

    def _check_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.client is None:     # a single process has no store: read its own beat
                self.absorb({self.process_index: self._own_beat()})
            problem = self.verdict()
            if problem and not self._stop.is_set():
                self.fail(problem)
                return

    def _own_beat(self) -> dict:
        with self._lock:
            self._own["count"] += 1
            return dict(self._own)

    def exchange(self) -> None:
        """Publishes this process's heartbeat and reads everyone's (one round trip each)."""
        own = self._own_beat()
        self.client.key_value_set(f"{_KEY}{self.process_index}", json.dumps(own),
                                  allow_overwrite=True)
        beats = {int(key.rsplit("/", 1)[1]): json.loads(value)
                 for key, value in self.client.key_value_dir_get(_KEY)}
        self.absorb(beats)

    def absorb(self, beats: dict[int, dict]) -> None:
        now = self.clock()
        with self._lock:
            for p, beat in beats.items():
                if self._beats.get(p, {}).get("count") != beat["count"]:
                    self._changed_at[p] = now
                if beat["phase"] == "failed":
                    self._failed_at.setdefault(p, now)
                self._beats[p] = beat
            progress = tuple(sorted((p, b["step"], b["phase"]) for p, b in self._beats.items()))
            if progress != self._progress[0]:
                self._progress = (progress, now)
            self._answered_at = now

    # ---------------------------------------------------------------- judgement
    def verdict(self) -> str | None:
        """Why the job must stop now, or None."""
        now, cfg = self.clock(), self.cfg
        with self._lock:
            beats, changed_at = dict(self._beats), dict(self._changed_at)
            answered_at, (progress, progress_at) = self._answered_at, self._progress
            failed_at, own_phase = dict(self._failed_at), self._own["phase"]
        if self.client is not None and now - answered_at > cfg.timeout_s:
            return (f"the coordination service (run by process 0) has not answered for "
                    f"{now - answered_at:.1f} s: process 0 is stuck or gone")
        failed = [p for p in sorted(failed_at) if p != self.process_index
                  and now - failed_at[p] > 2 * self.interval_s]
        if failed and own_phase != "failed":
            return "; ".join(f"process {p} (pid {beats[p]['pid']} on {beats[p]['host']}) failed "
                             f"at step {beats[p]['step']}: its log has the error" for p in failed)
        stale = [p for p in sorted(changed_at) if p != self.process_index
                 and beats.get(p, {}).get("phase") != "done"
                 and now - changed_at[p] > cfg.timeout_s]
        if stale:
            return "; ".join(self._describe_silent(p, beats.get(p), now - changed_at[p])
                             for p in stale)
        if (cfg.step_timeout_s and progress and len(beats) == self.num_processes
                and all(b["phase"] == "train" for b in beats.values())
                and now - progress_at > cfg.step_timeout_s):
            lowest = min(b["step"] for b in beats.values())
            stuck = [p for p, b in sorted(beats.items()) if b["step"] == lowest]
            who = ("every process" if len(stuck) == len(beats)
                   else "process " + ", ".join(map(str, stuck)))
            return (f"no train step finished for {now - progress_at:.1f} s "
                    f"(watchdog.step_timeout_s={cfg.step_timeout_s}); {who} at step {lowest}")
        fingerprints = {}
        for p, b in sorted(beats.items()):
            if b.get("fingerprint"):
                fingerprints.setdefault(b["fingerprint"], []).append(p)
        if len(fingerprints) > 1:
            groups = "; ".join(f"process {', '.join(map(str, ps))}: {fp}"
                               for fp, ps in fingerprints.items())
            return (f"the processes compiled different train steps ({groups}); their configs, "
                    f"flags or installed software differ")
        return None

    @staticmethod
    def _describe_silent(p: int, beat: dict | None, silent_s: float) -> str:
        if beat is None:
            return f"process {p} has sent no heartbeat in {silent_s:.1f} s since the watchdog started"
        return (f"process {p} (pid {beat['pid']} on {beat['host']}) has sent no heartbeat for "
                f"{silent_s:.1f} s, last at step {beat['step']} ({beat['phase']}): it is stuck "
                f"or gone")

    def fail(self, problem: str) -> None:
        with self._lock:
            own = dict(self._own)
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = "\n".join(f"Thread {names.get(ident, ident)}:\n" + "".join(
            traceback.format_stack(frame)) for ident, frame in sys._current_frames().items())
        logging.error("watchdog: %s. This is process %d at step %d (%s); exiting with status %d "
                      "so that the job can be restarted from its last checkpoint. Its Python "
                      "stacks:\n%s", problem, self.process_index, own["step"], own["phase"],
                      EXIT_STATUS, stacks)
        self.exit_fn(EXIT_STATUS)
