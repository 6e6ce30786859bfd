"""Asynchronous checkpoints of the train state, the data position and what made them.

Each checkpoint step holds two items: `state` (the sharded TrainState, restored onto whatever mesh
the restoring run has) and `meta` (JSON: the data iterator's position, the model config, every
parameter's shape and the device layout that wrote it). A run resumes from the latest *complete*
step; orbax writes a step into a temporary directory and renames it when done, so a save killed
halfway leaves a temporary directory, which we report and skip, and delete only once the run's
checks have passed. On gs:// orbax writes a step in place and marks it complete with a
`commit_success.txt` file last (an object store has no renames): a step directory without it is
what a killed save leaves there, reported and deleted the same way.

A complete step can still fail to restore (a torn write on a file system without atomic renames,
a disk error, a file removed by hand): orbax's OCDBT format detects truncated or garbled data
files (length and compression checks) and missing items. Such a step is moved aside, never
deleted, to `<workdir>/checkpoints.damaged/<step>` (outside orbax's step namespace, so it is
neither resumed from nor rotated away), and the run resumes from the newest step that restores;
if none does, the run is refused and nothing changes. Every process tries every step, and all of
them agree on the outcome before going on, so they all resume from the same step.
"""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store
from absl import logging
from etils import epath

from paxlike import storage
from paxlike.errors import UserError

_INCOMPLETE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
_STEP = re.compile(r"^(\d+)$")
# What orbax writes last into a step saved on gs:// (orbax/checkpoint/_src/path/atomicity.py,
# CommitFileTemporaryPath), where a step is written in place instead of renamed.
_COMMIT_FILE = "commit_success.txt"
_CAUSE_BYTES = 400   # how much of a failure's description other processes learn

# Orbax writes a replicated array in parts, one per replica ("replica-parallel"), slicing each
# part out with a compiled program per array shape and layout. Below a few MiB a part's write
# takes less time than that compile (about 20 ms each: 70 of them for a small model's first
# save); so arrays whose part would be under this size are written whole by one replica.
# (The handler is orbax's default one, array metadata store included, with that one setting.)
REPLICA_PARALLEL_MIN_BYTES = 4 << 20
ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
    array_metadata_store=array_metadata_store.Store(),
    min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)


def param_shapes(params) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): list(x.shape) for path, x in flat}


def _incomplete(directory: str) -> dict[str, int]:
    """{name: step} of what killed saves left in `directory`: orbax's temporary directories, and on
    gs:// the step directories without orbax's commit file."""
    names = storage.listdir(directory)
    found = {name: int(m.group(1)) for name in names if (m := _INCOMPLETE.match(name))}
    if storage.scheme(directory) == "gs":
        found.update({name: int(name) for name in names if _STEP.match(name)
                      and not storage.exists(storage.join(directory, name, _COMMIT_FILE))})
    return found


def incomplete_steps(directory: str) -> list[int]:
    return sorted(_incomplete(directory).values())


