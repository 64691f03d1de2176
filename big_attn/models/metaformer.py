"""MetaFormer (MetaFormer Is Actually What You Need for Vision; MetaFormer Baselines for Vision).

    model = Model(num_classes=1000, variant="S12")                      # PoolFormer-S12
    model = Model(num_classes=1000, variant="S12", mixers=("conv", "conv", "attention",
                  "attention"), mixer_args={"attention": {"op": "sigmoid"}})   # a CAFormer
    logits = model.apply({"params": params}, images, train=False)  # images: [batch, H, W, C]

A 4-stage pyramid: a 7x7 stride-4 patch embedding, then per stage (after a 3x3 stride-2
embedding from the second on) `depths[i]` blocks

    x = x + LayerScale(TokenMixer(GroupNorm(x))),   x = x + LayerScale(MLP(GroupNorm(x))),

with GroupNorm of one group (PoolFormer's norm over channels and positions), per-channel layer
scale initialised to 1e-5, optional stochastic depth, a final GroupNorm, global average pooling
and a linear head (`head_norm="layer"`: pooling first, then LayerNorm, as MetaFormer Baselines
and timm's `poolformer_*`). The token mixer is picked per stage by name from a registry
(`register_mixer`, `mixer_names`, `get_mixer`):

- `pool`: PoolFormer's AvgPool3x3(x) − x (padding not counted).
- `identity`: RIFormer / the identity MetaFormer.
- `shift`: ShiftViT's partial shift, 1/12 of the channels moved one pixel in each of 4
  directions, zeros shifted in (used inside the MetaFormer block, after the norm).
- `mlp_mixer`: MLP-Mixer's token-mixing MLP over the stage's H·W positions (fixed size).
- `conv`: ConvFormer's separable conv (pointwise expansion x2, StarReLU, depthwise 7x7,
  pointwise) or, with `separable=False`, ConvMixer's depthwise conv + GELU.
- `hyena`: HyenaPixel, the 2-D non-causal Hyena operator (`big_attn.layers.HyenaOperator`).
- `attention`: any op of `big_attn.ops` through `big_attn.layers.Attention` (`op`, `op_args`,
  `head_dim` 32 as CAFormer); ops that take `grid` get the stage's `(h, w)`.
Options of a mixer come from `mixer_args[name]`.

PoolFormer parameter counts (224x224x3, 1000 classes; `jax.eval_shape`, nothing allocated)
against Table 1 of MetaFormer Is Actually What You Need for Vision:

| variant | depths        | dims               | parameters | paper |
|---------|---------------|--------------------|------------|-------|
| S12     | 2, 2, 6, 2    | 64, 128, 320, 512  | 11,915,176 | 11.9M |
| S24     | 4, 4, 12, 4   | 64, 128, 320, 512  | 21,388,968 | 21.4M |
| S36     | 6, 6, 18, 6   | 64, 128, 320, 512  | 30,862,760 | 30.9M |
| M36     | 6, 6, 18, 6   | 96, 192, 384, 768  | 56,172,520 | 56.1M |
| M48     | 8, 8, 24, 8   | 96, 192, 384, 768  | 73,473,448 | 73.4M |
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from big_attn.layers import Attention, HyenaOperator, MlpBlock, layer_norm
from big_attn.models import common
from big_attn.ops import spatial

_DEPTHS = {"S12": (2, 2, 6, 2), "S24": (4, 4, 12, 4), "S36": (6, 6, 18, 6),
           "M36": (6, 6, 18, 6), "M48": (8, 8, 24, 8)}
_DIMS = {"S12": (64, 128, 320, 512), "S24": (64, 128, 320, 512), "S36": (64, 128, 320, 512),
         "M36": (96, 192, 384, 768), "M48": (96, 192, 384, 768)}


def decode_variant(variant: str) -> dict[str, Any]:
  """"S12" -> dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), mlp_ratio=4.0) (PoolFormer
  sizes S12, S24, S36, M36, M48)."""
  if not isinstance(variant, str) or variant not in _DEPTHS:
    raise ValueError(f"unknown MetaFormer variant {variant!r}; expected one of "
                     f"{', '.join(_DEPTHS)}")
  return dict(depths=_DEPTHS[variant], dims=_DIMS[variant], mlp_ratio=4.0)


# ------------------------------------------------------------------------------------------
# Token-mixer registry.
# ------------------------------------------------------------------------------------------
_MIXERS: dict[str, type[nn.Module]] = {}


def register_mixer(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Class decorator registering a token mixer `[b, h, w, c] -> [b, h, w, c]` under `name`.

  The class is a Linen module with `dtype` and `param_dtype` fields (see `Mixer`); its other
  fields are the mixer's options. A second registration of a name raises."""
  if not isinstance(name, str) or not name:
    raise TypeError(f"mixer name must be a non-empty string, got {name!r}")

  def decorator(cls):
    if name in _MIXERS:
      raise ValueError(f"token mixer {name!r} is already registered ({_MIXERS[name].__name__})")
    _MIXERS[name] = cls
    return cls

  return decorator


