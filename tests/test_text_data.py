"""Byte-level text data: split by file, packing with segments, resumable grain iterators."""
from __future__ import annotations

import os
import sysconfig

import numpy as np
import pytest

from big_attn import data
from big_attn.data import text


def _write_corpus(root, num_files=12):
  rng = np.random.default_rng(0)
  docs = {}
  for i in range(num_files):
    size = [0, 1, 5, 17, 40, 3][i % 6] * (i + 1)
    body = bytes(rng.integers(0, 256, size, dtype=np.uint8))
    path = os.path.join("pkg" if i % 2 else "", f"m{i}.py")
    os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
    with open(os.path.join(root, path), "wb") as f:
      f.write(body)
    docs[path] = body
  with open(os.path.join(root, "ignored.bin"), "wb") as f:
    f.write(b"not text")
  return docs


def _unpack(rows):
  """Documents back from packed rows: per segment, inputs then the last target."""
  pieces = []
  for row in rows:
    for seg in range(1, int(row["segment_ids"].max()) + 1):
      idx = np.nonzero(row["segment_ids"] == seg)[0]
      pieces.append(np.concatenate([row["inputs"][idx], row["targets"][idx[-1:]]]))
  docs, current = [], []
  for piece in pieces:
    current = list(piece) if not current else current + list(piece[1:])
    if current[-1] == text.EOS:
      docs.append(current)
      current = []
  return docs


def test_split_by_file_is_deterministic_and_disjoint(tmp_path):
  docs = _write_corpus(str(tmp_path), 40)
  train = text.list_files(str(tmp_path), "train", 0.3)
  test = text.list_files(str(tmp_path), "test", 0.3)
  assert sorted(train + test) == sorted(docs) and not set(train) & set(test)
  assert test and train
  assert test == text.list_files(str(tmp_path), "test", 0.3)
  stdlib = sysconfig.get_paths()["stdlib"]
  held = text.list_files(stdlib, "test", 0.05)
  assert held and all(p.endswith(text.EXTENSIONS) and "site-packages" not in p for p in held)


@pytest.mark.parametrize("seq_len", [7, 16])
def test_packing_round_trips_documents_with_restarting_positions(seq_len):
  rng = np.random.default_rng(1)
  docs = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in (0, 3, 30, 6, 1, 15, 2)]
  packed = text.PackedDocuments(docs, seq_len)
  rows = [packed[i] for i in range(len(packed))]
  for row in rows:
    seg, w = row["segment_ids"], row["weights"]
    np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))
    assert np.all(row["inputs"][seg == 0] == text.PAD)
    for s in range(1, seg.max() + 1):
      idx = np.nonzero(seg == s)[0]
      np.testing.assert_array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # contiguous
      np.testing.assert_array_equal(row["positions"][idx], np.arange(len(idx)))
      np.testing.assert_array_equal(row["targets"][idx[:-1]], row["inputs"][idx[1:]])
  want = [[text.BOS] + list(d) + [text.EOS] for d in docs]
  assert _unpack(rows) == want
  # Every next-byte target is predicted exactly once.
  assert sum(int(r["weights"].sum()) for r in rows) == sum(len(d) + 1 for d in docs)


def test_resumed_and_split_batches_and_padded_eval(tmp_path):
  _write_corpus(str(tmp_path))
  cfg = dict(name="bytes", seq_len=8, root=str(tmp_path), heldout=0.3, num_threads=1)
  assert data.dataset_info(cfg) == dict(vocab_size=text.VOCAB_SIZE, seq_len=8)
  it = iter(data.get_dataset(cfg, split="train", batch_size=4, seed=3, train=True))
  expected = [next(it) for _ in range(7)][3:]
  resumed = iter(data.get_dataset(cfg, split="train", batch_size=4, seed=3, train=True,
                                  start_batch=3))
  halves = [iter(data.get_dataset(cfg, split="train", batch_size=4, seed=3, train=True,
                                  rows=rows, start_batch=3)) for rows in (slice(0, 1),
                                                                         slice(1, 4))]
  for want in expected:
    got, parts = next(resumed), [next(h) for h in halves]
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
  assert expected[0]["inputs"].shape == (4, 8) and expected[0]["inputs"].dtype == np.int32

  rows = text.source(cfg, "train")
  batches = list(data.get_dataset(cfg, split="train", batch_size=3, seed=0, train=False))
  assert len(batches) == -(-len(rows) // 3)
  weights = np.concatenate([b["weights"] for b in batches])
  assert weights.sum() == sum(rows[i]["weights"].sum() for i in range(len(rows)))
  assert np.all(weights[len(rows):] == 0)
  # Two processes reading rows 0:1 and 1:3 yield the same number of batches, which together
  # are the global ones.
  parts = [list(data.get_dataset(cfg, split="train", batch_size=3, seed=0, train=False,
                                 rows=rows)) for rows in (slice(0, 1), slice(1, 3))]
  assert len(parts[0]) == len(parts[1]) == len(batches)
  for whole, first, rest in zip(batches, *parts):
    np.testing.assert_array_equal(np.concatenate([first["inputs"], rest["inputs"]]),
                                  whole["inputs"])


def test_input_config_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown config.input keys"):
    data.dataset_info(dict(name="bytes", seq_len=8, image_size=32))
  with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
    data.dataset_info(dict(name="bytes", seq_len=1))
  with pytest.raises(ValueError, match="heldout must be in"):
    data.dataset_info(dict(name="bytes", heldout=1.5))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    data.dataset_info(dict(name="bytes", root=str(tmp_path / "missing")))
  with pytest.raises(ValueError, match="batch_size"):
    data.get_dataset(dict(name="bytes", root=str(tmp_path)), split="train", batch_size=0,
                     seed=0, train=True)
  with pytest.raises(ValueError, match="no train files"):
    text.source(dict(name="bytes", root=str(tmp_path)), "train")
