"""ConvNeXt (A ConvNet for the 2020s, Liu et al. 2022): a ResNet modernised towards the Swin layout.

    model = Model(num_classes=1000, variant="T")
    params = model.init(jax.random.key(0), images)["params"]     # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)  # [batch, 1000]

A "patchify" stem (a `stem_size` x `stem_size` convolution of stride `stem_size`, 4 in the paper,
then LayerNorm), then stages of blocks; between stages a LayerNorm and a 2x2 convolution of stride
2 halve the resolution. A block is

    x + DropPath(gamma * Dense(GELU(Dense_4C(LN(DWConv7x7(x))))))

with a per-channel layer scale `gamma` initialised to `layer_scale_init` (1e-6) and stochastic
depth whose rate rises linearly from 0 to `drop_path_rate` over the blocks. The head is global
average pooling, LayerNorm and a linear classifier. All LayerNorms act over channels (eps 1e-6).
The plain network has no attention; it is here as the convnet of the literature's comparisons
and as a distillation teacher (`big_attn.models.deit`). `attention_module` adds a CNN attention
module to the branch of every block of a stage, before the layer scale (`ATTENTION_MODULES`:
triplet attention, ELA, residual attention's (1 + M) ⊙ F, GAAM, DANet's position and channel
attention; the MetaFormer mixers of those names, options from `attention_module_args`).

HorNet (HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions) is
this network with a token mixer per stage (`mixers`, a MetaFormer mixer name; `gnconv` of order
2, 3, 4, 5 in the paper's stages, 7x7 depthwise, s = 1/3): its block is

    x + DropPath(gamma_1 * Mixer(LN(x))),
    then x + DropPath(gamma_2 * Dense(GELU(Dense_4C(LN(x))))),

the rest (stem, downsampling, head, layer scale 1e-6) as ConvNeXt's.

Parameter counts (224x224x3 input, 1000 classes; counted with `jax.eval_shape`, nothing
allocated) against the paper's Table (ImageNet-1K results, 224²):

| variant | depths        | dims                  | parameters  | paper  |
|---------|---------------|-----------------------|-------------|--------|
| T       | (3, 3, 9, 3)  | (96, 192, 384, 768)   |  28,589,128 |  28.6M |
| S       | (3, 3, 27, 3) | (96, 192, 384, 768)   |  50,223,688 |  50.2M |
| B       | (3, 3, 27, 3) | (128, 256, 512, 1024) |  88,591,464 |  88.6M |
| L       | (3, 3, 27, 3) | (192, 384, 768, 1536) | 197,767,336 | 197.8M |
| XL      | (3, 3, 27, 3) | (256, 512, 1024, 2048)| 350,196,968 | 350.2M |

HorNet (7x7 gⁿConv, orders 2, 3, 4, 5) against the paper's Table 1 (ImageNet-1K, 224²):

| variant  | depths        | dims                  | parameters  | paper |
|----------|---------------|-----------------------|-------------|-------|
| hornet_t | (2, 3, 18, 2) | (64, 128, 256, 512)   |  22,409,512 |   22M |
| hornet_s | (2, 3, 18, 2) | (96, 192, 384, 768)   |  49,528,264 |   50M |
| hornet_b | (2, 3, 18, 2) | (128, 256, 512, 1024) |  87,256,680 |   87M |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_attn.layers import layer_norm
from big_attn.models import common
from big_attn.models import metaformer

_DEPTHS = {"T": (3, 3, 9, 3), "S": (3, 3, 27, 3), "B": (3, 3, 27, 3), "L": (3, 3, 27, 3),
           "XL": (3, 3, 27, 3)}
_DIMS = {"T": (96, 192, 384, 768), "S": (96, 192, 384, 768), "B": (128, 256, 512, 1024),
         "L": (192, 384, 768, 1536), "XL": (256, 512, 1024, 2048)}

_HORNET_DIMS = {"hornet_t": 64, "hornet_s": 96, "hornet_b": 128}
_HORNET_ORDERS = ({"order": 2}, {"order": 3}, {"order": 4}, {"order": 5})

_INIT = nn.initializers.truncated_normal(stddev=0.02)

# CNN attention modules a block can apply to its branch (MetaFormer mixers of these names).
ATTENTION_MODULES = ("channel_self_attention", "ela", "gaam", "position_attention",
                     "residual_attention", "triplet_attention")


def decode_variant(variant: str) -> dict[str, Any]:
  """"T" -> dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)); sizes T, S, B, L, XL, and
  HorNet's hornet_t, hornet_s, hornet_b (7x7 gⁿConv: also `mixers` and `mixer_args`)."""
  if isinstance(variant, str) and variant in _HORNET_DIMS:
    base = _HORNET_DIMS[variant]
    return dict(depths=(2, 3, 18, 2), dims=(base, 2 * base, 4 * base, 8 * base),
                mixers="gnconv", mixer_args=_HORNET_ORDERS)
  if not isinstance(variant, str) or variant not in _DEPTHS:
    raise ValueError(f"unknown ConvNeXt variant {variant!r}; expected one of "
                     f"{', '.join((*_DEPTHS, *_HORNET_DIMS))}")
  return dict(depths=_DEPTHS[variant], dims=_DIMS[variant])


