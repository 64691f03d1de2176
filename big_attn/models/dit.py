"""Diffusion Transformers: DiT (Peebles & Xie 2023) with PixArt-α's cross-attention (Chen et al.).

    model = Model(num_classes=1000, variant="XL/2")
    params = model.init(jax.random.key(0), latents)["params"]        # latents: [b, 32, 32, 4]
    out = model.apply({"params": params}, x_t, t, labels)             # [b, 32, 32, 8]: ε, σ
    images = sample(model, params, labels, rng, num_steps=50, guidance_scale=4.0,
                    image_shape=(32, 32, 4))
    images = sample(..., attention_reuse={"method": "pab"})  # big_attn.layers.attention_reuse

The noised image `[b, H, W, C]` is cut into p x p patches (a strided convolution), a fixed 2-D
sine-cosine position embedding is added, and `depth` DiT blocks with adaLN-Zero conditioning
run over the tokens: with c = MLP(sinusoid(t)) + embed(label) and (β₁, γ₁, α₁, β₂, γ₂, α₂) =
Linear(SiLU(c)) (zero-initialised, so every block starts as the identity),

    x = x + α₁ · Attn(LN(x) (1 + γ₁) + β₁)
    x = x + CrossAttn(x, cond_tokens)                    (optional, PixArt-α)
    x = x + α₂ · MLP(LN(x) (1 + γ₂) + β₂)

then a final adaLN layer and a zero-initialised linear map back to p x p x C (ε) or 2C (ε and
the interpolation v of the learned variance, `learn_sigma`) values per patch. The self-attention
is any op of `big_attn.ops` by name (`attention`, `attention_args`). With `proxy_tokens`
it is PT-DiT's (Qihoo-T2X: An Efficiency-Focused Diffusion Transformer via Proxy Tokens for
Text-to-Any-Task): one token sampled per window does global attention, all tokens cross-attend
to those proxies, and window plus shifted window attention add the local detail.

Conditioning. The class label (with a null class for classifier-free guidance, dropped to it
with probability `class_dropout` in training) enters adaLN (`class_adaln`, DiT), cross-attention
(`cross_attention`, PixArt-α: each block attends to condition tokens after its self-attention;
the cross-attention output projection starts at zero) or both. The condition tokens are
`num_cond_tokens` learned tokens per class, or, with `cond_dim`, caller-given `cond_tokens`
`[b, n, cond_dim]` (text-encoder features, with an optional `cond_mask`) projected by an MLP,
whose null condition is a learned `[num_cond_tokens, cond_dim]` array (PixArt's y_embedding).
`adaln_single` is PixArt-α's adaLN-single: one Linear(SiLU(c)) -> 6·width shared by all blocks
plus a learned `[6, width]` table per block (not the identity at init, as in PixArt).

Diffusion (`TASK`, `sample`): DDPM with `num_timesteps` = 1000 steps of the linear β schedule
(1e-4 .. 0.02), t uniform, loss = mean (ε - ε̂)² plus, with `learn_sigma`, the variational bound
term of Improved DDPM (Nichol & Dhariwal 2021) for the variance (the mean's gradient stopped),
as DiT's training. `sample` is DDIM (η = 0 by default) with classifier-free guidance
ε = ε_∅ + s (ε_y - ε_∅) on every channel (DiT's code guides only the first three channels).

The DiT paper trains in the latent space of the Stable Diffusion VAE (256² images -> 32x32x4
latents, scaled by 0.18215); the VAE is not part of this codebase: the model takes latents (or,
as `configs/dit_digits.py`, small pixel images) directly.

Parameter counts (32x32x4 latents, 1000 classes, learn_sigma, class dropout 0.1; counted with
`jax.eval_shape`, nothing allocated) next to DiT's Table 1 (33M, 130M, 458M, 675M; the official
code's 675,129,632 for XL/2 also counts its frozen position embedding, 256 x 1152):

| variant | width | depth | heads | /2          | /4          | /8          | paper |
|---------|-------|-------|-------|-------------|-------------|-------------|-------|
| S       |   384 |    12 |     6 |  32,865,056 |  32,920,448 |  33,142,016 |   33M |
| B       |   768 |    12 |    12 | 130,315,808 | 130,426,496 | 130,869,248 |  130M |
| L       |  1024 |    24 |    16 | 457,840,672 | 457,988,224 | 458,578,432 |  458M |
| XL      |  1152 |    28 |    16 | 674,834,720 | 675,000,704 | 675,664,640 |  675M |

Cross-attention in every block (one learned token per class) brings XL/2 to 824,752,544.
PixArt-α XL/2 (`cross_attention=True, adaln_single=True, class_adaln=False, cond_dim=4096,
num_cond_tokens=120`, T5 features): 611,347,616, of which 491,520 are the learned null
caption (a buffer in PixArt's code); the paper reports 0.6B.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.layers import Attention, MlpBlock, posemb_sincos_2d
from big_attn.layers import attention_reuse as attention_reuse_lib
from big_attn.layers.attention import Projection
from big_attn.models import common
from big_attn.models.vit import REMAT_POLICIES
from big_attn import tasks
from big_attn.ops import spatial

# DiT Table 1 (models.py of facebookresearch/DiT): width, depth, heads.
_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
_PATCHES = (2, 4, 8)
_FREQ_DIM = 256  # sinusoidal timestep features before the MLP (DiT's frequency_embedding_size)


def decode_variant(variant: str) -> dict[str, Any]:
  """"XL/2" -> dict(width=1152, depth=28, num_heads=16, mlp_dim=4608, patch_size=(2, 2))."""
  match = re.fullmatch(r"(S|B|L|XL)/(\d+)", variant) if isinstance(variant, str) else None
  if match is None or int(match.group(2)) not in _PATCHES:
    raise ValueError(f"unknown DiT variant {variant!r}; expected SIZE/PATCH with SIZE in "
                     f"{', '.join(_SIZES)} and PATCH in {_PATCHES} (e.g. 'XL/2')")
  width, depth, heads = _SIZES[match.group(1)]
  p = int(match.group(2))
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width, patch_size=(p, p))


def _dense(features, axes, name, init, dtype, param_dtype):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def _norm(x, dtype):
  """LayerNorm without scale or bias (eps 1e-6), as DiT's blocks."""
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype)(x)


