"""Evaluators by name: `get("classification")` is the `Evaluator` class of that module.

Each evaluator is built as `Evaluator(model, **config.evals[NAME] minus type/every, mesh=...,
rules=...)`; its `compile(state)` compiles its step before the training loop (`state` may be
abstract), and its `run(state)` yields `(metric_name, value)` pairs, which the loop logs as
`NAME/metric_name`.
"""
from __future__ import annotations

import importlib
import pkgutil


def names() -> list[str]:
  """Sorted names of the evaluator modules in this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> type:
  """The `Evaluator` class of `big_attn.evaluators.<name>`; `KeyError` listing names otherwise."""
  if not isinstance(name, str) or name not in names():
    raise KeyError(f"unknown evaluator {name!r}; known evaluators: {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}").Evaluator


__all__ = ["get", "names"]
