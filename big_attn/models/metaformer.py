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
  pointwise) or, with `separable=False`, ConvMixer's depthwise conv + exact GELU.
- `hyena`: HyenaPixel, the 2-D non-causal Hyena operator (`big_attn.layers.HyenaOperator`).
- `attention`: any op of `big_attn.ops` through `big_attn.layers.Attention` (`op`, `op_args`,
  `head_dim` 32 as CAFormer); ops that take `grid` get the stage's `(h, w)`.
- `gnconv` (HorNet), `bilstm2d` (Sequencer), `spectral_filter` (SpectFormer), `nin_gating`
  (NiNformer), `glu_activator` (Activator), `context_cluster` (Context Clusters),
  `large_kernel_conv` (LKCA), `oversized_conv` (ParCNetV2) and the CNN attention modules
  `triplet_attention`, `ela`, `residual_attention`, `gaam`, `position_attention`,
  `channel_self_attention` (also ConvNeXt's `attention_module`), `hat` (FasterViT's
  Hierarchical Attention: window attention with per-window carrier tokens), `visual_tokens`
  (Visual Transformers' tokenizer, token transformer and projector);
  each class's docstring gives its paper and formula.
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

Sequencer2D (Sequencer: Deep LSTM for Image Classification) is this network with the `bilstm2d`
mixer (hidden size c/4) in every stage, LayerNorm (`norm="layer"`), no layer scale, MLP ratio 3
with exact GELU, a 7x7 stride-7 patch embedding, one 2x2 downsampling and 1x1 embeddings before
stages 3 and 4 (`patch_embeddings`), LayerNorm on every position before pooling
(`head_norm="token_layer"`). Against the paper's Table 1 (one LSTM bias per gate where PyTorch
has two: 24,576 fewer parameters for S):

| variant       | depths       | dims                | parameters | paper |
|---------------|--------------|---------------------|------------|-------|
| sequencer2d_s | 4, 3, 8, 3   | 192, 384, 384, 384  | 27,627,112 |   28M |
| sequencer2d_m | 4, 3, 14, 3  | 192, 384, 384, 384  | 38,273,896 |   38M |
| sequencer2d_l | 8, 8, 16, 4  | 192, 384, 384, 384  | 54,249,064 |   54M |
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.layers import (Attention, HierarchicalAttention, HyenaOperator, MlpBlock,
                             layer_norm)
from big_attn.layers.visual_tokens import VisualTransformer
from big_attn.models import common
from big_attn.ops import checks, reduction, spatial

_DEPTHS = {"S12": (2, 2, 6, 2), "S24": (4, 4, 12, 4), "S36": (6, 6, 18, 6),
           "M36": (6, 6, 18, 6), "M48": (8, 8, 24, 8)}
_DIMS = {"S12": (64, 128, 320, 512), "S24": (64, 128, 320, 512), "S36": (64, 128, 320, 512),
         "M36": (96, 192, 384, 768), "M48": (96, 192, 384, 768)}


# Sequencer2D (Sequencer: Deep LSTM for Image Classification, Table 1): 7x7 patches, one 2x2
# downsampling, 1x1 embeddings before the last two stages (the authors' code); BiLSTM2D hidden
# size c/4, MLP ratio 3, LayerNorm, no layer scale.
_SEQUENCER_DEPTHS = {"sequencer2d_s": (4, 3, 8, 3), "sequencer2d_m": (4, 3, 14, 3),
                     "sequencer2d_l": (8, 8, 16, 4)}
_SEQUENCER = dict(dims=(192, 384, 384, 384), mlp_ratio=3.0, mixers="bilstm2d", norm="layer",
                  patch_embeddings=((7, 7, 0), (2, 2, 0), (1, 1, 0), (1, 1, 0)),
                  layer_scale_init=0.0, approximate_gelu=False, head_norm="token_layer")
# The defaults of the fields a Sequencer variant sets: PoolFormer's.
_POOLFORMER = dict(mlp_ratio=4.0, mixers="pool", norm="group", layer_scale_init=1e-5,
                   approximate_gelu=True, head_norm="group")
NORMS = ("group", "layer")
HEAD_NORMS = ("group", "layer", "token_layer")