def timestep_features(t: jax.Array, dim: int = _FREQ_DIM, max_period: float = 10_000.
                      ) -> jax.Array:
  """`[b]` timesteps -> `[b, dim]` [cos(t ω), sin(t ω)], ω_k = max_period^(-k / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class _CrossAttention(Attention):
  """`Attention` whose output projection starts at zero (PixArt-α's cross-attention init)."""

  def _projection(self, shape, logical_axes, name, contract=1, use_bias=None):
    if name != "out":
      return super()._projection(shape, logical_axes, name, contract, use_bias)
    return Projection(shape=shape, logical_axes=logical_axes, contract=contract,
                      use_bias=self.use_bias if use_bias is None else use_bias,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.zeros_init(), name=name)


def proxy_token_indices(batch: int, grid: tuple[int, int], window: int,
                        rng: jax.Array | None = None) -> jax.Array:
  """`[batch, (h/window)·(w/window)]` row-major token indices of the proxy tokens of PT-DiT
  (Qihoo-T2X: An Efficiency-Focused Diffusion Transformer via Proxy Tokens for Text-to-Any-Task).

  The `grid=(h, w)` token image is cut into `window x window` windows (row-major); each gives
  one token: a uniformly random one per example and window from `rng` (training, the paper's
  sampling), or, with `rng=None` (evaluation and DDIM sampling), the window's centre token
  (row and column `window // 2` inside it), a fixed token of the window.
  """
  h, w = grid
  if not isinstance(window, int) or isinstance(window, bool) or window < 1:
    raise ValueError(f"proxy_tokens (the proxy window) must be a positive int, got {window!r}")
  if h % window or w % window:
    raise ValueError(f"proxy_tokens window {window} must divide the token grid {(h, w)}")
  rows, cols = np.meshgrid(np.arange(h // window) * window, np.arange(w // window) * window,
                           indexing="ij")
  corners = jnp.asarray((rows * w + cols).reshape(-1))                 # [P]
  if rng is None:
    offset = jnp.full((batch, corners.shape[0]), (window // 2) * (w + 1))
  else:
    inside = jax.random.randint(rng, (batch, corners.shape[0]), 0, window * window)
    offset = (inside // window) * w + inside % window
  return corners[None] + offset


class _PTDiTSettings(nn.Module):
  """The settings PT-DiT's attention modules share: heads, the proxy window, the token grid, the
  proxies' op, and whether proxies are sampled at random (training) or the window centres."""
  num_heads: int
  window: int
  grid: tuple[int, int]
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  qk_norm: bool = False
  use_bias: bool = True
  sample: bool = False
  kernel_init: Any = nn.initializers.xavier_uniform()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _attention_args(self) -> dict[str, Any]:
    """The settings every `Attention` layer of these modules takes."""
    return dict(num_heads=self.num_heads, qk_norm=self.qk_norm, use_bias=self.use_bias,
                kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)


class ProxyTokenAttention(_PTDiTSettings):
  """PT-DiT's Global Information Interaction Module (Qihoo-T2X: An Efficiency-Focused Diffusion
  Transformer via Proxy Tokens for Text-to-Any-Task).

  From the `[b, h·w, width]` tokens x of the `grid`, one proxy token per `window x window`
  window is taken (`proxy_token_indices`: random with `sample`, else the centre token), the
  proxies p do self-attention with the `attention` op, and every token cross-attends to them:

      p' = Attn(p, p),   out = CrossAttn(x, p')          (softmax; queries: all tokens)

  so the global mixing costs O(N·N/window²) instead of O(N²). The proxies' token indices are
  sown as the intermediate "proxy_index" `[b, P]`.
  """

  @nn.compact
  def __call__(self, x):
    rng = self.make_rng("dropout") if self.sample else None
    index = proxy_token_indices(x.shape[0], self.grid, self.window, rng)
    self.sow("intermediates", "proxy_index", index)
    proxies = jnp.take_along_axis(x, index[..., None], axis=1)          # [b, P, width]
    attn = self._attention_args()
    proxies = Attention(op=self.attention, op_args=self.attention_args,
                        implementation=self.attention_impl, name="proxy_attn", **attn)(proxies)
    return Attention(name="proxy_cross_attn", **attn)(x, proxies)


class PTDiTAttention(_PTDiTSettings):
  """PT-DiT's attention (Qihoo-T2X): the global proxy-token module plus the local texture
  branch, window attention and shifted window attention (Swin's cyclic shift of window // 2),
  both with `window x window` windows and no relative position bias, run on the same input
  and summed:

      out = ProxyTokenAttention(x) + WindowAttn(x) + ShiftedWindowAttn(x)
  """

  @nn.compact
  def __call__(self, x):
    common_args = self._attention_args()
    y = ProxyTokenAttention(window=self.window, grid=self.grid, attention=self.attention,
                            attention_args=self.attention_args,
                            attention_impl=self.attention_impl, sample=self.sample,
                            name="proxy", **common_args)(x)
    for name, shift in (("window_attn", 0), ("shift_window_attn", self.window // 2)):
      y = y + Attention(op="window", op_args=dict(grid=self.grid, window_size=self.window,
                                                   shift=shift, rpb=None),
                        name=name, **common_args)(x)
    return y


class DiTBlock(nn.Module):
  """adaLN-Zero block: gated self-attention, optional cross-attention, gated MLP.

  `mod` is `[b, 6, width]`: (shift, scale, gate) of the attention, then of the MLP.
  With `proxy_tokens` (a window size) the self-attention is PT-DiT's (`PTDiTAttention` on the
  token `grid`, `proxy_attention_args` for the op among the proxies); `sample_proxies` samples
  the proxies at random (training).
  """
  num_heads: int
  mlp_dim: int
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  qk_norm: bool = False
  cross_attention: str | None = None
  cross_attention_args: Any = None
  proxy_tokens: int | None = None
  proxy_attention_args: Any = None
  grid: tuple[int, int] | None = None
  sample_proxies: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mod, cond=None, cond_mask=None):
    constrain = lambda y: nn.with_logical_constraint(y, ("batch", "length", "embed"))
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i] for i in range(6))
    attn = dict(num_heads=self.num_heads, qk_norm=self.qk_norm, use_bias=True, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform())
    y = _modulate(_norm(x, self.dtype), shift1, scale1)
    if self.proxy_tokens:
      y = PTDiTAttention(window=self.proxy_tokens, grid=self.grid, attention=self.attention,
                         attention_args=self.proxy_attention_args,
                         attention_impl=self.attention_impl, sample=self.sample_proxies,
                         name="pt_attn", **attn)(y)
    else:
      y = Attention(op=self.attention, op_args=self.attention_args,
                    implementation=self.attention_impl, name="attn", **attn)(y)
    x = constrain(x + gate1[:, None] * y)
    if self.cross_attention:
      mask = None if cond_mask is None else cond_mask[:, None, None, :]
      x = constrain(x + _CrossAttention(op=self.cross_attention, op_args=self.cross_attention_args,
                                        name="cross_attn", **attn)(x, cond, mask=mask))
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 bias_init=nn.initializers.zeros_init(), name="mlp")(
                     _modulate(_norm(x, self.dtype), shift2, scale2))
    return constrain(x + gate2[:, None] * y)


class Model(nn.Module):
  """DiT: noised images `[b, H, W, C]`, timesteps `[b]`, labels `[b]` -> float32 `[b, H, W, C']`.

  `C'` is C (ε) or 2C (ε, then the variance interpolation v in [-1, 1]) with `learn_sigma`.

  Attributes:
    num_classes: class labels 0..num_classes-1; index `num_classes` is the null class (present
      when `class_dropout > 0`).
    variant: size name for `decode_variant` ("XL/2"); explicit fields below override it.
    width, depth, num_heads, mlp_dim, patch_size: the sizes (`mlp_dim` defaults to 4·width).
    learn_sigma: output the variance interpolation too (DiT's default).
    class_dropout: probability of replacing the condition by the null one in training.
    class_adaln: add the class embedding to the timestep embedding (DiT).
    cross_attention: a cross-attention layer after every self-attention (PixArt-α) with this
      registry op (True: "softmax"; None or False: no cross-attention).
    cross_attention_args: dict of the cross-attention op's keyword arguments.
    cross_attention_op: deprecated name of the cross-attention op (use `cross_attention`).
    num_cond_tokens: learned condition tokens per class, or the length of the null condition
      with `cond_dim`.
    cond_dim: width of caller-given `cond_tokens` (None: learned per-class tokens).
    adaln_single: PixArt-α's shared adaLN (see the module docstring).
    num_timesteps: diffusion steps of the noise schedule.
    attention, attention_args, attention_impl, qk_norm: the self-attention op, as in ViT (a
      2-D op gets the patch `grid`, `big_attn.ops.spatial`).
    proxy_tokens: PT-DiT (Qihoo-T2X) in every block: the proxy window size (>= 2, dividing
      the patch grid); the self-attention becomes `ProxyTokenAttention` over one proxy token
      per window (random in training, the window's centre token otherwise), with the
      `attention` op among the proxies (on their grid for a 2-D op), plus window and shifted
      window attention (`DiTBlock`); `sample(attention_reuse=...)` does not reuse these
      layers' outputs. None: DiT's global self-attention.
    remat_policy: "none" or a `jax.checkpoint_policies` name applied to every block.
    dtype, param_dtype: compute and parameter dtypes.
  Parameters carry the logical axis names embed, mlp, heads, head_dim, patch_h, patch_w,
  channels_in, classes and norm (None for axes no rule shards).
  """
  num_classes: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  mlp_dim: int | None = None
  patch_size: Any = None
  learn_sigma: bool = True
  class_dropout: float = 0.1
  class_adaln: bool = True
  cross_attention: bool | str | None = None
  cross_attention_args: Any = None
  num_cond_tokens: int = 1
  cond_dim: int | None = None
  adaln_single: bool = False
  num_timesteps: int = 1000
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  qk_norm: bool = False
  proxy_tokens: int | None = None
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  cross_attention_op: str | None = None  # deprecated: `cross_attention` names the op

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("width", "depth", "num_heads"),
                           defaults=dict(mlp_dim=lambda sizes: 4 * sizes["width"],
                                         patch_size=(2, 2)))
    patch = self.patch_size
    common.set_fields(self, patch_size=(patch, patch) if isinstance(patch, int) else patch)
    if self.cross_attention_op is not None:
      warnings.warn("dit.Model(cross_attention_op=...) is deprecated; use cross_attention=OP",
                    DeprecationWarning, stacklevel=4)
      if self.cross_attention not in (True, self.cross_attention_op, False, None):
        raise ValueError(f"cross_attention_op={self.cross_attention_op!r} (deprecated) and "
                         f"cross_attention={self.cross_attention!r} disagree; set "
                         "cross_attention only")
      if self.cross_attention:
        common.set_fields(self, cross_attention=self.cross_attention_op)
      common.set_fields(self, cross_attention_op=None)
    if self.cross_attention is True:
      common.set_fields(self, cross_attention="softmax")
    super().__post_init__()

  @property
  def has_null_class(self) -> bool:
    return self.class_dropout > 0

  def _check(self, images, t, labels, cond_tokens):
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
    if not 0.0 <= self.class_dropout < 1.0:
      raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of "
                       f"{REMAT_POLICIES}")
    if self.num_cond_tokens < 1:
      raise ValueError(f"num_cond_tokens must be >= 1, got {self.num_cond_tokens}")
    if self.cond_dim is not None and not self.cross_attention:
      raise ValueError("cond_dim needs cross_attention=True (condition tokens enter through it)")
    if self.cross_attention not in (False, None) and not isinstance(self.cross_attention, str):
      raise TypeError(f"cross_attention must be a bool or a registry op name, got "
                      f"{self.cross_attention!r}")
    for name in ("attention_args", "cross_attention_args"):
      if getattr(self, name) is not None and not hasattr(getattr(self, name), "keys"):
        raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
    spatial.check_op(self.attention, "DiT")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    patch = self.patch_size
    if not isinstance(patch, tuple) or len(patch) != 2 or not all(
        isinstance(p, int) and p > 0 for p in patch):
      raise ValueError(f"patch_size must be a positive int or a pair of them, got {patch!r}")
    (ph, pw), (h, w) = patch, images.shape[1:3]
    if h % ph or w % pw:
      raise ValueError(f"image size {(h, w)} must be divisible by patch_size {(ph, pw)}")
    window = self.proxy_tokens
    if window is not None:
      if not isinstance(window, int) or isinstance(window, bool) or window < 2:
        raise ValueError(f"proxy_tokens (the proxy window) must be an int >= 2 or None, got "
                         f"{window!r}")
      if (h // ph) % window or (w // pw) % window:
        raise ValueError(f"proxy_tokens window {window} must divide the patch grid "
                         f"{(h // ph, w // pw)}")
    b = images.shape[0]
    if t is not None and jnp.shape(t) != (b,):
      raise ValueError(f"t must be [batch] = ({b},), got shape {jnp.shape(t)}")
    if labels is not None and jnp.shape(labels) != (b,):
      raise ValueError(f"labels must be [batch] = ({b},) class indices, got shape "
                       f"{jnp.shape(labels)}")
    if cond_tokens is not None:
      if self.cond_dim is None:
        raise ValueError("cond_tokens given but the model has cond_dim=None (per-class tokens)")
      if cond_tokens.ndim != 3 or cond_tokens.shape[0] != b or cond_tokens.shape[2] != \
          self.cond_dim:
        raise ValueError(f"cond_tokens must be [batch, n, cond_dim] = [{b}, n, {self.cond_dim}],"
                         f" got shape {cond_tokens.shape}")

  def _drop(self, b, labels, force_drop, train):
    """`[b]` bool: the examples whose condition is replaced by the null one (None: no null)."""
    if not self.has_null_class:
      return None
    drop = jnp.zeros((b,), bool) if force_drop is None else jnp.asarray(force_drop, bool)
    drop = drop | (labels >= self.num_classes)
    if train:
      drop = drop | (jax.random.uniform(self.make_rng("dropout"), (b,)) < self.class_dropout)
    return drop

  def _condition_tokens(self, b, labels, drop, cond_tokens, cond_mask, width):
    """The `[b, n, width]` tokens the cross-attention attends to, and their `[b, n]` mask."""
    param = lambda name, init, shape, axes: jnp.asarray(  # pylint: disable=g-long-lambda
        self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype),
        self.dtype)
    if self.cond_dim is None:
      rows = self.num_classes + int(self.has_null_class)
      table = param("class_tokens", nn.initializers.normal(stddev=0.02),
                    (rows, self.num_cond_tokens, width), ("classes", None, "embed"))
      index = labels if drop is None else jnp.where(drop, self.num_classes, labels)
      return table[index], None
    null = param("null_cond", nn.initializers.normal(stddev=self.cond_dim ** -0.5),
                 (self.num_cond_tokens, self.cond_dim), (None, None))
    if cond_tokens is None:
      tokens, cond_mask = jnp.broadcast_to(null[None], (b, *null.shape)), None
    else:
      tokens = jnp.asarray(cond_tokens, self.dtype)
      if drop is not None:
        if tokens.shape[1] != self.num_cond_tokens:
          raise ValueError(f"cond_tokens must have num_cond_tokens={self.num_cond_tokens} "
                           f"tokens to be replaced by the null condition, got {tokens.shape[1]}")
        tokens = jnp.where(drop[:, None, None], null[None], tokens)
        if cond_mask is not None:
          cond_mask = cond_mask | drop[:, None]
    # PixArt-α's caption projection: Linear -> GELU(tanh) -> Linear.
    dense = lambda name, axes: _dense(  # pylint: disable=g-long-lambda
        width, axes, name, nn.initializers.xavier_uniform(), self.dtype, self.param_dtype)
    tokens = nn.gelu(dense("cond_proj_0", (None, "mlp"))(tokens))
    return dense("cond_proj_1", ("mlp", "embed"))(tokens), cond_mask

  @nn.compact
  def __call__(self, images, t=None, labels=None, *, cond_tokens=None, cond_mask=None,
               force_drop=None, train: bool = False):
    """`t` defaults to 0 and `labels` to the null class (init); `force_drop` `[b]` bool
    replaces those examples' condition by the null one (the unconditional branch of
    classifier-free guidance)."""
    self._check(images, t, labels, cond_tokens)
    width, patch = self.width, self.patch_size
    b, h, w, channels = images.shape
    if t is None:
      t = jnp.zeros((b,), jnp.int32)
    if labels is None:
      labels = jnp.full((b,), self.num_classes if self.has_null_class else 0, jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)
    dense = lambda n, axes, name, init: _dense(  # pylint: disable=g-long-lambda
        n, axes, name, init, self.dtype, self.param_dtype)

    # Patches, fixed position embedding.
    x = nn.Conv(width, patch, strides=patch, padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="x_embedder",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                    ("patch_h", "patch_w", "channels_in", "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                       ("embed",)))(jnp.asarray(images, self.dtype))
    gh, gw = h // patch[0], w // patch[1]
    x = jnp.reshape(x, (b, gh * gw, width)) + posemb_sincos_2d(gh, gw, width, dtype=self.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    # Condition: timestep MLP (+ class embedding).
    normal = nn.initializers.normal(stddev=0.02)
    c = dense(width, (None, "embed"), "t_embedder_0", normal)(
        timestep_features(t).astype(self.dtype))
    c = dense(width, ("mlp", "embed"), "t_embedder_1", normal)(nn.silu(c))
    drop = self._drop(b, labels, force_drop, train)
    if self.class_adaln:
      rows = self.num_classes + int(self.has_null_class)
      table = self.param("y_embedder", nn.with_logical_partitioning(normal, ("classes", "embed")),
                         (rows, width), self.param_dtype)
      index = labels if drop is None else jnp.where(drop, self.num_classes, labels)
      c = c + jnp.asarray(table, self.dtype)[index]
    cond, mask = None, None
    if self.cross_attention:
      cond, mask = self._condition_tokens(b, labels, drop, cond_tokens, cond_mask, width)

    # Blocks.
    if self.adaln_single:
      shared = dense(6 * width, ("embed", "mlp"), "t_block", normal)(nn.silu(c))
      shared = shared.reshape(b, 6, width)
    block_cls = DiTBlock
    if self.remat_policy != "none":
      block_cls = nn.remat(block_cls, policy=getattr(jax.checkpoint_policies, self.remat_policy))
    block_args = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                      attention=self.attention,
                      attention_args=spatial.op_args(self.attention, self.attention_args,
                                                     (gh, gw)),
                      attention_impl=self.attention_impl, qk_norm=self.qk_norm,
                      cross_attention=self.cross_attention or None,
                      cross_attention_args=None if self.cross_attention_args is None
                      else dict(self.cross_attention_args), dtype=self.dtype,
                      param_dtype=self.param_dtype)
    if self.proxy_tokens:
      window = self.proxy_tokens
      block_args.update(proxy_tokens=window, grid=(gh, gw), sample_proxies=train,
                        proxy_attention_args=spatial.op_args(
                            self.attention, self.attention_args, (gh // window, gw // window)))
    for i in range(self.depth):
      if self.adaln_single:
        table = self.param(f"scale_shift_table_{i}", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=width ** -0.5), (None, "embed")), (6, width),
                           self.param_dtype)
        mod = shared + jnp.asarray(table, self.dtype)[None]
      else:
        mod = dense(6 * width, ("embed", "mlp"), f"adaLN_{i}", nn.initializers.zeros_init())(
            nn.silu(c)).reshape(b, 6, width)
      x = block_cls(name=f"block_{i}", **block_args)(x, mod, cond, mask)

    # Final adaLN layer, linear to patches, unpatchify.
    out_channels = channels * (2 if self.learn_sigma else 1)
    if self.adaln_single:
      table = self.param("final_scale_shift_table", nn.with_logical_partitioning(
          nn.initializers.normal(stddev=width ** -0.5), (None, "embed")), (2, width),
                         self.param_dtype)
      shift, scale = (jnp.asarray(table, self.dtype)[None] + c[:, None]).swapaxes(0, 1)
    else:
      shift, scale = dense(2 * width, ("embed", "mlp"), "final_adaLN",
                           nn.initializers.zeros_init())(nn.silu(c)).reshape(
                               b, 2, width).swapaxes(0, 1)
    x = _modulate(_norm(x, self.dtype), shift, scale)
    x = dense(patch[0] * patch[1] * out_channels, ("embed", None), "final_linear",
              nn.initializers.zeros_init())(x)
    x = x.reshape(b, gh, gw, patch[0], patch[1], out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, out_channels).astype(jnp.float32)


# ---------------------------------------------------------------------------------- diffusion
def noise_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> dict[str, np.ndarray]:
  """DDPM's linear β schedule (scaled by 1000 / num_timesteps, as DiT) and derived float64 arrays.

  ᾱ_t = Π_{s<=t} (1 - β_s); the posterior q(x_{t-1} | x_t, x_0) has variance
  β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) and mean c1_t x_0 + c2_t x_t with
  c1_t = β_t √ᾱ_{t-1} / (1 - ᾱ_t), c2_t = (1 - ᾱ_{t-1}) √(1 - β_t) / (1 - ᾱ_t).
  """
  if not isinstance(num_timesteps, int) or num_timesteps < 2:
    raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
  scale = 1000 / num_timesteps
  betas = np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
  return dict(
      betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=prev,
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=np.log(np.append(posterior_variance[1],
                                                      posterior_variance[1:])),
      posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod))


def _at(schedule, name, t):
  """schedule[name][t] as float32 `[b, 1, 1, 1]`."""
  return jnp.asarray(schedule[name], jnp.float32)[t][:, None, None, None]


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, schedule: dict[str, np.ndarray]
             ) -> jax.Array:
  """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε for `[b, H, W, C]` images and `[b]` timesteps."""
  ab = _at(schedule, "alphas_cumprod", t)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def _normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_normal_cdf(x):
  """Φ(x) ≈ (1 + tanh(√(2/π) (x + 0.044715 x³))) / 2, as Improved DDPM's code."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log P(x) of 8-bit data in [-1, 1] (bins of width 2/255) under N(mean, exp(log_scale)²);
  the edge bins take the tails."""
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _approx_normal_cdf(inv_std * (centered + 1.0 / 255))
  cdf_min = _approx_normal_cdf(inv_std * (centered - 1.0 / 255))
  log = lambda p: jnp.log(jnp.maximum(p, 1e-12))  # pylint: disable=unnecessary-lambda-assignment
  return jnp.where(x < -0.999, log(cdf_plus),
                   jnp.where(x > 0.999, log(1.0 - cdf_min), log(cdf_plus - cdf_min)))


def vlb_terms(x0, x_t, t, eps, v, schedule):
  """Per-example variational-bound term in bits per dimension (Improved DDPM, L_vlb).

  The model's mean comes from `eps` (the caller stops its gradient), its log variance is
  v' log β_t + (1 - v') log β̃_t with v' = (v + 1) / 2. For t > 0 the term is
  KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); for t = 0 the decoder's negative
  log-likelihood of x_0.
  """
  ab = _at(schedule, "alphas_cumprod", t)
  pred_x0 = (x_t - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)
  c1, c2 = _at(schedule, "posterior_mean_coef1", t), _at(schedule, "posterior_mean_coef2", t)
  min_log = _at(schedule, "posterior_log_variance_clipped", t)
  max_log = jnp.log(_at(schedule, "betas", t))
  frac = (v + 1.0) / 2.0
  model_log_var = frac * max_log + (1.0 - frac) * min_log
  model_mean = c1 * pred_x0 + c2 * x_t
  true_mean = c1 * x0 + c2 * x_t
  kl = jnp.mean(_normal_kl(true_mean, min_log, model_mean, model_log_var), axis=(1, 2, 3))
  nll = -jnp.mean(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var),
                  axis=(1, 2, 3))
  return jnp.where(t == 0, nll, kl) / math.log(2.0)


def diffusion_losses(model: Model, params: Any, images: jax.Array, labels: jax.Array,
                     rng: jax.Array, *, train: bool = True) -> tuple[jax.Array, jax.Array]:
  """Per-example ε-MSE and variational-bound term (zeros without `learn_sigma`), `[b]` each.

  t ~ U{0..T-1} and ε ~ N(0, I) are drawn from `rng`; `train` turns on label dropout.
  """
  schedule = noise_schedule(model.num_timesteps)
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  b, channels = images.shape[0], images.shape[-1]
  t = jax.random.randint(t_rng, (b,), 0, model.num_timesteps)
  noise = jax.random.normal(noise_rng, images.shape, jnp.float32)
  x_t = q_sample(images, t, noise, schedule)
  out = model.apply({"params": params}, x_t, t, labels, train=train,
                    rngs={"dropout": drop_rng})
  eps = out[..., :channels]
  mse = jnp.mean((noise - eps) ** 2, axis=(1, 2, 3))
  if not model.learn_sigma:
    return mse, jnp.zeros_like(mse)
  vb = vlb_terms(images, x_t, t, jax.lax.stop_gradient(eps), out[..., channels:], schedule)
  return mse, vb


def loss_fn(model: Model, params: Any, batch: dict[str, Any], rng: jax.Array) -> jax.Array:
  """Mean ε-MSE (+ the VLB term with `learn_sigma`) on `batch["image"]` in [-1, 1], with the
  class index taken from the one-hot `batch["labels"]`."""
  labels = jnp.argmax(batch["labels"], axis=-1).astype(jnp.int32)
  mse, vb = diffusion_losses(model, params, batch["image"], labels, rng)
  return jnp.mean(mse + vb)


TASK = tasks.Task(
    batch_spec=lambda info, b: {"image": ((b, *info["image_shape"]), jnp.float32),
                                "labels": ((b, info["num_classes"]), jnp.float32)},
    example_input=lambda info: (tuple(info["image_shape"]), jnp.float32),
    loss=loss_fn)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The `num_steps` timesteps ⌊i T / num_steps⌋ a sampler visits (DiT's "ddim50": 0, 20, ...)."""
  if not isinstance(num_steps, int) or not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be an int in [1, {num_timesteps}], got {num_steps!r}")
  return (np.arange(num_steps) * num_timesteps) // num_steps


def sample(model: Model, params: Any, labels: jax.Array, rng: jax.Array, num_steps: int = 50,
           guidance_scale: float = 1.0, *, image_shape: tuple[int, int, int],
           cond_tokens: jax.Array | None = None, cond_mask: jax.Array | None = None,
           eta: float = 0.0, clip_denoised: bool = False, attention_reuse: Any = None,
           return_stats: bool = False) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
  """DDIM samples `[b, *image_shape]` for class `labels` `[b]`, with classifier-free guidance.

  From x_T ~ N(0, I), each visited step τ_i -> τ_{i-1} computes ε̂ (guided:
  ε̂ = ε_∅ + s (ε_y - ε_∅), one batched call; s = 1 calls the conditional model only),
  x̂_0 = (x - √(1 - ᾱ) ε̂) / √ᾱ, σ = η √((1 - ᾱ') / (1 - ᾱ)) √(1 - ᾱ / ᾱ') and
  x' = √ᾱ' x̂_0 + √(1 - ᾱ' - σ²) ε̂ + σ z (ᾱ' = 1 after the last step). η = 1 is DDPM-like.
  `clip_denoised` clips x̂_0 to [-1, 1] and recomputes ε̂ from it (pixel data; DiT's latents
  are not clipped).

  `attention_reuse` (a dict, `big_attn.layers.attention_reuse`: Pyramid Attention Broadcast,
  DiTFastAttn) reuses attention outputs across steps instead of computing them at every step.
  `return_stats` also returns, per attention kind ("self", "cross"), the attention calls the
  run computed and their FLOPs (`{"self": {"calls": ..., "flops": ...}, ...}`).
  """
  labels = jnp.asarray(labels, jnp.int32)
  if labels.ndim != 1:
    raise ValueError(f"labels must be [batch] class indices, got shape {labels.shape}")
  if len(image_shape) != 3:
    raise ValueError(f"image_shape must be (height, width, channels), got {image_shape!r}")
  if guidance_scale < 0:
    raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
  if guidance_scale != 1.0 and not model.has_null_class:
    raise ValueError("classifier-free guidance (guidance_scale != 1) needs a null class: "
                     "a model trained with class_dropout > 0")
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  schedule = noise_schedule(model.num_timesteps)
  steps = ddim_timesteps(model.num_timesteps, num_steps)
  ab = schedule["alphas_cumprod"][steps]
  ab_prev = np.append(1.0, ab[:-1])
  b, channels = labels.shape[0], image_shape[-1]
  guided = guidance_scale != 1.0
  plan = attention_reuse_lib.resolve(attention_reuse, timesteps=steps[::-1],
                                     num_timesteps=model.num_timesteps, depth=model.depth)
  if plan is None:
    plan = attention_reuse_lib.full_plan(num_steps, model.depth)
  if plan.uses_cfg and not guided:
    raise ValueError("attention_reuse: a plan with 'asc' (sharing across classifier-free "
                     "guidance) needs guidance_scale != 1")

  def eps_fn(params, x, t):
    if not guided:
      out = model.apply({"params": params}, x, t, labels, cond_tokens=cond_tokens,
                        cond_mask=cond_mask)
      return out[..., :channels]
    def double(a):
      return None if a is None else jnp.concatenate([a, a])

    out = model.apply({"params": params}, double(x), double(t), double(labels),
                      cond_tokens=double(cond_tokens), cond_mask=double(cond_mask),
                      force_drop=jnp.arange(2 * b) >= b)[..., :channels]
    cond, uncond = out[:b], out[b:]
    return uncond + guidance_scale * (cond - uncond)

  def run(params, rng):
    rng, init_rng = jax.random.split(rng)
    x = jax.random.normal(init_rng, (b, *image_shape), jnp.float32)
    with attention_reuse_lib.record_shapes() as shapes:
      jax.eval_shape(eps_fn, params, x, jnp.zeros((b,), jnp.int32))
    state = attention_reuse_lib.init_state(plan, shapes)
    index = attention_reuse_lib.step_indices(plan, state)

    def body(carry, xs):
      x, state = carry
      t, a, a_prev, key, index = xs
      with attention_reuse_lib.apply_step(plan, index, state) as state:
        eps = eps_fn(params, x, jnp.full((b,), t, jnp.int32))
      x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
      if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
      sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a)) * jnp.sqrt(1.0 - a / a_prev)
      x = (jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - sigma ** 2) * eps
           + sigma * jax.random.normal(key, x.shape, jnp.float32))
      return (x, state), None

    xs = (jnp.asarray(steps[::-1], jnp.int32), jnp.asarray(ab[::-1], jnp.float32),
          jnp.asarray(ab_prev[::-1], jnp.float32), jax.random.split(rng, num_steps), index)
    x, state = jax.lax.scan(body, (x, state), xs)[0]
    return x, state["stats"]

  images, stats = jax.jit(run)(params, rng)
  return (images, stats) if return_stats else images


def count_params(model: Model, image_shape: tuple[int, int, int] = (32, 32, 4)) -> int:
  """Parameters of `model` for `image_shape` inputs, from `jax.eval_shape` (nothing allocated)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, *image_shape), jnp.float32)))
  return tasks.count_params(shapes["params"])
