"""MViTv2 (MViTv2: Improved Multiscale Vision Transformers for Classification and Detection,
Li et al. 2022).

    model = Model(num_classes=1000, variant="MViTv2-T")
    params = model.init(jax.random.key(0), images)["params"]     # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)  # [batch, 1000]

A 7x7/4 convolution (padding 3) embeds the image; four stages of pre-LayerNorm blocks follow,
without position embedding or class token. Each block is

    x ← MaxPool(x or Linear(LN(x))) + DropPath(PoolAttn(LN(x))),
    x ← (x or Linear(LN(x))) + DropPath(MLP(LN(x))),

where the pooling attention projects queries, keys and values, pools each head's map with a
3x3 depthwise convolution (no bias, shared by the heads) and a LayerNorm over the head
dimension, the queries at stride 2 in the first block of stages 2-4 and 1 elsewhere, the keys
and values at an adaptive stride (4, 2, 1, 1 by stage: 4 divided by the query strides so far).
The attention is any op of `big_attn.ops` by name; the default is `decomposed_relpos`, the
paper's decomposed relative position embeddings, which gets the queries' `grid` and the keys'
`kv_grid`. Other 2-D ops need one grid for queries and keys and are refused
(`big_attn.ops.spatial.check_op`). The residual pooling connection adds the pooled queries to
the attention output before the output projection. Widths double at stage transitions: in the
attention's projections of a stage's first block (`expand_attn`, T/S/B; the shortcut then goes
through a Linear layer of the normalised input, pooled by a max pool of kernel stride + 1) or in
the MLP of a stage's last block (MViTv2-L). The LayerNorm'd tokens are averaged and classified.

With timm's weights laid out as these parameters (the joint qkv projection split, convolutions
transposed) and `approximate_gelu=False`, the outputs are timm's `MultiScaleVit` ones (within
6e-7 in float32 on a tiny four-stage model, with and without `expand_attn`).

Parameter counts (224x224x3 input, 1000 classes; counted with `jax.eval_shape`, nothing
allocated; timm's `mvitv2_*`, the authors' weights, have the same) against the paper's Table 3:

| variant   | dims                  | heads         | depths        | parameters  | paper |
|-----------|-----------------------|---------------|---------------|-------------|-------|
| MViTv2-T  | (96, 192, 384, 768)   | (1, 2, 4, 8)  | (1, 2, 5, 2)  |  24,173,320 |  24M  |
| MViTv2-S  | (96, 192, 384, 768)   | (1, 2, 4, 8)  | (1, 2, 11, 2) |  34,870,216 |  35M  |
| MViTv2-B  | (96, 192, 384, 768)   | (1, 2, 4, 8)  | (2, 3, 16, 3) |  51,472,744 |  52M  |
| MViTv2-L  | (144, 288, 576, 1152) | (2, 4, 8, 16) | (2, 6, 36, 4) | 217,992,952 | 218M  |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_attn.layers import MlpBlock, layer_norm
from big_attn.layers.attention import Attention, Projection, learned_op_args
from big_attn.models import common
from big_attn.ops import spatial

_SIZES = {  # depths, stage-1 width, stage-1 heads, expand_attn (the paper's Table 3)
    "T": ((1, 2, 5, 2), 96, 1, True),
    "S": ((1, 2, 11, 2), 96, 1, True),
    "B": ((2, 3, 16, 3), 96, 1, True),
    "L": ((2, 6, 36, 4), 144, 2, False),
}
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"MViTv2-T" (or "T") -> dict(dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8),
  depths=(1, 2, 5, 2), expand_attn=True). Sizes: T, S, B, L."""
  size = variant[7:] if isinstance(variant, str) and variant.startswith("MViTv2-") else variant
  if not isinstance(size, str) or size not in _SIZES:
    raise ValueError(f"unknown MViTv2 variant {variant!r}; expected MViTv2-SIZE or SIZE with "
                     f"SIZE in {', '.join(_SIZES)}")
  depths, dim, heads, expand = _SIZES[size]
  return dict(dims=tuple(dim * 2 ** i for i in range(4)),
              num_heads=tuple(heads * 2 ** i for i in range(4)), depths=depths,
              expand_attn=expand)