def decode_variant(variant: str) -> dict[str, Any]:
  """"S12" -> dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), mlp_ratio=4.0) (PoolFormer
  sizes S12, S24, S36, M36, M48); sequencer2d_s, sequencer2d_m, sequencer2d_l give Sequencer2D's
  whole layout (mixers, norm, patch_embeddings, ...)."""
  if isinstance(variant, str) and variant in _SEQUENCER_DEPTHS:
    return dict(_SEQUENCER, depths=_SEQUENCER_DEPTHS[variant])
  if not isinstance(variant, str) or variant not in _DEPTHS:
    raise ValueError(f"unknown MetaFormer variant {variant!r}; expected one of "
                     f"{', '.join((*_DEPTHS, *_SEQUENCER_DEPTHS))}")
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

  def _conv(self, x, kernel, name, *, groups=None, features=None, padding="SAME",
            use_bias=True):
    """A stride-1 conv of `x` with kernel shape `kernel`; depthwise unless `groups` is given
    (`features`: output channels, default the input's)."""
    channels = x.shape[-1]
    features = channels if features is None else features
    return nn.Conv(features, kernel, padding=padding,
                   feature_group_count=channels if groups is None else groups,
                   use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.lecun_normal(),
                       ("conv_height", "conv_width", None, "mlp")[-len(kernel) - 2:]),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("mlp",)))(x)

  def _token_mlp(self, x, ratio, name, mixer):
    """Per channel, Dense(⌈ratio·N⌉) -> GELU -> Dense(N) over the N = h·w positions of `x`
    (the parameters `{name}_0`, `{name}_1`; `mixer` names the caller in errors)."""
    b, h, w, c = x.shape
    n = h * w
    if ratio <= 0:
      raise ValueError(f"{mixer}: token_mlp_ratio must be > 0, got {ratio!r}")
    hidden = max(1, int(round(ratio * n)))
    y = jnp.swapaxes(x.reshape(b, n, c), 1, 2)  # [b, c, n]
    y = self._dense(hidden, ("position", "mlp"), f"{name}_0")(y)
    y = self._dense(n, ("mlp", "position"), f"{name}_1")(nn.gelu(y))
    return jnp.swapaxes(y, 1, 2).reshape(b, h, w, c)


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
    return self._token_mlp(x, self.token_mlp_ratio, "token", "mlp_mixer")


@register_mixer("conv")
class ConvMixer(Mixer):
  """ConvFormer's separable conv (MetaFormer Baselines): Dense(expansion·c, no bias) ->
  StarReLU s·relu(x)² + β -> depthwise k×k (no bias) -> Dense(c, no bias); with
  `separable=False`, ConvMixer's (Patches Are All You Need?) depthwise k×k with bias -> exact
  GELU (the whole ConvMixer network, BatchNorm after each GELU, is `big_attn.models.convmixer`)."""
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
    x = self._conv(x, (k, k), "dwconv", use_bias=not self.separable)
    if not self.separable:
      return nn.gelu(x, approximate=False)
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