def describe_failure(error: BaseException, directory: str = "") -> str:
    """One short line for why a restore failed: the innermost exception's first line, without
    tensorstore's multi-kilobyte spec dumps and with paths shown relative to `directory`."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    text = (text.strip().splitlines() or [""])[0]
    text = text.split(" [tensorstore_spec")[0]
    text = re.sub(r'Error opening "\w+" driver: ', "", text)
    # tensorstore chains every layer's context ("CODE: a: b: c: d"); the code and the last two
    # say what broke and where.
    code, parts = re.match(r"([A-Z_]+: )?(.*)", text).groups()
    parts = parts.split(": ")
    if code and len(parts) > 2:
        text = code + "... " + ": ".join(parts[-2:])
    if directory:
        text = text.replace(directory.rstrip("/") + "/", "")
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _agree(cause: str | None) -> str | None:
    """Every process's outcome of the same attempt: None when all succeeded, else the first
    failure's description (naming the process when it is not this one). With one process this
    is free; with several it is one small all-gather, which also keeps them in step."""
    if jax.process_count() == 1:
        return cause
    from jax.experimental import multihost_utils
    mine = np.zeros(_CAUSE_BYTES + 1, np.uint8)
    if cause is not None:
        raw = cause.encode()[:_CAUSE_BYTES]
        mine[0], mine[1:1 + len(raw)] = 1, np.frombuffer(raw, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, _CAUSE_BYTES + 1)
    for process, row in enumerate(everyone):
        if row[0]:
            text = bytes(row[1:]).rstrip(b"\0").decode(errors="replace")
            return text if process == jax.process_index() else f"{text} (on process {process})"
    return None


def _abandoned_read(unraisable) -> bool:
    """Whether an unraisable exception is the debris of a failed restore: tensorstore reads that
    finish after orbax closed its event loop ('Event loop is closed'), or orbax read coroutines
    closed unfinished when they are garbage-collected (GeneratorExit)."""
    error, obj = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)
    if code is None or f"{os.sep}orbax{os.sep}" not in code.co_filename:
        return False
    while error is not None:
        if isinstance(error, GeneratorExit):
            return True
        error = error.__cause__ or error.__context__
    return False


def _unretrieved_orbax_read(record: py_logging.LogRecord) -> bool:
    """Whether an asyncio log record is the other debris of a failed restore: orbax read tasks
    that failed too, after the first failure ended the restore, which asyncio reports (with their
    tracebacks) when they are garbage-collected: 'Task exception was never retrieved'."""
    message = record.getMessage()
    return (message.startswith("Task exception was never retrieved")
            and f"{os.sep}orbax{os.sep}" in message)


def _quiet_abandoned_reads() -> None:
    """A restore that fails leaves orbax's other reads behind; Python prints each as an
    unraisable-exception or unretrieved-task traceback (dozens, with kilobytes of tensorstore
    specs) after the one warning that matters. Drops those, and only those. Installed before the
    first restore, since the first of them can come before the failed read's exception reaches
    us."""
    previous = sys.unraisablehook
    if getattr(previous, "paxlike_quiet", False):
        return

    def hook(unraisable):
        if not _abandoned_read(unraisable):
            previous(unraisable)
    hook.paxlike_quiet = True
    sys.unraisablehook = hook
    py_logging.getLogger("asyncio").addFilter(lambda r: not _unretrieved_orbax_read(r))


def _attempt(fn: Callable, directory: str):
    """(fn(), None), or (None, why) when it raised; agreed between processes. The callers pass
    only reads of checkpoint files, so a failure here means the files cannot be used."""
    result, cause = None, None
    _quiet_abandoned_reads()
    try:
        result = fn()
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the read raised, the step is unusable
        cause = describe_failure(e, directory)
    cause = _agree(cause)
    return (None, cause) if cause is not None else (result, None)


class Checkpoints:
    """Saving and restoring one run's checkpoints in `<workdir>/checkpoints`."""

    def __init__(self, directory: str, *, keep: int, async_save: bool):
        storage.check_workdir(directory, "the checkpoint directory")
        self.directory = storage.absolute(directory)
        self.damaged_directory = self.directory + ".damaged"
        self.keep, self.async_save = keep, async_save
        self._manager = None
        self._state_handler = None
        # Complete steps newer than `newest_readable()`'s answer whose meta did not read.
        self.unreadable: dict[int, str] = {}
        # The device layout of this run (paxlike/elastic.py), recorded in every meta it saves.
        self.layout: dict | None = None

    def _open(self) -> ocp.CheckpointManager:
        # Created on first use, so a run that fails validation leaves no directory behind.
        # orbax's own tmp-directory cleanup is off: it deletes in a background thread as soon as
        # the manager opens (before our checks, and racing interpreter exit when a check fails).
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, enable_async_checkpointing=self.async_save, create=True)
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=("state", "meta"))
        return self._manager

    def latest_step(self) -> int | None:
        """The newest complete step, warning about newer steps whose save did not finish."""
        if not storage.isdir(self.directory):
            return None
        incomplete = incomplete_steps(self.directory)
        latest = self._open().latest_step()
        skipped = [s for s in incomplete if latest is None or s > latest]
        if skipped:
            logging.warning("checkpoint step(s) %s in %s were not completely written (the run was "
                            "probably killed while saving); resuming from %s instead",
                            skipped, self.directory,
                            f"step {latest}" if latest is not None else "scratch")
        return latest

    def steps(self) -> list[int]:
        """Every complete step, oldest first."""
        if not storage.isdir(self.directory):
            return []
        return sorted(self._open().all_steps())

    def step_to_read(self, step: int | None, workdir: str) -> int:
        """`step` if it is a complete checkpoint, the newest one when None; UserError naming the
        steps there otherwise (for tools that read a run)."""
        steps = self.steps()
        if not steps:
            raise UserError(f"no checkpoint in {self.directory}: the run in {workdir} saved none "
                            f"yet (it saves every checkpoint_every steps and at its end)")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise UserError(f"--step={step} is not a checkpoint of {workdir}; its steps are "
                            f"{', '.join(map(str, steps))}")
        return step

    def discard_incomplete(self) -> None:
        """Deletes what killed saves left behind; called once the run is known to go ahead."""
        for name in _incomplete(self.directory):
            storage.rmtree(storage.join(self.directory, name))

    def _step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    # Restores use orbax's item handlers directly: the manager's restore ends in a barrier that a
    # process whose read failed would never reach, so the others would wait for it forever.
    def read_meta(self, step: int) -> dict:
        meta = ocp.JsonCheckpointHandler().restore(self._step_dir(step) / "meta")
        if not isinstance(meta, dict):
            raise ValueError(f"meta is a JSON {type(meta).__name__}, not an object")
        return meta

    def newest_readable(self) -> tuple[int | None, dict | None]:
        """(step, meta) of the newest complete step whose meta reads, or (None, None) without
        complete steps. Newer steps whose meta does not read are kept in `self.unreadable` for
        `restore_newest` to report and move aside once the run goes ahead. Reads only; raises
        UserError when there are complete steps but no meta reads."""
        self.latest_step()   # warns about half-written saves
        self.unreadable = {}
        for step in reversed(self.steps()):
            meta, cause = _attempt(lambda: self.read_meta(step), self.directory)
            if cause is None:
                return step, meta
            self.unreadable[step] = cause
        if self.unreadable:
            raise self._nothing_restores(self.unreadable)
        return None, None

    def check_compatible(self, step: int, model_cfg: dict, shapes: dict[str, list[int]],
                         meta: dict | None = None) -> None:
        """Refuses (UserError) a checkpoint written by a model of a different shape."""
        meta = self.read_meta(step) if meta is None else meta
        if meta.get("param_shapes") == shapes:
            return
        saved_model = meta.get("model", {})
        changed = [f"model.{k}: {saved_model.get(k)!r} in the checkpoint, {model_cfg.get(k)!r} now"
                   for k in sorted(set(saved_model) | set(model_cfg))
                   if saved_model.get(k) != model_cfg.get(k)]
        if not changed:
            saved, now = meta.get("param_shapes", {}), shapes
            changed = [f"{k}: {saved.get(k)} in the checkpoint, {now.get(k)} now"
                       for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        raise UserError(
            f"the checkpoint at step {step} in {self.directory} was written by a model of a "
            f"different shape ({'; '.join(changed[:6])}). Use a new --workdir for the new model, "
            f"or restore the original model settings to resume. Nothing was changed.")

    def save(self, step: int, state, meta: dict) -> None:
        if self.layout is not None:
            meta = {**meta, "layout": self.layout}
        self._open().save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state):
        """The state at `step`, resharded onto the shardings carried by `abstract_state`, and
        its meta. Raises whatever the read raised."""
        meta = self.read_meta(step)
        if self._state_handler is None:
            self._state_handler = ocp.StandardCheckpointHandler()
        state = self._state_handler.restore(self._step_dir(step) / "state",
                                            args=ocp.args.StandardRestore(abstract_state))
        return state, meta

    def restore_params(self, step: int, abstract_params):
        """Only the parameters of the state at `step` (the optimizer state is not read),
        resharded onto the shardings carried by `abstract_params` (the state's `params` tree of
        jax.ShapeDtypeStruct). Raises whatever the read raised."""
        item = {"params": abstract_params}
        restored = ocp.PyTreeCheckpointHandler().restore(
            self._step_dir(step) / "state", args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True))
        return restored["params"]

    def restore_newest(self, newest: int, abstract_state,
                       check: Callable[[int, dict], None]) -> tuple[int, object, dict, dict]:
        """Restores the newest step <= `newest` that restores: (step, state, meta, damaged),
        `damaged` being {step: why} for the newer complete steps that did not (including those
        `newest_readable` found unreadable). `check(step, meta)` may refuse a step (UserError).
        Reads only; raises UserError naming every step tried when none restores."""
        tried = dict(self.unreadable)
        for step in [s for s in reversed(self.steps()) if s <= newest]:
            restored, cause = _attempt(lambda: self.read_meta(step), self.directory)
            if cause is None:
                check(step, restored)
                restored, cause = _attempt(lambda: self.restore(step, abstract_state),
                                             self.directory)
            if cause is None:
                state, meta = restored
                return step, state, meta, tried
            tried[step] = cause
        raise self._nothing_restores(tried)

    def _nothing_restores(self, tried: dict[int, str]) -> UserError:
        listed = "; ".join(f"step {s}: {why}" for s, why in sorted(tried.items(), reverse=True))
        return UserError(
            f"no checkpoint in {self.directory} can be restored ({listed}). Nothing was changed. "
            f"Put back intact copies of those step directories if you have them, or start over: "
            f"move {self.directory} away (or use a new --workdir).")

    def set_aside(self, damaged: dict[int, str], resumed_from: int) -> None:
        """Moves the `damaged` steps to `checkpoints.damaged/` (primary process only, after every
        process has finished reading) and reports them in one warning."""
        moved, failure = {}, None
        if jax.process_index() == 0:
            try:
                storage.makedirs(self.damaged_directory)
                for step in sorted(damaged):
                    target = storage.join(self.damaged_directory, str(step))
                    n = 1
                    while storage.exists(target):   # damaged at this step before: keep both
                        target, n = storage.join(self.damaged_directory, f"{step}.{n}"), n + 1
                    storage.move_tree(storage.join(self.directory, str(step)), target)
                    moved[step] = target
            except Exception as e:  # noqa: BLE001 - OSError, or a remote file system's own error
                failure = describe_failure(e)
        failure = _agree(failure)
        if failure is not None:
            raise UserError(f"checkpoint step(s) {sorted(damaged)} in {self.directory} could not "
                            f"be restored and could not be moved aside ({failure}); move them out "
                            f"of {self.directory} by hand and run again")
        self._open().reload()   # orbax's list of steps still holds the moved ones
        if moved:
            newest_first = sorted(moved, reverse=True)
            which = "step" + ("s " if len(moved) > 1 else " ") + ", ".join(map(str, newest_first))
            why = (damaged[newest_first[0]] if len(moved) == 1 else
                   "; ".join(f"step {s}: {damaged[s]}" for s in newest_first))
            where = ("it to " if len(moved) == 1 else "them to ") + ", ".join(
                moved[s] for s in newest_first)
            logging.warning("checkpoint %s in %s could not be restored (%s); moved %s and resuming "
                            "from step %d", which, self.directory, why, where, resumed_from)

    def close(self) -> None:
        """Waits for the last asynchronous save to finish."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None
        if self._state_handler is not None:
            self._state_handler.close()
            self._state_handler = None
