"""Damaged checkpoints: the newest checkpoint that fails to restore is reported in one warning,
moved aside (never deleted) and the run resumes from the newest one that restores; when none
does, the run is refused and nothing changes. A kill while an asynchronous save is being written
leaves the previous checkpoint usable."""

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import (ROOT, assert_one_line_error, cli_overrides, small_test_config, snapshot,
                     subprocess_env)
from paxlike import loop

SETTINGS = dict(steps=8, checkpoint_every=2)


def _train_cmd(workdir, **overrides):
    return [sys.executable, "-m", "paxlike.train", f"--workdir={workdir}", "--cpu_devices=8",
            *cli_overrides(**overrides)]


def _logged(workdir) -> tuple[list[int], list[float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r]
    return [r["step"] for r in train], [r["loss"] for r in train]


def _damage(step_dir, how: str) -> None:
    """What a torn write, bit rot or a slip of the hand leaves in a complete checkpoint step."""
    data_files = [p for p in (step_dir / "state").rglob("*")
                  if p.is_file() and p.parent.name == "d"]
    if how == "truncated":        # a torn write: the data files end early
        for path in data_files:
            os.truncate(path, path.stat().st_size // 2)
    elif how == "corrupt":        # garbage bytes of the right length
        rng = random.Random(0)
        for path in data_files:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(path.stat().st_size)))
    elif how == "missing_item":   # the state item is gone, the meta is intact
        shutil.rmtree(step_dir / "state")
    elif how == "unreadable_meta":
        (step_dir / "meta" / "metadata").write_text('{"step": 6, "data_sta')
    else:
        raise ValueError(how)
    assert how == "missing_item" or how == "unreadable_meta" or data_files


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An uninterrupted run's losses, and a run stopped at step 6 with checkpoints 2, 4 and 6."""
    base = tmp_path_factory.mktemp("damage")
    straight = loop.run(small_test_config(**SETTINGS), str(base / "straight"))
    loop.run(small_test_config(**SETTINGS), str(base / "stopped"), stop_at=6)
    assert sorted(os.listdir(base / "stopped" / "checkpoints"), key=int) == ["2", "4", "6"]
    return straight, base / "stopped"


def _copy(interrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(interrupted[1], workdir)
    return workdir


def _damage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "could not be restored" in r.getMessage()]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(interrupted, tmp_path,
                                                                      caplog):
    straight = interrupted[0]
    workdir = _copy(interrupted, tmp_path)
    ckpts = workdir / "checkpoints"
    _damage(ckpts / "6", "truncated")
    damaged_files, previous_files = snapshot(ckpts / "6"), snapshot(ckpts / "4")
    with caplog.at_level(logging.WARNING):
        resumed = loop.run(small_test_config(**SETTINGS), str(workdir))
    warnings = _damage_warnings(caplog)
    assert len(warnings) == 1, warnings
    moved_to = workdir / "checkpoints.damaged" / "6"
    assert re.search(r"checkpoint step 6 in .* could not be restored \(ValueError: OUT_OF_RANGE.*"
                     r"\); moved it to " + re.escape(str(moved_to)) + " and resuming from step 4",
                     warnings[0]), warnings[0]
    # The losses continue exactly as if nothing had happened after step 4.
    np.testing.assert_array_equal(resumed, straight[4:])
    steps, losses = _logged(workdir)
    assert steps == list(range(1, 9))
    np.testing.assert_array_equal(losses, straight)
    # Nothing was deleted: the damaged step is moved aside byte for byte, the one resumed from is
    # untouched, and the run's new checkpoints rotate as usual (keep_checkpoints=3).
    assert snapshot(moved_to) == damaged_files
    assert snapshot(ckpts / "4") == previous_files
    assert sorted(os.listdir(ckpts), key=int) == ["4", "6", "8"]


@pytest.mark.parametrize("how,cause", [("corrupt", "DATA_LOSS"),
                                       ("missing_item", r"state"),
                                       ("unreadable_meta", "JSONDecodeError")])
def test_other_damage_falls_back_too(interrupted, tmp_path, caplog, how, cause):
    straight = interrupted[0]
    workdir = _copy(interrupted, tmp_path)
    _damage(workdir / "checkpoints" / "6", how)
    with caplog.at_level(logging.WARNING):
        resumed = loop.run(small_test_config(**SETTINGS), str(workdir))
    warnings = _damage_warnings(caplog)
    assert len(warnings) == 1 and re.search(r"step 6 .*\(.*" + cause + r".*\); moved it to .*"
                                            r"checkpoints.damaged/6 and resuming from step 4",
                                            warnings[0]), warnings
    assert (workdir / "checkpoints.damaged" / "6").is_dir()
    np.testing.assert_array_equal(resumed, straight[4:])