@register_mixer("gnconv")
class GnConvMixer(Mixer):
  """HorNet (Efficient High-Order Spatial Interactions with Recursive Gated Convolutions): gⁿConv
  of `order` n with widths C_k = c / 2^(n-1-k):

      [p_0, q_0 … q_{n-1}] = Dense_{2c}(x),   q_k = s · DWConv_{k×k}(q)_k   (s = 1/3),
      p_{k+1} = Dense_{C_{k+1}}(p_k) ⊙ q_k … with p_1 = p_0 ⊙ q_0,   out = Dense_c(p_n)."""
  order: int = 3
  kernel_size: int = 7
  scale: float = 1.0 / 3.0

  @nn.compact
  def __call__(self, x):
    n, c = self.order, x.shape[-1]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or c % 2 ** (n - 1):
      raise ValueError(f"gnconv mixer: order must be a positive int with channels ({c}) "
                       f"divisible by 2**(order - 1), got order={n!r}")
    dims = [c // 2 ** (n - 1 - k) for k in range(n)]
    y = self._dense(2 * c, ("embed", "mlp"), "proj_in")(x)
    p, q = y[..., :dims[0]], y[..., dims[0]:]
    q = self._conv(q, (self.kernel_size,) * 2, "dwconv") * self.scale
    qs = jnp.split(q, np.cumsum(dims)[:-1].tolist(), axis=-1)
    p = p * qs[0]
    for k in range(n - 1):
      p = self._dense(dims[k + 1], (None, "mlp"), f"pw_{k}")(p) * qs[k + 1]
    return self._dense(c, ("mlp", "embed"), "proj_out")(p)


@register_mixer("bilstm2d")
class BiLstm2dMixer(Mixer):
  """Sequencer (Sequencer: Deep LSTM for Image Classification), BiLSTM2D: a bidirectional LSTM
  of hidden size D = `hidden_ratio`·c (1/4) down every column and one along every row,

      out = Dense_c([BiLSTM_v(x), BiLSTM_h(x)]),
      LSTM: [i, f, g, o] = x_t W + h_{t-1} U + b,  c_t = σ(f)·c_{t-1} + σ(i)·tanh(g),
            h_t = σ(o)·tanh(c_t)  (gates in PyTorch's order)."""
  hidden_ratio: float = 0.25

  def _lstm(self, x, hidden, name):
    """[n, length, c] -> [n, length, hidden], one direction."""
    w = self._param(f"{name}_w", nn.initializers.xavier_uniform(), (x.shape[-1], 4 * hidden),
                    ("embed", "mlp"))
    u = self._param(f"{name}_u", nn.initializers.orthogonal(), (hidden, 4 * hidden),
                    (None, "mlp"))
    b = self._param(f"{name}_b", nn.initializers.zeros_init(), (4 * hidden,), ("mlp",))

    def step(carry, gates):
      h, cell = carry
      i, f, g, o = jnp.split(gates + h @ u, 4, axis=-1)
      cell = nn.sigmoid(f) * cell + nn.sigmoid(i) * jnp.tanh(g)
      h = nn.sigmoid(o) * jnp.tanh(cell)
      return (h, cell), h

    zeros = jnp.zeros((x.shape[0], hidden), w.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(jnp.asarray(x, w.dtype) @ w + b, 0, 1))
    return jnp.swapaxes(hs, 0, 1)

  def _bilstm(self, x, hidden, name):
    return jnp.concatenate([self._lstm(x, hidden, f"{name}_fwd"),
                            self._lstm(x[:, ::-1], hidden, f"{name}_bwd")[:, ::-1]], axis=-1)

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if not self.hidden_ratio > 0:
      raise ValueError(f"bilstm2d mixer: hidden_ratio must be > 0, got {self.hidden_ratio!r}")
    hidden = max(1, int(round(self.hidden_ratio * c)))
    v = self._bilstm(jnp.swapaxes(x, 1, 2).reshape(b * w, h, c), hidden, "vertical")
    v = jnp.swapaxes(v.reshape(b, w, h, 2 * hidden), 1, 2)
    hz = self._bilstm(x.reshape(b * h, w, c), hidden, "horizontal").reshape(b, h, w, 2 * hidden)
    return self._dense(c, ("mlp", "embed"), "fc")(jnp.concatenate([v, hz], axis=-1))


@register_mixer("spectral_filter")
class SpectralFilterMixer(Mixer):
  """SpectFormer (SpectFormer: Frequency and Attention is what you need in a Vision Transformer),
  its spectral layer, GFNet's global filter: out = IFFT2(W ⊙ FFT2(x)) with the real 2-D FFT over
  the stage's (h, w) (orthonormal) and a learned complex W of shape [h, ⌊w/2⌋+1, c] (so the
  image size is fixed by the parameters), initialised N(0, 0.02²)."""

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    weight = self._param("filter", nn.initializers.normal(0.02), (h, w // 2 + 1, c, 2),
                         (None, None, "embed", None)).astype(jnp.float32)
    spectrum = jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2), norm="ortho")
    spectrum = spectrum * jax.lax.complex(weight[..., 0], weight[..., 1])
    return jnp.fft.irfft2(spectrum, s=(h, w), axes=(1, 2), norm="ortho").astype(x.dtype)


@register_mixer("nin_gating")
class NinGatingMixer(Mixer):
  """NiNformer (A Network in Network Transformer with Token Mixing Generated Gating Function):
  an element-wise gate generated by an inner token-mixing MLP (MLP-Mixer's),

      u = Dense_c(x),   g = TokenMLP(u),   out = Dense_c(u ⊙ g),

  TokenMLP as `mlp_mixer` (Dense(⌈r·N⌉) -> GELU -> Dense(N) over the N = h·w positions,
  r = `token_mlp_ratio` 0.5; the image size is fixed by the parameters)."""
  token_mlp_ratio: float = 0.5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    u = self._dense(c, ("embed", "mlp"), "proj_in")(x)
    g = self._token_mlp(u, self.token_mlp_ratio, "token", "nin_gating")
    return self._dense(c, ("mlp", "embed"), "proj_out")(u * g)


