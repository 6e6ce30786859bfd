"""Asynchronous checkpoints of the train state, the data position and what made them.

Each checkpoint step holds two items: `state` (the sharded TrainState, restored onto whatever mesh
the restoring run has) and `meta` (JSON: the data iterator's position, the model config and every
parameter's shape). A run resumes from the latest *complete* step; orbax writes a step into a
temporary directory and renames it when done, so a save killed halfway leaves a temporary
directory, which we report and skip, and delete only once the run's checks have passed.
"""

from __future__ import annotations

import os
import re
import shutil

import jax
import orbax.checkpoint as ocp
from absl import logging

from paxlike.errors import UserError

_INCOMPLETE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def param_shapes(params) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): list(x.shape) for path, x in flat}


def incomplete_steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(directory)
                  if (m := _INCOMPLETE.match(name)))


class Checkpoints:
    """Saving and restoring one run's checkpoints in `<workdir>/checkpoints`."""

    def __init__(self, directory: str, *, keep: int, async_save: bool):
        self.directory = os.path.abspath(directory)
        self.keep, self.async_save = keep, async_save
        self._manager = None

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
        if not os.path.isdir(self.directory):
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

    def discard_incomplete(self) -> None:
        """Deletes what killed saves left behind; called once the run is known to go ahead."""
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if _INCOMPLETE.match(name):
                shutil.rmtree(os.path.join(self.directory, name))

    def read_meta(self, step: int) -> dict:
        return self._open().restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, model_cfg: dict, shapes: dict[str, list[int]]) -> None:
        """Refuses (UserError) a checkpoint written by a model of a different shape."""
        meta = self.read_meta(step)
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
        self._open().save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state):
        """The state at `step`, resharded onto the shardings carried by `abstract_state`."""
        restored = self._open().restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def close(self) -> None:
        """Waits for the last asynchronous save to finish."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None
