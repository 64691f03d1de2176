"""Checkpoints of the train state (orbax `CheckpointManager`), verified by checksums on restore.

Each checkpoint `checkpoints/<step>/state` holds params, optimizer state and step, saved
asynchronously and restored directly into the shardings of the current mesh (which may differ
from the saving run's, on any number of processes). The input position needs no item of its
own: the data order is a function of the seed and the global batch, and a run resumed at step s
reads from global batch s on (`big_attn.data.batching`).

Nothing is lost:
- Half-written checkpoints are never seen: orbax writes into a temporary directory and renames it
  when the save is complete, and `all_steps()` lists finished ones only.
- Once a save has finished, the SHA-256 of each of its files is written to
  `checkpoints-sha256/<step>.p<i>of<n>.json` (process i of n hashes every n-th file). A restore
  first verifies them; a checkpoint whose file differs from its checksum (or is missing) is
  proven corrupt: it is named in a warning, moved aside to `<step>.corrupt-<time>` and the
  previous checkpoint is tried. A checkpoint without checksums (the run stopped between the
  save and the hashing) is restored with a warning.
- Any other failure to restore (the state does not fit the model, an I/O error) is not proof of
  corruption: `RestoreError` is raised and nothing is renamed or deleted. So is the case of
  checkpoints that exist but of which none verifies.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

_CHUNK = 1 << 22


class RestoreError(RuntimeError):
  """Checkpoints exist but cannot be restored safely; nothing was renamed or deleted."""


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(root: str) -> list[str]:
  """Relative paths of the files under `root`, sorted."""
  out = []
  for directory, _, names in os.walk(root):
    out.extend(os.path.relpath(os.path.join(directory, n), root) for n in names)
  return sorted(out)


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpointer:
  """Saves every `every` steps keeping `max_to_keep`; restores the newest verified checkpoint."""

  def __init__(self, directory: str, *, every: int, max_to_keep: int | None):
    if every < 1:
      raise ValueError(f"config.ckpt_every must be >= 1, got {every}")
    self.every = every
    self.directory = os.fspath(directory)
    self.checksum_dir = self.directory.rstrip("/") + "-sha256"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler()})
    self._unhashed: list[int] = []
    self._last_saved: int | None = None

  def steps(self) -> list[int]:
    """The finished checkpoints' steps, ascending."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts saving `state` at `step` when due (or `force`)."""
    if not force and step % self.every:
      return False
    if step == self._last_saved or step in self.manager.all_steps():
      return False
    self.write_checksums()  # of the previous save, once it has finished
    saved = self.manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    if saved:
      self._unhashed.append(step)
      self._last_saved = step
    return saved

  def write_checksums(self) -> None:
    """Waits for the saves in flight, then writes this process's checksums of each of them."""
    if not self._unhashed:
      return
    self.manager.wait_until_finished()
    index, count = jax.process_index(), jax.process_count()
    os.makedirs(self.checksum_dir, exist_ok=True)
    finished = set(self.manager.all_steps())
    for step in self._unhashed:
      if step not in finished:  # already removed by max_to_keep
        continue
      root = os.path.join(self.directory, str(step))
      files = _files(root)
      sums = {f: sha256(os.path.join(root, f)) for f in files[index::count]}
      path = os.path.join(self.checksum_dir, f"{step}.p{index}of{count}.json")
      with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump({"files": sums, "num_files": len(files)}, f, indent=0)
      os.replace(f"{path}.tmp", path)
    self._unhashed = []
    self._drop_stale_checksums(finished)

  def _drop_stale_checksums(self, finished: set[int]) -> None:
    if jax.process_index() != 0 or not os.path.isdir(self.checksum_dir):
      return
    for name in os.listdir(self.checksum_dir):
      step = name.split(".", 1)[0]
      if step.isdigit() and int(step) not in finished:
        os.remove(os.path.join(self.checksum_dir, name))

  def verify(self, step: int) -> tuple[bool | None, str]:
    """`(True, "")` when every file of `step` matches its checksum, `(False, why)` when one does
    not or is missing (proven corruption), `(None, why)` when there are no complete checksums."""
    manifests = [n for n in (os.listdir(self.checksum_dir) if os.path.isdir(self.checksum_dir)
                             else []) if n.split(".", 1)[0] == str(step)]
    counts = {n.rsplit("of", 1)[1].split(".")[0] for n in manifests}
    if len(counts) != 1 or len(manifests) != int(next(iter(counts))):
      return None, f"no complete checksums in {self.checksum_dir}"
    expected, num_files = {}, None
    for name in manifests:
      with open(os.path.join(self.checksum_dir, name), encoding="utf-8") as f:
        manifest = json.load(f)
      expected.update(manifest["files"])
      num_files = manifest["num_files"]
    root = os.path.join(self.directory, str(step))
    if len(expected) != num_files:
      return None, f"checksums of step {step} cover {len(expected)} of {num_files} files"
    index, count = jax.process_index(), jax.process_count()
    problem = ""
    for rel in sorted(expected)[index::count]:
      path = os.path.join(root, rel)
      if not os.path.exists(path):
        problem = f"{path} is missing"
        break
      if sha256(path) != expected[rel]:
        problem = f"{path} does not match its SHA-256 checksum"
        break
    if _all_processes_agree(not problem):
      return True, ""
    return False, problem or "a file of another process does not match its checksum"

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
    """`(step, state)` from the newest verified checkpoint; None when there are none.

    `abstract_state` holds `ShapeDtypeStruct`s with shardings, so arrays come back already
    sharded. Raises `RestoreError` when
    checkpoints exist but none verifies, or when a verified one fails to restore.
    """
    steps = self.steps()
    for step in reversed(steps):
      verified, why = self.verify(step)
      if verified is False:
        logging.warning("checkpoint at step %d is corrupt: %s; moving it aside and trying the "
                        "previous one", step, why)
        self._set_aside(step)
        continue
      if verified is None:
        logging.warning("checkpoint at step %d is restored unverified: %s", step, why)
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # pylint: disable=broad-exception-caught
        raise RestoreError(
            f"checkpoint at step {step} in {self.directory} could not be restored "
            f"({type(e).__name__}: {e}). It was left as it is: this is not proof that it is "
            "corrupt (its checksums " + ("match" if verified else "are missing") + "). Check "
            "that the config is the one the run was started with, or start a new run in "
            "another --workdir.") from e
      logging.info("restored checkpoint of step %d from %s", step, self.directory)
      return step, restored["state"]
    if steps:
      raise RestoreError(
          f"none of the checkpoints {steps} in {self.directory} verifies (each was moved aside "
          "as <step>.corrupt-<time>); refusing to start over silently. Pass "
          "--config.resume_policy=restart to start again from step 0.")
    return None

  def restore_as_saved(self, step: int | None = None) -> tuple[int, Any]:
    """`(step, state)` of checkpoint `step` (default: the newest) as saved, NumPy arrays on the
    host, with no model to describe it (a checkpoint written by `python -m big_attn.pretrained
    convert`). Raises `RestoreError` when there is none or it does not verify."""
    steps = self.steps()
    step = steps[-1] if step is None and steps else step
    if step not in steps:
      raise RestoreError(f"no checkpoint {'' if step is None else step} in {self.directory}")
    verified, why = self.verify(step)
    if verified is False:
      raise RestoreError(f"checkpoint at step {step} in {self.directory} is corrupt: {why}")
    saved = self.manager.item_metadata(step)["state"]
    item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), getattr(saved, "tree", saved))
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item)))
    return step, restored["state"]

  def _set_aside(self, step: int) -> None:
    path = os.path.join(self.directory, str(step))
    if jax.process_index() == 0:
      os.rename(path, os.path.join(self.directory, f"{step}.corrupt-{int(time.time())}"))
    multihost_utils.sync_global_devices(f"big_attn checkpoint {step} set aside")
    self.manager.reload()

  def close(self) -> None:
    self.write_checksums()
    self.manager.wait_until_finished()
    self.manager.close()
