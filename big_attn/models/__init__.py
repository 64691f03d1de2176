"""Model families by module name: `get("vit")` is `big_attn.models.vit` (exposing `Model`)."""
from __future__ import annotations

import importlib
import pkgutil
import types


def names() -> list[str]:
  """Sorted names of the model modules in this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> types.ModuleType:
  """The module `big_attn.models.<name>`; a `KeyError` listing the known names otherwise."""
  if not isinstance(name, str) or name not in names():
    raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}")


__all__ = ["get", "names"]
