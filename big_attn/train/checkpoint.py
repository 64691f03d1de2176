"""Checkpoints of the train state and the grain iterator state (orbax `CheckpointManager`).

Each checkpoint `workdir/checkpoints/<step>/` holds two items: `state` (params, optimizer state,
step; saved asynchronously, restored directly into its shardings) and `data` (the input
iterator's position, one JSON file per process, grain's own orbax handler).

Half-written checkpoints are never seen: orbax writes into a temporary directory and renames it
(or writes a commit marker on object stores) when the save is complete, and `all_steps()` lists
finished ones only. A finished checkpoint that fails to restore (a truncated or corrupted file) is
reported, deleted, and the previous one is tried.
"""
from __future__ import annotations

from typing import Any

import grain
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves every `every` steps keeping `max_to_keep`; restores the newest readable checkpoint."""

  def __init__(self, directory: str, *, every: int, max_to_keep: int | None,
               async_save: bool = True):
    if every < 1:
      raise ValueError(f"config.ckpt_every must be >= 1, got {every}")
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def save(self, step: int, state: Any, data_iter: Any, *, force: bool = False) -> bool:
    """Starts saving `state` and `data_iter`'s position at `step` when due (or `force`)."""
    if not force and step % self.every:
      return False
    return self.manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iter)))

  def restore_latest(self, abstract_state: Any, data_iter: Any) -> tuple[int, Any] | None:
    """`(step, state)` from the newest checkpoint that restores, else None.

    `abstract_state` holds `ShapeDtypeStruct`s with shardings, so arrays come back already
    sharded; `data_iter` is moved to the saved position in place.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter)))
      except Exception as e:  # pylint: disable=broad-exception-caught
        logging.warning("checkpoint at step %d cannot be restored (%s: %s); deleting it and "
                        "trying the previous one", step, type(e).__name__, e)
        self.manager.delete(step)
        continue
      logging.info("restored checkpoint of step %d from %s", step, self.manager.directory)
      return step, restored["state"]
    return None

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
