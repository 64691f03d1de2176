"""Checkpoints of the train state and the grain iterator state (orbax `CheckpointManager`).

Each checkpoint `workdir/checkpoints/<step>/` holds two items: `state` (params, optimizer state,
step; saved asynchronously, restored directly into its shardings) and `data` (the input
iterator's position, one JSON file per process, grain's own orbax handler).

Half-written checkpoints are never seen: orbax writes into a temporary directory and renames it
(or writes a commit marker on object stores) when the save is complete, and `all_steps()` lists
finished ones only. A finished checkpoint that fails to restore (a truncated or corrupted file) is
reported and moved aside to `<step>.unreadable-<time>` (kept for inspection, invisible to
orbax), and the previous one is tried.
"""
from __future__ import annotations

import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class Checkpointer:
  """Saves every `every` steps keeping `max_to_keep`; restores the newest readable checkpoint."""

  def __init__(self, directory: str, *, every: int, max_to_keep: int | None):
    if every < 1:
      raise ValueError(f"config.ckpt_every must be >= 1, got {every}")
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True)
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
        logging.warning("checkpoint at step %d cannot be restored (%s: %s); moving it aside and "
                        "trying the previous one", step, type(e).__name__, e)
        self._set_aside(step)
        continue
      logging.info("restored checkpoint of step %d from %s", step, self.manager.directory)
      return step, restored["state"]
    return None

  def _set_aside(self, step: int) -> None:
    path = self.manager.directory / str(step)  # an etils.epath.Path (local or cloud)
    if jax.process_index() == 0:
      path.rename(path.parent / f"{step}.unreadable-{int(time.time())}")
    multihost_utils.sync_global_devices(f"big_attn checkpoint {step} set aside")
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
