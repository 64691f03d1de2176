"""DPT (Vision Transformers for Dense Prediction, Ranftl et al. 2021): a ViT with a dense head.

The tokens of four chosen blocks of the ViT (`vit.Model(output_blocks=...)`) are *reassembled*
into image-like maps (`Reassemble`): the class token is read out (ignored, added to every patch
token, or concatenated to it and projected back with a linear layer and GELU), the patch tokens
are laid out on their h×w grid, projected by a 1×1 convolution to D̂_s channels and resampled by
4, 2, 1 and 1/2 (a transposed convolution of kernel and stride 4 or 2, nothing, a 3×3
convolution of stride 2): with patch size p, maps of stride p/4, p/2, p and 2p (1/4, 1/8, 1/16
and 1/32 of the image for p = 16). A 3×3 convolution brings each map to `features` channels;
RefineNet-style fusion blocks (`Fusion`) then go from the coarsest map to the finest: each adds
a residual convolution unit of the next finer map to the path, applies a second unit, upsamples
by 2 (bilinear, corners aligned) and projects with a 1×1 convolution. A task head reads the
finest path (stride p/8) and resamples it to the image size (×2 for p = 16): "depth" (3×3 conv
to features/2, upsampling, 3×3 conv to 32, ReLU, 1×1 conv to 1, ReLU: the paper's monocular
depth head) or "segmentation" (3×3 conv, ReLU, dropout, 1×1 conv to num_classes + 1,
upsampling; the paper's head has a BatchNorm after its first conv, this one a bias).

`TASK` trains per-pixel classes on an image data set without masks: each pixel is background
(class 0) where the image is dark (its first channel <= 0 in [-1, 1]) and the image's class + 1
where it is ink (`pixel_targets`); configs/dpt_digits.py runs it on the digits.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_attn import tasks
from big_attn.models import vit

READOUTS = ("ignore", "add", "project")
HEADS = ("depth", "segmentation")
RESAMPLE_FACTORS = (4, 2, 1, 0.5)  # per reassembled map, relative to the token grid
_BACKBONE_SET_HERE = ("num_classes", "pool_type", "output_blocks", "dtype", "param_dtype")

# DPT-Base and DPT-Large of the paper: the ViT, the blocks read (timm's hooks) and D̂ per map.
_VARIANTS = {
    "Base": dict(backbone=dict(variant="B/16"), hooks=(2, 5, 8, 11),
                 reassemble_features=(96, 192, 384, 768)),
    "Large": dict(backbone=dict(variant="L/16"), hooks=(4, 11, 17, 23),
                  reassemble_features=(256, 512, 1024, 1024)),
}


def decode_variant(variant: str) -> dict[str, Any]:
  """The fields of DPT-`variant` ("Base" or "Large"): backbone, hooks, reassemble_features."""
  if variant not in _VARIANTS:
    raise ValueError(f"unknown DPT variant {variant!r}; expected one of {sorted(_VARIANTS)}")
  return dict(_VARIANTS[variant])


def upsample_matrix(size: int, out: int) -> np.ndarray:
  """`[out, size]` matrix of bilinear resampling with corners aligned (output i reads the input
  at i (size - 1) / (out - 1))."""
  pos = np.arange(out) * ((size - 1) / (out - 1) if out > 1 else 0.0)
  low = np.minimum(np.floor(pos).astype(int), size - 1)
  high = np.minimum(low + 1, size - 1)
  frac = pos - low
  matrix = np.zeros((out, size))
  matrix[np.arange(out), low] += 1 - frac
  matrix[np.arange(out), high] += frac
  return matrix


def upsample(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """Bilinear resampling of `[b, h, w, c]` maps to `size` (default 2h × 2w), corners aligned
  (the paper's upsampling)."""
  out_h, out_w = size if size is not None else (2 * x.shape[1], 2 * x.shape[2])
  if (out_h, out_w) == x.shape[1:3]:
    return x
  rows = jnp.asarray(upsample_matrix(x.shape[1], out_h), x.dtype)
  cols = jnp.asarray(upsample_matrix(x.shape[2], out_w), x.dtype)
  return jnp.einsum("ih,jw,bhwc->bijc", rows, cols, x)


def _conv(features: int, kernel: int, module: nn.Module, name: str, *, bias: bool = True,
          strides: int = 1) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=[(kernel // 2, kernel // 2)] * 2, use_bias=bias, dtype=module.dtype,
                 param_dtype=module.param_dtype, name=name)


class Reassemble(nn.Module):
  """Tokens `[b, 1 + h·w, D]` (class token first) -> a map `[b, f·h, f·w, features]`: read the
  class token out, lay the patch tokens on the grid, 1×1 conv, resample by `factor` f."""
  grid: tuple[int, int]
  features: int
  factor: float
  readout: str = "project"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    cls, patches = tokens[:, :1], tokens[:, 1:]
    if self.readout == "add":
      patches = patches + cls
    elif self.readout == "project":
      both = jnp.concatenate([patches, jnp.broadcast_to(cls, patches.shape)], axis=-1)
      patches = nn.gelu(nn.Dense(tokens.shape[-1], dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="readout")(both),
                        approximate=False)
    x = patches.reshape(patches.shape[0], *self.grid, patches.shape[-1])
    x = _conv(self.features, 1, self, "project")(x)
    if self.factor > 1:
      f = int(self.factor)
      x = nn.ConvTranspose(self.features, (f, f), strides=(f, f), padding="VALID",
                           dtype=self.dtype, param_dtype=self.param_dtype, name="resample")(x)
    elif self.factor < 1:
      x = _conv(self.features, 3, self, "resample", strides=round(1 / self.factor))(x)
    return x


class ResidualConvUnit(nn.Module):
  """x + conv3×3(ReLU(conv3×3(ReLU(x)))) (RefineNet's residual convolution unit)."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = _conv(x.shape[-1], 3, self, "conv1")(nn.relu(x))
    return x + _conv(x.shape[-1], 3, self, "conv2")(nn.relu(y))


class Fusion(nn.Module):
  """One fusion block: path (+ RCU(skip)) -> RCU -> upsample ×2 -> 1×1 conv."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, path, skip=None):
    unit = lambda name: ResidualConvUnit(dtype=self.dtype, param_dtype=self.param_dtype,
                                         name=name)
    if skip is not None:
      path = path + unit("skip_unit")(skip)
    path = upsample(unit("unit")(path))
    return _conv(path.shape[-1], 1, self, "project")(path)


class DenseHead(nn.Module):
  """DPT's decoder: 4 blocks' tokens `[b, 1 + h·w, D]` -> `[b, *image_size, channels]` float32:
  `Reassemble` with factors 4, 2, 1, 1/2, a 3×3 conv (no bias) to `features`, `Fusion` from
  the coarsest map to the finest, the task head, resampled to `image_size` (fields as in
  `Model`)."""
  num_classes: int
  reassemble_features: tuple[int, ...] | None = None
  features: int = 256
  readout: str = "project"
  head: str = "segmentation"
  head_dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, grid, image_size, *, train: bool = False):
    if (self.reassemble_features is None
        or len(self.reassemble_features) != len(RESAMPLE_FACTORS)):
      raise ValueError(f"reassemble_features must hold {len(RESAMPLE_FACTORS)} values, got "
                       f"{self.reassemble_features!r}")
    if self.readout not in READOUTS:
      raise ValueError(f"unknown readout {self.readout!r}; expected one of {READOUTS}")
    if self.head not in HEADS:
      raise ValueError(f"unknown head {self.head!r}; expected one of {HEADS}")
    if not isinstance(self.features, int) or self.features < 2:
      raise ValueError(f"features must be an int >= 2, got {self.features!r}")
    if len(hidden) != len(RESAMPLE_FACTORS) or any(g % 2 for g in grid):
      raise ValueError(f"DenseHead needs {len(RESAMPLE_FACTORS)} blocks' tokens on a token "
                       f"grid of even sides (the 1/2 map is upsampled back onto it), got "
                       f"{len(hidden)} on {tuple(grid)}")
    maps = []
    for i, (tokens, dim, factor) in enumerate(zip(hidden, self.reassemble_features,
                                                  RESAMPLE_FACTORS)):
      x = Reassemble(grid=grid, features=dim, factor=factor, readout=self.readout,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name=f"reassemble_{i}")(tokens)
      maps.append(_conv(self.features, 3, self, f"layer_{i}", bias=False)(x))
    path = None
    for i in reversed(range(len(maps))):
      fusion = Fusion(dtype=self.dtype, param_dtype=self.param_dtype, name=f"fusion_{i}")
      path = fusion(maps[i]) if path is None else fusion(path, maps[i])
    if self.head == "depth":
      x = _conv(self.features // 2, 3, self, "head_conv1")(path)
      x = nn.relu(_conv(32, 3, self, "head_conv2")(upsample(x, image_size)))
      x = nn.relu(_conv(1, 1, self, "head_out")(x))
    else:
      x = nn.relu(_conv(self.features, 3, self, "head_conv1")(path))
      x = nn.Dropout(rate=self.head_dropout)(x, deterministic=not train)
      x = upsample(_conv(self.num_classes + 1, 1, self, "head_out")(x), image_size)
    return x.astype(jnp.float32)


class Model(DenseHead):
  """DPT: `[b, H, W, C]` images -> dense float32 outputs `[b, H, W, channels]` (module docstring):
  the ViT `backbone` and `DenseHead`, whose fields it has.

  Attributes:
    num_classes: the data's classes; head "segmentation" returns num_classes + 1 logits per
      pixel (0: background), head "depth" one non-negative value.
    variant: "Base" or "Large" (DPT-Base: ViT-B/16, hooks 2, 5, 8, 11, D̂ 96, 192, 384, 768;
      DPT-Large: ViT-L/16, hooks 4, 11, 17, 23, D̂ 256, 512, 1024, 1024); fields set override it.
    backbone: `vit.Model` fields (sizes or a ViT variant) but num_classes, pool_type ("cls":
      the class token the readout reads), output_blocks, dtype and param_dtype, set here.
    hooks: the 4 block indices whose outputs are reassembled (increasing).
    reassemble_features: D̂ of the 4 maps.
    features: channels of the fusion path (256).
    readout: "ignore", "add" or "project" (default; the paper's best).
    head: "segmentation" (default) or "depth".
    head_dropout: dropout of the segmentation head (0.1).
    dtype, param_dtype: compute and parameter dtypes.
  """
  variant: str | None = None
  backbone: Any = None
  hooks: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.variant is not None:
      for name, value in decode_variant(self.variant).items():
        if getattr(self, name) is None:
          object.__setattr__(self, name, value)
    for name in ("hooks", "reassemble_features"):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    super().__post_init__()

  def _check(self):
    if self.backbone is None or self.hooks is None or self.reassemble_features is None:
      raise ValueError("DPT needs a variant or backbone, hooks and reassemble_features")
    if not isinstance(self.backbone, Mapping):
      raise TypeError(f"backbone must be a dict of vit.Model fields, got "
                      f"{type(self.backbone).__name__}")
    reserved = sorted(set(self.backbone) & set(_BACKBONE_SET_HERE))
    if reserved:
      raise ValueError(f"backbone must not set {reserved}: DPT sets them")
    if len(self.hooks) != len(RESAMPLE_FACTORS):
      raise ValueError(f"hooks must hold {len(RESAMPLE_FACTORS)} values, got {self.hooks!r}")

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check()
    backbone = vit.Model(**dict(self.backbone), num_classes=0, pool_type="cls",
                         output_blocks=tuple(self.hooks), dtype=self.dtype,
                         param_dtype=self.param_dtype, name="backbone")
    hidden = backbone(images, train=train)
    head_fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(DenseHead)
                   if f.name not in ("parent", "name")}
    return DenseHead(**head_fields, name="dense_head")(
        hidden, vit.token_grid(images, backbone.patch_size), images.shape[1:3], train=train)


def pixel_targets(images: jax.Array, labels: jax.Array) -> jax.Array:
  """`[b, H, W]` int32 pixel classes: 0 where `images[..., 0] <= 0` (background of images in
  [-1, 1]), else the image's class (argmax of the one-hot `labels` `[b, classes]`) + 1."""
  classes = jnp.argmax(labels, axis=-1).astype(jnp.int32)
  return jnp.where(images[..., 0] > 0, classes[:, None, None] + 1, 0)


def pixel_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`[b]` mean per-pixel softmax cross-entropy of `logits` `[b, H, W, k]` against integer
  `targets` `[b, H, W]`."""
  if logits.shape[:3] != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} must share [b, H, W]")
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return losses.mean(axis=(1, 2))


def loss_fn(model: Model, params: Any, batch: dict[str, Any], rng: jax.Array) -> jax.Array:
  """Mean per-pixel cross-entropy of `model` on `batch["image"]` against `pixel_targets`."""
  logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
  return pixel_losses(logits, pixel_targets(batch["image"], batch["labels"])).mean()


TASK = tasks.Task(batch_spec=tasks.CLASSIFICATION.batch_spec,
                  example_input=tasks.CLASSIFICATION.example_input, loss=loss_fn)