@register_mixer("glu_activator")
class GluActivatorMixer(Mixer):
  """Activator (Activator: GLU Activations as The Core Functions of a Vision Transformer):
  attention replaced by a token-mixing MLP with a gated linear unit, per channel over the
  N = h·w positions (hidden ⌈r·N⌉, r = `token_mlp_ratio` 0.5; image size fixed by the
  parameters):  out = W_o [(W_a x) ⊙ σ(W_b x)]  (GLU with the sigmoid)."""
  token_mlp_ratio: float = 0.5

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    n = h * w
    if self.token_mlp_ratio <= 0:
      raise ValueError(f"glu_activator: token_mlp_ratio must be > 0, got "
                       f"{self.token_mlp_ratio!r}")
    hidden = max(1, int(round(self.token_mlp_ratio * n)))
    y = jnp.swapaxes(x.reshape(b, n, c), 1, 2)  # [b, c, n]
    a = self._dense(hidden, ("position", "mlp"), "value")(y)
    g = self._dense(hidden, ("position", "mlp"), "gate")(y)
    y = self._dense(n, ("mlp", "position"), "out")(a * nn.sigmoid(g))
    return jnp.swapaxes(y, 1, 2).reshape(b, h, w, c)


def _adaptive_pool_matrix(size: int, bins: int) -> np.ndarray:
  """`[bins, size]` averaging weights of adaptive average pooling (PyTorch's bins: from
  ⌊i·size/bins⌋ to ⌈(i+1)·size/bins⌉)."""
  out = np.zeros((bins, size), np.float32)
  for i in range(bins):
    lo, hi = (i * size) // bins, -((-(i + 1) * size) // bins)
    out[i, lo:hi] = 1.0 / (hi - lo)
  return out


