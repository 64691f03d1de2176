"""Checks of the ops' scalar hyper-parameters, written once.

Each returns the checked value (ints as Python ints) and raises `ValueError` naming the
argument and what was expected, for a wrong value or a wrong type alike (as the ops always
did: `block_size=2.5` is a bad block size), e.g. "block_size must be a positive int, got 0".
"""
from __future__ import annotations

import numbers
from typing import Any


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(name: str, value: Any, *, optional: bool = False) -> int | None:
  """`value` as an int >= 1 (or None with `optional=True`)."""
  if optional and value is None:
    return None
  if not _is_int(value) or value < 1:
    raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, "
                     f"got {value!r}")
  return int(value)


def int_in_range(name: str, value: Any, low: int, high: int | None = None) -> int:
  """`value` as an int in `[low, high]` (`high` None: no upper bound)."""
  if not _is_int(value) or value < low or (high is not None and value > high):
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an int {bound}, got {value!r}")
  return int(value)


def positive_float(name: str, value: Any) -> float:
  """`value` (an int or a float) as a float > 0."""
  if not _is_real(value) or not value > 0:
    raise ValueError(f"{name} must be a positive number, got {value!r}")
  return float(value)


def non_negative_float(name: str, value: Any) -> float:
  """`value` (an int or a float) as a float >= 0."""
  if not _is_real(value) or not value >= 0:
    raise ValueError(f"{name} must be a non-negative number, got {value!r}")
  return float(value)


def unit_interval(name: str, value: Any, *, include_one: bool = True) -> float:
  """`value` as a float in (0, 1] (or (0, 1) with `include_one=False`)."""
  upper = "]" if include_one else ")"
  if not _is_real(value) or not (0 < value < 1 or (include_one and value == 1)):
    raise ValueError(f"{name} must be in (0, 1{upper}, got {value!r}")
  return float(value)


def int_tuple(name: str, value: Any, rank: int = 2, *, allow_int: bool = True
              ) -> tuple[int, ...]:
  """A `rank`-tuple of positive ints; with `allow_int`, an int stands for `rank` copies."""
  values = (value,) * rank if allow_int and _is_int(value) else value
  try:
    values = tuple(values)
  except TypeError:
    values = ()
  if len(values) != rank or not all(_is_int(v) and v >= 1 for v in values):
    if rank == 1:
      kind = "a positive int"
    elif allow_int:
      kind = f"a positive int or a {rank}-tuple of them"
    else:
      kind = "a pair of positive ints" if rank == 2 else f"a {rank}-tuple of positive ints"
    raise ValueError(f"{name} must be {kind}, got {value!r}")
  return tuple(int(v) for v in values)
