"""Deprecated: checkpoint I/O moved to `big_attn.checkpoint_io`, the one module that reads and
writes checkpoints (models read a teacher's through it without importing the training loop).
The old names keep working here for one release, with a `DeprecationWarning`."""
from __future__ import annotations

import warnings

from big_attn import checkpoint_io


def __getattr__(name: str):
  if name.startswith("_") or not hasattr(checkpoint_io, name):
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  warnings.warn(f"big_attn.train.checkpoint.{name} is deprecated; use "
                f"big_attn.checkpoint_io.{name}", DeprecationWarning, stacklevel=2)
  return getattr(checkpoint_io, name)
