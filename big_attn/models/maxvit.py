"""MaxViT: Multi-Axis Vision Transformer (Tu et al., ECCV 2022).

    model = Model(num_classes=1000, variant="T")
    params = model.init(jax.random.key(0), images)["params"]      # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)   # [batch, 1000]

A convolutional stem (3x3 stride 2, norm, GELU, 3x3) halves the image; then stages of MaxViT
blocks, the first block of each stage striding by 2. A block is

    x = MBConv(x)                  # pre-norm, 1x1 expand (4x), depthwise 3x3, SE (0.25), 1x1
    x = x + Attn_block(LN(x));  x = x + MLP(LN(x))     # attention inside P x P windows
    x = x + Attn_grid(LN(x));   x = x + MLP(LN(x))     # attention across a dilated G x G grid

with stochastic depth on every residual branch (rate rising linearly over the blocks). The
head is global average pooling, LayerNorm, a pre-logits Dense + tanh (the paper's classifier,
as in the released weights) and the classifier. Block and grid attention go through
`big_attn.layers.Attention` with ops `window` and `grid` (registry names, so any op can be
swapped in by config) and own a relative position bias per head ([heads, 2P−1, 2P−1], through
`big_attn.ops.windowed`'s parameter modules). The partition size P = G is 7 at 224x224 (the feature maps are
56, 28, 14, 7).

Normalisation: the MBConv and stem norms are BatchNorm as in the paper (`conv_norm="batch"`,
TensorFlow's eps 1e-3 and momentum 0.99; running statistics in the `batch_stats` collection,
which the train step carries), or LayerNorm over channels at every pixel (`conv_norm="layer"`:
stateless, the same parameters). The attention blocks and the head use LayerNorm
(`layer_norm_eps`; the authors' and timm's `maxvit_*_tf` weights use 1e-5).

    variables = model.init(rng, images)           # {"params": ..., "batch_stats": ...}
    logits = model.apply(variables, images)       # running statistics
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

Parameter counts (224x224x3 input, 1000 classes; `jax.eval_shape`, nothing allocated) next to
the paper's (its ImageNet-1K results table: 31M, 69M, 120M, 212M) and timm's counts of the
weights ported from the authors' TensorFlow code (maxvit_{tiny,small,base,large}_tf_224), whose
layer shapes this model reproduces:

| variant | embed dims            | depths        | stem | parameters  | timm   | paper |
|---------|-----------------------|---------------|------|-------------|--------|-------|
| T       | 64, 128, 256, 512     | 2, 2, 5, 2    |   64 |  30,916,528 |  30.9M |   31M |
| S       | 96, 192, 384, 768     | 2, 2, 5, 2    |   64 |  68,927,956 |  68.9M |   69M |
| B       | 96, 192, 384, 768     | 2, 6, 14, 2   |   64 | 119,467,708 | 119.5M |  120M |
| L       | 128, 256, 512, 1024   | 2, 6, 14, 2   |  128 | 211,785,560 | 211.8M |  212M |

Heads are `dim // 32` at every stage; the pre-logits width is the last embed dim.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.layers import Attention, MlpBlock, conv_norm, layer_norm
from big_attn.layers.norm import CONV_NORMS
from big_attn.models import common, vit
from big_attn.ops import spatial

# MaxViT Section 3.4; stem widths as the authors' maxvit/models/hp/vision.py.
_EMBED_DIMS = {"T": (64, 128, 256, 512), "S": (96, 192, 384, 768), "B": (96, 192, 384, 768),
               "L": (128, 256, 512, 1024)}
_DEPTHS = {"T": (2, 2, 5, 2), "S": (2, 2, 5, 2), "B": (2, 6, 14, 2), "L": (2, 6, 14, 2)}
_STEM_WIDTH = {"T": 64, "S": 64, "B": 64, "L": 128}
# Stochastic depth rates of the ImageNet-1k training (1 − survival_prob of the authors'
# maxvit/models/hp/vision_i1k.py).
DROP_PATH = {"T": 0.2, "S": 0.3, "B": 0.4, "L": 0.6}
# Filled in by the model per stage: the feature map and the partition size.
_PARTITION_ARGS = {"window": "window_size", "grid": "grid_size"}
_SPATIAL_ARGS = ("grid", "window_size", "grid_size")


def decode_variant(variant: str) -> dict[str, Any]:
  """"T" -> dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 5, 2), stem_width=64,
  head_hidden=512); sizes are T, S, B, L."""
  if not isinstance(variant, str) or variant not in _EMBED_DIMS:
    raise ValueError(f"unknown MaxViT variant {variant!r}; expected one of "
                     f"{', '.join(_EMBED_DIMS)}")
  dims = _EMBED_DIMS[variant]
  return dict(embed_dims=dims, depths=_DEPTHS[variant], stem_width=_STEM_WIDTH[variant],
              head_hidden=dims[-1])


def _dense(features, axes, dtype, param_dtype, name, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


def _conv(features, strides, axes, dtype, param_dtype, name, groups=1, use_bias=True):
  """3x3 convolution, "SAME" padding (the TensorFlow models')."""
  return nn.Conv(features, (3, 3), strides=strides, padding="SAME",
                 feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                 param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def drop_path_rates(depths: tuple[int, ...], rate: float) -> list[list[float]]:
  """Per-stage stochastic depth rates rising linearly from 0 (first block) to `rate` (last)."""
  total = sum(depths)
  rates = [rate * i / max(total - 1, 1) for i in range(total)]
  starts = [sum(depths[:s]) for s in range(len(depths))]
  return [rates[start:start + depth] for start, depth in zip(starts, depths)]


def _drop_path(rate: float, x, deterministic: bool):
  """Stochastic depth: the whole branch of an example dropped with probability `rate`."""
  return nn.Dropout(rate=rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic)


def _norm(norm_args: Any, deterministic: bool, dtype: Any, param_dtype: Any, name: str):
  """`layers.conv_norm` of `norm_args = dict(kind=..., batch_norm_eps=..., ...)` (BatchNorm with
  TensorFlow's defaults when None); batch statistics when not `deterministic`."""
  args = dict(norm_args or {})
  return conv_norm(args.pop("kind", "batch"), not deterministic, dtype, param_dtype, name, **args)


class MBConv(nn.Module):
  """Pre-norm inverted bottleneck (MobileNetV2/EfficientNet) with squeeze-excitation.

  `shortcut(x) + DropPath(W3 · SE(GELU(N(DW3x3(GELU(N(W1 · N(x))))))))` with W1 expanding to
  `expansion · features` channels, SE reducing to `se_ratio · features` (SiLU, sigmoid gate)
  and W3 projecting to `features`. With `strides=2` the depthwise conv strides and the
  shortcut is 2x2 average pooling followed, if the width changes, by a 1x1 conv (with bias).
  N is `layers.conv_norm` with `norm_args` (kind, eps, momentum; BatchNorm by default).
  """
  features: int
  strides: int = 1
  expansion: float = 4.0
  se_ratio: float = 0.25
  drop_path: float = 0.0
  norm_args: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    norm = lambda name: _norm(self.norm_args, deterministic, self.dtype, self.param_dtype, name)
    dense = lambda width, axes, name, use_bias=True: _dense(  # pylint: disable=g-long-lambda
        width, axes, self.dtype, self.param_dtype, name, use_bias)
    mid = int(self.features * self.expansion)
    shortcut = x
    if self.strides > 1:
      shortcut = nn.avg_pool(x, (self.strides,) * 2, (self.strides,) * 2, padding="SAME",
                             count_include_pad=False)
    if x.shape[-1] != self.features:
      shortcut = dense(self.features, ("channels_in", "embed"), "shortcut")(shortcut)

    y = norm("pre_norm")(x)
    y = nn.gelu(norm("norm_1")(dense(mid, ("embed", "mlp"), "expand", use_bias=False)(y)))
    y = _conv(mid, (self.strides,) * 2, ("conv_height", "conv_width", None, "mlp"), self.dtype,
              self.param_dtype, "depthwise", groups=mid, use_bias=False)(y)
    y = nn.gelu(norm("norm_2")(y))
    s = jnp.mean(y, axis=(1, 2), keepdims=True)
    reduced = max(1, int(self.features * self.se_ratio))
    s = nn.silu(dense(reduced, ("mlp", None), "se_reduce")(s))
    y = y * nn.sigmoid(dense(mid, (None, "mlp"), "se_expand")(s))
    y = dense(self.features, ("mlp", "embed"), "project")(y)
    return shortcut + _drop_path(self.drop_path, y, deterministic)


class PartitionAttention(nn.Module):
  """`x + DropPath(Attn(LN(x)))`, then `x + DropPath(MLP(LN(x)))` on `[batch, h, w, c]` maps,
  the tokens flattened row-major; the op (`window`, `grid` or any other) gets `op_args`."""
  num_heads: int
  op: str
  op_args: Any
  implementation: str | None = None
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    b, h, w, c = x.shape
    x = jnp.reshape(x, (b, h * w, c))
    norm = lambda name: layer_norm(self.dtype, self.param_dtype, name,
                                   epsilon=self.layer_norm_eps)
    y = norm("LayerNorm_0")(x)
    y = Attention(num_heads=self.num_heads, op=self.op, op_args=self.op_args,
                  implementation=self.implementation, use_bias=True,
                  dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=nn.initializers.xavier_uniform(), name="MultiHeadAttention")(y)
    x = x + _drop_path(self.drop_path, y, deterministic)
    y = norm("LayerNorm_1")(x)
    y = MlpBlock(mlp_dim=int(c * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype,
                 name="MlpBlock")(y, deterministic)
    x = x + _drop_path(self.drop_path, y, deterministic)
    return jnp.reshape(x, (b, h, w, c))


# The partition argument of MaxViT's own partition ops: block ("window") and grid attention.
_PARTITION_ARGS = {"window": "window_size", "grid": "grid_size"}


def _op_args(op: str, user_args: Any, grid: tuple[int, int], partition: tuple[int, int]
             ) -> dict[str, Any] | None:
  """`user_args` plus, for a 2-D op, the stage's `grid=(h, w)`, the partition size as the
  `window_size` of `window` or the `grid_size` of `grid`, and the op's other sizes clipped to
  the map (`big_attn.ops.spatial.op_args`)."""
  args = dict(user_args or {})
  if op in _PARTITION_ARGS:
    args[_PARTITION_ARGS[op]] = partition
  return spatial.op_args(op, args, grid)


class MaxViTBlock(nn.Module):
  """MBConv, then block attention, then grid attention (each attention with its MLP)."""
  features: int
  strides: int
  num_heads: int
  partition: tuple[int, int]
  block_attention: str
  block_attention_args: Any
  grid_attention: str
  grid_attention_args: Any
  attention_impl: str | None = None
  expansion: float = 4.0
  se_ratio: float = 0.25
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  norm_args: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    shared = dict(drop_path=self.drop_path, dtype=self.dtype, param_dtype=self.param_dtype)
    x = MBConv(self.features, self.strides, self.expansion, self.se_ratio, name="MBConv",
               norm_args=self.norm_args, **shared)(x, deterministic)
    grid = x.shape[1:3]
    for kind, op, args in (("block", self.block_attention, self.block_attention_args),
                           ("grid", self.grid_attention, self.grid_attention_args)):
      x = PartitionAttention(self.num_heads, op, _op_args(op, args, grid, self.partition),
                             self.attention_impl, self.mlp_ratio, name=f"{kind}_attention",
                             layer_norm_eps=dict(self.norm_args or {}).get("layer_norm_eps",
                                                                           1e-6),
                             **shared)(x, deterministic)
    return x


class Model(nn.Module):
  """MaxViT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the pre-logits `[batch, head_hidden or last dim]`.
    variant: "T", "S", "B" or "L" (`decode_variant`); explicit sizes below override it.
    embed_dims, depths: per-stage widths and block counts (tuples of equal length, any number
      of stages; each stage halves the feature map). Needed without a variant.
    stem_width: width of the stem convs; `embed_dims[0]` when None.
    head_hidden: width of the pre-logits Dense + tanh; 0 for none. The variant's last embed
      dim (the paper's), or 0 without a variant, when None.
    head_dim: attention head width (heads per stage are `dim // head_dim`).
    partition_size: P of the P x P windows and the G x G grid (int or pair): 7 at 224x224. It
      must divide every stage's feature map.
    block_attention, grid_attention: registry names of the two attention ops ("window",
      "grid"); `*_attention_args` are their extra op arguments; attention_impl: their
      `implementation` (None, "xla", "pallas" or "cudnn"). A 2-D op gets the stage's
      feature map as `grid=(h, w)` and its sizes clipped to it (`big_attn.ops.spatial`);
      `window` and `grid` get the partition size as `window_size` / `grid_size` (so those
      three keys may not be given).
    expansion, se_ratio: MBConv expansion and squeeze-excitation ratios (4, 0.25).
    mlp_ratio: the attention blocks' MLP width over the embed dim (4).
    drop_path: stochastic depth rate of the last block, linearly rising from 0 at the first
      (the paper's 0.2/0.3/0.4/0.6 for T/S/B/L on ImageNet-1k are in `DROP_PATH`).
    conv_norm: norm of the stem and the MBConvs, "batch" (the paper's) or "layer".
    batch_norm_eps, batch_norm_momentum: BatchNorm's (TensorFlow's 1e-3 and 0.99).
    layer_norm_eps: epsilon of every LayerNorm (1e-6; the authors' weights use 1e-5).
    head_zeroinit: zero-initialised classifier (as the ViT here).
    remat_policy: "none" or a `jax.checkpoint_policies` name applied to every block.
    dtype: compute dtype (e.g. bfloat16); param_dtype: parameter dtype.
  Parameters carry the logical axis names embed, mlp, heads, kv_heads, head_dim, norm,
  conv_height, conv_width, channels_in and classes.
  """
  num_classes: int
  variant: str | None = None
  embed_dims: tuple[int, ...] | None = None
  depths: tuple[int, ...] | None = None
  stem_width: int | None = None
  head_hidden: int | None = None
  head_dim: int = 32
  partition_size: Any = 7
  block_attention: str = "window"
  block_attention_args: Any = None
  grid_attention: str = "grid"
  grid_attention_args: Any = None
  attention_impl: str | None = None
  expansion: float = 4.0
  se_ratio: float = 0.25
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  conv_norm: str = "batch"
  batch_norm_eps: float = 1e-3
  batch_norm_momentum: float = 0.99
  layer_norm_eps: float = 1e-6
  head_zeroinit: bool = True
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("embed_dims", "depths"),
                           defaults=dict(head_hidden=0))
    super().__post_init__()

  def _partition(self) -> tuple[int, int]:
    p = self.partition_size
    pair = (p, p) if isinstance(p, int) else p
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(_positive_int(v) for v in pair)):
      raise ValueError(f"partition_size must be a positive int or a pair of them, got {p!r}")
    return tuple(pair)

  def _check(self, images, partition):
    dims, depths = self.embed_dims, self.depths
    if not dims or len(dims) != len(depths):
      raise ValueError(f"embed_dims {dims} and depths {depths} must be non-empty and of equal "
                       "length (one entry per stage)")
    if not all(_positive_int(v) for v in dims + depths):
      raise ValueError(f"embed_dims {dims} and depths {depths} must hold positive ints")
    if not _positive_int(self.head_dim) or any(d % self.head_dim for d in dims):
      raise ValueError(f"embed_dims {dims} must be multiples of head_dim {self.head_dim!r}")
    if self.stem_width is not None and not _positive_int(self.stem_width):
      raise ValueError(f"stem_width must be a positive int, got {self.stem_width!r}")
    if not _positive_int(self.head_hidden) and self.head_hidden != 0:
      raise ValueError(f"head_hidden must be a non-negative int, got {self.head_hidden!r}")
    if self.remat_policy not in vit.REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of "
                       f"{vit.REMAT_POLICIES}")
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path!r}")
    for name in ("expansion", "se_ratio", "mlp_ratio", "batch_norm_eps", "layer_norm_eps"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if self.conv_norm not in CONV_NORMS:
      raise ValueError(f"unknown conv_norm {self.conv_norm!r}; expected one of {CONV_NORMS}")
    if not 0.0 <= self.batch_norm_momentum < 1.0:
      raise ValueError(f"batch_norm_momentum must be in [0, 1), got {self.batch_norm_momentum!r}")
    for name in ("block_attention", "grid_attention"):
      spatial.check_op(getattr(self, name), "MaxViT")  # a KeyError for an unknown op
      args = getattr(self, f"{name}_args")
      if args is None:
        continue
      if not hasattr(args, "keys"):
        raise TypeError(f"{name}_args must be a dict, got {type(args).__name__}")
      reserved = sorted(set(args) & set(_SPATIAL_ARGS))
      if reserved:
        raise ValueError(f"{name}_args may not set {reserved}: the model gives each stage its "
                         "feature map (grid) and partition_size")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    h, w = images.shape[1:3]
    h, w = -(-h // 2), -(-w // 2)  # the stem, then the first block of each stage, stride 2
    for stage in range(len(depths)):
      h, w = -(-h // 2), -(-w // 2)
      if h % partition[0] or w % partition[1]:
        raise ValueError(
            f"partition_size {partition} must divide every stage's feature map: images of "
            f"{tuple(images.shape[1:3])} give {(h, w)} at stage {stage + 1}")

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    partition = self._partition()
    self._check(images, partition)
    deterministic = not train
    dims, depths = self.embed_dims, self.depths
    stem_width = dims[0] if self.stem_width is None else self.stem_width

    norm_args = dict(kind=self.conv_norm, batch_norm_eps=self.batch_norm_eps,
                     batch_norm_momentum=self.batch_norm_momentum,
                     layer_norm_eps=self.layer_norm_eps)
    x = jnp.asarray(images, self.dtype)
    x = _conv(stem_width, (2, 2), ("conv_height", "conv_width", "channels_in", "embed"),
              self.dtype, self.param_dtype, "stem_conv_0")(x)
    x = nn.gelu(_norm(norm_args, deterministic, self.dtype, self.param_dtype, "stem_norm")(x))
    x = _conv(stem_width, (1, 1), ("conv_height", "conv_width", "channels_in", "embed"),
              self.dtype, self.param_dtype, "stem_conv_1")(x)

    block = MaxViTBlock
    if self.remat_policy != "none":
      block = nn.remat(block, static_argnums=(2,),
                       policy=getattr(jax.checkpoint_policies, self.remat_policy))
    rates = drop_path_rates(depths, self.drop_path)
    for stage, (dim, depth) in enumerate(zip(dims, depths)):
      for i in range(depth):
        x = block(features=dim, strides=2 if i == 0 else 1, num_heads=dim // self.head_dim,
                  partition=partition, block_attention=self.block_attention,
                  block_attention_args=self.block_attention_args,
                  grid_attention=self.grid_attention,
                  grid_attention_args=self.grid_attention_args,
                  attention_impl=self.attention_impl, expansion=self.expansion,
                  se_ratio=self.se_ratio, mlp_ratio=self.mlp_ratio, drop_path=rates[stage][i],
                  norm_args=norm_args, dtype=self.dtype, param_dtype=self.param_dtype,
                  name=f"stage_{stage}_block_{i}")(x, deterministic)

    x = jnp.mean(x, axis=(1, 2))
    x = layer_norm(self.dtype, self.param_dtype, "head_norm", epsilon=self.layer_norm_eps)(x)
    if self.head_hidden:
      x = jnp.tanh(_dense(self.head_hidden, ("embed", "mlp"), self.dtype, self.param_dtype,
                          "pre_logits")(x))
    if self.num_classes:
      kernel_init = (nn.initializers.zeros_init() if self.head_zeroinit
                     else nn.initializers.lecun_normal())
      axes = ("mlp" if self.head_hidden else "embed", "classes")
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                   kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("classes",)))(x)
    return x.astype(jnp.float32)


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0
