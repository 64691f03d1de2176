"""TFDS ArrayRecord data sources read from a local `data_dir` (random access, never downloads).

`tensorflow_datasets` is an optional dependency (`pip install 'big_attn[tfds]'`), imported
only when a "tfds:NAME" input is used; TensorFlow itself is not needed.
"""
from __future__ import annotations

import functools

import numpy as np


def _tfds():
  try:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "TFDS inputs ('tfds:NAME') need tensorflow_datasets; install the extra with "
        "pip install 'big_attn[tfds]' (or pip install tensorflow-datasets)") from e
  return tensorflow_datasets


def data_source(name: str, split: str, data_dir: str | None):
  """`tfds.data_source` of a prepared data set; an error naming the path if it is missing."""
  tfds = _tfds()
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (FileNotFoundError, NotImplementedError, AssertionError, KeyError, ValueError) as e:
    raise FileNotFoundError(
        f"TFDS data set {name!r} split {split!r} is not prepared as ArrayRecord in "
        f"data_dir={data_dir!r} (nothing is downloaded; prepare it with tfds build "
        f"--file_format=array_record): {e}") from e


@functools.lru_cache(maxsize=16)
def features(name: str, data_dir: str | None) -> dict[str, int]:
  """`dict(num_classes=, channels=)` from the data set's `label` and `image` features."""
  info = _tfds().builder(name, data_dir=data_dir).info
  return dict(num_classes=int(info.features["label"].num_classes),
              channels=int(info.features["image"].shape[-1] or 3))


class TfdsSource:
  """`{"image": uint8 [h, w, c], "label": int}` of one split of a TFDS data set."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    self._source = data_source(name, split, data_dir)
    self._name, self._split = name, split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self._source[index]
    return {"image": np.asarray(example["image"]), "label": np.int32(example["label"])}

  def __repr__(self) -> str:
    return f"TfdsSource({self._name!r}, split={self._split!r}, num_examples={len(self)})"