def pooled_grid(grid: tuple[int, int], kernel_size: int, stride: int) -> tuple[int, int]:
  """The grid after a `kernel_size` pooling at `stride` with padding kernel_size // 2."""
  pad = kernel_size // 2
  return tuple((s + 2 * pad - kernel_size) // stride + 1 for s in grid)


def kv_strides(stride_q: tuple[int, ...], stride_kv: int) -> tuple[int, ...]:
  """The adaptive key/value pooling stride of each stage: `stride_kv` divided by the query
  strides of the stages so far (at least 1)."""
  strides, current = [], stride_kv
  for s in stride_q:
    if s > 1:
      current = max(current // s, 1)
    strides.append(current)
  return tuple(strides)


def _dense(features, axes, dtype, param_dtype, name, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(_INIT, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


class PoolingAttention(nn.Module):
  """MViTv2's pooling attention: `x [batch, h·w, dim]` on `grid=(h, w)` -> `([batch, h'·w',
  dim_out], (h', w'))` on the queries' pooled grid.

  Queries, keys and values are linear projections to `num_heads` heads of `dim_out /
  num_heads`; each head's map is pooled by a depthwise `kernel_size` convolution (no bias,
  shared by the heads; stride `stride_q` for the queries, `stride_kv` for keys and values,
  padding kernel_size // 2) and a LayerNorm over the head dimension (skipped for a 1x1 kernel
  at stride 1). The op `op` (with `op_args`; `grid` and, for `spatial.TWO_GRID_OPS`, `kv_grid`
  added) attends; with `residual_pooling` the pooled queries are added to its output, and a
  linear layer maps the heads to `dim_out`.
  """
  dim_out: int
  num_heads: int
  op: str = "decomposed_relpos"
  op_args: Any = None
  implementation: str | None = None
  kernel_size: int = 3
  stride_q: int = 1
  stride_kv: int = 1
  residual_pooling: bool = True
  qkv_bias: bool = True
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _pool(self, t, grid, stride, name):
    """`[b, h·w, heads, head_dim]` -> the pooled `[b, h'·w', heads, head_dim]` and `(h', w')`."""
    if self.kernel_size == 1 and stride == 1:
      return t, grid
    b, _, heads, d = t.shape
    k, pad = self.kernel_size, self.kernel_size // 2
    maps = jnp.transpose(jnp.reshape(t, (b,) + tuple(grid) + (heads, d)), (0, 3, 1, 2, 4))
    maps = nn.Conv(d, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=d, use_bias=False, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=f"pool_{name}",
                   kernel_init=nn.with_logical_partitioning(
                       _INIT, ("conv_height", "conv_width", None, "head_dim")))(maps)
    maps = layer_norm(self.dtype, self.param_dtype, f"norm_{name}", epsilon=self.norm_eps)(maps)
    pooled = maps.shape[2:4]
    return jnp.reshape(jnp.transpose(maps, (0, 2, 3, 1, 4)), (b, -1, heads, d)), pooled

  @nn.compact
  def __call__(self, x, grid: tuple[int, int]):
    if x.shape[1] != grid[0] * grid[1]:
      raise ValueError(f"x has {x.shape[1]} tokens; expected the grid {grid}")
    if self.dim_out % self.num_heads:
      raise ValueError(f"dim_out {self.dim_out} must be divisible by num_heads "
                       f"{self.num_heads}")
    head_dim = self.dim_out // self.num_heads
    proj = lambda name: Projection(  # pylint: disable=g-long-lambda
        shape=(x.shape[-1], self.num_heads, head_dim), logical_axes=("embed", "heads", "head_dim"),
        use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=_INIT, name=name)
    query, q_grid = self._pool(proj("query")(x), grid, self.stride_q, "q")
    key, kv_grid = self._pool(proj("key")(x), grid, self.stride_kv, "k")
    value, _ = self._pool(proj("value")(x), grid, self.stride_kv, "v")
    op_grid = kv_grid if self.op in spatial.KV_GRID_OPS else q_grid
    op_args = spatial.op_args(self.op, self.op_args, op_grid) or {}
    if self.op in spatial.TWO_GRID_OPS:
      op_args["kv_grid"] = tuple(kv_grid)
    # A learned argument read from the query's token (a gate) reads the pooled query's.
    pooled_tokens = query.reshape(query.shape[:2] + (-1,))
    op_args = learned_op_args(self.op, op_args, self.implementation, pooled_tokens, query, key,
                              value, dtype=self.dtype, param_dtype=self.param_dtype)
    out = Attention(num_heads=self.num_heads, op=self.op, name="attention_op").attend(
        query, key, value, op_args=op_args)
    if self.residual_pooling:
      out = out + query
    out = Projection(shape=(self.num_heads, head_dim, self.dim_out),
                     logical_axes=("heads", "head_dim", "embed"), contract=2, use_bias=True,
                     dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_INIT,
                     name="out")(out)
    return out, q_grid


class Block(nn.Module):
  """One MViTv2 block `[batch, h·w, dim]` on `grid` -> `[batch, h'·w', dim_out]` (module
  docstring); `expand_attn`: the width changes in the attention, else in the MLP."""
  attention_args: Any
  dim_out: int
  expand_attn: bool = True
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid, deterministic: bool = True):
    dt, pdt = self.dtype, self.param_dtype
    dim, stride = x.shape[-1], self.attention_args["stride_q"]
    att_dim = self.dim_out if self.expand_attn else dim
    drop_path = nn.Dropout(rate=self.drop_path, broadcast_dims=(1, 2))
    y = layer_norm(dt, pdt, "norm1", epsilon=self.norm_eps)(x)
    shortcut = x
    if self.expand_attn and dim != self.dim_out:
      shortcut = _dense(self.dim_out, ("embed", "mlp"), dt, pdt, "shortcut_attn")(y)
    if stride > 1:
      b, _, c = shortcut.shape
      pad = (stride + 1) // 2
      shortcut = nn.max_pool(jnp.reshape(shortcut, (b,) + tuple(grid) + (c,)),
                             (stride + 1, stride + 1), (stride, stride), ((pad, pad), (pad, pad)))
      shortcut = jnp.reshape(shortcut, (b, -1, c))
    y, grid = PoolingAttention(dim_out=att_dim, **self.attention_args, dtype=dt,
                               param_dtype=pdt, name="attention")(y, grid)
    x = shortcut + drop_path(y, deterministic)
    y = layer_norm(dt, pdt, "norm2", epsilon=self.norm_eps)(x)
    shortcut = x
    if not self.expand_attn and dim != self.dim_out:
      shortcut = _dense(self.dim_out, ("embed", "mlp"), dt, pdt, "shortcut_mlp")(y)
    y = MlpBlock(mlp_dim=int(self.mlp_ratio * att_dim), out_dim=self.dim_out,
                 approximate_gelu=self.approximate_gelu, kernel_init=_INIT,
                 bias_init=nn.initializers.zeros_init(), dtype=dt, param_dtype=pdt,
                 name="MlpBlock")(y, deterministic)
    x = nn.with_logical_constraint(shortcut + drop_path(y, deterministic),
                                   ("batch", "length", "embed"))
    return x, grid


class Model(nn.Module):
  """MViTv2 classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the averaged normalised tokens `[batch, width]`.
    variant: size name for `decode_variant` ("MViTv2-T" or "T"); explicit fields override it.
    dims, num_heads, depths: width, heads and blocks of each stage (equal lengths).
    expand_attn: widths change in the attention of a stage's first block (True, T/S/B) or in
      the MLP of the previous stage's last block (False, L).
    patch_size, patch_stride, patch_padding: the embedding convolution (7, 4, 3).
    kernel_size: the pooling convolutions' kernel (3).
    stride_q: query pooling stride of each stage's first block ((1, 2, 2, 2)).
    stride_kv: key/value pooling stride of the first stage (4), divided by the query strides
      in the later stages (`kv_strides`).
    residual_pooling: add the pooled queries to the attention output (True).
    mlp_ratio: MLP width over the attention width (4).
    attention: registry name of the attention op (default `decomposed_relpos`, the paper's);
      attention_args its keyword arguments; attention_impl its `implementation`.
    drop_path_rate: stochastic depth rate, rising linearly over all blocks.
    norm_eps: every LayerNorm's eps (1e-6).
    approximate_gelu: tanh-approximate GELU (True); False: exact, PyTorch's `nn.GELU()`.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  num_classes: int
  variant: str | None = None
  dims: tuple[int, ...] | None = None
  num_heads: tuple[int, ...] | None = None
  depths: tuple[int, ...] | None = None
  expand_attn: bool | None = None
  patch_size: int = 7
  patch_stride: int = 4
  patch_padding: int = 3
  kernel_size: int = 3
  stride_q: tuple[int, ...] = (1, 2, 2, 2)
  stride_kv: int = 4
  residual_pooling: bool = True
  mlp_ratio: float = 4.0
  attention: str = "decomposed_relpos"
  attention_args: Any = None
  attention_impl: str | None = None
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("dims", "num_heads", "depths"),
                           defaults=dict(expand_attn=True))
    super().__post_init__()

  def _check(self, images):
    stages = len(self.dims)
    for key in ("dims", "num_heads", "depths", "stride_q"):
      value = tuple(getattr(self, key))
      if len(value) != stages or not all(isinstance(v, int) and v >= 1 for v in value):
        raise ValueError(f"{key} must be {stages} ints >= 1 (one per stage, as dims), got "
                         f"{value}")
    for dim, heads in zip(self.dims, self.num_heads):
      if dim % heads:
        raise ValueError(f"dims {self.dims} must be divisible by num_heads {self.num_heads}")
    for name in ("patch_size", "patch_stride", "kernel_size", "stride_kv"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    if self.attention_args is not None and not hasattr(self.attention_args, "keys"):
      raise TypeError(f"attention_args must be a dict, got {type(self.attention_args).__name__}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    strides_kv = kv_strides(self.stride_q, self.stride_kv)
    same_grid = all((self.stride_q[i] if j == 0 else 1) == strides_kv[i]
                    for i, depth in enumerate(self.depths) for j in range(depth))
    spatial.check_op(self.attention, "MViTv2", same_grid=same_grid, kv_grid=True)
    dt, pdt = self.dtype, self.param_dtype
    pad = self.patch_padding
    x = nn.Conv(self.dims[0], (self.patch_size, self.patch_size),
                strides=(self.patch_stride, self.patch_stride), padding=((pad, pad), (pad, pad)),
                dtype=dt, param_dtype=pdt, name="embedding",
                kernel_init=nn.with_logical_partitioning(
                    _INIT, ("conv_height", "conv_width", "channels_in", "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
                )(jnp.asarray(images, dt))
    b, h, w, dim = x.shape
    x, grid = jnp.reshape(x, (b, h * w, dim)), (h, w)
    stages = len(self.dims)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    index = 0
    for i in range(stages):
      stage_out = self.dims[i] if self.expand_attn else self.dims[min(i + 1, stages - 1)]
      for j in range(self.depths[i]):
        last = j == self.depths[i] - 1
        attention_args = dict(
            num_heads=self.num_heads[i], op=self.attention, op_args=self.attention_args,
            implementation=self.attention_impl, kernel_size=self.kernel_size,
            stride_q=self.stride_q[i] if j == 0 else 1, stride_kv=strides_kv[i],
            residual_pooling=self.residual_pooling, norm_eps=self.norm_eps)
        x, grid = Block(attention_args=attention_args,
                        dim_out=stage_out if self.expand_attn or last else x.shape[-1],
                        expand_attn=self.expand_attn, mlp_ratio=self.mlp_ratio,
                        drop_path=float(rates[index]), norm_eps=self.norm_eps,
                        approximate_gelu=self.approximate_gelu, dtype=dt, param_dtype=pdt,
                        name=f"stage{i}_block{j}")(x, grid, not train)
        index += 1
    x = jnp.mean(layer_norm(dt, pdt, "norm", epsilon=self.norm_eps)(x), axis=1)
    if self.num_classes:
      x = _dense(self.num_classes, ("embed", "classes"), dt, pdt, "head")(x)
    return x.astype(jnp.float32)
