"""Checkpoint I/O: the one module that opens orbax. Checkpoints of the train state, verified by
checksums on restore; read back whole or in part by other programs.

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
- Readers of another run's checkpoints (`read_state`: a distillation teacher, `big_attn.interpret`,
  a converted checkpoint for `init_from`) change nothing in its directory: a checkpoint proven
  corrupt is skipped with a warning, never moved, and unfinished saves are left alone.

The saving run's object is `Checkpointer(directory, every=..., max_to_keep=...)`; a reader calls
`read_state(checkpoints_dir(workdir), item)`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

_CHUNK = 1 << 22
CHECKPOINTS = "checkpoints"  # a run's checkpoints are WORKDIR/checkpoints


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


def checkpoints_dir(workdir: str) -> str:
  """The directory of a `big_attn.main` run's checkpoints: `WORKDIR/checkpoints`, absolute."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINTS)


def checksums_dir(directory: str) -> str:
  """Where the checksums of the checkpoints in `directory` are: `<directory>-sha256`."""
  return os.fspath(directory).rstrip("/") + "-sha256"


def verify(directory: str, step: int) -> tuple[bool | None, str]:
  """`(True, "")` when every file of checkpoint `step` in `directory` matches its checksum,
  `(False, why)` when one does not or is missing (proven corruption), `(None, why)` when there
  are no complete checksums. Every process checks its share of the files; all get one answer."""
  checksum_dir = checksums_dir(directory)
  manifests = [n for n in (os.listdir(checksum_dir) if os.path.isdir(checksum_dir) else [])
               if n.split(".", 1)[0] == str(step)]
  counts = {n.rsplit("of", 1)[1].split(".")[0] for n in manifests}
  if len(counts) != 1 or len(manifests) != int(next(iter(counts))):
    return None, f"no complete checksums in {checksum_dir}"
  expected, num_files = {}, None
  for name in manifests:
    with open(os.path.join(checksum_dir, name), encoding="utf-8") as f:
      manifest = json.load(f)
    expected.update(manifest["files"])
    num_files = manifest["num_files"]
  root = os.path.join(directory, str(step))
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


def read_state(directory: str, item: Any = None, *, step: int | None = None) -> tuple[int, Any]:
  """`(step, state)` of checkpoint `step` in `directory` (default: the newest one not proven
  corrupt), as NumPy arrays on the host.

  `item`, a tree of shapes such as `{"params": ..., "batch_stats": ...}` (`jax.eval_shape` of a
  model's init), reads only those entries of the saved state (orbax partial restore); None reads
  the whole saved tree, with no model to describe it. Nothing in `directory` is created, moved
  or deleted: a checkpoint proven corrupt by its checksums is skipped with a warning (an explicit
  `step` raises `RestoreError` instead), one without checksums is read with a warning.
  Raises `FileNotFoundError` when `directory` has no finished checkpoint (or none of `step`),
  `RestoreError` when none verifies or reading one fails.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint in {directory} (not a directory)")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                      save_interval_steps=0),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    steps = sorted(manager.all_steps())
    if not steps or (step is not None and step not in steps):
      raise FileNotFoundError(f"no checkpoint {'' if step is None else f'of step {step} '}in "
                              f"{directory} (finished checkpoints: {steps})")
    for candidate in ([step] if step is not None else reversed(steps)):
      verified, why = verify(directory, candidate)
      if verified is False and step is not None:
        raise RestoreError(f"checkpoint at step {step} in {directory} is corrupt: {why}")
      if verified is False:
        logging.warning("checkpoint at step %d in %s is corrupt: %s; reading the previous one",
                        candidate, directory, why)
        continue
      if verified is None:
        logging.warning("checkpoint at step %d in %s is read unverified: %s", candidate,
                        directory, why)
      return candidate, _read(manager, candidate, item)
  finally:
    manager.close()
  raise RestoreError(f"none of the checkpoints {steps} in {directory} verifies (each is left as "
                     "it is)")


def _read(manager: ocp.CheckpointManager, step: int, item: Any) -> Any:
  target = item
  if target is None:
    saved = manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                          getattr(saved, "tree", saved))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target,
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
        partial_restore=item is not None)))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise RestoreError(
        f"checkpoint at step {step} in {manager.directory} could not be read "
        f"({type(e).__name__}: {e}); it was left as it is") from e

  def check_shape(path, want, got):  # orbax returns NumPy arrays as saved, of any shape
    if tuple(want.shape) != np.shape(got):
      raise RestoreError(
          f"checkpoint at step {step} in {manager.directory} could not be read: "
          f"{jax.tree_util.keystr(path)} has shape {np.shape(got)} there, {tuple(want.shape)} "
          "expected; it was left as it is")

  jax.tree_util.tree_map_with_path(check_shape, target, restored["state"])
  return restored["state"]


class Checkpointer:
  """Saves every `every` steps keeping `max_to_keep`; restores the newest verified checkpoint."""

  def __init__(self, directory: str, *, every: int, max_to_keep: int | None):
    if every < 1:
      raise ValueError(f"config.ckpt_every must be >= 1, got {every}")
    self.every = every
    self.directory = os.fspath(directory)
    self.checksum_dir = checksums_dir(self.directory)
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
    """`verify(self.directory, step)`."""
    return verify(self.directory, step)

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
    """Deprecated: `read_state(directory, step=step)`, which opens nothing for writing."""
    warnings.warn("Checkpointer.restore_as_saved is deprecated; use "
                  "big_attn.checkpoint_io.read_state(directory)", DeprecationWarning,
                  stacklevel=2)
    return read_state(self.directory, step=step)

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
