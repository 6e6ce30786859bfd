"""Run metrics: metrics.jsonl, TensorBoard scalars, Weights & Biases, a terminal progress line and
a loss plot.

Everything a run records lives in its workdir (a local path or gs://..., via paxlike/storage.py):

- ``metrics.jsonl``: one JSON object per line, appended and flushed on every write so a killed run
  keeps its lines. Training records carry ``step, loss, learning_rate, grad_norm, param_norm,
  tokens_seen, tokens_per_sec, step_time_s, mfu`` plus the model family's auxiliary losses and metrics under their own names;
  eval records carry ``step, split ("val"), eval_loss, bits_per_byte`` (the schema in README.md,
  "What a run produces"; tools parse these names, so keep them stable); event records carry
  ``step, event`` ("rollback", "straggler") and the event's details. An object store cannot
  append: there the whole file is rewritten (one atomic object write) on every write.
- ``tensorboard/``: tensorboardX event files, scalars ``train/<key>`` and ``eval/<key>``
  (``metrics.tensorboard``). On an object store each event file is uploaded whole whenever
  tensorboardX flushes it (every 2 minutes, and at the end).
- Weights & Biases (``metrics.wandb``, ``pip install 'paxlike[wandb]'``): the same scalars, against
  the metric ``step``; one W&B run per launch, grouped by the run's name. Its own files go to
  ``<workdir>/wandb/`` (offline mode keeps them there for ``wandb sync``).
- ``loss.png``: train and eval loss against step, drawn from the whole metrics.jsonl at ``close()``
  (``metrics.plot``).

Each destination is a `Writer` (``write_scalars(step, values, split)``, ``write_event``,
``truncate_after``, ``close``); `MetricsWriter` hands every record to each of them and prints
the progress line. Only the primary process writes: construct with
``enabled=(jax.process_index() == 0)``; a disabled writer touches no file and prints nothing.
"""

from __future__ import annotations

import collections
import datetime
import io
import json
import math
import os
import sys
import time
from typing import Any, Mapping, TextIO

from paxlike import storage
from paxlike.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
PLOT_FILE = "loss.png"
TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "param_norm", "tokens_seen", "tokens_per_sec",
              "step_time_s", "mfu")
EVAL_KEYS = ("eval_loss", "bits_per_byte")
# Every key the trainer writes itself: a model family may not name a loss or metric after one.
RESERVED_KEYS = ("step", "split", "event") + TRAIN_KEYS + EVAL_KEYS
WANDB_MODES = ("online", "offline", "disabled")
WANDB_MISSING = ("metrics.wandb=True needs the wandb package, which is not installed: "
                 "pip install 'paxlike[wandb]'")


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
    if not storage.exists(path):
        return records
    for line in storage.read_text(path).splitlines():
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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------ writers
class Writer:
    """One destination of a run's metrics. `values` hold plain Python values (numbers, None for
    a non-finite number, and in events also strings); `split` is "train" or "eval"."""

    def write_scalars(self, step: int, values: Mapping[str, Any], split: str) -> None:
        raise NotImplementedError

    def write_event(self, step: int, event: str, values: Mapping[str, Any]) -> None:
        """Something that happened to the run (a rollback, a straggler); ignored by default."""

    def truncate_after(self, step: int) -> None:
        """The run resumes (or rolls back) from `step`: forget what was written after it, where
        the destination allows."""

    def close(self) -> None:
        """Flushes and closes; the writer may be written to again afterwards (it reopens)."""


class JsonlWriter(Writer):
    """metrics.jsonl (module docstring). Appended locally; rewritten whole on an object store."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = storage.join(workdir, METRICS_FILE)
        self._local = storage.is_local(self.path)
        self._file = None     # local: the open file
        self._text = None     # object store: the file's lines, uploaded whole on every write

    def write_scalars(self, step: int, values: Mapping[str, Any], split: str) -> None:
        record = {"step": step, "split": "val"} if split == "eval" else {"step": step}
        self._append({**record, **values})

    def write_event(self, step: int, event: str, values: Mapping[str, Any]) -> None:
        self._append({"step": step, "event": event, **values})

    def _append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self._local:
            f = self._open_local()
            f.write(line)
            f.flush()
            return
        if self._text is None:
            text = storage.read_text(self.path) if storage.exists(self.path) else ""
            self._text = [text if not text or text.endswith("\n") else text + "\n"]
        self._text.append(line)
        storage.write_atomically(self.path, "".join(self._text))

    def _open_local(self):
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

    def truncate_after(self, step: int) -> None:
        """Drops records with step > `step` (atomic rewrite)."""
        if not storage.exists(self.path):
            return
        self.close()
        kept = "".join(json.dumps(r) + "\n" for r in read_records(self.path)
                       if r.get("step", 0) <= step)
        storage.write_atomically(self.path, kept, fsync=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._text = None


class _ObjectEventFile:
    """A TensorBoard event file on an object store: the events are kept in memory and the file is
    uploaded whole (one object write) whenever tensorboardX flushes it."""

    def __init__(self, path: str):
        self.path = path
        self._buffer = io.BytesIO()
        self._uploaded = -1

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if self._buffer.tell() != self._uploaded:
            storage.write_atomically(self.path, self._buffer.getvalue())
            self._uploaded = self._buffer.tell()

    def close(self) -> None:
        self.flush()


class _ObjectEventFiles:
    """tensorboardX's hook for a path prefix ("gs" of gs://...; tensorboardX/record_writer.py)."""

    def open(self, path: str) -> _ObjectEventFile:
        return _ObjectEventFile(path)

    def directory_check(self, path: str) -> None:
        pass    # an object store has no directories to make