def _conv(features, size, *, groups=1, in_axis="channels_in", dtype, param_dtype, name):
  """Conv of stride `size` ("patchify", downsampling) or, with `groups`, same-padded depthwise."""
  stride = 1 if groups > 1 else size
  return nn.Conv(
      features, (size, size), strides=(stride, stride),
      padding="SAME" if groups > 1 else "VALID", feature_group_count=groups, dtype=dtype,
      param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(
          _INIT, ("conv_height", "conv_width", in_axis, "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class Block(nn.Module):
  """x + DropPath(gamma * A(MLP(LN(DWConv7x7(x))))) on `[batch, H, W, C]`, A the attention
  module `attention_module` (`attention_module_args`) or the identity; with a token `mixer`
  (`mixer_args`) x + DropPath(gamma_1 * Mixer(LN(x))) first and no depthwise conv in the MLP
  branch (HorNet's block)."""
  drop_path: float = 0.0
  layer_scale_init: float = 1e-6
  kernel_size: int = 7
  mixer: str | None = None
  mixer_args: Any = None
  attention_module: str | None = None
  attention_module_args: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    dim = x.shape[-1]
    dense = lambda width, axes, name: nn.Dense(  # pylint: disable=g-long-lambda
        width, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(_INIT, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))

    def residual(x, y, name):
      if self.layer_scale_init > 0:
        gamma = self.param(name, nn.with_logical_partitioning(
            nn.initializers.constant(self.layer_scale_init), ("embed",)), (dim,),
                           self.param_dtype)
        y = y * jnp.asarray(gamma, self.dtype)
      # Stochastic depth: the whole residual branch of an example is dropped (and the kept
      # ones rescaled by 1 / (1 - rate)), i.e. dropout broadcast over every non-batch axis.
      return x + nn.Dropout(rate=self.drop_path, broadcast_dims=(1, 2, 3))(y, deterministic)

    if self.mixer is None:
      y = _conv(dim, self.kernel_size, groups=dim, in_axis=None, dtype=self.dtype,
                param_dtype=self.param_dtype, name="dwconv")(x)
    else:
      y = metaformer.get_mixer(self.mixer)(
          **dict(self.mixer_args or {}), dtype=self.dtype, param_dtype=self.param_dtype,
          name="mixer")(layer_norm(self.dtype, self.param_dtype, "mixer_norm")(x))
      x = y = residual(x, y, "mixer_gamma")
    y = layer_norm(self.dtype, self.param_dtype, "norm")(y)
    y = nn.gelu(dense(4 * dim, ("embed", "mlp"), "pwconv1")(y), approximate=False)
    y = dense(dim, ("mlp", "embed"), "pwconv2")(y)
    if self.attention_module is not None:
      y = metaformer.get_mixer(self.attention_module)(
          **dict(self.attention_module_args or {}), dtype=self.dtype,
          param_dtype=self.param_dtype, name="attention")(y)
    return residual(x, y, "gamma")


class Model(nn.Module):
  """ConvNeXt classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the pooled, normalised features `[batch, dims[-1]]`.
    variant: size name for `decode_variant` ("T"); explicit `depths`/`dims` override it.
    depths, dims: blocks and channels per stage (equal lengths; 4 stages in the paper).
    stem_size: stem convolution size and stride (4 in the paper; 2 or 1 for tiny images).
    kernel_size: depthwise convolution size (7).
    drop_path_rate: stochastic depth rate of the last block (linear from 0).
    layer_scale_init: initial layer scale; 0 disables it.
    attention_module: None, a name of `ATTENTION_MODULES` for every stage, or one (or None) per
      stage; attention_module_args: its options, e.g. `{"kernel_size": 5}`.
    mixers: None (ConvNeXt's block), or a token mixer (`metaformer.mixer_names()`) for every
      stage or one (or None) per stage: HorNet's block; mixer_args: the mixer's options, one
      dict for every stage or one per stage (HorNet: `({"order": 2}, ..., {"order": 5})`).
    head_norm_eps: epsilon of the head's LayerNorm (1e-6; Hugging Face's ConvNeXt uses 1e-12).
    head_init_scale: multiplies the initial classifier weights (1.0; the paper fine-tunes with
      0.001).
    dtype: compute dtype; param_dtype: parameter dtype.
  Parameters carry the logical axis names conv_height, conv_width, channels_in, embed, mlp, norm
  and classes. Image sides must be divisible by `stem_size * 2**(len(depths) - 1)`.
  """
  num_classes: int
  variant: str | None = None
  depths: tuple[int, ...] | None = None
  dims: tuple[int, ...] | None = None
  stem_size: int = 4
  kernel_size: int = 7
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-6
  attention_module: Any = None
  attention_module_args: Any = None
  mixers: Any = None
  mixer_args: Any = None
  head_norm_eps: float = 1e-6
  head_init_scale: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("depths", "dims"))
    super().__post_init__()

  def _check(self, images):
    depths, dims = self.depths, self.dims
    if (not depths or len(depths) != len(dims)
        or not all(isinstance(v, int) and v > 0 for v in depths + dims)):
      raise ValueError(f"depths and dims must be equally long, non-empty tuples of positive "
                       f"ints, got depths={depths}, dims={dims}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
    modules = (self.attention_module if isinstance(self.attention_module, (tuple, list))
               else (self.attention_module,) * len(depths))
    if len(modules) != len(depths) or any(m is not None and m not in ATTENTION_MODULES
                                          for m in modules):
      raise ValueError(f"attention_module must be None, one of {', '.join(ATTENTION_MODULES)} "
                       f"or one of those (or None) per stage ({len(depths)}), got "
                       f"{self.attention_module!r}")
    if self.attention_module_args is not None and not hasattr(self.attention_module_args, "keys"):
      raise TypeError(f"attention_module_args must be a dict, got "
                      f"{type(self.attention_module_args).__name__}")
    mixers = (tuple(self.mixers) if isinstance(self.mixers, (tuple, list))
              else (self.mixers,) * len(depths))
    known = metaformer.mixer_names()
    if len(mixers) != len(depths) or any(m is not None and m not in known for m in mixers):
      raise ValueError(f"mixers must be None, a token mixer name ({', '.join(known)}) or one "
                       f"of those (or None) per stage ({len(depths)}), got {self.mixers!r}")
    mixer_args = (tuple(self.mixer_args) if isinstance(self.mixer_args, (tuple, list))
                  else (self.mixer_args,) * len(depths))
    if len(mixer_args) != len(depths) or not all(a is None or hasattr(a, "keys")
                                                 for a in mixer_args):
      raise TypeError(f"mixer_args must be a dict or one dict per stage ({len(depths)}), got "
                      f"{self.mixer_args!r}")
    for name in ("stem_size", "kernel_size"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    factor = self.stem_size * 2 ** (len(depths) - 1)
    if images.shape[1] % factor or images.shape[2] % factor:
      raise ValueError(f"image size {images.shape[1:3]} must be divisible by {factor} "
                       f"(stem_size {self.stem_size} x 2 per later stage)")
    return tuple(modules), mixers, mixer_args

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    modules, mixers, mixer_args = self._check(images)
    depths, dims = self.depths, self.dims
    deterministic = not train
    norm = lambda name: layer_norm(self.dtype, self.param_dtype, name)
    conv = lambda features, size, name: _conv(  # pylint: disable=g-long-lambda
        features, size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    x = jnp.asarray(images, self.dtype)
    x = norm("stem_norm")(conv(dims[0], self.stem_size, "stem")(x))
    rates = np.linspace(0.0, self.drop_path_rate, sum(depths))
    block = 0
    for stage, (depth, dim, module, mixer, args) in enumerate(
        zip(depths, dims, modules, mixers, mixer_args)):
      if stage:
        x = conv(dim, 2, f"downsample_{stage}")(norm(f"downsample_norm_{stage}")(x))
      for i in range(depth):
        x = Block(drop_path=float(rates[block]), layer_scale_init=self.layer_scale_init,
                  kernel_size=self.kernel_size, attention_module=module,
                  attention_module_args=self.attention_module_args, mixer=mixer,
                  mixer_args=args, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"stage_{stage}_block_{i}")(x, deterministic)
        block += 1
    x = layer_norm(self.dtype, self.param_dtype, "head_norm", epsilon=self.head_norm_eps)(
        jnp.mean(x, axis=(1, 2)))
    if self.num_classes:
      scaled = lambda key, shape, dtype: _INIT(key, shape, dtype) * self.head_init_scale
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="head",
                   kernel_init=nn.with_logical_partitioning(scaled, ("embed", "classes")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("classes",)))(x)
    return x.astype(jnp.float32)
