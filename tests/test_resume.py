"""Fault tolerance: a SIGKILLed run resumes bit-for-bit, half-written checkpoints are skipped, and
a checkpoint of another model shape is refused without touching anything."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import ROOT, cli_overrides, small_test_config, snapshot, subprocess_env
from paxlike import loop
from paxlike.errors import UserError


def _train_cmd(workdir, **overrides):
    return [sys.executable, "-m", "paxlike.train", f"--workdir={workdir}", "--cpu_devices=8",
            *cli_overrides(**overrides)]


def _logged_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if "loss" in r]
    steps = [r["step"] for r in train]
    assert steps == list(range(1, len(steps) + 1)), "every step logged exactly once"
    return [r["loss"] for r in train]


def test_sigkill_then_rerun_gives_identical_losses(tmp_path):
    # Dropout makes the RNG part of what must be restored. The kill lands right after the save at
    # step 20, so the 40 steps after it leave ample time for it to land mid-run.
    settings = dict(steps=60, checkpoint_every=10, **{"model.dropout_rate": 0.1})
    env = subprocess_env()
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, **settings), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "20").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_logged_losses(killed)) < 60, "the run must be killed before it finishes"
    subprocess.run(_train_cmd(killed, **settings), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, **settings), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    resumed, uninterrupted = _logged_losses(killed), _logged_losses(straight)
    assert len(resumed) == 60
    assert resumed == uninterrupted  # bitwise: floats round-trip exactly through JSON


def test_half_written_checkpoint_is_skipped_with_warning(tmp_path, caplog):
    cfg = small_test_config(steps=8, checkpoint_every=2)
    straight = loop.run(cfg, str(tmp_path / "straight"))
    workdir = tmp_path / "interrupted"
    loop.run(cfg, str(workdir), stop_at=4)
    ckpts = workdir / "checkpoints"
    # What a save killed halfway leaves: orbax's temporary directory for a later step.
    shutil.copytree(ckpts / "4", ckpts / "6.orbax-checkpoint-tmp-1234")
    (ckpts / "6.orbax-checkpoint-tmp-1234" / "state" / "_METADATA").unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING):
        resumed = loop.run(cfg, str(workdir))
    assert any("not completely written" in r.getMessage() and "[6]" in r.getMessage()
               for r in caplog.records)
    np.testing.assert_array_equal(resumed, straight[4:])
    # keep_checkpoints=3 keeps the newest three; the half-written directory is cleaned away.
    assert sorted(os.listdir(ckpts), key=int) == ["4", "6", "8"]


def test_changed_model_shape_is_refused_and_nothing_changes(tmp_path):
    workdir = str(tmp_path / "run")
    loop.run(small_test_config(steps=3), workdir)
    # Even a half-written save stays: it is deleted only by a run that goes ahead.
    ckpts = os.path.join(workdir, "checkpoints")
    shutil.copytree(os.path.join(ckpts, "3"), os.path.join(ckpts, "5.orbax-checkpoint-tmp-1234"))
    before = snapshot(workdir)
    with pytest.raises(UserError, match=r"different shape .*model.d_model: 32 in the checkpoint, 64 now"):
        loop.run(small_test_config(steps=6, **{"model.d_model": 64}), workdir)
    assert snapshot(workdir) == before


def test_finished_run_rerun_does_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    loop.run(small_test_config(steps=3), workdir)
    before = snapshot(workdir)
    assert loop.run(small_test_config(steps=3), workdir) == []
    assert snapshot(workdir) == before


def test_divergence_stops_without_checkpointing_the_diverged_state(tmp_path):
    cfg = small_test_config(steps=6, checkpoint_every=1, **{"optimizer.learning_rate": 1e35,
                                                            "optimizer.warmup_steps": 0})
    with pytest.raises(UserError, match="training diverged at step 2"):
        loop.run(cfg, str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1"]
