"""What the model families share: sizes from a variant name, renamed fields, the image check
and the linear classifier.

Every `Model` resolves its sizes when it is built, as big_vision's
`Model(variant=..., **kw)` = `_Model(**{**decode_variant(variant), **kw})`: a size field left at
None takes the variant's value, then its default, so `vit.Model(variant="B/16").width` is 768
and explicit fields override the variant. The module's `__post_init__` calls `resolve_variant`
(and `rename_fields` for names kept for one release) before Flax's own.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Mapping

import flax.linen as nn


def set_fields(model: Any, **values: Any) -> None:
  """Sets dataclass fields of a Flax module that is being built (before its `__post_init__`)."""
  for name, value in values.items():
    object.__setattr__(model, name, value)


def _as_tuple(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def resolve_variant(model: Any, decode_variant: Callable[[str], dict[str, Any]], *,
                    required: tuple[str, ...],
                    defaults: Mapping[str, Any] | None = None) -> None:
  """Fills `model`'s size fields that are None: the variant's value, then `defaults` (a value,
  or a function of the sizes so far such as `lambda s: 4 * s["width"]`).

  Lists become tuples. A `ValueError` names the model and the `required` sizes that neither the
  variant nor the fields give; `decode_variant` raises its own for an unknown variant.
  """
  sizes = decode_variant(model.variant) if model.variant is not None else {}
  fields = {f.name for f in dataclasses.fields(model)}
  for name, value in sizes.items():
    if name not in fields:
      raise TypeError(f"{type(model).__module__}.decode_variant gives {name!r}, which is not a "
                      "field of its Model")
    if getattr(model, name) is None:
      set_fields(model, **{name: value})
  missing = [name for name in required if getattr(model, name) is None]
  if missing:
    raise ValueError(f"{type(model).__module__}.Model needs a variant or explicit "
                     f"{', '.join(missing)}")
  for name, default in (defaults or {}).items():
    if getattr(model, name) is None:
      current = {f: getattr(model, f) for f in fields if f not in ("parent", "name")}
      set_fields(model, **{name: default(current) if callable(default) else default})
  for name in set(sizes) | set(required) | set(defaults or {}):
    set_fields(model, **{name: _as_tuple(getattr(model, name))})


def rename_fields(model: Any, renamed: Mapping[str, str]) -> None:
  """Moves the deprecated fields `renamed` (old name -> new name) that are set onto their new
  names with a `DeprecationWarning`, and resets them to None; a `ValueError` when both names
  are set to different values."""
  defaults = {f.name: f.default for f in dataclasses.fields(model)}
  for old, new in renamed.items():
    value = getattr(model, old)
    if value is None:
      continue
    warnings.warn(f"{type(model).__module__}.Model({old}=...) is deprecated; use {new}=...",
                  DeprecationWarning, stacklevel=5)
    current = getattr(model, new)
    if current != defaults[new] and current != value:
      raise ValueError(f"{old}={value!r} (deprecated) and {new}={current!r} disagree; set "
                       f"{new} only")
    set_fields(model, **{new: value, old: None})


def check_images(images: Any, patch_size: int, divisor: str = "patch_size") -> None:
  """A `ValueError` unless `images` is `[batch, height, width, channels]` with sides divisible
  by `patch_size` (named `divisor` in the message)."""
  if images.ndim != 4:
    raise ValueError(f"images must be [batch, height, width, channels], got shape "
                     f"{images.shape}")
  if images.shape[1] % patch_size or images.shape[2] % patch_size:
    raise ValueError(f"image size {images.shape[1:3]} must be divisible by {divisor} "
                     f"{patch_size}")


def stride_two_convs(patch_size: Any) -> int:
  """How many stride-2 convolutions make a stem of stride `patch_size`; a `ValueError` unless it
  is a power of two >= 2."""
  if (not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 2
      or patch_size & (patch_size - 1)):
    raise ValueError(f"patch_size must be a power of two >= 2 (stride-2 convolutions), got "
                     f"{patch_size!r}")
  return patch_size.bit_length() - 1


def classifier(num_classes: int, dtype: Any, param_dtype: Any, name: str = "head") -> nn.Dense:
  """The linear classifier over the pooled features: LeCun-normal kernel (logical axes embed,
  classes), zero bias."""
  return nn.Dense(num_classes, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                           ("embed", "classes")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         ("classes",)))