def mixer_names() -> list[str]:
  """Sorted names of the registered token mixers."""
  return sorted(_MIXERS)


def get_mixer(name: str) -> type[nn.Module]:
  """The mixer class registered as `name`; a `KeyError` listing the known names otherwise."""
  try:
    return _MIXERS[name]
  except (KeyError, TypeError):
    raise KeyError(f"unknown token mixer {name!r}; known mixers: "
                   f"{', '.join(mixer_names())}") from None


class Mixer(nn.Module):
  """Base of the token mixers: fields shared by all."""
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _param(self, name, init, shape, axes):
    return jnp.asarray(self.param(name, nn.with_logical_partitioning(init, axes), shape,
                                  self.param_dtype), self.dtype or jnp.float32)

  def _dense(self, features, axes, name, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                             axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           axes[1:]))


@register_mixer("pool")
class PoolMixer(Mixer):
  """PoolFormer: AvgPool_{k×k}(x) − x, stride 1, padding not counted in the average."""
  pool_size: int = 3

  @nn.compact
  def __call__(self, x):
    k = self.pool_size
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k % 2 == 0:
      raise ValueError(f"pool mixer: pool_size must be a positive odd int, got {k!r}")
    pad = ((k // 2, k // 2),) * 2
    return nn.avg_pool(x, (k, k), strides=(1, 1), padding=pad, count_include_pad=False) - x


@register_mixer("identity")
class IdentityMixer(Mixer):
  """The identity token mixer (RIFormer; MetaFormer Baselines' IdentityFormer)."""

  def __call__(self, x):
    return x


@register_mixer("shift")
class ShiftMixer(Mixer):
  """ShiftViT (When Shift Operation Meets Vision Transformer): `fraction` (1/12) of the
  channels each moved one pixel left, right, up and down, zeros shifted in; the rest kept."""
  fraction: float = 1.0 / 12.0

  def __call__(self, x):
    if not 0.0 < self.fraction <= 0.25:
      raise ValueError(f"shift mixer: fraction must be in (0, 1/4], got {self.fraction!r}")
    g = int(x.shape[-1] * self.fraction)
    zero_col, zero_row = jnp.zeros_like(x[:, :, :1, :g]), jnp.zeros_like(x[:, :1, :, :g])
    parts = [
        jnp.concatenate([x[:, :, 1:, :g], zero_col], axis=2),            # left
        jnp.concatenate([zero_col, x[:, :, :-1, g:2 * g]], axis=2),      # right
        jnp.concatenate([x[:, 1:, :, 2 * g:3 * g], zero_row], axis=1),   # up
        jnp.concatenate([zero_row, x[:, :-1, :, 3 * g:4 * g]], axis=1),  # down
        x[..., 4 * g:]]
    return jnp.concatenate(parts, axis=-1)


@register_mixer("mlp_mixer")
class TokenMlpMixer(Mixer):
  """MLP-Mixer's token mixing: per channel, Dense(⌈ratio·N⌉) -> GELU -> Dense(N) over the N =
  h·w positions of the stage (so the image size is fixed by the parameters)."""
  token_mlp_ratio: float = 0.5

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    n = h * w
    if self.token_mlp_ratio <= 0:
      raise ValueError(f"mlp_mixer: token_mlp_ratio must be > 0, got {self.token_mlp_ratio!r}")
    hidden = max(1, int(round(self.token_mlp_ratio * n)))
    y = jnp.swapaxes(x.reshape(b, n, c), 1, 2)  # [b, c, n]
    y = self._dense(hidden, ("position", "mlp"), "token_0")(y)
    y = self._dense(n, ("mlp", "position"), "token_1")(nn.gelu(y))
    return jnp.swapaxes(y, 1, 2).reshape(b, h, w, c)


@register_mixer("conv")
class ConvMixer(Mixer):
  """ConvFormer's separable conv (MetaFormer Baselines): Dense(expansion·c, no bias) ->
  StarReLU s·relu(x)² + β -> depthwise k×k (no bias) -> Dense(c, no bias); with
  `separable=False`, ConvMixer's (Patches Are All You Need?) depthwise k×k with bias -> GELU."""
  kernel_size: int = 7
  expansion: int = 2
  separable: bool = True

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
      raise ValueError(f"conv mixer: kernel_size must be a positive int, got {k!r}")
    c = x.shape[-1]
    if self.separable:
      x = self._dense(self.expansion * c, ("embed", "mlp"), "pwconv1", use_bias=False)(x)
      scale = self._param("star_scale", nn.initializers.ones_init(), (), ())
      shift = self._param("star_bias", nn.initializers.zeros_init(), (), ())
      x = scale * nn.relu(x) ** 2 + shift
    channels = x.shape[-1]
    x = nn.Conv(channels, (k, k), padding="SAME", feature_group_count=channels,
                use_bias=not self.separable, dtype=self.dtype, param_dtype=self.param_dtype,
                name="dwconv",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("conv_height", "conv_width", None, "mlp")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))(x)
    if not self.separable:
      return nn.gelu(x)
    return self._dense(c, ("mlp", "embed"), "pwconv2", use_bias=False)(x)


@register_mixer("hyena")
class HyenaMixer(Mixer):
  """HyenaPixel: the 2-D non-causal Hyena operator of `order` over the stage's image."""
  order: int = 2
  short_kernel: int = 3
  num_heads: int = 1

  @nn.compact
  def __call__(self, x):
    return HyenaOperator(num_heads=self.num_heads, order=self.order,
                         short_kernel=self.short_kernel, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="hyena")(x)


@register_mixer("attention")
class AttentionMixer(Mixer):
  """Self-attention over the h·w tokens with the registered op `op` (`op_args`,
  `implementation`; the Model's `attention`, `attention_args`, `attention_impl`), heads of
  `head_dim` (32, as CAFormer), no projection biases; a 2-D op gets `grid=(h, w)` and its
  sizes clipped to the map (`big_attn.ops.spatial.op_args`)."""
  op: str = "softmax"
  op_args: Any = None
  implementation: str | None = None
  head_dim: int = 32
  qk_norm: bool = False

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if c % self.head_dim:
      raise ValueError(f"attention mixer: channels ({c}) must be divisible by head_dim "
                       f"({self.head_dim})")
    spatial.check_op(self.op, "MetaFormer")
    y = Attention(num_heads=c // self.head_dim, op=self.op,
                  op_args=spatial.op_args(self.op, self.op_args, (h, w)),
                  implementation=self.implementation, qk_norm=self.qk_norm, dtype=self.dtype,
                  param_dtype=self.param_dtype,
                  name="attention")(x.reshape(b, h * w, c))
    return y.reshape(b, h, w, c)


# ------------------------------------------------------------------------------------------
# The MetaFormer.
# ------------------------------------------------------------------------------------------
def _group_norm(dtype, param_dtype, name):
  """GroupNorm(1): normalises over positions and channels, per-channel affine (PoolFormer)."""
  return nn.GroupNorm(
      num_groups=1, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


def _embedding(features, kernel, stride, pad, dtype, param_dtype, name):
  """A strided conv patch embedding (PoolFormer's PatchEmbed, no norm)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=param_dtype,
                 name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.lecun_normal(),
                     ("patch_h", "patch_w", "channels_in", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                        ("embed",)))


class MetaFormerBlock(nn.Module):
  """x + LS(Mixer(GN(x))), then x + LS(MLP(GN(x))), with stochastic depth `drop_path`."""
  mixer: str
  mixer_args: Any = None
  mlp_ratio: float = 4.0
  layer_scale_init: float = 1e-5
  drop_path: float = 0.0
  approximate_gelu: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    c = x.shape[-1]

    def residual(y, name):
      scale = self.param(name, nn.with_logical_partitioning(
          nn.initializers.constant(self.layer_scale_init), ("embed",)), (c,), self.param_dtype)
      y = y * jnp.asarray(scale, y.dtype)
      return x + nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3))(y, deterministic)

    y = _group_norm(self.dtype, self.param_dtype, "norm1")(x)
    y = get_mixer(self.mixer)(**dict(self.mixer_args or {}), dtype=self.dtype,
                              param_dtype=self.param_dtype, name="mixer")(y)
    x = residual(y, "layer_scale1")
    y = _group_norm(self.dtype, self.param_dtype, "norm2")(x)
    y = MlpBlock(mlp_dim=int(self.mlp_ratio * c), approximate_gelu=self.approximate_gelu,
                 dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)
    return residual(y, "layer_scale2")


class Model(nn.Module):
  """MetaFormer classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the pooled features `[batch, dims[-1]]`.
    variant: PoolFormer size for `decode_variant` ("S12"); explicit fields override it.
    depths, dims: blocks and channels per stage (needed without a variant).
    mlp_ratio: MLP hidden width over channels (4).
    mixers: a mixer name for every stage, or one name per stage (`mixer_names()`).
    mixer_args: `{mixer name: dict of its options}`, e.g. `{"attention": {"head_dim": 16}}`.
    attention, attention_args, attention_impl: the attention mixer's op by registry name, its
      arguments and `implementation` (`mixer_args={"attention": {"op": ..., "op_args": ...}}`
      is deprecated).
    layer_scale_init: initial layer scale (1e-5, PoolFormer).
    drop_path: stochastic depth rate of the last block (linear from 0 over the blocks).
    approximate_gelu: tanh-approximate GELU in the MLPs; False: exact (PoolFormer's, timm's).
    head_norm: "group" (GroupNorm of the last map, then pooling: PoolFormer) or "layer"
      (pooling, then LayerNorm with eps 1e-6: MetaFormer Baselines, timm).
    head_zeroinit: zero-initialised classifier (as big_vision).
    dtype: compute dtype; param_dtype: parameter dtype.
  Parameters carry the logical axis names embed, mlp, norm, patch_h, patch_w, channels_in,
  conv_height, conv_width, position, heads, kv_heads, head_dim and classes.
  """
  num_classes: int
  variant: str | None = None
  depths: tuple[int, ...] | None = None
  dims: tuple[int, ...] | None = None
  mlp_ratio: float | None = None
  mixers: Any = "pool"
  mixer_args: Any = None
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  layer_scale_init: float = 1e-5
  drop_path: float = 0.0
  approximate_gelu: bool = True
  head_norm: str = "group"
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("depths", "dims"),
                           defaults=dict(mlp_ratio=4.0))
    legacy = dict(self.mixer_args or {}).get("attention")
    if hasattr(legacy, "keys") and {"op", "op_args"} & set(legacy):
      warnings.warn('metaformer.Model(mixer_args={"attention": {"op": ..., "op_args": ...}}) '
                    "is deprecated; use attention=..., attention_args=...", DeprecationWarning,
                    stacklevel=4)
      legacy = dict(legacy)
      for key, new in (("op", "attention"), ("op_args", "attention_args")):
        if key not in legacy:
          continue
        value, default = legacy.pop(key), type(self).__dataclass_fields__[new].default
        if getattr(self, new) not in (default, value):
          raise ValueError(f'mixer_args["attention"][{key!r}]={value!r} (deprecated) and '
                           f"{new}={getattr(self, new)!r} disagree; set {new} only")
        common.set_fields(self, **{new: value})
      common.set_fields(self, mixer_args={**self.mixer_args, "attention": legacy})
    super().__post_init__()

  def _mixers(self) -> tuple[str, ...]:
    """The checked mixer name of every stage."""
    depths, dims = self.depths, self.dims
    if len(depths) != len(dims) or not depths or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in depths + dims):
      raise ValueError(f"depths and dims must be equally long tuples of positive ints, got "
                       f"{depths!r} and {dims!r}")
    mixers = (self.mixers,) * len(depths) if isinstance(self.mixers, str) else tuple(
        self.mixers)
    if len(mixers) != len(depths):
      raise ValueError(f"mixers must be one name or one per stage ({len(depths)}), got "
                       f"{self.mixers!r}")
    args = dict(self.mixer_args or {})
    for name in mixers + tuple(args):
      if name not in _MIXERS:
        raise ValueError(f"unknown token mixer {name!r}; known mixers: "
                         f"{', '.join(mixer_names())}")
    for name, value in args.items():
      if not hasattr(value, "keys"):
        raise TypeError(f"mixer_args[{name!r}] must be a dict, got {type(value).__name__}")
    if self.attention_args is not None and not hasattr(self.attention_args, "keys"):
      raise TypeError(f"attention_args must be a dict, got {type(self.attention_args).__name__}")
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path!r}")
    if self.head_norm not in ("group", "layer"):
      raise ValueError(f"unknown head_norm {self.head_norm!r}; expected 'group' or 'layer'")
    return mixers

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    mixers = self._mixers()
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    depths, dims = self.depths, self.dims
    args = dict(self.mixer_args or {})
    args["attention"] = dict(args.get("attention", {}), op=self.attention,
                             op_args=self.attention_args, implementation=self.attention_impl)
    total, index = sum(depths), 0
    x = jnp.asarray(images, self.dtype)
    for stage, (depth, dim, mixer) in enumerate(zip(depths, dims, mixers)):
      if stage == 0:
        x = _embedding(dim, 7, 4, 2, self.dtype, self.param_dtype, "stem")(x)
      else:
        x = _embedding(dim, 3, 2, 1, self.dtype, self.param_dtype, f"downsample_{stage}")(x)
      for i in range(depth):
        rate = self.drop_path * index / max(total - 1, 1)
        x = MetaFormerBlock(
            mixer=mixer, mixer_args=dict(args.get(mixer, {})), mlp_ratio=self.mlp_ratio,
            layer_scale_init=self.layer_scale_init, drop_path=rate,
            approximate_gelu=self.approximate_gelu, dtype=self.dtype,
            param_dtype=self.param_dtype, name=f"stage_{stage}_block_{i}")(x, not train)
        index += 1
    if self.head_norm == "group":
      x = jnp.mean(_group_norm(self.dtype, self.param_dtype, "norm")(x), axis=(1, 2))
    else:
      x = layer_norm(self.dtype, self.param_dtype, "norm")(jnp.mean(x, axis=(1, 2)))
    if self.num_classes:
      kernel_init = (nn.initializers.zeros_init() if self.head_zeroinit
                     else nn.initializers.lecun_normal())
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                   kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "classes")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("classes",)))(x)
    return x.astype(jnp.float32)