@register_mixer("context_cluster")
class ContextClusterMixer(Mixer):
  """Context Clusters (Image as Set of Points), per head of c/`num_heads` channels: points
  f = Dense(x), values v = Dense(x); M = p_h×p_w centres (`proposals`, (2, 2), clipped to the
  map) f_c, v_c by adaptive average pooling; similarity s_ij = σ(α·cos(f_i, f_c_j) + β) (α = 1,
  β = 0 learned), each point kept only for its most similar centre (s_ij = 0 for the others);
  aggregate g_j = (v_c_j + Σ_i s_ij v_i) / (1 + Σ_i s_ij); dispatch out_i = Σ_j s_ij g_j;
  then Dense_c. Clustering is over the whole map (the paper's last stages; no local regions)."""
  proposals: tuple[int, int] = (2, 2)
  num_heads: int = 4

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    heads = self.num_heads
    if not isinstance(heads, int) or heads < 1 or c % heads:
      raise ValueError(f"context_cluster mixer: num_heads must be a positive int dividing the "
                       f"channels ({c}), got {heads!r}")
    if len(self.proposals) != 2 or min(self.proposals) < 1:
      raise ValueError(f"context_cluster mixer: proposals must be two positive ints, got "
                       f"{self.proposals!r}")
    ph, pw = min(self.proposals[0], h), min(self.proposals[1], w)
    split = lambda y: y.reshape(b, h, w, heads, c // heads)
    f = split(self._dense(c, ("embed", "mlp"), "f")(x))
    v = split(self._dense(c, ("embed", "mlp"), "v")(x))
    pool = lambda y: jnp.einsum("ph,qw,bhwnd->bnpqd", _adaptive_pool_matrix(h, ph),
                                _adaptive_pool_matrix(w, pw), y).reshape(b, heads, ph * pw, -1)
    fc, vc = pool(f), pool(v)
    tokens = lambda y: jnp.swapaxes(y.reshape(b, h * w, heads, -1), 1, 2)  # [b, heads, n, d]
    f, v = tokens(f), tokens(v)
    unit = lambda y: y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
    alpha = self._param("alpha", nn.initializers.ones_init(), (), ())
    beta = self._param("beta", nn.initializers.zeros_init(), (), ())
    sim = nn.sigmoid(alpha * jnp.einsum("bnid,bnjd->bnij", unit(f), unit(fc)) + beta)
    sim = sim * jax.nn.one_hot(jnp.argmax(sim, axis=-1), ph * pw, dtype=sim.dtype)
    agg = (vc + jnp.einsum("bnij,bnid->bnjd", sim, v)) / (1.0 + sim.sum(axis=2)[..., None])
    out = jnp.einsum("bnij,bnjd->bind", sim, agg).reshape(b, h, w, c)
    return self._dense(c, ("mlp", "embed"), "proj")(out)


@register_mixer("large_kernel_conv")
class LargeKernelConvMixer(Mixer):
  """LKCA (LKCA: Large Kernel Convolutional Attention): attention replaced by one large-kernel
  convolution, out_i = W_o Σ_j K_{i-j} ⊙ (W_v x_j), i.e. Dense_c -> depthwise k×k
  (`kernel_size` 7, zero padded, our default: the abstract fixes none) -> Dense_c; the
  kernel plays the role of the attention weights, a function of the relative position only."""
  kernel_size: int = 7

  @nn.compact
  def __call__(self, x):
    k, c = self.kernel_size, x.shape[-1]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
      raise ValueError(f"large_kernel_conv mixer: kernel_size must be a positive int, got {k!r}")
    v = self._dense(c, ("embed", "mlp"), "value")(x)
    return self._dense(c, ("mlp", "embed"), "proj")(self._conv(v, (k, k), "dwconv"))


@register_mixer("oversized_conv")
class OversizedConvMixer(Mixer):
  """ParCNetV2 (ParCNetV2: Oversized Kernel with Enhanced Attention): oversized depthwise
  convolutions and a bifurcate gate unit,

      u = Dense_c(x),  a = Dense_c(x),  a = [DWConv_{(2h-1)×1}(a_{:c/2}), DWConv_{1×(2w-1)}(a_{c/2:})],
      out = Dense_c(u ⊙ a),

  kernels twice the map (zero padded by h-1, w-1: global, position-dependent effective kernels;
  the image size is fixed by the parameters)."""

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    if c < 2:
      raise ValueError(f"oversized_conv mixer: needs at least 2 channels, got {c}")
    u = self._dense(c, ("embed", "mlp"), "value")(x)
    a = self._dense(c, ("embed", "mlp"), "gate")(x)
    half = c // 2
    a = jnp.concatenate([
        self._conv(a[..., :half], (2 * h - 1, 1), "conv_v", padding=((h - 1, h - 1), (0, 0))),
        self._conv(a[..., half:], (1, 2 * w - 1), "conv_h", padding=((0, 0), (w - 1, w - 1)))],
        axis=-1)
    return self._dense(c, ("mlp", "embed"), "proj")(u * a)


def _z_pool(x, axis):
  """Triplet attention's Z-pool: [max, mean] over `axis`, stacked as the last axis."""
  return jnp.stack([x.max(axis=axis), x.mean(axis=axis)], axis=-1)


@register_mixer("triplet_attention")
class TripletAttentionMixer(Mixer):
  """Triplet attention (Rotate to Attend: Convolutional Triplet Attention Module): three branches
  each Z-pool ([max, mean]) over one axis, a k×k conv (2 -> 1, `kernel_size` 7) and a sigmoid,
  giving gates over (h, c), (w, c) and (h, w); out = x ⊙ (g_hc + g_wc + g_hw) / 3. The conv has a
  bias in place of the paper's BatchNorm (no batch statistics in the block)."""
  kernel_size: int = 7

  @nn.compact
  def __call__(self, x):
    k = (self.kernel_size,) * 2
    gate = lambda z, name: nn.sigmoid(self._conv(z, k, name, groups=1, features=1))[..., 0]
    g_hc = gate(_z_pool(x, 2), "conv_hc")[:, :, None, :]
    g_wc = gate(_z_pool(x, 1), "conv_wc")[:, None, :, :]
    g_hw = gate(_z_pool(x, 3), "conv_hw")[..., None]
    return x * (g_hc + g_wc + g_hw) / 3.0


@register_mixer("ela")
class EfficientLocalAttentionMixer(Mixer):
  """ELA (ELA: Efficient Local Attention for Deep Convolutional Neural Networks), ELA-B by
  default: the means over rows and over columns, one shared depthwise 1-D conv (`kernel_size` 7,
  no bias), one shared GroupNorm (`num_groups` 16) and a sigmoid,

      a_h = σ(GN(Conv1d(mean_w x))),  a_w = σ(GN(Conv1d(mean_h x))),  out = x ⊙ a_h ⊙ a_w."""
  kernel_size: int = 7
  num_groups: int = 16

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if not isinstance(self.num_groups, int) or self.num_groups < 1 or c % self.num_groups:
      raise ValueError(f"ela mixer: num_groups must be a positive int dividing the channels "
                       f"({c}), got {self.num_groups!r}")
    conv = nn.Conv(c, (self.kernel_size,), padding="SAME", feature_group_count=c,
                   use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            ("conv_width", None, "mlp")))
    norm = nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-5, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="norm",
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("norm",)))
    a_h = nn.sigmoid(norm(conv(x.mean(axis=2))))[:, :, None, :]
    a_w = nn.sigmoid(norm(conv(x.mean(axis=1))))[:, None, :, :]
    return x * a_h * a_w


