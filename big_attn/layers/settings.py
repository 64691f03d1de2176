"""Checking the `{"method": NAME, ...}` setting dicts of optional model techniques."""
from __future__ import annotations

from typing import Any, Mapping


def method_settings(name: str, config: Any, defaults: Mapping[str, Mapping[str, Any]],
                    example: str) -> tuple[str, dict[str, Any]] | None:
  """`(method, settings)` of the setting dict `config` named `name`: its "method" one of
  `defaults`' keys, its other keys among that method's, completed with its defaults; None for
  None. Raises `TypeError` for a non-dict (showing `example`) and `ValueError` naming
  `name['key']` for an unknown method or key."""
  if config is None:
    return None
  if not hasattr(config, "keys"):
    raise TypeError(f"{name} must be a dict such as {example} or None, got "
                    f"{type(config).__name__}")
  config = {key: config[key] for key in config.keys()}
  method = config.pop("method", None)
  if method not in defaults:
    raise ValueError(f"{name}['method'] must be one of {tuple(defaults)}, got {method!r}")
  unknown = sorted(set(config) - set(defaults[method]))
  if unknown:
    raise ValueError(f"{name}: unknown key(s) {unknown} for method {method!r}; "
                     f"expected {sorted(defaults[method])}")
  return method, dict(defaults[method], **config)


def block_indices(name: str, value: Any, depth: int) -> frozenset[int]:
  """The block indices `value` (a sequence; None: none) of a model of `depth` blocks; raises
  `ValueError` naming `name` for anything else or an index outside [0, depth)."""
  value = () if value is None else value
  if isinstance(value, (int, str)) or not all(
      isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in value):
    raise ValueError(f"{name} must be a sequence of block indices in [0, {depth}), got "
                     f"{value!r}")
  return frozenset(value)
