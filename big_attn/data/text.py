"""Byte-level text: the Python standard library's own source and docs, packed for an LM.

    ds = get_dataset(dict(name="bytes", seq_len=512), split="train", batch_size=32, seed=0,
                     train=True, start_batch=step)
    batch = next(iter(ds))  # {"inputs", "targets", "positions", "segment_ids", "weights"}

Every machine with Python has the corpus offline: the `.py`, `.txt` and `.rst` files under
`sysconfig.get_paths()["stdlib"]` (site-packages excluded), or under `input.root`. Files are
split into train and held-out by a hash of their relative path (deterministic, independent of
the file system's order). A document is its bytes between BOS and EOS; token ids are the bytes
0..255 and `PAD`, `BOS`, `EOS` (`VOCAB_SIZE` = 259).

Packing: a document's token stream is cut into pieces of at most `seq_len + 1` tokens
overlapping by one (so every next-token target is predicted once), and pieces are packed in
order into rows of `seq_len` inputs, first fit. In a row, piece k has `segment_ids` k+1 and
`positions` 0, 1, ... (restarting per piece), `targets` its inputs shifted by one and `weights`
1; padding has segment 0, weight 0. The model must not attend across segments.

`input_config` keys: name ("bytes"), seq_len, root (None: the standard library), heldout
(fraction of files held out, 0.05), max_files (None, or the first N files of each split, for
quick tests), num_threads, prefetch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sysconfig
import zlib
from typing import Any

import grain
import numpy as np

from big_attn.data import batching

NAME = "bytes"
PAD, BOS, EOS = 256, 257, 258
VOCAB_SIZE = 259
EXTENSIONS = (".py", ".txt", ".rst")
_KEYS = ("name", "seq_len", "root", "heldout", "max_files", "num_threads", "prefetch")


def is_text(input_config: Any) -> bool:
  """Whether `input_config` names the byte-level text data set."""
  return input_config is not None and input_config.get("name") == NAME


@dataclasses.dataclass(frozen=True)
class _Spec:
  seq_len: int
  root: str
  heldout: float
  max_files: int | None
  num_threads: int
  prefetch: int

  @classmethod
  def parse(cls, cfg: Any) -> _Spec:
    unknown = sorted(set(cfg.keys()) - set(_KEYS))
    if unknown:
      raise ValueError(f"unknown config.input keys {unknown} for name={NAME!r}; known: {_KEYS}")

    def get(key, default):
      return default if cfg.get(key) is None else cfg.get(key)

    spec = cls(seq_len=get("seq_len", 512), root=get("root", sysconfig.get_paths()["stdlib"]),
               heldout=float(get("heldout", 0.05)), max_files=cfg.get("max_files"),
               num_threads=get("num_threads", 4), prefetch=get("prefetch", 8))
    if not isinstance(spec.seq_len, int) or spec.seq_len < 2:
      raise ValueError(f"config.input.seq_len must be an int >= 2, got {spec.seq_len!r}")
    if not 0.0 < spec.heldout < 1.0:
      raise ValueError(f"config.input.heldout must be in (0, 1), got {spec.heldout}")
    if spec.max_files is not None and (not isinstance(spec.max_files, int)
                                       or spec.max_files < 1):
      raise ValueError(f"config.input.max_files must be None or a positive int, got "
                       f"{spec.max_files!r}")
    if not os.path.isdir(spec.root):
      raise FileNotFoundError(f"config.input.root {spec.root!r} is not a directory")
    for key in ("num_threads", "prefetch"):
      if not isinstance(getattr(spec, key), int) or getattr(spec, key) < 1:
        raise ValueError(f"config.input.{key} must be a positive int, got {getattr(spec, key)!r}")
    return spec


def list_files(root: str, split: str, heldout: float) -> list[str]:
  """Sorted relative paths of `split` ("train" or "test") under `root`."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  paths = []
  for directory, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages",
                                                  "__pycache__"))
    for name in files:
      if name.endswith(EXTENSIONS):
        paths.append(os.path.relpath(os.path.join(directory, name), root))
  held_out = lambda p: zlib.crc32(p.encode()) % 10_000 < heldout * 10_000
  return sorted(p for p in paths if held_out(p) == (split == "test"))


