"""Tests for paxlike.metrics: metrics.jsonl schema, resume truncation, TensorBoard, plot, progress."""

import glob
import json
import os
import struct

import numpy as np
import pytest

from paxlike import metrics

TRAIN_KEYS = {"step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time_s", "mfu"}
EVAL_KEYS = {"step", "split", "eval_loss", "bits_per_byte"}


def _train_values(step):
    # numpy scalars on purpose: the trainer hands over device/numpy values, the file must hold numbers
    return {
        "loss": np.float32(5.0 - 0.1 * step),
        "learning_rate": np.float64(1e-3),
        "grad_norm": np.float32(0.8),
        "tokens_per_sec": 12345.0,
        "step_time_s": 0.25,
        "mfu": np.float32(0.31),
    }


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _run(workdir, steps=range(1, 7), eval_every=3, total=6, enabled=True):
    w = metrics.MetricsWriter(str(workdir), enabled=enabled, total_steps=total)
    for s in steps:
        w.write_train(s, _train_values(s))
        if s % eval_every == 0:
            w.write_eval(s, {"eval_loss": np.float32(4.0 - 0.1 * s), "bits_per_byte": 5.5})
    return w


def _tb_events(logdir):
    """Every Event in the TFRecord event files, read without TensorFlow."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]  # skip length and its masked crc
            pos += 12 + length + 4                       # payload and its masked crc
            events.append(event_pb2.Event.FromString(payload))
    return events


def _tb_tags(logdir):
    """(tag, step, value) of every scalar in the event files."""
    return [(v.tag, e.step, v.simple_value) for e in _tb_events(logdir) for v in e.summary.value]


def test_train_and_eval_records_schema(tmp_path):
    _run(tmp_path).close()
    records = _lines(tmp_path / "metrics.jsonl")
    train = [r for r in records if "split" not in r]
    evals = [r for r in records if "split" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        assert set(r) == TRAIN_KEYS
        assert type(r["step"]) is int
        for k in TRAIN_KEYS - {"step"}:
            assert type(r[k]) is float, (k, r[k])
    assert r["loss"] == pytest.approx(4.4) and r["mfu"] == pytest.approx(0.31)
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert set(r) == EVAL_KEYS
        assert r["split"] == "val"
        assert type(r["eval_loss"]) is float and type(r["bits_per_byte"]) is float


def test_jax_scalars_become_plain_numbers(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    w = metrics.MetricsWriter(str(tmp_path), total_steps=1)
    w.write_train(jnp.int32(1), {"loss": jnp.float32(2.5), "mfu": jnp.array(0.5)})
    w.close()
    (r,) = _lines(tmp_path / "metrics.jsonl")
    assert r == {"step": 1, "loss": 2.5, "mfu": 0.5}


def test_nonfinite_values_keep_the_line_valid_json(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path), total_steps=2)
    w.write_train(1, {"loss": float("nan"), "grad_norm": np.float32("inf")})
    w.close()
    (r,) = _lines(tmp_path / "metrics.jsonl")  # json.loads in strict sense: no NaN tokens
    assert r == {"step": 1, "loss": None, "grad_norm": None}


def test_lines_are_flushed_before_close(tmp_path):
    w = _run(tmp_path, steps=range(1, 3))
    assert len(_lines(tmp_path / "metrics.jsonl")) == 2  # a killed run keeps what it wrote
    w.close()


def test_truncate_after_drops_later_records_and_resume_appends(tmp_path):
    _run(tmp_path).close()  # steps 1..6, evals at 3 and 6
    w = metrics.MetricsWriter(str(tmp_path), total_steps=6)
    w.truncate_after(3)
    records = _lines(tmp_path / "metrics.jsonl")
    assert max(r["step"] for r in records) == 3
    assert [r["step"] for r in records if "split" not in r] == [1, 2, 3]
    assert [r["step"] for r in records if "split" in r] == [3]
    assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
    for s in (4, 5, 6):  # the resumed run writes the remaining steps once each
        w.write_train(s, _train_values(s))
    w.close()
    steps = [r["step"] for r in _lines(tmp_path / "metrics.jsonl") if "split" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    # TensorBoard: the resumed run's event file starts with a purge marker at step 4, so the
    # abandoned run's steps >= 4 are hidden (SessionLog START with the purge step).
    starts = [e.step for e in _tb_events(str(tmp_path / "tensorboard")) if e.session_log.status == 1]
    assert starts == [4]
    loss_steps = sorted(s for t, s, _ in _tb_tags(str(tmp_path / "tensorboard")) if t == "train/loss")
    assert loss_steps == [1, 2, 3, 4, 4, 5, 5, 6, 6]  # both runs' files kept; TB hides old 4..6


def test_construct_and_truncate_without_file_create_nothing(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path / "new"), total_steps=3)
    w.truncate_after(10)
    assert not os.path.exists(tmp_path / "new")  # a run that fails before its first step


def test_torn_last_line_is_ended_and_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')  # killed mid-write
    w = metrics.MetricsWriter(str(tmp_path), total_steps=3)
    w.write_train(2, {"loss": 2.0})
    w.close()
    assert [r["step"] for r in metrics.read_records(str(path))] == [1, 2]


def test_tensorboard_scalars(tmp_path):
    _run(tmp_path).close()
    files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert files and all(os.path.getsize(f) > 0 for f in files)
    scalars = _tb_tags(str(tmp_path / "tensorboard"))
    tags = {t for t, _, _ in scalars}
    assert {"train/" + k for k in TRAIN_KEYS - {"step"}} <= tags
    assert {"eval/eval_loss", "eval/bits_per_byte"} <= tags
    losses = sorted((s, v) for t, s, v in scalars if t == "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert losses[0][1] == pytest.approx(4.9)


def test_loss_png_covers_whole_file(tmp_path):
    _run(tmp_path).close()
    png = tmp_path / "loss.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not os.path.exists(str(png) + ".tmp.png")


def test_no_loss_png_when_plot_is_off(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path), total_steps=6, plot=False)
    w.write_train(1, _train_values(1))
    w.close()
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tensorboard"]


def test_disabled_writer_writes_and_prints_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    w = _run(workdir, enabled=False)
    w.truncate_after(2)
    w.close()
    assert not os.path.exists(workdir)
    assert capsys.readouterr().out == ""


def test_progress_and_eval_lines(tmp_path, capsys):
    w = metrics.MetricsWriter(str(tmp_path), total_steps=300)
    w.write_train(120, {"loss": 2.34123, "learning_rate": 1e-3, "grad_norm": 0.84,
                        "tokens_per_sec": 12345.0, "step_time_s": 0.2, "mfu": 0.312})
    w.write_eval(120, {"eval_loss": 2.1, "bits_per_byte": 3.05})
    w.close()
    train_line, eval_line = capsys.readouterr().out.splitlines()
    assert "step 120/300" in train_line and "loss 2.3412" in train_line
    assert "lr 1.0e-03" in train_line and "12.3k tok/s" in train_line
    assert "mfu 31.2%" in train_line and "eta 0:00:36" in train_line  # 180 steps x 0.2 s
    assert eval_line.startswith("eval step 120") and "loss 2.1000" in eval_line
    assert "bpb 3.050" in eval_line


def test_progress_line_shows_the_models_own_losses_and_metrics(tmp_path, capsys):
    w = metrics.MetricsWriter(str(tmp_path), total_steps=10)
    w.write_train(5, {"loss": 2.0, "grad_norm": 0.5, "load_balance": 1.0123456, "accuracy": 0.25})
    w.close()
    line = capsys.readouterr().out.strip()
    assert line.index("grad 0.50") < line.index("accuracy 0.25") < line.index("load_balance 1.012")
    assert metrics.read_records(str(tmp_path / "metrics.jsonl"))[0]["load_balance"] == 1.0123456