def _import_tensorboardx():
    """tensorboardX, imported lazily (only the primary process writes), without torch.

    tensorboardX's writer module imports torch at its top whenever torch is installed, only so
    that it can accept torch tensors; paxlike writes Python floats. Importing torch costs a
    training process 2-10 s of start-up and a few hundred MB, so torch is hidden for that one
    import (`import torch` then raises ImportError, which tensorboardX expects) unless the
    process has already imported it."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


class TensorBoardWriter(Writer):
    """tensorboardX event files in `<workdir>/tensorboard/`, scalars `<split>/<key>`. On an
    object store the event files go through paxlike/storage.py (etils.epath): tensorboardX's own
    gs:// writer is replaced, for this process, by `_ObjectEventFiles`."""

    def __init__(self, workdir: str):
        self.logdir = storage.join(workdir, TENSORBOARD_DIR)
        self._tb = None
        self._purge_step = None  # set by truncate_after: TensorBoard hides the abandoned steps

    def _writer(self):
        if self._tb is None:
            SummaryWriter = _import_tensorboardx().SummaryWriter
            scheme = storage.scheme(self.logdir)
            if scheme is not None:
                from tensorboardX import record_writer
                record_writer.register_writer_factory(scheme, _ObjectEventFiles())
            # tensorboardX names files by the second and opens them "wb": a unique suffix keeps a
            # quickly restarted run from overwriting the previous run's event file.
            self._tb = SummaryWriter(logdir=self.logdir, purge_step=self._purge_step,
                                     filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        return self._tb

    def write_scalars(self, step: int, values: Mapping[str, Any], split: str) -> None:
        tb = self._writer()
        for k, v in values.items():
            if _is_number(v):
                tb.add_scalar(f"{split}/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        """TensorBoard discards the events after `step` (purge_step)."""
        self._purge_step = int(step) + 1
        if self._tb is not None:  # reopen so the purge marker precedes the resumed run's scalars
            self._tb.close()
            self._tb = None

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


class WandbWriter(Writer):
    """Weights & Biases: one W&B run per launch (started at the first write), `<split>/<key>`
    logged against the metric `step`. W&B history cannot be rewritten, so after a resume or a
    rollback the repeated steps appear twice; plotting against `step` (not W&B's own counter)
    keeps them in place. Needs `pip install 'paxlike[wandb]'`."""

    def __init__(self, workdir: str, *, project: str = "paxlike", entity: str | None = None,
                 name: str | None = None, mode: str | None = None,
                 config: Mapping[str, Any] | None = None):
        try:
            import wandb
        except ImportError:
            raise UserError(WANDB_MISSING) from None
        self._wandb = wandb
        self.workdir = workdir
        self.name = name or storage.basename(storage.absolute(workdir))
        self._init = dict(project=project or None, entity=entity or None, name=self.name,
                          group=self.name, job_type="train", mode=mode or None,
                          config=dict(config or {}))
        self._run = None

    def _started(self):
        if self._run is None:
            # W&B keeps its files in a local directory: the workdir's wandb/ when it is local,
            # else wandb's default (./wandb).
            directory = None
            if storage.is_local(self.workdir):
                os.makedirs(self.workdir, exist_ok=True)
                directory = self.workdir
            self._run = self._wandb.init(
                dir=directory, settings=self._wandb.Settings(console="off", silent=True),
                **self._init)
            self._run.define_metric("step")
            self._run.define_metric("*", step_metric="step")
        return self._run

    def write_scalars(self, step: int, values: Mapping[str, Any], split: str) -> None:
        data = {f"{split}/{k}": v for k, v in values.items() if _is_number(v)}
        self._started().log({"step": step, **data})

    def write_event(self, step: int, event: str, values: Mapping[str, Any]) -> None:
        data = {f"event/{event}/{k}": v for k, v in values.items() if _is_number(v)}
        self._started().log({"step": step, **data})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def check_config(cfg_metrics) -> None:
    """Refuses (UserError) a `metrics` config section that cannot be honoured, before anything is
    written: an unknown W&B mode, or W&B asked for without the package."""
    if cfg_metrics is None or not cfg_metrics.get("wandb", False):
        return
    mode = cfg_metrics.get("wandb_mode", "")
    if mode and mode not in WANDB_MODES:
        raise UserError(f"invalid config: metrics.wandb_mode={mode!r}; choose one of "
                        f"{', '.join(WANDB_MODES)} (or '' for WANDB_MODE / online)")
    if not storage.installed("wandb"):
        raise UserError(WANDB_MISSING)


# ------------------------------------------------------------------------------------ the run's
class MetricsWriter:
    """Writes one run's metrics to its writers (metrics.jsonl always; TensorBoard and W&B as
    asked), prints the progress line, draws loss.png at the end; see the module docstring."""

    def __init__(self, workdir: str, *, enabled: bool = True, total_steps: int | None = None,
                 stream: TextIO | None = None, eta_window: int = 20, tensorboard: bool = True,
                 wandb: Mapping[str, Any] | None = None, plot: bool = True):
        """`wandb`: None (off), or WandbWriter's keyword arguments (project, entity, name, mode,
        config). `plot`: draw loss.png at close()."""
        self.workdir = workdir
        self.plot = plot
        self.enabled = enabled
        self.total_steps = total_steps
        self._stream = stream  # None -> sys.stdout at print time (so capsys/redirects work)
        self._step_times: collections.deque[float] = collections.deque(maxlen=eta_window)
        self.jsonl = JsonlWriter(workdir)
        self.path = self.jsonl.path
        self.writers: list[Writer] = [self.jsonl]
        if enabled and tensorboard:
            self.writers.append(TensorBoardWriter(workdir))
        if enabled and wandb is not None:
            self.writers.append(WandbWriter(workdir, **wandb))
        # Nothing is created here: the workdir is touched only by the first write.

    @classmethod
    def from_config(cls, cfg, workdir: str, *, enabled: bool = True) -> "MetricsWriter":
        """The writers the config's `metrics` section asks for (paxlike/config.py)."""
        m = cfg.get("metrics") or {}
        wandb = None
        if m.get("wandb", False):
            wandb = dict(project=m.get("wandb_project", "paxlike"),
                         entity=m.get("wandb_entity", ""), name=m.get("wandb_name", ""),
                         mode=m.get("wandb_mode", ""), config=cfg.to_dict())
        return cls(workdir, enabled=enabled, total_steps=cfg.steps,
                   tensorboard=m.get("tensorboard", True), wandb=wandb, plot=m.get("plot", True))

    def _print(self, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        print(line, file=stream, flush=True)

    def truncate_after(self, step: int) -> None:
        """On resume from a checkpoint at `step`: drop metrics.jsonl records with step > `step`
        (atomic rewrite) and have TensorBoard discard its events after `step` (purge_step)."""
        if not self.enabled:
            return
        for w in self.writers:
            w.truncate_after(step)

    # -- writes ----------------------------------------------------------------------------------

    def write_train(self, step: int, values: Mapping[str, Any]) -> None:
        """Append a training record, log scalars train/<key>, print the progress line."""
        if not self.enabled:
            return
        step = int(step)
        values = {k: _json_number(_to_python(v)) for k, v in values.items()}
        for w in self.writers:
            w.write_scalars(step, values, "train")
        record = {"step": step, **values}
        if _is_number(record.get("step_time_s")):
            self._step_times.append(float(record["step_time_s"]))
        self._print(self.progress_line(record))

    def write_eval(self, step: int, values: Mapping[str, Any]) -> None:
        """Append an eval record (split "val"), log scalars eval/<key>, print one line."""
        if not self.enabled:
            return
        step = int(step)
        values = {k: _json_number(_to_python(v)) for k, v in values.items()}
        for w in self.writers:
            w.write_scalars(step, values, "eval")
        parts = [f"eval step {step}"]
        if values.get("eval_loss") is not None:
            parts.append(f"loss {values['eval_loss']:.4f}")
        if values.get("bits_per_byte") is not None:
            parts.append(f"bpb {values['bits_per_byte']:.3f}")
        self._print("  ".join(parts))

    def write_event(self, step: int, event: str, values: Mapping[str, Any]) -> None:
        """Append a record of something that happened to the run ({"step", "event": "rollback"
        or "straggler", ...}) and print it as one line."""
        if not self.enabled:
            return
        for w in self.writers:
            w.write_event(int(step), event,
                          {k: _json_number(_to_python(v)) for k, v in values.items()})
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
        """Flush and close every writer; draw loss.png from the whole metrics.jsonl."""
        if not self.enabled:
            return
        for w in self.writers:
            w.close()
        if self.plot:
            plot_losses(self.path, storage.join(self.workdir, PLOT_FILE))


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
    ax.set_title(storage.basename(storage.dirname(storage.absolute(png_path))) or "loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if storage.is_local(png_path):
        tmp = png_path + ".tmp.png"
        fig.savefig(tmp, format="png")
        os.replace(tmp, png_path)
    else:
        image = io.BytesIO()
        fig.savefig(image, format="png")
        storage.write_atomically(png_path, image.getvalue())
    return True
