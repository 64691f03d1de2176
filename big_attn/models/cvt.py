"""CvT (CvT: Introducing Convolutions to Vision Transformers, Wu et al. 2021).

    model = Model(num_classes=1000, variant="CvT-13", attention="softmax")
    params = model.init(jax.random.key(0), images)["params"]     # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)  # [batch, 1000]

Three stages, each opened by a convolutional token embedding: an overlapping strided convolution
(7x7/4 with padding 2, then 3x3/2 with padding 1) and LayerNorm turn the image (or the previous
stage's tokens, reshaped back to a map) into a token map. No position embedding. Each block is

    x + DropPath(Attn(LN(x))),   x + DropPath(MLP(LN(x)))

where the attention takes its queries, keys and values through a convolutional projection: the
token map goes through a 3x3 depthwise convolution (stride 1 for queries, `stride_kv` = 2 for
keys and values, which shortens the key sequence 4x) and a normalisation, then a linear
projection per head. The attention itself is any op of `big_attn.ops` by name (default softmax).
A class token joins only in the last stage; it skips the convolutions (it is concatenated to the
projected maps) and is classified after a final LayerNorm.

The projection's normalisation is BatchNorm as in the paper (`conv_norm="batch"`, PyTorch's eps
1e-5 and momentum 0.1, i.e. 0.9 in Flax's convention; running statistics in the `batch_stats`
collection, which the train step carries), or LayerNorm over channels (`conv_norm="layer"`:
stateless, the same two parameters per channel). Deviations by default, each a field: the
attention scale is the op's 1/sqrt(head_dim) (`attention_scale="width"`: the official code's
1/sqrt(stage width)), LayerNorm eps 1e-6 (`norm_eps`; PyTorch's 1e-5) and tanh-approximate
GELU (`approximate_gelu=False`: exact, PyTorch's `nn.GELU()`).

Parameter counts (224x224x3 input, 1000 classes; counted with `jax.eval_shape`, nothing
allocated) against the paper's Table 2:

| variant  | dims             | heads       | depths      | parameters  | paper |
|----------|------------------|-------------|-------------|-------------|-------|
| CvT-13   | (64, 192, 384)   | (1, 3, 6)   | (1, 2, 10)  |  19,997,480 |  20M  |
| CvT-21   | (64, 192, 384)   | (1, 3, 6)   | (1, 4, 16)  |  31,622,696 |  32M  |
| CvT-W24  | (192, 768, 1024) | (3, 12, 16) | (2, 2, 20)  | 277,196,392 | 277M  |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_attn.layers import MlpBlock, conv_norm, layer_norm
from big_attn.layers.norm import CONV_NORMS
from big_attn.layers.attention import Attention, Projection, learned_op_args
from big_attn.models import common
from big_attn.ops import spatial

_DIMS = {"13": (64, 192, 384), "21": (64, 192, 384), "W24": (192, 768, 1024)}
_HEADS = {"13": (1, 3, 6), "21": (1, 3, 6), "W24": (3, 12, 16)}
_DEPTHS = {"13": (1, 2, 10), "21": (1, 4, 16), "W24": (2, 2, 20)}
# Convolutional token embedding of each stage (kernel, stride, padding), as the paper's configs.
PATCH_SIZE = (7, 3, 3)
PATCH_STRIDE = (4, 2, 2)
PATCH_PADDING = (2, 1, 1)
ATTENTION_SCALES = ("head_dim", "width")

_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"CvT-13" (or "13") -> dict(dims=(64, 192, 384), num_heads=(1, 3, 6), depths=(1, 2, 10)).

  Sizes: 13, 21, W24.
  """
  size = variant[4:] if isinstance(variant, str) and variant.startswith("CvT-") else variant
  if not isinstance(size, str) or size not in _DIMS:
    raise ValueError(f"unknown CvT variant {variant!r}; expected CvT-13, CvT-21 or CvT-W24 "
                     "(or 13, 21, W24)")
  return dict(dims=_DIMS[size], num_heads=_HEADS[size], depths=_DEPTHS[size])


