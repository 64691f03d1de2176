"""Batches read and placed on the devices ahead of the step, in a background thread.

    batches = Prefetch(train_iter, lambda b: mesh_lib.shard_batch(b, sharding, batch_size),
                       count=total_steps - first_step)
    for batch in batches: ...   # the same batches, in the same order, already on the devices
    batches.close()

The thread reads the input pipeline and transfers each batch while the devices compute the
previous steps, so neither the pipeline nor the host-to-device copy waits in the loop. Each
process prefetches its own rows (`shard_batch` builds the global arrays from them), so a
multi-process run needs no communication here.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable

_POLL_S = 0.1


class Prefetch:
  """Iterates `place(item)` for the first `count` items of `source` (all when None), computed
  up to `depth` items ahead in a daemon thread. An error of the source or of `place` is raised
  by the `next()` that would have returned that item. `close()` stops the thread."""

  def __init__(self, source: Iterable[Any], place: Callable[[Any], Any], *, depth: int = 2,
               count: int | None = None):
    if not isinstance(depth, int) or depth < 1:
      raise ValueError(f"depth must be a positive int, got {depth!r}")
    if count is not None and count < 0:
      raise ValueError(f"count must be None or >= 0, got {count!r}")
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(iter(source), place, count),
                                    name="big_attn-prefetch", daemon=True)
    self._thread.start()

  def _put(self, entry: tuple[str, Any]) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(entry, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self, source, place, count) -> None:
    done = 0
    try:
      while count is None or done < count:
        try:
          item = next(source)
        except StopIteration:
          break
        if not self._put(("item", place(item))):
          return
        done += 1
    except BaseException as e:  # pylint: disable=broad-exception-caught
      self._put(("error", e))
      return
    self._put(("end", None))

  def __iter__(self) -> Prefetch:
    return self

  def __next__(self) -> Any:
    kind, value = self._queue.get()
    if kind == "error":
      self._queue.put((kind, value))  # every later call raises it too
      raise value
    if kind == "end":
      self._queue.put((kind, value))
      raise StopIteration
    return value

  def close(self) -> None:
    """Stops reading ahead and waits for the thread (which finishes the item it is placing)."""
    self._stop.set()
    self._thread.join()
