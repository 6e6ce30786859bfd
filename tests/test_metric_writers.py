"""Metric writers (paxlike/metrics.py): the Writer interface, Weights & Biases against a fake
`wandb` module (every call checked) and for real in offline mode (its run file read back), the
clear error without the package, and the config keys that choose the writers."""

import glob
import importlib.machinery
import json
import os
import struct
import sys
import types

import numpy as np
import pytest

from configs import small_test_config
from paxlike import loop, metrics
from paxlike.errors import UserError


class _FakeRun:
    def __init__(self, calls, kwargs):
        self.calls, self.kwargs = calls, kwargs
        calls.append(("init", kwargs))

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, data):
        self.calls.append(("log", dict(data)))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module that records every call; returns the list of calls."""
    calls = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **kwargs: _FakeRun(calls, kwargs)
    module.Settings = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_wandb_writer_logs_every_record_against_step(fake_wandb, tmp_path, capsys):
    workdir = tmp_path / "my-run"
    w = metrics.MetricsWriter(str(workdir), total_steps=3, tensorboard=False,
                              wandb=dict(project="proj", config={"steps": 3}))
    assert fake_wandb == [] and not workdir.exists()    # nothing starts before the first write
    w.write_train(1, {"loss": np.float32(2.5), "grad_norm": float("nan"), "mfu": 0.25})
    w.write_eval(1, {"eval_loss": 2.25, "bits_per_byte": np.float64(3.0)})
    w.write_event(1, "rollback", {"to_step": 0, "bad_loss": 9.5, "reason": "loss spike"})
    # metrics.jsonl, the progress line and the event line are as without W&B.
    assert _lines(workdir / "metrics.jsonl") == [
        {"step": 1, "loss": 2.5, "grad_norm": None, "mfu": 0.25},
        {"step": 1, "split": "val", "eval_loss": 2.25, "bits_per_byte": 3.0},
        {"step": 1, "event": "rollback", "to_step": 0, "bad_loss": 9.5, "reason": "loss spike"}]
    w.truncate_after(0)       # metrics.jsonl forgets step 1; W&B keeps its history, logs it again
    w.write_train(1, {"loss": 2.0})
    w.close()
    init = fake_wandb[0][1]
    assert init == dict(project="proj", entity=None, name="my-run", group="my-run",
                        job_type="train", mode=None, config={"steps": 3}, dir=str(workdir),
                        settings=dict(console="off", silent=True))
    assert fake_wandb[1:] == [
        ("define_metric", "step", None), ("define_metric", "*", "step"),
        ("log", {"step": 1, "train/loss": 2.5, "train/mfu": 0.25}),   # NaN (null) left out
        ("log", {"step": 1, "eval/eval_loss": 2.25, "eval/bits_per_byte": 3.0}),
        ("log", {"step": 1, "event/rollback/to_step": 0, "event/rollback/bad_loss": 9.5}),
        ("log", {"step": 1, "train/loss": 2.0}),
        ("finish",)]
    assert _lines(workdir / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]
    assert not (workdir / "tensorboard").exists()       # metrics.tensorboard=False
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 1/3  loss 2.5000")
    assert out[1] == "eval step 1  loss 2.2500  bpb 3.000"
    assert out[2] == "rollback at step 1: to_step 0  bad_loss 9.5  reason loss spike"


def test_writers_share_one_interface(tmp_path):
    """A writer of one's own: MetricsWriter hands it what it hands the others."""
    seen = []

    class Recorder(metrics.Writer):
        def write_scalars(self, step, values, split):
            seen.append((split, step, dict(values)))

        def write_event(self, step, event, values):
            seen.append((event, step, dict(values)))

    w = metrics.MetricsWriter(str(tmp_path), total_steps=2, tensorboard=False)
    w.writers.append(Recorder())
    w.write_train(2, {"loss": np.float32(1.5), "load_balance": float("inf")})
    w.write_eval(2, {"eval_loss": 1.25})
    w.write_event(2, "straggler", {"process": 1})
    w.close()
    assert seen == [("train", 2, {"loss": 1.5, "load_balance": None}),
                    ("eval", 2, {"eval_loss": 1.25}), ("straggler", 2, {"process": 1})]
    assert [r.get("event") for r in _lines(tmp_path / "metrics.jsonl")] == [None, None, "straggler"]


def test_wandb_without_the_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)     # import wandb -> ImportError
    with pytest.raises(UserError, match=r"metrics.wandb=True needs the wandb package, which is "
                                        r"not installed: pip install 'paxlike\[wandb\]'"):
        metrics.MetricsWriter(str(tmp_path / "a"), wandb={})
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=r"pip install 'paxlike\[wandb\]'"):
        loop.prepare(small_test_config(**{"metrics.wandb": True}), str(workdir))
    assert not workdir.exists()


def test_bad_wandb_mode_is_refused(fake_wandb, tmp_path):
    with pytest.raises(UserError, match=r"metrics.wandb_mode='ofline'; choose one of online, "
                                        r"offline, disabled"):
        loop.prepare(small_test_config(**{"metrics.wandb": True, "metrics.wandb_mode": "ofline"}),
                     str(tmp_path / "run"))


def test_config_keys_choose_the_writers(fake_wandb, tmp_path):
    workdir = tmp_path / "run"
    losses = loop.run(small_test_config(steps=2, **{
        "metrics.wandb": True, "metrics.wandb_project": "proj", "metrics.wandb_name": "exp-1",
        "metrics.tensorboard": False, "metrics.plot": True}), str(workdir))
    init = fake_wandb[0][1]
    assert (init["project"], init["name"], init["group"]) == ("proj", "exp-1", "exp-1")
    assert init["config"]["steps"] == 2 and init["config"]["metrics"]["wandb"] is True
    logged = [c[1] for c in fake_wandb if c[0] == "log"]
    assert [(d["step"], d["train/loss"]) for d in logged] == list(zip([1, 2], losses))
    assert fake_wandb[-1] == ("finish",)
    assert {"metrics.jsonl", "config.json", "loss.png", "checkpoints"} <= set(os.listdir(workdir))
    assert "tensorboard" not in os.listdir(workdir)


def _wandb_history(run_file):
    """The history rows of a W&B run file: a leveldb-style log of wandb_internal_pb2.Record
    (a 7-byte file header, then records of 7-byte headers in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2
    data, pos, pending, rows = open(run_file, "rb").read(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                     # block trailer: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):                              # a full record, or its last part
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})
    return rows


def test_wandb_offline_run_keeps_its_files_in_the_workdir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")         # metrics.wandb_mode="" defers to it
    workdir = tmp_path / "run"
    w = metrics.MetricsWriter(str(workdir), total_steps=3, wandb=dict(project="paxlike-test"))
    for step in (1, 2, 3):
        w.write_train(step, {"loss": 4.0 - step, "learning_rate": 1e-3})
    w.write_eval(3, {"eval_loss": 1.5})
    w.close()
    (run_file,) = glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in _wandb_history(run_file)]
    assert rows == [{"step": 1, "train/loss": 3.0, "train/learning_rate": 1e-3},
                    {"step": 2, "train/loss": 2.0, "train/learning_rate": 1e-3},
                    {"step": 3, "train/loss": 1.0, "train/learning_rate": 1e-3},
                    {"step": 3, "eval/eval_loss": 1.5}]
    assert [r["step"] for r in _lines(workdir / "metrics.jsonl")] == [1, 2, 3, 3]
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