class ConvProjectionAttention(nn.Module):
  """Multi-head attention with CvT's convolutional projection of queries, keys and values.

  `x: [batch, num_prefix + h * w, dim]` (prefix tokens first, e.g. the class token) with the
  token map of size `grid = (h, w)`. For each of q, k, v: depthwise `kernel_size` convolution
  of the map (stride `stride_q` for q, `stride_kv` for k and v; no bias), `conv_norm`
  (BatchNorm: batch statistics unless `deterministic`), flatten, prefix tokens prepended
  unconvolved, then a linear projection to `[.., heads, head_dim]`. The
  op `op` (registry name, with `op_args`) attends through `layers.Attention.attend` and a
  linear layer maps the heads back.
  `attention_scale="width"` multiplies the queries by sqrt(head_dim / width), so that the op's
  1/sqrt(head_dim) logit scale becomes the official code's 1/sqrt(width).
  """
  num_heads: int
  op: str = "softmax"
  op_args: Any = None
  implementation: str | None = None
  kernel_size: int = 3
  stride_q: int = 1
  stride_kv: int = 2
  num_prefix: int = 0
  use_bias: bool = True
  conv_norm: str = "batch"
  batch_norm_eps: float = 1e-5
  batch_norm_momentum: float = 0.9
  layer_norm_eps: float = 1e-6
  attention_scale: str = "head_dim"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _conv_proj(self, prefix, x_map, stride, name, deterministic):
    dim = x_map.shape[-1]
    pad = self.kernel_size // 2
    y = nn.Conv(dim, (self.kernel_size, self.kernel_size), strides=(stride, stride),
                padding=((pad, pad), (pad, pad)), feature_group_count=dim, use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv_proj_{name}",
                kernel_init=nn.with_logical_partitioning(
                    _INIT, ("conv_height", "conv_width", None, "embed")))(x_map)
    y = conv_norm(self.conv_norm, not deterministic, self.dtype, self.param_dtype,
                  f"conv_proj_{name}_norm", batch_norm_eps=self.batch_norm_eps,
                  batch_norm_momentum=self.batch_norm_momentum,
                  layer_norm_eps=self.layer_norm_eps)(y)
    n, h, w, _ = y.shape
    y = jnp.concatenate([prefix, jnp.reshape(y, (n, h * w, dim))], axis=1)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))

  @nn.compact
  def __call__(self, x, grid: tuple[int, int], deterministic: bool = True):
    n, length, dim = x.shape
    h, w = grid
    if length != self.num_prefix + h * w:
      raise ValueError(f"x has {length} tokens; expected num_prefix {self.num_prefix} + "
                       f"grid {grid} = {self.num_prefix + h * w}")
    if dim % self.num_heads:
      raise ValueError(f"width {dim} must be divisible by num_heads {self.num_heads}")
    if self.attention_scale not in ATTENTION_SCALES:
      raise ValueError(f"unknown attention_scale {self.attention_scale!r}; expected one of "
                       f"{ATTENTION_SCALES}")
    head_dim = dim // self.num_heads
    prefix, x_map = x[:, :self.num_prefix], jnp.reshape(x[:, self.num_prefix:], (n, h, w, dim))
    proj = lambda name: Projection(  # pylint: disable=g-long-lambda
        shape=(dim, self.num_heads, head_dim), logical_axes=("embed", "heads", "head_dim"),
        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=_INIT, name=name)
    inputs_q = self._conv_proj(prefix, x_map, self.stride_q, "q", deterministic)
    query = proj("query")(inputs_q)
    if self.attention_scale == "width":
      query = query * jnp.asarray((head_dim / dim) ** 0.5, query.dtype)
    key = proj("key")(self._conv_proj(prefix, x_map, self.stride_kv, "k", deterministic))
    value = proj("value")(self._conv_proj(prefix, x_map, self.stride_kv, "v", deterministic))

    op_args = learned_op_args(self.op, self.op_args, self.implementation, inputs_q, query, key,
                              value, dtype=self.dtype, param_dtype=self.param_dtype)
    # The op through the one method every attention layer calls it with (interpret sees it).
    out = Attention(num_heads=self.num_heads, op=self.op, name="attention_op").attend(
        query, key, value, op_args=op_args)
    return Projection(shape=(self.num_heads, head_dim, dim),
                      logical_axes=("heads", "head_dim", "embed"), contract=2, use_bias=True,
                      dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_INIT,
                      name="out")(out)


