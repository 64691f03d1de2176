"""Helpers shared by the converters: torch tensors to NumPy, a state dict read key by key."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np


class ConversionError(ValueError):
  """A checkpoint or model configuration that has no big_attn equivalent; names the field."""


def to_numpy(tensor: Any) -> np.ndarray:
  """A torch tensor (any dtype, device, requires_grad) or array as a float32 NumPy array that
  owns its memory (later changes to the tensor do not reach it)."""
  if hasattr(tensor, "detach"):
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
      tensor = tensor.float()
    tensor = tensor.numpy()
  return np.array(tensor, np.float32, copy=True)


def dense_kernel(weight: Any) -> np.ndarray:
  """torch `Linear.weight` `[out, in]` (or a 1x1 conv `[out, in, 1, 1]`) -> Flax `[in, out]`."""
  weight = to_numpy(weight)
  if weight.ndim == 4:
    if weight.shape[2:] != (1, 1):
      raise ConversionError(f"expected a 1x1 convolution, got a kernel of shape {weight.shape}")
    weight = weight[:, :, 0, 0]
  return weight.T


def conv_kernel(weight: Any) -> np.ndarray:
  """torch `Conv2d.weight` `[out, in/groups, kh, kw]` -> Flax `[kh, kw, in/groups, out]`."""
  return to_numpy(weight).transpose(2, 3, 1, 0)


class StateDict:
  """A torch state dict read key by key: a missing key or one left unread is a ConversionError.

      sd = StateDict(model.state_dict(), source="vit_tiny_patch16_224")
      kernel = dense_kernel(sd.take("head.weight"))
      sd.check_all_read()
  """

  def __init__(self, state_dict: Mapping[str, Any], source: str = "checkpoint"):
    if not hasattr(state_dict, "keys"):
      raise TypeError(f"state_dict must be a mapping of names to tensors, got "
                      f"{type(state_dict).__name__}")
    self._tensors = dict(state_dict)
    self._unread = set(self._tensors)
    self.source = source

  def __contains__(self, key: str) -> bool:
    return key in self._tensors

  def take(self, key: str) -> np.ndarray:
    """The tensor `key` as float32 NumPy, marked as read."""
    if key not in self._tensors:
      raise ConversionError(f"{self.source}: state dict has no {key!r}")
    self._unread.discard(key)
    return to_numpy(self._tensors[key])

  def skip(self, *keys: str) -> None:
    """Mark `keys` (buffers the big_attn model recomputes, e.g. index tables) as read."""
    self._unread.difference_update(keys)

  def check_all_read(self) -> None:
    """Raise a ConversionError naming the tensors nothing converted."""
    unread = sorted(self._unread)
    if unread:
      shown = ", ".join(unread[:8]) + (f", ... ({len(unread)} in all)" if len(unread) > 8 else "")
      raise ConversionError(f"{self.source}: tensors with no big_attn equivalent: {shown}")


def take_norm(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
  """LayerNorm / LayerNorm2d / GroupNorm(1) / BatchNorm's affine part: `{scale, bias}`."""
  return {"scale": sd.take(f"{prefix}.weight"), "bias": sd.take(f"{prefix}.bias")}


def take_dense(sd: StateDict, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
  """A torch `Linear` (or 1x1 conv): `{kernel, bias}` of `nn.Dense`."""
  out = {"kernel": dense_kernel(sd.take(f"{prefix}.weight"))}
  if bias:
    out["bias"] = sd.take(f"{prefix}.bias")
  return out


def take_conv(sd: StateDict, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
  """A torch `Conv2d`: `{kernel, bias}` of `nn.Conv`."""
  out = {"kernel": conv_kernel(sd.take(f"{prefix}.weight"))}
  if bias:
    out["bias"] = sd.take(f"{prefix}.bias")
  return out


def take_batch_norm(sd: StateDict, prefix: str, stats: dict[str, Any],
                    name: str) -> dict[str, np.ndarray]:
  """A torch `BatchNorm2d`: `{scale, bias}` returned, the running `{mean, var}` put in
  `stats[name]` (for `variables["batch_stats"]`)."""
  stats[name] = {"mean": sd.take(f"{prefix}.running_mean"),
                 "var": sd.take(f"{prefix}.running_var")}
  sd.skip(f"{prefix}.num_batches_tracked")
  return take_norm(sd, prefix)
