"""DAT and DAT++ (Vision Transformer with Deformable Attention, Xia et al. 2022; DAT++:
Spatially Dynamic Vision Transformer with Deformable Attention, Xia et al. 2023).

    model = Model(num_classes=1000, variant="DAT++-T")
    params = model.init(jax.random.key(0), images)["params"]     # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)  # [batch, 1000]

Four stages of pre-LayerNorm blocks on `[batch, h, w, c]` maps (`hvit.Block`), each stage's
blocks spelled by `stage_spec`, one letter a block:

| letter | attention (op by name)                                    | default op             |
|--------|-----------------------------------------------------------|------------------------|
| L      | window attention with a relative position bias (Swin)     | `window`               |
| S      | the same in windows shifted by ⌈window/2⌉                  | `window` (`shift`)     |
| N      | 7x7 neighbourhood attention with a relative position bias | `neighborhood`         |
| D      | deformable multi-head attention                           | `deformable_attention` |

`attention` replaces the op of the D blocks and `local_attention` that of the L, S and N
blocks (`attention_args`, `local_attention_args`: their extra arguments; a 2-D op gets the
stage's `grid`, its sizes clipped to the map, `big_attn.ops.spatial`). The deformable op gets
the stage's offset kernel (9, 7, 5, 3), reference-point stride, offset range and offset
groups (the heads of a group share its sampling points) and owns the offset network and the
deformable relative position bias table `[heads, 2h−1, 2w−1]`. Its keys and values are the
projected tokens sampled bilinearly (DAT samples the features and projects them, which differs
only in the projections' bias at points near the border and in DAT's mixing of channels that
different groups sampled at different points).

- DAT: a 4x4/4 convolution + LayerNorm embeds the image; 2x2/2 convolutions (no bias) +
  LayerNorm downsample; stages 1-2 alternate window and shifted-window attention (L, S), stages
  3-4 window and deformable attention (L, D) with one reference point per token, offsets
  bounded by s·tanh (s = 2 tokens); MLP ratio 4.
- DAT++: a convolutional stem (3x3/2 to half the width, LayerNorm, GELU, 3x3/2, LayerNorm);
  3x3/2 convolutions (no bias) + LayerNorm downsample; a local perception unit (depthwise 3x3,
  residual) before every block; neighbourhood and deformable attention alternate (N, D) in
  stages 1-3 and stage 4 is all deformable, with reference points every 8, 4, 2, 1 tokens (a
  7x7 grid of points at 224x224) and unbounded offsets, the points clamped to the image;
  ConvFFN (Linear, + depthwise 3x3,
  GELU, Linear).

LayerScale (`layer_scale`) is off in the authors' configs of both. The LayerNorm'd map is
averaged and classified.

Parameter counts (224x224x3 input, 1000 classes; `jax.eval_shape`) against the papers (DAT's
Table 2, DAT++'s Table 2) and the authors' modules (their configs, counted from the layer
shapes of their code): equal to the latter everywhere; DAT-T's "29M" is 2.4% above it.

| variant | dims                | depths      | heads        | groups      | parameters | paper |
|---------|---------------------|-------------|--------------|-------------|------------|-------|
| DAT-T   | 96, 192, 384, 768   | 2, 2, 6, 2  | 3, 6, 12, 24 | -, -, 3, 6  | 28,319,138 | 29M   |
| DAT-S   | 96, 192, 384, 768   | 2, 2, 18, 2 | 3, 6, 12, 24 | -, -, 3, 6  | 49,700,402 | 50M   |
| DAT-B   | 128, 256, 512, 1024 | 2, 2, 18, 2 | 4, 8, 16, 32 | -, -, 4, 8  | 87,881,632 | 88M   |
| DAT++-T | 64, 128, 256, 512   | 2, 4, 18, 2 | 2, 4, 8, 16  | 1, 2, 4, 8  | 23,962,876 | 24M   |
| DAT++-S | 96, 192, 384, 768   | 2, 4, 18, 2 | 3, 6, 12, 24 | 1, 2, 3, 6  | 53,127,366 | 53M   |
| DAT++-B | 128, 256, 512, 1024 | 2, 4, 18, 2 | 4, 8, 16, 32 | 2, 4, 8, 16 | 93,690,640 | 94M   |
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_attn.layers import layer_norm
from big_attn.models import common
from big_attn.models import hvit
from big_attn.ops import checks
from big_attn.ops import spatial

_conv, _dense = hvit._conv, hvit._dense  # pylint: disable=protected-access

LETTERS = {"L": "window", "S": "window", "N": "neighborhood", "D": "deformable_attention"}

# The authors' settings shared by every size of a version.
_VERSIONS = {
    "DAT": dict(offset_range=2.0, strides=(1, 1, 1, 1), conv_stem=False, lpu=False,
                conv_ffn=False),
    "DAT++": dict(offset_range=None, strides=(8, 4, 2, 1), conv_stem=True, lpu=True,
                  conv_ffn=True),
}
_SIZES = {  # dims, depths, heads, offset groups (the authors' configs)
    "DAT-T": ((96, 192, 384, 768), (2, 2, 6, 2), (3, 6, 12, 24), (None, None, 3, 6)),
    "DAT-S": ((96, 192, 384, 768), (2, 2, 18, 2), (3, 6, 12, 24), (None, None, 3, 6)),
    "DAT-B": ((128, 256, 512, 1024), (2, 2, 18, 2), (4, 8, 16, 32), (None, None, 4, 8)),
    "DAT++-T": ((64, 128, 256, 512), (2, 4, 18, 2), (2, 4, 8, 16), (1, 2, 4, 8)),
    "DAT++-S": ((96, 192, 384, 768), (2, 4, 18, 2), (3, 6, 12, 24), (1, 2, 3, 6)),
    "DAT++-B": ((128, 256, 512, 1024), (2, 4, 18, 2), (4, 8, 16, 32), (2, 4, 8, 16)),
}


def stage_spec(version: str, depths: tuple[int, ...]) -> tuple[str, ...]:
  """The authors' block letters of each stage: DAT "LS" in stages 1-2 and "LD" in 3-4, DAT++
  "ND" in stages 1-3 and "DD" in stage 4 (repeated to the stage's depth)."""
  pairs = ("LS", "LS", "LD", "LD") if version == "DAT" else ("ND", "ND", "ND", "DD")
  return tuple((pair * depth)[:depth] for pair, depth in zip(pairs, depths))


def decode_variant(variant: str) -> dict[str, Any]:
  """"DAT++-T" -> dict(dims=(64, 128, 256, 512), depths=(2, 4, 18, 2), num_heads=(2, 4, 8,
  16), offset_groups=(1, 2, 4, 8), stage_spec=("ND", "NDND", ..., "DD"), offset_range=None,
  strides=(8, 4, 2, 1), conv_stem=True, lpu=True, conv_ffn=True). Variants: DAT-T, DAT-S,
  DAT-B, DAT++-T, DAT++-S, DAT++-B."""
  if not isinstance(variant, str) or variant not in _SIZES:
    raise ValueError(f"unknown DAT variant {variant!r}; expected one of {', '.join(_SIZES)}")
  version = variant.rsplit("-", 1)[0]
  dims, depths, heads, groups = _SIZES[variant]
  return dict(dims=dims, depths=depths, num_heads=heads, offset_groups=groups,
              stage_spec=stage_spec(version, depths), **_VERSIONS[version])


def _embed(x, dim, patch_size, conv_stem, norm_eps, dtype, param_dtype):
  """DAT's patch embedding (a p x p convolution at stride p) or DAT++'s stem (log2 p 3x3/2
  convolutions, half the width before the last, GELU between), each convolution +
  LayerNorm."""
  def norm(name, y):
    return layer_norm(dtype, param_dtype, name, epsilon=norm_eps)(y)

  if not conv_stem:
    return norm("stem_norm", _conv(dim, patch_size, patch_size, dtype, param_dtype, "stem",
                                   padding=0)(x))
  halvings = patch_size.bit_length() - 1
  for i in range(halvings):
    if i:
      x = nn.gelu(x, approximate=False)
    width = dim if i == halvings - 1 else dim // 2
    x = norm(f"stem_norm_{i}", _conv(width, 3, 2, dtype, param_dtype, f"stem_{i}")(x))
  return x


class Model(nn.Module):
  """DAT / DAT++ classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the averaged normalised map `[batch, dims[-1]]`.
    variant: a `decode_variant` name ("DAT++-T"); explicit fields override it.
    dims, depths, num_heads: width, blocks and heads of each stage (four entries each).
    stage_spec: a string of block letters per stage, as long as its depth (module docstring).
    patch_size: the stem's stride p (4; a power of two for DAT++'s stem).
    offset_groups: offset groups of each stage's deformable blocks (None: one per head).
    offset_kernels: the offset network's depthwise kernel per stage (9, 7, 5, 3, then 3).
    strides: reference-point spacing of each stage's deformable blocks.
    offset_range: DAT's bound s of the offsets (s·(r/2)·tanh, in tokens); None: unbounded,
      the points clamped to the image (DAT++).
    conv_stem: DAT++'s convolutional stem and 3x3 downsampling (else DAT's 4x4 and 2x2).
    lpu: DAT++'s local perception unit (depthwise 3x3, residual) before every block.
    conv_ffn: DAT++'s ConvFFN (a residual depthwise 3x3 conv before the GELU).
    window_size: L and S blocks' windows (7); kernel_size: N blocks' neighbourhood (7); both
      clipped to a smaller map.
    mlp_ratio: FFN width over the stage's width (4).
    layer_scale: initial LayerScale γ of every block; None: none (the authors' configs).
    attention: the D blocks' op by name (default `deformable_attention`); local_attention:
      the L, S and N blocks' op (None: `window` for L and S, `neighborhood` for N);
      attention_args, local_attention_args: their extra arguments; attention_impl: the ops'
      `implementation`.
    drop_path_rate: stochastic depth rate of the last block (linear from 0).
    norm_eps: every LayerNorm's eps (1e-5, PyTorch's).
    approximate_gelu: tanh-approximate GELU in the FFNs; False: exact (the authors' code).
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  num_classes: int
  variant: str | None = None
  dims: tuple[int, ...] | None = None
  depths: tuple[int, ...] | None = None
  num_heads: tuple[int, ...] | None = None
  stage_spec: tuple[str, ...] | None = None
  offset_groups: tuple[int | None, ...] | None = None
  patch_size: int = 4
  offset_kernels: tuple[int, ...] | None = None
  strides: tuple[int, ...] | None = None
  offset_range: float | None = None
  conv_stem: bool | None = None
  lpu: bool | None = None
  conv_ffn: bool | None = None
  window_size: int = 7
  kernel_size: int = 7
  mlp_ratio: int = 4
  layer_scale: float | None = None
  attention: str = "deformable_attention"
  attention_args: Any = None
  local_attention: str | None = None
  local_attention_args: Any = None
  attention_impl: str | None = None
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-5
  approximate_gelu: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(
        self, decode_variant, required=("dims", "depths", "num_heads"),
        defaults=dict(stage_spec=lambda s: stage_spec("DAT++", s["depths"]),
                      offset_groups=lambda s: (None,) * len(s["dims"]),
                      offset_kernels=lambda s: tuple(max(9 - 2 * i, 3)
                                                     for i in range(len(s["dims"]))),
                      strides=lambda s: (1,) * len(s["dims"]), conv_stem=True, lpu=True,
                      conv_ffn=True))
    super().__post_init__()

  def _check(self, images):
    stages = len(self.dims)
    def is_int(value):
      return isinstance(value, int) and not isinstance(value, bool)

    for name in ("dims", "depths", "num_heads", "offset_kernels", "strides"):
      value = tuple(getattr(self, name))
      if len(value) != stages or not all(is_int(v) and v >= 1 for v in value):
        raise ValueError(f"{name} must be {stages} ints >= 1 (one per stage, as dims), got "
                         f"{value}")
    if len(self.offset_groups) != stages:
      raise ValueError(f"offset_groups must have {stages} entries (one per stage, as dims), "
                       f"got {self.offset_groups}")
    for i, (dim, heads, groups) in enumerate(zip(self.dims, self.num_heads,
                                                 self.offset_groups)):
      if dim % heads:
        raise ValueError(f"dims {self.dims} must be divisible by num_heads {self.num_heads}")
      if groups is not None and (not is_int(groups) or groups < 1 or heads % groups):
        raise ValueError(f"offset_groups[{i}] must divide num_heads[{i}] = {heads}, got "
                         f"{groups!r}")
    if len(self.stage_spec) != stages or any(
        not isinstance(spec, str) or len(spec) != depth or set(spec) - set(LETTERS)
        for spec, depth in zip(self.stage_spec, self.depths)):
      raise ValueError(f"stage_spec must be {stages} strings of the letters "
                       f"{''.join(LETTERS)}, as long as depths {self.depths}, got "
                       f"{self.stage_spec!r}")
    if any(k % 2 == 0 for k in self.offset_kernels):
      raise ValueError(f"offset_kernels must be odd, got {self.offset_kernels}")
    if self.offset_range is not None:
      checks.positive_float("offset_range", self.offset_range)
    for name in ("patch_size", "window_size", "kernel_size", "mlp_ratio"):
      checks.positive_int(name, getattr(self, name))
    if self.conv_stem and self.patch_size & (self.patch_size - 1):
      raise ValueError(f"patch_size of DAT++'s stem must be a power of two, got "
                       f"{self.patch_size}")
    for name in ("attention_args", "local_attention_args"):
      if getattr(self, name) is not None and not hasattr(getattr(self, name), "keys"):
        raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    stride = self.patch_size * 2 ** (stages - 1)
    if images.shape[1] % stride or images.shape[2] % stride:
      raise ValueError(f"image size {images.shape[1:3]} must be a multiple of the total "
                       f"stride {stride}")
    spatial.check_op(self.attention, "DAT")
    if self.local_attention is not None:
      spatial.check_op(self.local_attention, "DAT")

  def _op(self, letter: str, stage: int, grid: tuple[int, int]) -> tuple[str, dict[str, Any]]:
    """The op of a block spelled `letter` at `stage` on the `grid` map, and its arguments."""
    default = LETTERS[letter]
    op, user = ((self.attention, self.attention_args) if letter == "D" else
                (self.local_attention or default, self.local_attention_args))
    args = {}
    if op == default == "deformable_attention":
      args = dict(kernel_size=self.offset_kernels[stage], stride=self.strides[stage],
                  offset_range=self.offset_range, offset_groups=self.offset_groups[stage],
                  clamp=self.offset_range is None)
    elif op == default == "window":
      args = dict(window_size=self.window_size)
    elif op == default == "neighborhood":
      args = dict(kernel_size=self.kernel_size)
    args = spatial.op_args(op, dict(args, **(user or {})), grid) or {}
    if op == default == "window" and letter == "S":
      args["shift"] = tuple(math.ceil(a / 2) % a for a in args["window_size"])
    return op, args

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    dt, pdt = self.dtype, self.param_dtype
    x = _embed(jnp.asarray(images, dt), self.dims[0], self.patch_size, self.conv_stem,
               self.norm_eps, dt, pdt)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    index = 0
    for stage, (dim, heads, spec) in enumerate(zip(self.dims, self.num_heads,
                                                   self.stage_spec)):
      if stage:
        kernel = 3 if self.conv_stem else 2
        x = _conv(dim, kernel, 2, dt, pdt, f"downsample_{stage}", use_bias=False,
                  padding=kernel // 2 if self.conv_stem else 0)(x)
        x = layer_norm(dt, pdt, f"downsample_{stage}_norm", epsilon=self.norm_eps)(x)
      grid = tuple(x.shape[1:3])
      for j, letter in enumerate(spec):
        op, op_args = self._op(letter, stage, grid)
        x = hvit.Block(
            num_heads=heads, mlp_dim=dim * self.mlp_ratio, op=op, op_args=op_args,
            implementation=self.attention_impl, cpe=self.lpu,
            rpb_size=op_args.get("kernel_size") if op == "neighborhood" else None,
            ffn_conv_before_gelu=self.conv_ffn, layer_scale=self.layer_scale,
            drop_path=float(rates[index]), norm_eps=self.norm_eps,
            approximate_gelu=self.approximate_gelu, dtype=dt, param_dtype=pdt,
            name=f"stage{stage}_block{j}")(x, not train)
        index += 1
    x = jnp.mean(layer_norm(dt, pdt, "norm", epsilon=self.norm_eps)(x), axis=(1, 2))
    if self.num_classes:
      x = _dense(self.num_classes, ("embed", "classes"), dt, pdt, "head")(x)
    return x.astype(jnp.float32)
