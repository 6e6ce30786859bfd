"""Run metrics: metrics.jsonl, TensorBoard scalars, a terminal progress line and a loss plot.

Everything a run records lives in its workdir:

- ``metrics.jsonl``: one JSON object per line, appended and flushed on every write so a killed run
  keeps its lines. Training records carry ``step, loss, learning_rate, grad_norm, tokens_per_sec,
  step_time_s, mfu`` plus the model family's auxiliary losses and metrics under their own names;
  eval records carry ``step, split ("val"), eval_loss, bits_per_byte`` (the schema in README.md,
  "What a run produces"; tools parse these names, so keep them stable); event records carry
  ``step, event`` ("rollback", "straggler") and the event's details.
- ``tensorboard/``: tensorboardX event files, scalars ``train/<key>`` and ``eval/<key>``.
- ``loss.png``: train and eval loss against step, drawn from the whole metrics.jsonl at ``close()``.

Only the primary process writes: construct with ``enabled=(jax.process_index() == 0)``; a disabled
writer touches no file and prints nothing.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import sys
import time
from typing import Any, Mapping, TextIO

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "loss.png"
TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time_s", "mfu")
EVAL_KEYS = ("eval_loss", "bits_per_byte")
# Every key the trainer writes itself: a model family may not name a loss or metric after one.
RESERVED_KEYS = ("step", "split", "event") + TRAIN_KEYS + EVAL_KEYS


def _to_python(value: Any) -> Any:
    """numpy / jax scalars and 0-d arrays -> Python int/float; other values unchanged."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalar, numpy 0-d array, jax.Array (fetches to host)
        return value.item()
    return value


