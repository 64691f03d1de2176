"""`big_attn.checkpoint_io.read_state`: another program reads a run's checkpoints, whole or in
part, verified by their checksums, and changes nothing in the run's directory. The run's own
save / resume rules are tests/test_checkpoint.py's."""
from __future__ import annotations

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from big_attn import checkpoint_io
from tests.test_checkpoint import _snapshot


def _state(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {"step": np.int32(step),
          "params": {"dense": {"kernel": rng.normal(size=(3, 5)).astype(np.float32),
                               "bias": rng.normal(size=(5,)).astype(np.float32)}},
          "batch_stats": {"norm": {"mean": rng.normal(size=(5,)).astype(np.float32)}},
          "opt_state": {"mu": rng.normal(size=(7, 2)).astype(np.float64)}}


def _shapes(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def _assert_equal_trees(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert isinstance(a, np.ndarray) and a.dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(a, e)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir whose run saved (and hashed) the states of steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("run")
  checkpointer = checkpoint_io.Checkpointer(checkpoint_io.checkpoints_dir(workdir), every=2,
                                            max_to_keep=None)
  try:
    for step in (2, 4):
      assert checkpointer.save(step, _state(step))
  finally:
    checkpointer.close()
  return workdir


@pytest.fixture
def workdir(saved, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(saved, copy)
  return copy


def test_reads_the_whole_tree_or_only_the_entries_of_item(saved):
  directory = checkpoint_io.checkpoints_dir(saved)
  before = _snapshot(saved)
  step, state = checkpoint_io.read_state(directory)
  assert step == 4
  _assert_equal_trees(state, _state(4))
  item = {k: _shapes(v) for k, v in _state(0).items() if k in ("params", "batch_stats")}
  step, variables = checkpoint_io.read_state(directory, item, step=2)
  assert step == 2 and set(variables) == {"params", "batch_stats"}
  _assert_equal_trees(variables, {k: _state(2)[k] for k in ("params", "batch_stats")})
  assert _snapshot(saved) == before


def test_a_corrupt_checkpoint_is_skipped_but_never_moved(workdir, caplog):
  directory = checkpoint_io.checkpoints_dir(workdir)
  victim = max((os.path.join(d, n) for d, _, names in os.walk(os.path.join(directory, "4"))
                for n in names), key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  before = _snapshot(workdir)
  with caplog.at_level(logging.WARNING):
    step, state = checkpoint_io.read_state(directory)
  assert step == 2
  _assert_equal_trees(state, _state(2))
  assert "step 4" in caplog.text and "corrupt" in caplog.text
  with pytest.raises(checkpoint_io.RestoreError, match="step 4 .* is corrupt"):
    checkpoint_io.read_state(directory, step=4)
  assert _snapshot(workdir) == before  # nothing renamed, removed or written


def test_unverified_read_unfinished_save_and_errors(workdir, tmp_path, caplog):
  directory = checkpoint_io.checkpoints_dir(workdir)
  # An unfinished save of another, still running, process is left alone.
  unfinished = os.path.join(directory, "6.orbax-checkpoint-tmp-1700000000")
  os.makedirs(unfinished)
  for name in os.listdir(checkpoint_io.checksums_dir(directory)):
    if name.startswith("4."):
      os.remove(os.path.join(checkpoint_io.checksums_dir(directory), name))
  before = _snapshot(workdir)
  with caplog.at_level(logging.WARNING):
    step, _ = checkpoint_io.read_state(directory)
  assert step == 4 and "read unverified" in caplog.text
  assert os.path.isdir(unfinished)
  # An item that does not fit the checkpoint: a RestoreError, and nothing is touched.
  wrong = {"params": {"dense": {"kernel": jax.ShapeDtypeStruct((4, 5), np.float32)}}}
  with pytest.raises(checkpoint_io.RestoreError,
                     match=r"step 4 .* \['params'\]\['dense'\]\['kernel'\] has shape \(3, 5\)"):
    checkpoint_io.read_state(directory, wrong)
  assert _snapshot(workdir) == before and os.path.isdir(unfinished)
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 3 in"):
    checkpoint_io.read_state(directory, step=3)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpoint_io.read_state(tmp_path / "missing")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpoint_io.read_state(tmp_path / "empty")
  assert not os.listdir(tmp_path / "empty")


def test_old_names_warn_and_are_the_new_ones(saved):
  from big_attn.train import checkpoint as old  # pylint: disable=g-import-not-at-top
  with pytest.warns(DeprecationWarning, match="big_attn.checkpoint_io.Checkpointer"):
    assert old.Checkpointer is checkpoint_io.Checkpointer
  with pytest.raises(AttributeError):
    old.no_such_name  # pylint: disable=pointless-statement
  checkpointer = checkpoint_io.Checkpointer(checkpoint_io.checkpoints_dir(saved), every=2,
                                            max_to_keep=None)
  try:
    with pytest.warns(DeprecationWarning, match="read_state"):
      step, state = checkpointer.restore_as_saved()
  finally:
    checkpointer.close()
  assert step == 4
  _assert_equal_trees(state, _state(4))