@register_mixer("residual_attention")
class ResidualAttentionMixer(Mixer):
  """Residual Attention Network: attention residual learning (1 + M(x)) ⊙ F(x), the trunk F
  the input (in a ConvNeXt block: the block's branch), the soft mask M one bottom-up top-down
  level:  M = σ(Dense_c(ReLU(Dense_c(Up(ReLU(DWConv_{k×k}(MaxPool_{3×3, stride 2}(x)))))))),
  Up bilinear back to (h, w)."""
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    m = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    m = nn.relu(self._conv(m, (self.kernel_size,) * 2, "dwconv"))
    m = jax.image.resize(m, (b, h, w, c), method="bilinear")
    m = nn.relu(self._dense(c, ("embed", "mlp"), "mask_0")(m))
    m = nn.sigmoid(self._dense(c, ("mlp", "embed"), "mask_1")(m))
    return (1.0 + m) * x


@register_mixer("gaam")
class GaussianAdaptiveAttentionMixer(Mixer):
  """GAAM (Gaussian Adaptive Attention is All You Need) as a feature gate: per example and
  channel the mean μ and variance σ² over the positions; per head (c/`num_heads` channels, 4)
  `num_gaussians` (1) learned mean offsets δ_g (0) and scales ξ_g (1),

      out = x ⊙ Π_g exp(−(x − μ − δ_g)² / (2 ξ_g² (σ² + ε))),  ε = 1e-5

  (head and Gaussian counts are ours; the paper varies them per task)."""
  num_heads: int = 4
  num_gaussians: int = 1

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    heads, count = self.num_heads, self.num_gaussians
    if not isinstance(heads, int) or heads < 1 or c % heads:
      raise ValueError(f"gaam mixer: num_heads must be a positive int dividing the channels "
                       f"({c}), got {heads!r}")
    if not isinstance(count, int) or count < 1:
      raise ValueError(f"gaam mixer: num_gaussians must be a positive int, got {count!r}")
    offset = jnp.repeat(self._param("mean_offset", nn.initializers.zeros_init(),
                                    (count, heads), (None, "heads")), c // heads, axis=-1)
    scale = jnp.repeat(self._param("scale", nn.initializers.ones_init(), (count, heads),
                                   (None, "heads")), c // heads, axis=-1)
    mu = x.mean(axis=(1, 2), keepdims=True)
    var = x.var(axis=(1, 2), keepdims=True) + 1e-5
    z = sum((x - mu - offset[g]) ** 2 / (2.0 * scale[g] ** 2 * var) for g in range(count))
    return x * jnp.exp(-z)


@register_mixer("position_attention")
class PositionAttentionMixer(Mixer):
  """The position attention module of DANet (Dual Attention Network for Scene Segmentation), as
  Multi-scale self-guided attention for medical image segmentation uses it beside channel
  attention: with 1x1 convolutions (per-position Dense) B, C to c/`reduction` channels and D to
  c, over the N = h·w positions

      S_ij = softmax_j(B_i · C_j),   out_i = x_i + γ Σ_j S_ij D_j,

  γ a learned scalar initialised to 0 (the module starts as the identity)."""
  reduction: int = 8

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if not isinstance(self.reduction, int) or self.reduction < 1 or c % self.reduction:
      raise ValueError(f"position_attention mixer: reduction must be a positive int dividing "
                       f"the channels ({c}), got {self.reduction!r}")
    tokens = x.reshape(b, h * w, c)
    query = self._dense(c // self.reduction, ("embed", "mlp"), "query")(tokens)
    key = self._dense(c // self.reduction, ("embed", "mlp"), "key")(tokens)
    value = self._dense(c, ("embed", "mlp"), "value")(tokens)
    weights = jax.nn.softmax(jnp.einsum("bid,bjd->bij", query, key), axis=-1)
    gamma = self._param("gamma", nn.initializers.zeros_init(), (), ())
    return x + gamma * jnp.einsum("bij,bjc->bic", weights, value).reshape(b, h, w, c)


@register_mixer("channel_self_attention")
class ChannelSelfAttentionMixer(Mixer):
  """The channel attention module of DANet (Dual Attention Network for Scene Segmentation), the
  other module of Multi-scale self-guided attention for medical image segmentation: with
  E_ij = Σ_n x_i(n) x_j(n) over the N = h·w positions ([c, c], no projections),

      A_ij = softmax_j(max_k E_ik − E_ij) = softmax_j(−E_ij),   out_i = x_i + β Σ_j A_ij x_j,

  β a learned scalar initialised to 0: the `channel_attention` op with queries −x, keys and
  values x, one head and scale 1."""

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, 1, c)
    mixed = reduction.channel_attention(-tokens, tokens, tokens, scale=1.0)
    beta = self._param("beta", nn.initializers.zeros_init(), (), ())
    return x + beta * mixed.reshape(b, h, w, c)


@register_mixer("visual_tokens")
class VisualTokensMixer(Mixer):
  """Visual Transformers: Token-based Image Representation and Processing for Computer Vision:
  `num_modules` VT modules in a row (`big_attn.layers.visual_tokens.VisualTransformer`), the
  first with the filter-based tokenizer, the others recurrent on the previous module's tokens; each
  returns X + softmax_L((X W_Q)(T W_K)ᵀ)(T W_V) over its `num_tokens` visual tokens (the token
  transformer's attention: the registered op `op`, `op_args`)."""
  num_tokens: int = 16
  token_dim: int | None = None
  num_heads: int = 1
  mlp_ratio: float = 4.0
  num_modules: int = 1
  op: str = "softmax"
  op_args: Any = None

  @nn.compact
  def __call__(self, x):
    tokens = None
    for i in range(checks.positive_int("visual_tokens mixer: num_modules", self.num_modules)):
      x, tokens = VisualTransformer(
          num_tokens=self.num_tokens, token_dim=self.token_dim, num_heads=self.num_heads,
          mlp_ratio=self.mlp_ratio, op=self.op, op_args=self.op_args, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f"vt_{i}")(x, tokens)
    return x


@register_mixer("hat")
class HierarchicalAttentionMixer(Mixer):
  """FasterViT's Hierarchical Attention (FasterViT: Fast Vision Transformers with Hierarchical
  Attention; `big_attn.layers.HierarchicalAttention`): window attention joined to per-window
  carrier tokens that attend globally, heads of `head_dim`, the window clipped to the map
  (min(window, h, w)). The block adds the residual, so the mixer returns HAT(x) − x (as
  PoolFormer's pool − x)."""
  window: int = 7
  carriers_per_window: int = 1
  head_dim: int = 32
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    if not isinstance(self.head_dim, int) or self.head_dim < 1 or c % self.head_dim:
      raise ValueError(f"hat mixer: channels ({c}) must be divisible by head_dim "
                       f"({self.head_dim!r})")
    window = min(self.window, h, w) if isinstance(self.window, int) else self.window
    return HierarchicalAttention(
        num_heads=c // self.head_dim, window=window, carriers_per_window=min(
            self.carriers_per_window, window * window), mlp_ratio=self.mlp_ratio,
        dtype=self.dtype, param_dtype=self.param_dtype, name="hat")(x) - x


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
  """x + LS(Mixer(N(x))), then x + LS(MLP(N(x))), with stochastic depth `drop_path`; N GroupNorm(1)
  (`norm="group"`) or LayerNorm over channels (eps 1e-6, "layer"); no LS with
  `layer_scale_init=0`."""
  mixer: str
  mixer_args: Any = None
  mlp_ratio: float = 4.0
  norm: str = "group"
  layer_scale_init: float = 1e-5
  drop_path: float = 0.0
  approximate_gelu: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    c = x.shape[-1]

    norm = _group_norm if self.norm == "group" else layer_norm

    def residual(y, name):
      if self.layer_scale_init:
        scale = self.param(name, nn.with_logical_partitioning(
            nn.initializers.constant(self.layer_scale_init), ("embed",)), (c,),
                           self.param_dtype)
        y = y * jnp.asarray(scale, y.dtype)
      return x + nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3))(y, deterministic)

    y = norm(self.dtype, self.param_dtype, "norm1")(x)
    y = get_mixer(self.mixer)(**dict(self.mixer_args or {}), dtype=self.dtype,
                              param_dtype=self.param_dtype, name="mixer")(y)
    x = residual(y, "layer_scale1")
    y = norm(self.dtype, self.param_dtype, "norm2")(x)
    y = MlpBlock(mlp_dim=int(self.mlp_ratio * c), approximate_gelu=self.approximate_gelu,
                 dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)
    return residual(y, "layer_scale2")