def _json_number(value: Any) -> Any:
    """JSON has no NaN/inf; write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_records(path: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _format_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class MetricsWriter:
    """Writes one run's metrics; see the module docstring for the files."""

    def __init__(self, workdir: str, *, enabled: bool = True, total_steps: int | None = None,
                 stream: TextIO | None = None, eta_window: int = 20):
        self.workdir = workdir
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = os.path.join(workdir, METRICS_FILE)
        self._stream = stream  # None -> sys.stdout at print time (so capsys/redirects work)
        self._step_times: collections.deque[float] = collections.deque(maxlen=eta_window)
        self._file = None
        self._tb = None
        self._purge_step = None  # set by truncate_after: TensorBoard hides the abandoned steps
        # Nothing is created here: the workdir is touched only by the first write.

    # -- files -----------------------------------------------------------------------------------

    def _jsonl(self):
        if self._file is None:
            os.makedirs(self.workdir, exist_ok=True)
            torn = False
            if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
            self._file = open(self.path, "a")
            if torn:  # a killed run left half a line: end it so the next record starts on its own line
                self._file.write("\n")
        return self._file

    def _tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter  # imported lazily: only the primary process needs it
            # tensorboardX names files by the second and opens them "wb": a unique suffix keeps a
            # quickly restarted run from overwriting the previous run's event file.
            self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TENSORBOARD_DIR),
                                     purge_step=self._purge_step,
                                     filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        return self._tb

    def _append(self, record: Mapping[str, Any]) -> None:
        f = self._jsonl()
        f.write(json.dumps(record) + "\n")
        f.flush()

    def _print(self, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        print(line, file=stream, flush=True)

    def truncate_after(self, step: int) -> None:
        """On resume from a checkpoint at `step`: drop metrics.jsonl records with step > `step`
        (atomic rewrite) and have TensorBoard discard its events after `step` (purge_step)."""
        if not self.enabled:
            return
        self._purge_step = int(step) + 1
        if self._tb is not None:  # reopen so the purge marker precedes the resumed run's scalars
            self._tb.close()
            self._tb = None
        if not os.path.exists(self.path):
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- writes ----------------------------------------------------------------------------------

    def write_train(self, step: int, values: Mapping[str, Any]) -> None:
        """Append a training record, log TB scalars train/<key>, print the progress line."""
        if not self.enabled:
            return
        step = int(step)
        record = {"step": step}
        record.update({k: _json_number(_to_python(v)) for k, v in values.items()})
        self._append(record)
        tb = self._tensorboard()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                tb.add_scalar(f"train/{k}", v, step)
        if isinstance(record.get("step_time_s"), (int, float)):
            self._step_times.append(float(record["step_time_s"]))
        self._print(self.progress_line(record))

    def write_eval(self, step: int, values: Mapping[str, Any]) -> None:
        """Append an eval record (split "val"), log TB scalars eval/<key>, print one line."""
        if not self.enabled:
            return
        step = int(step)
        record = {"step": step, "split": "val"}
        record.update({k: _json_number(_to_python(v)) for k, v in values.items()})
        self._append(record)
        tb = self._tensorboard()
        for k, v in record.items():
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                tb.add_scalar(f"eval/{k}", v, step)
        parts = [f"eval step {step}"]
        if record.get("eval_loss") is not None:
            parts.append(f"loss {record['eval_loss']:.4f}")
        if record.get("bits_per_byte") is not None:
            parts.append(f"bpb {record['bits_per_byte']:.3f}")
        self._print("  ".join(parts))

    def write_event(self, step: int, event: str, values: Mapping[str, Any]) -> None:
        """Append a record of something that happened to the run ({"step", "event": "rollback"
        or "straggler", ...}) and print it as one line."""
        if not self.enabled:
            return
        record = {"step": int(step), "event": event}
        record.update({k: _json_number(_to_python(v)) for k, v in values.items()})
        self._append(record)
        self._print(f"{event} at step {step}: " + "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))

    def progress_line(self, record: Mapping[str, Any]) -> str:
        """`step   120/300  loss 2.3412  lr 1.0e-03  grad 0.84  12.3k tok/s  0.21 s/step  ...`."""
        step = record["step"]
        if self.total_steps:
            width = len(str(self.total_steps))
            parts = [f"step {step:>{width}}/{self.total_steps}"]
        else:
            parts = [f"step {step}"]

        def num(key):
            v = record.get(key)
            return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        if "loss" in record:
            parts.append(f"loss {num('loss'):.4f}" if num("loss") is not None else "loss nan")
        if num("learning_rate") is not None:
            parts.append(f"lr {num('learning_rate'):.1e}")
        if num("grad_norm") is not None:
            parts.append(f"grad {num('grad_norm'):.2f}")
        for key in sorted(set(record) - set(TRAIN_KEYS) - {"step"}):  # the model's own parts
            # Per-layer detail ("name/layerN") goes to metrics.jsonl and TensorBoard only.
            if num(key) is not None and "/" not in key:
                parts.append(f"{key} {num(key):.4g}")
        if num("tokens_per_sec") is not None:
            parts.append(f"{_format_count(num('tokens_per_sec'))} tok/s")
        if num("step_time_s") is not None:
            parts.append(f"{num('step_time_s'):.2f} s/step")
        if num("mfu") is not None:
            parts.append(f"mfu {100 * num('mfu'):.1f}%")
        if self.total_steps and self._step_times:
            mean = sum(self._step_times) / len(self._step_times)
            remaining = max(self.total_steps - step, 0) * mean
            parts.append(f"eta {datetime.timedelta(seconds=round(remaining))}")
        return "  ".join(parts)

    # -- end of run ------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close files; draw loss.png from the whole metrics.jsonl."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        plot_losses(self.path, os.path.join(self.workdir, PLOT_FILE))


def plot_losses(metrics_path: str, png_path: str) -> bool:
    """Train loss and eval loss against step; returns False (no file) if there is nothing to plot."""
    records = read_records(metrics_path)
    train = [(r["step"], r["loss"]) for r in records
             if r.get("split") is None and isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in records
             if r.get("split") == "val" and isinstance(r.get("eval_loss"), (int, float))]
    if not train and not evals:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global state, no display

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*sorted(train)), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*sorted(evals)), "o-", label="eval loss (val)", linewidth=1.5, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(png_path))) or "loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)
    return True
