"""Batches of a global example stream, of which one process reads some rows.

The order of a run's data is a function of the seed and the global batch size only: global batch
b holds the stream's examples `b * batch_size ... (b + 1) * batch_size - 1`. A process reads the
rows `rows` (a `slice`) of each global batch: the rows its devices hold (`parallel.mesh.
process_rows`), so processes whose devices hold the same rows read the same examples, and one
process with 8 devices sees the same batches as two with 4. Training resumes at batch
`start_batch` (the step), on any number of processes.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import grain
import numpy as np


def check_rows(rows: slice | None, batch_size: int) -> slice:
  """`rows` (None: all) as a `slice(start, stop)` inside `[0, batch_size)`, checked."""
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if rows is None:
    return slice(0, batch_size)
  if not isinstance(rows, slice) or rows.step not in (None, 1):
    raise TypeError(f"rows must be a slice(start, stop) of the global batch, got {rows!r}")
  start, stop = rows.start or 0, batch_size if rows.stop is None else rows.stop
  if not 0 <= start < stop <= batch_size:
    raise ValueError(f"rows {start}:{stop} must lie in the global batch of {batch_size}")
  return slice(start, stop)


def seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _Rows:
  """Local example k -> `stream[b * batch_size + r]`: b = k // local rows, r = the row of this
  process's k % local rows; `combine(b, r, stream)` may replace the plain lookup (mixup)."""

  def __init__(self, stream: Any, batch_size: int, rows: slice, num_batches: int,
               combine: Callable[[int, int, Any], Any] | None):
    self._stream, self._batch_size, self._rows = stream, batch_size, rows
    self._local = rows.stop - rows.start
    self._length = num_batches * self._local
    self._combine = combine

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, k: int):
    b, r = divmod(int(k), self._local)
    r += self._rows.start
    if self._combine is not None:
      return self._combine(b, r, self._stream)
    return self._stream[b * self._batch_size + r]


def _check_start(start_batch: int, num_batches: int | None, batch_size: int) -> int:
  if not isinstance(start_batch, int) or start_batch < 0:
    raise ValueError(f"start_batch must be an int >= 0, got {start_batch!r}")
  return sys.maxsize // (2 * batch_size) if num_batches is None else num_batches


def batches(stream: grain.MapDataset, *, batch_size: int, rows: slice | None,
            read: grain.ReadOptions, num_batches: int | None = None, start_batch: int = 0,
            combine: Callable[[int, int, Any], Any] | None = None) -> grain.IterDataset:
  """This process's rows of global batches `start_batch, start_batch + 1, ...` of `stream`.

  `num_batches` None means as many as an endless `stream` has (training).
  """
  rows = check_rows(rows, batch_size)
  num_batches = _check_start(start_batch, num_batches, batch_size)
  local = rows.stop - rows.start
  ds = grain.MapDataset.source(_Rows(stream, batch_size, rows, num_batches, combine))
  return ds[start_batch * local:].batch(local, drop_remainder=True).to_iter_dataset(read)


class _Made:
  """Global batch b -> `make(b, rows)`, rows = this process's row numbers (an int array)."""

  def __init__(self, make: Callable[[int, np.ndarray], Any], rows: slice, num_batches: int):
    self._make, self._rows, self._length = make, np.arange(rows.start, rows.stop), num_batches

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, b: int):
    return self._make(int(b), self._rows)


def made_batches(make: Callable[[int, np.ndarray], Any], *, batch_size: int,
                 rows: slice | None, read: grain.ReadOptions, num_batches: int | None = None,
                 start_batch: int = 0) -> grain.IterDataset:
  """As `batches`, for a source that builds a whole batch at once: `make(b, rows)` returns the
  rows `rows` (global row numbers, so example `b * batch_size + rows`) of global batch b."""
  rows = check_rows(rows, batch_size)
  num_batches = _check_start(start_batch, num_batches, batch_size)
  ds = grain.MapDataset.source(_Made(make, rows, num_batches))
  return ds[start_batch:].to_iter_dataset(read)