def test_two_damaged_steps_are_reported_together_and_the_third_resumes(interrupted, tmp_path,
                                                                          caplog):
    straight = interrupted[0]
    workdir = _copy(interrupted, tmp_path)
    _damage(workdir / "checkpoints" / "6", "truncated")
    _damage(workdir / "checkpoints" / "4", "unreadable_meta")
    with caplog.at_level(logging.WARNING):
        resumed = loop.run(small_test_config(**SETTINGS), str(workdir))
    warnings = _damage_warnings(caplog)
    assert len(warnings) == 1 and re.search(
        r"checkpoint steps 6, 4 in .* could not be restored \(step 6: ValueError: OUT_OF_RANGE"
        r".*; step 4: JSONDecodeError.*\); moved them to .*checkpoints.damaged/6, "
        r".*checkpoints.damaged/4 and resuming from step 2", warnings[0]), warnings
    np.testing.assert_array_equal(resumed, straight[2:])


def test_no_checkpoint_restores_is_refused_and_nothing_changes(interrupted, tmp_path):
    workdir = _copy(interrupted, tmp_path)
    for step in ("2", "4", "6"):
        _damage(workdir / "checkpoints" / step, "truncated")
    before = snapshot(workdir)
    result = subprocess.run(_train_cmd(workdir, **SETTINGS), cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True)
    assert_one_line_error(result, r"no checkpoint in .*checkpoints can be restored \(step 6: "
                                  r"ValueError: OUT_OF_RANGE.*; step 4: .*; step 2: .*\)\. "
                                  r"Nothing was changed\. .*move .*checkpoints away")
    assert "Event loop is closed" not in result.stderr
    assert snapshot(workdir) == before   # nothing deleted, moved or written


def test_kill_during_an_asynchronous_save_resumes_from_the_previous_checkpoint(tmp_path):
    settings = dict(steps=40, checkpoint_every=5, async_checkpoints=True)
    workdir = tmp_path / "killed"
    ckpts = workdir / "checkpoints"
    env = subprocess_env()
    proc = subprocess.Popen(_train_cmd(workdir, **settings), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Orbax writes step N into `N.orbax-checkpoint-tmp*` in the background and renames it when
    # complete, about 0.1 s later here. Polling every 2 ms finds that window; the process is
    # then frozen (SIGSTOP) and, if the directory is still there, killed mid-save; if the rename
    # won the race, it is let go and the next save is tried. Only saves after the first
    # complete one count, so that there is a previous checkpoint to fall back on.
    in_flight, deadline = None, time.time() + 240
    while in_flight is None:
        assert proc.poll() is None and time.time() < deadline, "run ended before a second save"
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        seen = next((n for n in names if (m := re.match(r"(\d+)\.orbax-checkpoint-tmp", n))
                     and int(m.group(1)) >= 10), None)
        if seen is None:
            time.sleep(0.002)
            continue
        proc.send_signal(signal.SIGSTOP)
        if (ckpts / seen).is_dir():
            in_flight = seen
        else:
            proc.send_signal(signal.SIGCONT)
    proc.kill()
    proc.wait()
    saving = int(in_flight.split(".")[0])
    assert (ckpts / in_flight).is_dir(), "the kill must land while the save is being written"
    complete = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
    assert complete[-1] == saving - 5, complete

    result = subprocess.run(_train_cmd(workdir, **settings), cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {saving - 5}" in result.stderr
    assert "could not be restored" not in result.stderr
    straight = loop.run(small_test_config(**settings), str(tmp_path / "straight"))
    steps, losses = _logged(workdir)
    assert steps == list(range(1, 41))
    np.testing.assert_allclose(losses, straight, rtol=1e-5)


def test_only_the_failed_restores_unretrieved_reads_are_dropped_from_the_log():
    # What asyncio logs when it garbage-collects orbax read tasks that failed after the first
    # failure ended the restore (seen under load), against an unrelated task's failure.
    from paxlike.checkpoint import _unretrieved_orbax_read
    orbax = os.path.join("", "site-packages", "orbax", "checkpoint", "serialization.py")
    def record(message):
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1805, message,
                                 None, None)
    assert _unretrieved_orbax_read(record(
        "Task exception was never retrieved\nfuture: <Task finished name='Task-143' coro=<"
        f"async_deserialize() done, defined at {orbax}:394> exception=ValueError('OUT_OF_RANGE')>"))
    assert not _unretrieved_orbax_read(record(
        "Task exception was never retrieved\nfuture: <Task finished coro=<fetch() done, defined "
        "at /app/client.py:12> exception=OSError()>"))
    assert not _unretrieved_orbax_read(record(f"Unclosed client session in {orbax}"))