class Block(nn.Module):
  """x + DropPath(ConvAttn(LN(x))), then x + DropPath(MLP(LN(x)))."""
  attention_args: Any
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid, deterministic: bool = True):
    drop_path = nn.Dropout(rate=self.drop_path, broadcast_dims=(1, 2))
    y = layer_norm(self.dtype, self.param_dtype, "LayerNorm_0", epsilon=self.norm_eps)(x)
    y = ConvProjectionAttention(**self.attention_args, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="attention")(
                                    y, grid, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + drop_path(y, deterministic)
    y = layer_norm(self.dtype, self.param_dtype, "LayerNorm_1", epsilon=self.norm_eps)(x)
    y = MlpBlock(mlp_dim=int(self.mlp_ratio * x.shape[-1]), dropout=self.dropout,
                 approximate_gelu=self.approximate_gelu,
                 kernel_init=_INIT, bias_init=nn.initializers.zeros_init(), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="MlpBlock")(y, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return nn.with_logical_constraint(x + drop_path(y, deterministic),
                                      ("batch", "length", "embed"))


class Model(nn.Module):
  """CvT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the normalised class token `[batch, dims[-1]]`.
    variant: size name for `decode_variant` ("CvT-13"); explicit `dims`, `num_heads`,
      `depths` override it.
    dims, num_heads, depths: width, heads and blocks of each stage (equal lengths).
    patch_size, patch_stride, patch_padding: the token embedding convolution of each stage
      (defaults: the paper's (7, 3, 3), (4, 2, 2), (2, 1, 1)).
    kernel_size, stride_kv: convolutional projection (3, and 2 for keys and values).
    mlp_ratio: MLP width over the stage width (4).
    attention: registry name of the attention op (`big_attn.ops.names()`); attention_args its
      keyword arguments; attention_impl its `implementation`. A 2-D op gets the stage's
      `grid` and the class token as `extra_tokens` (`big_attn.ops.spatial`); one that needs
      queries and keys on one grid is refused unless `stride_kv=1`.
    dropout: rate on the attention and MLP outputs.
    drop_path_rate: stochastic depth rate, rising linearly over the last stage's blocks (the
      official configs use 0 in the earlier stages).
    conv_norm: the convolutional projection's norm, "batch" (the paper's) or "layer";
      batch_norm_eps, batch_norm_momentum: BatchNorm's (PyTorch's 1e-5 and 0.9).
    norm_eps: every LayerNorm's eps (1e-6; the official code and transformers use 1e-5).
    approximate_gelu: tanh-approximate GELU in the MLPs (True); False is the exact erf form.
    attention_scale: "head_dim" (the op's 1/sqrt(head_dim)) or "width" (the official code's
      1/sqrt(stage width), which converted transformers checkpoints need).
    dtype: compute dtype; param_dtype: parameter dtype.
  Parameters carry the logical axis names conv_height, conv_width, channels_in, embed, heads,
  head_dim, mlp, norm and classes.
  """
  num_classes: int
  variant: str | None = None
  dims: tuple[int, ...] | None = None
  num_heads: tuple[int, ...] | None = None
  depths: tuple[int, ...] | None = None
  patch_size: tuple[int, ...] = PATCH_SIZE
  patch_stride: tuple[int, ...] = PATCH_STRIDE
  patch_padding: tuple[int, ...] = PATCH_PADDING
  kernel_size: int = 3
  stride_kv: int = 2
  mlp_ratio: float = 4.0
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  conv_norm: str = "batch"
  batch_norm_eps: float = 1e-5
  batch_norm_momentum: float = 0.9
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  attention_scale: str = "head_dim"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("dims", "num_heads", "depths"))
    super().__post_init__()

  def _check(self, images):
    stages = len(self.dims)
    for key in ("dims", "num_heads", "depths", "patch_size", "patch_stride", "patch_padding"):
      value, low = tuple(getattr(self, key)), 0 if key == "patch_padding" else 1
      if len(value) != stages or not all(isinstance(v, int) and v >= low for v in value):
        raise ValueError(f"{key} must be {stages} ints >= {low} (one per stage, as dims), got "
                         f"{value}")
    for dim, heads in zip(self.dims, self.num_heads):
      if dim % heads:
        raise ValueError(f"dims {self.dims} must be divisible by num_heads {self.num_heads}")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    if self.attention_args is not None and not hasattr(self.attention_args, "keys"):
      raise TypeError(f"attention_args must be a dict, got {type(self.attention_args).__name__}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
    for name in ("kernel_size", "stride_kv"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if self.conv_norm not in CONV_NORMS:
      raise ValueError(f"unknown conv_norm {self.conv_norm!r}; expected one of {CONV_NORMS}")
    if not 0.0 <= self.batch_norm_momentum < 1.0 or not self.batch_norm_eps > 0:
      raise ValueError(f"batch_norm_momentum must be in [0, 1) and batch_norm_eps positive, got "
                       f"{self.batch_norm_momentum!r} and {self.batch_norm_eps!r}")
    if not self.norm_eps > 0:
      raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    spatial.check_op(self.attention, "CvT", same_grid=self.stride_kv == 1)
    deterministic = not train
    stages = len(self.dims)
    x = jnp.asarray(images, self.dtype)
    for stage in range(stages):
      dim, size = self.dims[stage], self.patch_size[stage]
      stride, pad = self.patch_stride[stage], self.patch_padding[stage]
      x = nn.Conv(dim, (size, size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                  dtype=self.dtype, param_dtype=self.param_dtype, name=f"stage_{stage}_embed",
                  kernel_init=nn.with_logical_partitioning(
                      _INIT, ("conv_height", "conv_width", "channels_in", "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         ("embed",)))(x)
      n, h, w, _ = x.shape
      x = layer_norm(self.dtype, self.param_dtype, f"stage_{stage}_embed_norm",
                     epsilon=self.norm_eps)(
          jnp.reshape(x, (n, h * w, dim)))
      num_prefix = 0
      if stage == stages - 1:
        cls = self.param("cls", nn.with_logical_partitioning(_INIT, (None, "embed")), (1, dim),
                         self.param_dtype)
        cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype)[None], (n, 1, dim))
        x = jnp.concatenate([cls, x], axis=1)
        num_prefix = 1
      x = nn.Dropout(rate=self.dropout)(x, deterministic)
      depth = self.depths[stage]
      rates = (np.linspace(0.0, self.drop_path_rate, depth) if stage == stages - 1
               else np.zeros(depth))
      # Keys and values come from the stride_kv convolution of the map (padding k // 2).
      kv_grid = tuple((s + 2 * (self.kernel_size // 2) - self.kernel_size) // self.stride_kv + 1
                      for s in (h, w))
      op_grid = kv_grid if self.attention in spatial.KV_GRID_OPS else (h, w)
      attention_args = dict(
          num_heads=self.num_heads[stage], op=self.attention,
          op_args=spatial.op_args(self.attention, self.attention_args, op_grid, num_prefix),
          implementation=self.attention_impl, kernel_size=self.kernel_size,
          stride_kv=self.stride_kv, num_prefix=num_prefix, conv_norm=self.conv_norm,
          batch_norm_eps=self.batch_norm_eps, batch_norm_momentum=self.batch_norm_momentum,
          layer_norm_eps=self.norm_eps, attention_scale=self.attention_scale)
      for i in range(depth):
        x = Block(attention_args=attention_args, mlp_ratio=self.mlp_ratio,
                  drop_path=float(rates[i]), dropout=self.dropout, norm_eps=self.norm_eps,
                  approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"stage_{stage}_block_{i}")(
                      x, (h, w), deterministic)
      if stage < stages - 1:
        x = jnp.reshape(x, (n, h, w, dim))  # back to a map for the next token embedding

    x = layer_norm(self.dtype, self.param_dtype, "norm", epsilon=self.norm_eps)(x[:, 0])
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                   kernel_init=nn.with_logical_partitioning(_INIT, ("embed", "classes")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("classes",)))(x)
    return x.astype(jnp.float32)