class Model(nn.Module):
  """MetaFormer classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the pooled features `[batch, dims[-1]]`.
    variant: PoolFormer size or Sequencer2D variant for `decode_variant` ("S12",
      "sequencer2d_s"); explicit fields override it.
    depths, dims: blocks and channels per stage (needed without a variant).
    mlp_ratio: MLP hidden width over channels (4).
    mixers: a mixer name for every stage, or one name per stage (`mixer_names()`; "pool").
    norm: the blocks' norm, "group" (GroupNorm(1), PoolFormer) or "layer" (LayerNorm over
      channels, eps 1e-6: Sequencer).
    patch_embeddings: per stage `(kernel, stride, padding)` of its strided-conv embedding, or
      None for none (the stage then keeps the previous stage's channels); default PoolFormer's
      (7, 4, 2), then (3, 2, 1). Sequencer2D: ((7, 7, 0), (2, 2, 0), (1, 1, 0), (1, 1, 0)).
    mixer_args: `{mixer name: dict of its options}`, e.g. `{"attention": {"head_dim": 16}}`.
    attention, attention_args, attention_impl: the attention mixer's op by registry name, its
      arguments and `implementation` (`mixer_args={"attention": {"op": ..., "op_args": ...}}`
      is deprecated).
    layer_scale_init: initial layer scale (1e-5, PoolFormer); 0: none (Sequencer).
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
  mixers: Any = None
  norm: str | None = None
  patch_embeddings: Any = None
  mixer_args: Any = None
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  layer_scale_init: float | None = None
  drop_path: float = 0.0
  approximate_gelu: bool | None = None
  head_norm: str | None = None
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("depths", "dims"),
                           defaults=_POOLFORMER)
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
    if self.head_norm not in HEAD_NORMS:
      raise ValueError(f"unknown head_norm {self.head_norm!r}; expected one of {HEAD_NORMS}")
    if self.norm not in NORMS:
      raise ValueError(f"unknown norm {self.norm!r}; expected one of {NORMS}")
    return mixers, self._patch_embeddings()

  def _patch_embeddings(self) -> tuple[Any, ...]:
    """The checked `(kernel, stride, padding)` or None of every stage."""
    depths, dims = self.depths, self.dims
    embeddings = self.patch_embeddings
    if embeddings is None:
      return ((7, 4, 2),) + ((3, 2, 1),) * (len(depths) - 1)
    embeddings = tuple(None if e is None else tuple(e) for e in embeddings)
    ok = len(embeddings) == len(depths) and embeddings[0] is not None and all(
        e is None or (len(e) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                          for v in e) and min(e[:2]) >= 1 and e[2] >= 0)
        for e in embeddings)
    if not ok:
      raise ValueError(f"patch_embeddings must give per stage ({len(depths)}) a (kernel, "
                       f"stride, padding) of ints or None, the first stage's not None, got "
                       f"{self.patch_embeddings!r}")
    for stage, e in enumerate(embeddings):
      if e is None and dims[stage] != dims[stage - 1]:
        raise ValueError(f"patch_embeddings[{stage}] is None but dims change from "
                         f"{dims[stage - 1]} to {dims[stage]}: the stage needs an embedding")
    return embeddings

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    mixers, embeddings = self._mixers()
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    depths, dims = self.depths, self.dims
    args = dict(self.mixer_args or {})
    args["attention"] = dict(args.get("attention", {}), op=self.attention,
                             op_args=self.attention_args, implementation=self.attention_impl)
    total, index = sum(depths), 0
    x = jnp.asarray(images, self.dtype)
    for stage, (depth, dim, mixer, embedding) in enumerate(zip(depths, dims, mixers,
                                                                embeddings)):
      if embedding is not None:
        x = _embedding(dim, *embedding, self.dtype, self.param_dtype,
                       f"downsample_{stage}" if stage else "stem")(x)
      for i in range(depth):
        rate = self.drop_path * index / max(total - 1, 1)
        x = MetaFormerBlock(
            mixer=mixer, mixer_args=dict(args.get(mixer, {})), mlp_ratio=self.mlp_ratio,
            norm=self.norm, layer_scale_init=self.layer_scale_init, drop_path=rate,
            approximate_gelu=self.approximate_gelu, dtype=self.dtype,
            param_dtype=self.param_dtype, name=f"stage_{stage}_block_{i}")(x, not train)
        index += 1
    if self.head_norm == "group":
      x = jnp.mean(_group_norm(self.dtype, self.param_dtype, "norm")(x), axis=(1, 2))
    elif self.head_norm == "token_layer":
      x = jnp.mean(layer_norm(self.dtype, self.param_dtype, "norm")(x), axis=(1, 2))
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