class PackedDocuments:
  """Random-access rows of packed documents (a grain source); see the module docstring."""

  def __init__(self, documents: list[bytes], seq_len: int):
    self.seq_len = seq_len
    lengths = np.array([len(d) + 2 for d in documents], np.int64)  # with BOS and EOS
    self._streams = np.full(int(lengths.sum()), EOS, np.int16)
    self._offsets = np.concatenate([[0], np.cumsum(lengths)])
    for doc, start in zip(documents, self._offsets[:-1]):
      self._streams[start] = BOS
      self._streams[start + 1:start + 1 + len(doc)] = np.frombuffer(doc, np.uint8)
    # Pieces (stream start, inputs length): L + 1 tokens overlapping by one.
    starts, sizes = [], []
    for begin, end in zip(self._offsets[:-1], self._offsets[1:]):
      for s in range(begin, end - 1, seq_len):
        starts.append(s)
        sizes.append(min(seq_len, end - 1 - s))
    self._piece_start = np.asarray(starts, np.int64)
    self._piece_size = np.asarray(sizes, np.int64)
    rows, used = [0], 0
    for i, size in enumerate(sizes):
      if used + size > seq_len:
        rows.append(i)
        used = 0
      used += size
    rows.append(len(sizes))
    self._rows = np.asarray(rows if sizes else [0], np.int64)

  def __len__(self) -> int:
    return len(self._rows) - 1

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range [0, {len(self)})")
    n = self.seq_len
    row = dict(inputs=np.full(n, PAD, np.int32), targets=np.full(n, PAD, np.int32),
               positions=np.zeros(n, np.int32), segment_ids=np.zeros(n, np.int32),
               weights=np.zeros(n, np.float32))
    used = 0
    for k, piece in enumerate(range(self._rows[index], self._rows[index + 1])):
      start, size = self._piece_start[piece], self._piece_size[piece]
      tokens = self._streams[start:start + size + 1]
      span = slice(used, used + size)
      row["inputs"][span], row["targets"][span] = tokens[:-1], tokens[1:]
      row["positions"][span] = np.arange(size)
      row["segment_ids"][span] = k + 1
      row["weights"][span] = 1.0
      used += size
    return row


class _Padded:
  """`source` followed by empty rows (weight 0) up to `length`."""

  def __init__(self, source: PackedDocuments, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    if index < len(self._source):
      return self._source[index]
    n = self._source.seq_len
    return dict(inputs=np.full(n, PAD, np.int32), targets=np.full(n, PAD, np.int32),
                positions=np.zeros(n, np.int32), segment_ids=np.zeros(n, np.int32),
                weights=np.zeros(n, np.float32))


@functools.lru_cache(maxsize=8)
def _packed(root: str, split: str, heldout: float, max_files: int | None,
            seq_len: int) -> PackedDocuments:
  files = list_files(root, split, heldout)[:max_files]
  documents = []
  for path in files:
    with open(os.path.join(root, path), "rb") as f:
      documents.append(f.read())
  if not documents:
    raise ValueError(f"no {split} files ({EXTENSIONS}) under {root}")
  return PackedDocuments(documents, seq_len)


def source(input_config: Any, split: str) -> PackedDocuments:
  """The packed rows of `split` ("train" or "test")."""
  spec = _Spec.parse(input_config)
  return _packed(spec.root, split, spec.heldout, spec.max_files, spec.seq_len)


def dataset_info(input_config: Any) -> dict[str, Any]:
  """`dict(vocab_size, seq_len)` (reads no files)."""
  spec = _Spec.parse(input_config)
  return dict(vocab_size=VOCAB_SIZE, seq_len=spec.seq_len)


def get_dataset(input_config: Any, *, split: str, batch_size: int, seed: int, train: bool,
                rows: slice | None = None, start_batch: int = 0) -> grain.IterDataset:
  """Batches of packed rows for one process (`big_attn.data.batching`).

  train: rows shuffled per epoch, repeated forever, remainder dropped, from global batch
  `start_batch` on. Otherwise one ordered pass whose last batch is completed with empty rows
  (weights 0). `rows` are the rows of each global batch of `batch_size` this process reads
  (None: all).

  Returns a `grain.IterDataset` of `{"inputs", "targets", "positions", "segment_ids": int32
  [b, seq_len], "weights": float32 [b, seq_len]}` (b = the rows read).
  """
  rows = batching.check_rows(rows, batch_size)
  spec = _Spec.parse(input_config)
  packed = source(input_config, split)
  read = grain.ReadOptions(num_threads=spec.num_threads, prefetch_buffer_size=spec.prefetch)
  if train:
    if len(packed) < batch_size:
      raise ValueError(f"split {split!r} has {len(packed)} rows, fewer than the batch of "
                       f"{batch_size}")
    stream = grain.MapDataset.source(packed).shuffle(seed=batching.seed(seed, 0)).repeat()
    return batching.batches(stream, batch_size=batch_size, rows=rows, read=read,
                            start_batch=start_batch)
  num_batches = math.ceil(len(packed) / batch_size)
  stream = grain.MapDataset.source(_Padded(packed, num_batches * batch_size))
  return batching.batches(stream, batch_size=batch_size, rows=rows, read=read,
                          num_batches=num_batches)
