"""Vision Transformer (An Image is Worth 16x16 Words; Scaling Vision Transformers), as big_vision.

    model = Model(num_classes=1000, variant="B/16", attention="sigmoid")
    params = model.init(jax.random.key(0), images)["params"]     # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)  # [batch, 1000]

Patches are embedded by a strided convolution, position embeddings added (learned or fixed
2-D sine-cosine), an optional class token prepended and `num_registers` learned register
tokens appended (Vision Transformers Need Registers; discarded at the output), then `depth`
pre-LayerNorm blocks x + Attn(LN(x)), x + MLP(LN(x)) and a final LayerNorm. The attention
mechanism is any op of `big_attn.ops` by name. Pooling: "gap" (mean of the patch tokens),
"cls"/"tok" (the class token), "map" (multihead attention pooling with a learned probe).

Two families are ViT plus options, sized by `decode_variant("ConViT-S/16")` / `("CPVT-Ti/16")`:
ConViT (Improving Vision Transformers with Soft Convolutional Inductive Biases) runs the first
`local_layers=10` blocks with gated positional self-attention (`local_attention="gpsa"`) on the
patch tokens and inserts the class token after them; CPVT (Conditional Positional Encodings
for Vision Transformers, `posemb="peg"`) has no absolute position embedding and a `PEG`
(depthwise 3x3 convolution of the patch grid, added) after the first block.

Parameter counts (224x224x3 input, 1000 classes, pool "gap", learned position embedding;
counted with `jax.eval_shape`, nothing allocated). A class token adds `width`; a MAP head adds
a block's worth (ViT-B/16 "cls": 86,566,888; ViT-G/14 "map": 1,882,797,416). Scaling Vision
Transformers reports 1,843M for ViT-G/14.

| variant   | width | depth | mlp_dim | heads | parameters    |
|-----------|-------|-------|---------|-------|---------------|
| Ti/16     |   192 |    12 |     768 |     3 |     5,717,032 |
| S/16      |   384 |    12 |    1536 |     6 |    22,049,896 |
| M/16      |   512 |    12 |    2048 |     8 |    38,836,712 |
| B/16      |   768 |    12 |    3072 |    12 |    86,566,120 |
| L/16      |  1024 |    24 |    4096 |    16 |   304,324,584 |
| So400m/14 |  1152 |    27 |    4304 |    16 |   413,595,352 |
| H/14      |  1280 |    32 |    5120 |    16 |   632,043,240 |
| g/14      |  1408 |    40 |    6144 |    16 | 1,012,608,616 |
| G/14      |  1664 |    48 |    8192 |    16 | 1,844,437,352 |
| e/14      |  1792 |    56 |   15360 |    16 | 3,807,210,728 |

SpectFormer (SpectFormer: Frequency and Attention is what you need in a Vision Transformer) is
this ViT with GFNet's spectral block in its first α = 4 blocks (`spectral_layers`):

    x + DropPath(MLP(LN(IFFT2(W ⊙ FFT2(LN(x))))))      (`metaformer`'s `spectral_filter`),

attention blocks (any op) after them; patches 16x16, learned position embedding, no class
token, mean pooling. The paper's vanilla variants (its Table 2 / model zoo), exact GELU:

| variant        | width | depth | heads | parameters | paper |
|----------------|-------|-------|-------|------------|-------|
| spectformer_t  |   256 |    12 |     4 |  9,158,376 |    9M |
| spectformer_xs |   384 |    12 |     6 | 20,028,520 |   22M |
| spectformer_s  |   384 |    19 |     6 | 32,449,768 |   32M |
| spectformer_b  |   512 |    19 |     8 | 57,159,656 |   57M |

The authors' code fixes 6 heads (512 is not divisible by 6: B has 8 here); the parameter count
does not depend on them. Their XS entry (22M) is 20.0M in their own layout (width 384, depth 12,
α = 4; GFNet-XS is 16M), as counted here. The hierarchical SpectFormer-H variants are not built.

The families' variants (width 48 per head for ConViT; CPVT the GAP variant), against their
papers' tables and the authors' code (ConViT's in timm: 5,710,512 / 27,777,322 / 86,540,040;
ours has query/key/value biases and no constant positional bias); ConViT's Table 1 prints
whole millions:

| variant      | width | heads | parameters | paper |
|--------------|-------|-------|------------|-------|
| ConViT-Ti/16 |   192 |     4 |  5,717,384 |  6M   |
| ConViT-S/16  |   432 |     9 | 27,792,784 |  27M  |
| ConViT-B/16  |   768 |    16 | 86,567,528 |  86M  |
| CPVT-Ti/16   |   192 |     3 |  5,681,320 |  5.7M |
| CPVT-S/16    |   384 |     6 | 21,978,472 |  22M  |
| CPVT-B/16    |   768 |    12 | 86,423,272 |  86M  |

ChannelViT (Channel Vision Transformers: An Image Is Worth C x 16 x 16 Words,
`channel_tokens=True`) embeds each of the C channels' patches with one single-channel
projection, adds the patch's position embedding and a learned embedding of the channel
(`embed_patches`), so a 224x224x3 image is 3·196 tokens; a class token is classified. Its
counts (3 channels) are ViT's with a class token, less the two channels the projection no
longer reads, plus 3 channel embeddings (hierarchical channel sampling is not built):

| variant          | width | heads | parameters | ViT (cls) |
|------------------|-------|-------|------------|-----------|
| ChannelViT-Ti/16 |   192 |     3 |  5,619,496 | 5,717,224 |
| ChannelViT-S/16  |   384 |     6 | 21,854,824 | 22,050,280 |
| ChannelViT-B/16  |   768 |    12 | 86,175,976 | 86,566,888 |
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.layers import Attention, MlpBlock, PositionEmbedding, layer_norm
from big_attn.layers import settings
from big_attn.layers import token_reduction as token_reduction_lib
from big_attn.models import common
from big_attn.models import metaformer
from big_attn.ops import spatial

# Sizes as in big_vision's `decode_variant` (ViT-G/g from Scaling Vision Transformers,
# So400m from "Getting ViT in Shape", ViT-e from PaLI).
_WIDTH = {"Ti": 192, "S": 384, "M": 512, "B": 768, "L": 1024, "So400m": 1152, "H": 1280,
          "g": 1408, "G": 1664, "e": 1792}
_DEPTH = {"Ti": 12, "S": 12, "M": 12, "B": 12, "L": 24, "So400m": 27, "H": 32, "g": 40, "G": 48,
          "e": 56}
_MLP_DIM = {"Ti": 768, "S": 1536, "M": 2048, "B": 3072, "L": 4096, "So400m": 4304, "H": 5120,
            "g": 6144, "G": 8192, "e": 15360}
_NUM_HEADS = {"Ti": 3, "S": 6, "M": 8, "B": 12, "L": 16, "So400m": 16, "H": 16, "g": 16, "G": 16,
              "e": 16}

# Families that are a ViT plus options (`FAMILY-SIZE/PATCH`): ConViT's sizes are 48 per head
# (its Table 1: 4, 9 and 16 heads for Ti, S, B), GPSA in the first 10 blocks and a class token
# inserted after them; CPVT is DeiT's sizes with a PEG after the first block and no absolute
# position embedding (its GAP variant); ChannelViT is ViT's sizes with a token per channel and
# patch (`channel_tokens`) and a class token.
_FAMILIES = {
    "ConViT": dict(sizes={"Ti": (192, 4), "S": (432, 9), "B": (768, 16)},
                   options=dict(local_layers=10, pool_type="cls")),
    "CPVT": dict(sizes={"Ti": (192, 3), "S": (384, 6), "B": (768, 12)},
                 options=dict(posemb="peg", pool_type="gap")),
    "ChannelViT": dict(sizes={"Ti": (192, 3), "S": (384, 6), "B": (768, 12)},
                       options=dict(channel_tokens=True, pool_type="cls")),
}
FAMILY_OPTIONS = ("local_layers", "pool_type", "posemb", "channel_tokens")
POOL_TYPES = ("gap", "cls", "tok", "map")
POSEMB_TYPES = ("learn", "sincos2d", "peg")
# `jax.checkpoint_policies` usable as they are (the others are factories taking names).
REMAT_POLICIES = ("none", "nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots",
                  "checkpoint_dots_with_no_batch_dims")


# SpectFormer's vanilla variants: GFNet's sizes (width, depth) with heads of 64 channels.
_SPECTFORMER = {"spectformer_t": (256, 12, 4), "spectformer_xs": (384, 12, 6),
                "spectformer_s": (384, 19, 6), "spectformer_b": (512, 19, 8)}
SPECTFORMER_ALPHA = 4


def decode_variant(variant: str) -> dict[str, Any]:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=(16, 16)).

  The patch part is optional ("B" gives no `patch_size`); sizes are Ti, S, M, B, L, So400m, H,
  g, G, e. SpectFormer's spectformer_t, spectformer_xs, spectformer_s, spectformer_b also give
  `spectral_layers` (the first 4 blocks) and 16x16 patches. A family prefix gives that family's sizes and options: "ConViT-S/16" (Ti, S, B:
  `local_layers=10`, `pool_type="cls"`), "CPVT-Ti/16" (Ti, S, B: `posemb="peg"`,
  `pool_type="gap"`), "ChannelViT-S/16" (Ti, S, B: `channel_tokens=True`, `pool_type="cls"`).
  """
  if isinstance(variant, str) and variant in _SPECTFORMER:
    width, depth, heads = _SPECTFORMER[variant]
    return dict(width=width, depth=depth, mlp_dim=4 * width, num_heads=heads,
                patch_size=(16, 16), spectral_layers=tuple(range(SPECTFORMER_ALPHA)))
  match = (re.fullmatch(r"(?:([A-Za-z]+)-)?([A-Za-z0-9]+?)(?:/(\d+))?", variant)
           if isinstance(variant, str) else None)
  family, size, patch = match.groups() if match else (None, None, None)
  sizes = _FAMILIES[family]["sizes"] if family in _FAMILIES else _WIDTH
  if match is None or (family is not None and family not in _FAMILIES) or size not in sizes:
    raise ValueError(f"unknown ViT variant {variant!r}; expected SIZE or SIZE/PATCH with SIZE in "
                     f"{', '.join(_WIDTH)} (e.g. 'B/16', 'G/14'), or FAMILY-SIZE/PATCH with "
                     + "; ".join(f"{name} sizes {', '.join(f['sizes'])}"
                                 for name, f in _FAMILIES.items()) + " (e.g. 'ConViT-S/16'), or one of "
                     + ", ".join(_SPECTFORMER))
  if family is None:
    out = dict(width=_WIDTH[size], depth=_DEPTH[size], mlp_dim=_MLP_DIM[size],
               num_heads=_NUM_HEADS[size])
  else:
    width, heads = _FAMILIES[family]["sizes"][size]
    out = dict(width=width, depth=12, mlp_dim=4 * width, num_heads=heads,
               **_FAMILIES[family]["options"])
  if patch is not None:
    out["patch_size"] = (int(patch), int(patch))
  return out


class Encoder1DBlock(nn.Module):
  """x + Dropout(Attn(LN(x))), then x + Dropout(MLP(LN(x))); returns `(x, size)` (`(x, None)`
  for `nn.scan`).

  With `layer_scale_init` each branch is first multiplied by a learned per-channel scale
  initialised to it (LayerScale of "Going deeper with Image Transformers"; DeiT III, DINOv2).
  With `token_reduction` (a `big_attn.layers.token_reduction.TokenReduction`) the call takes the
  token sizes `size: [batch, tokens]`, gives the op proportional attention where the method
  has it, and with `reduce_tokens` reduces the tokens after the first `num_protected` between
  the attention and the MLP; with `lookup_block` it is a LookupViT block on
  `x = [protected, compressed, lookup]` (`big_attn.layers.token_reduction.LookupExchange`:
  the compressed tokens gather from the lookup tokens, the attention and the MLP see the
  protected and compressed tokens, the lookup tokens receive from them after the MLP); a
  method that pads (SPA with a threshold) makes the attention mask out the keys of size 0. With
  `attention_free` the block has no attention branch
  (x + Dropout(MLP(LN(x))) only; MLP Can Be A Good Transformer Learner). With `parallel` the
  two branches read the same LayerNorm and add in parallel, x + Attn(LN(x)) + MLP(LN(x))
  (PAF: Investigating the Role of Feed-Forward Networks in Transformers Using Parallel
  Attention and Feed-Forward Net Design). With `spectral_grid`
  `(h, w)` (the tokens are exactly that patch grid) it is GFNet's spectral block,
  x + Dropout(MLP(LN(Filter(LN(x))))) with the global filter `metaformer`'s `spectral_filter`
  (SpectFormer's first blocks). With `token_pooling_scales` K the attention reads
  `TokenAwarePooling` (TAP, K scales over `token_pooling_grid` from token
  `token_pooling_start`) of x: x + Dropout(Attn(LN(TAP(x)))).
  """
  num_heads: int
  mlp_dim: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  qk_norm: bool = False
  projections: str | None = None
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  layer_scale_init: float | None = None
  token_reduction: Any = None
  reduce_tokens: bool = False
  lookup_block: bool = False
  num_protected: int = 0
  attention_free: bool = False
  parallel: bool = False
  spectral_grid: tuple[int, int] | None = None
  token_pooling_scales: int | None = None
  token_pooling_grid: tuple[int, int] | None = None
  token_pooling_start: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _scale(self, name, y):
    if self.layer_scale_init is None:
      return y
    gamma = self.param(name, nn.with_logical_partitioning(
        nn.initializers.constant(self.layer_scale_init), ("embed",)), (y.shape[-1],),
                       self.param_dtype)
    return y * jnp.asarray(gamma, y.dtype)

  @nn.compact
  def __call__(self, x, deterministic: bool = True, size=None, lookahead=None,
               probe: bool = False):
    """With `probe`, only this block's queries and keys of `x` (`observe_attention`'s record,
    MCTF's one-step-ahead attention of the block before); `lookahead`, a function of `(x, size)`
    returning that record from the next block, is passed to `reduce_tokens`."""
    constrain = lambda y: nn.with_logical_constraint(y, ("batch", "length", "embed"))
    x = constrain(x)
    attention = lambda: Attention(  # pylint: disable=g-long-lambda
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        op=self.attention, op_args=self.attention_args, implementation=self.attention_impl,
        qk_norm=self.qk_norm, projections=self.projections, use_bias=True, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform(),
        name="MultiHeadAttention")
    if probe:
      normed = layer_norm(self.dtype, self.param_dtype, "LayerNorm_0", epsilon=self.norm_eps)(x)
      with token_reduction_lib.observe_attention(self.attention, self.token_reduction,
                                                 size) as seen:
        attention()(normed)
      return seen
    if self.attention_free and self.reduce_tokens:
      raise ValueError("token reduction reads the block's attention: a block in "
                       "attention_free_layers cannot reduce tokens")
    p = self.num_protected
    if self.lookup_block:  # LookupViT: the compressed tokens gather from the lookup tokens
      split = p + self.token_reduction.num_tokens
      x, lookup, size, lookup_size = x[:, :split], x[:, split:], size[:, :split], size[:, split:]
      exchange = token_reduction_lib.LookupExchange(
          features=x.shape[-1], num_heads=self.num_heads,
          mlp_dim=max(self.mlp_dim // self.token_reduction.mlp_reduction, 1),
          dropout=self.dropout, approximate_gelu=self.approximate_gelu, dtype=self.dtype,
          param_dtype=self.param_dtype, name="lookup_exchange")
      compressed, logits = exchange.gather(x[:, p:], lookup)
      x = jnp.concatenate([x[:, :p], compressed], axis=1)
    if self.spectral_grid is not None:
      return self._spectral(x, deterministic), size
    parallel = self.parallel and not self.attention_free
    if not self.attention_free:
      y = x
      if self.token_pooling_scales:
        y = TokenAwarePooling(grid=self.token_pooling_grid, start=self.token_pooling_start,
                              scales=self.token_pooling_scales, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="token_pooling")(y)
      normed = layer_norm(self.dtype, self.param_dtype, "LayerNorm_0", epsilon=self.norm_eps)(y)
      with token_reduction_lib.observe_attention(self.attention, self.token_reduction,
                                                 size) as seen:
        padded = self.token_reduction is not None and self.token_reduction.pads
        y = attention()(normed, mask=(size > 0)[:, None, None, :] if padded else None)
      attention_branch = self._scale("layer_scale_1", nn.Dropout(rate=self.dropout)(
          y, deterministic))
      if not parallel:
        x = constrain(x + attention_branch)
    if self.reduce_tokens:
      x, size = token_reduction_lib.reduce_tokens(self.token_reduction, x, size, seen,
                                                  num_protected=p,
                                                  lookahead=lookahead and lookahead(x, size),
                                                  dtype=self.dtype,
                                                  param_dtype=self.param_dtype)
    y = normed if parallel else layer_norm(self.dtype, self.param_dtype, "LayerNorm_1",
                                           epsilon=self.norm_eps)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout,
                 approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="MlpBlock")(y, deterministic)
    y = self._scale("layer_scale_2", nn.Dropout(rate=self.dropout)(y, deterministic))
    x = constrain(x + y + attention_branch if parallel else x + y)
    if self.lookup_block:
      lookup = exchange.propagate(lookup, x[:, p:], logits, deterministic)
      x, size = jnp.concatenate([x, lookup], axis=1), jnp.concatenate([size, lookup_size], 1)
    return x, size

  def _spectral(self, x, deterministic):
    """GFNet's block: x + Dropout(MLP(LN(Filter(LN(x))))) over the `spectral_grid`."""
    (b, n, c), (gh, gw) = x.shape, self.spectral_grid
    y = layer_norm(self.dtype, self.param_dtype, "LayerNorm_0", epsilon=self.norm_eps)(x)
    y = metaformer.get_mixer("spectral_filter")(
        dtype=self.dtype, param_dtype=self.param_dtype, name="SpectralFilter")(
            y.reshape(b, gh, gw, c)).reshape(b, n, c)
    y = layer_norm(self.dtype, self.param_dtype, "LayerNorm_1", epsilon=self.norm_eps)(y)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout,
                 approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="MlpBlock")(y, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return nn.with_logical_constraint(x + self._scale("layer_scale_2", y),
                                      ("batch", "length", "embed"))


class _GridTokens(nn.Module):
  """A module on the `h·w` patch tokens from `start` on, seen as a `grid=(h, w)` image."""
  grid: tuple[int, int]
  start: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _image(self, x):
    """The grid's tokens of `x` as a `[batch, h, w, width]` image."""
    (h, w), (n, tokens, d), start = self.grid, x.shape, self.start
    if start < 0 or start + h * w > tokens:
      raise ValueError(f"{type(self).__name__}: tokens {start}..{start + h * w} of grid "
                       f"{tuple(self.grid)} do not fit in {tokens} tokens")
    return x[:, start:start + h * w].reshape(n, h, w, d)

  def _replace(self, x, image):
    """`x` with the grid's tokens replaced by the `[batch, h, w, width]` `image`."""
    n, h, w, d = image.shape
    return jnp.concatenate([x[:, :self.start], image.reshape(n, h * w, d),
                            x[:, self.start + h * w:]], axis=1)


class PEG(_GridTokens):
  """Positional encoding generator: Conditional Positional Encodings for Vision Transformers
  (Chu et al., 2021). The `h·w` patch tokens from `start` on, as a `grid=(h, w)` image, get a
  depthwise 3x3 convolution of themselves added (zero padding, with bias):

      x_p <- x_p + DWConv3x3(x_p),

  so each token's encoding depends on its neighbourhood and on the image border; tokens
  before `start` and after the patches pass unchanged. `[batch, tokens, width]` in and out.
  """

  @nn.compact
  def __call__(self, x):
    patches = self._image(x)
    d = x.shape[-1]
    y = nn.Conv(d, (3, 3), padding="SAME", feature_group_count=d, dtype=self.dtype,
                param_dtype=self.param_dtype, name="proj",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("patch_h", "patch_w", None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
                )(patches)
    return self._replace(x, patches + y.astype(patches.dtype))


class TokenAwarePooling(_GridTokens):
  """Token-aware average pooling (TAP) of Robustifying Token Attention for Vision Transformers
  (Guo, Stutz and Schiele, ICCV 2023): each patch token becomes its own learned mixture of
  average poolings of its neighbourhood at `scales` dilations,

      x_p <- Σ_k w_k(p)·Pool_k(x)_p,   w(p) = softmax_k(Conv3x3(Conv3x3(x))_p),

  Pool_0 the identity and Pool_d (d >= 1) the mean over the 3x3 neighbours at dilation d (zero
  padding, divided by 9); `scales` is 3 by default. The weight predictor is two bias-free 3x3
  convolutions (width -> scales -> scales); the paper's BatchNorm between them is left out.
  The `h·w` patch tokens from `start` on form the `grid`; the other tokens pass unchanged.
  `[batch, tokens, width]` in and out.
  """
  scales: int = 3

  @nn.compact
  def __call__(self, x):
    if not isinstance(self.scales, int) or self.scales < 2:
      raise ValueError(f"TokenAwarePooling: scales must be an int >= 2 (the identity and at "
                       f"least one pooling), got {self.scales!r}")
    patches = self._image(x)
    d = x.shape[-1]
    conv = lambda features, name: nn.Conv(  # pylint: disable=g-long-lambda
        features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 ("patch_h", "patch_w", None, None)))
    weights = jax.nn.softmax(conv(self.scales, "predictor_1")(
        conv(self.scales, "predictor_0")(patches)).astype(jnp.float32), axis=-1)
    pooled = [patches.astype(jnp.float32)]
    window = jnp.full((3, 3, 1, d), 1.0 / 9.0, jnp.float32)  # depthwise 3x3 mean
    for dilation in range(1, self.scales):
      pooled.append(jax.lax.conv_general_dilated(
          pooled[0], window, (1, 1), "SAME", rhs_dilation=(dilation, dilation),
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=d))
    mixed = sum(weights[..., k:k + 1] * pooled[k] for k in range(self.scales))
    return self._replace(x, mixed.astype(x.dtype))


class Encoder(nn.Module):
  """`depth` blocks (a Python loop, or `nn.scan` with a leading `layers` axis) and a final LN
  (`final_norm=False`: none).

  `token_reduction`, a resolved `big_attn.layers.token_reduction.TokenReduction`, reduces the
  tokens after the first `num_protected` in the blocks of its `layers` (Python loop only); for
  LookupViT the patch tokens are pooled into the compressed tokens before the block of its
  `layers`, the blocks from there on are LookupViT blocks and the lookup tokens are dropped
  after the last; for HVT they are max-pooled before the blocks of its `layers`; for MSTM
  fused with their multi-scale poolings before the first block of its `layers`; MCTF with
  `one_step_ahead` reads the next block's attention of the tokens it fuses (that block called
  with `probe=True`; needs remat_policy "none").
  The blocks of `attention_free_layers` have no attention branch, those of `spectral_layers`
  are GFNet's spectral blocks over the token grid `grid` (Python loop only).
  The first `local_layers` blocks take `local_block_args` (ConViT's GPSA blocks) and the
  `late_tokens` given to the call are prepended after them (ConViT's class token). With
  `peg_grid=(h, w)` a `PEG` follows the first block, on the `h·w` patch tokens that follow the
  first `num_protected` tokens (less the late tokens before those are in). Both need
  `scan_layers=False`.
  With `loops` T the `depth` blocks are one weight-tied stack run T times (Looped Transformers
  as Programmable Computers), x_t = blocks(x_{t-1}); with `loop_injection` the input x_0 is
  added before every run after the first, x_t = blocks(x_{t-1} + x_0) (input injection of
  Looped Transformers are Better at Learning Learning Algorithms). Plain blocks only.
  With `output_blocks` (block indices) it returns the list of those blocks' outputs instead,
  without the final LN (a dense head's inputs, DPT; Python loop only).
  """
  depth: int
  block_args: Any
  remat_policy: str = "none"
  scan_layers: bool = False
  final_norm: bool = True
  token_reduction: Any = None
  num_protected: int = 0
  attention_free_layers: Any = None
  spectral_layers: Any = None
  grid: tuple[int, int] | None = None
  local_layers: int = 0
  local_block_args: Any = None
  peg_grid: tuple[int, int] | None = None
  loops: int | None = None
  loop_injection: bool = False
  output_blocks: tuple[int, ...] | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True, late_tokens=None):
    block = Encoder1DBlock
    if self.remat_policy != "none":
      block = nn.remat(block, prevent_cse=not self.scan_layers, static_argnums=(2,),
                       policy=getattr(jax.checkpoint_policies, self.remat_policy))
    kwargs = dict(self.block_args, dtype=self.dtype, param_dtype=self.param_dtype)
    reduction = self.token_reduction
    if reduction is not None and self.scan_layers:
      raise ValueError("token_reduction changes the token count between blocks: it needs "
                       "scan_layers=False")
    free = settings.block_indices("attention_free_layers", self.attention_free_layers,
                                  self.depth)
    spectral = settings.block_indices("spectral_layers", self.spectral_layers, self.depth)
    for name, value in (("attention_free_layers", free), ("spectral_layers", spectral)):
      if value and self.scan_layers:
        raise ValueError(f"{name} makes the blocks differ: it needs scan_layers=False")
    if (self.local_layers or self.peg_grid is not None) and self.scan_layers:
      raise ValueError("local_layers and a PEG make the blocks differ: they need "
                       "scan_layers=False")
    if self.local_layers and reduction is not None:
      raise ValueError("token_reduction needs every token from the first block: it does not "
                       "combine with local_layers")
    if late_tokens is not None and not 0 < self.local_layers < self.depth:
      raise ValueError(f"late_tokens are inserted after the local layers: local_layers must be "
                       f"in (0, depth={self.depth}), got {self.local_layers}")
    if self.loops is not None:
      self._check_loops(reduction, free, spectral, late_tokens)
    elif self.loop_injection:
      raise ValueError("loop_injection needs loops")
    if self.output_blocks is not None and (self.scan_layers or self.loops is not None):
      raise ValueError("output_blocks reads single blocks: it needs scan_layers=False and no "
                       "loops")
    outputs = []
    if self.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                      "dropout": True},
                      in_axes=nn.broadcast, length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      stack = stack(name="encoderblock", **kwargs)
      x = self._looped(lambda y: stack(y, deterministic)[0], x)
    elif self.loops is not None:
      blocks = [block(name=f"encoderblock_{i}", **kwargs) for i in range(self.depth)]

      def run(y):
        for b in blocks:
          y, _ = b(y, deterministic, None)
        return y

      x = self._looped(run, x)
    else:
      size = None if reduction is None else jnp.ones(x.shape[:2], jnp.float32)
      lookup = reduction is not None and reduction.method == "lookupvit"
      pool = reduction is not None and reduction.method == "hvt"
      late = 0 if late_tokens is None else late_tokens.shape[1]
      ahead = reduction is not None and reduction.one_step_ahead
      if ahead and self.remat_policy != "none":
        raise ValueError("token_reduction 'one_step_ahead' calls the next block from the "
                         "reducing one: it needs remat_policy='none'")
      blocks = {}

      def make_block(i):
        if i not in blocks:
          settings_i = dict(kwargs)
          if reduction is not None:
            settings_i.update(token_reduction=reduction, num_protected=self.num_protected,
                              reduce_tokens=i in reduction.layers and not (lookup or pool),
                              lookup_block=lookup and i >= reduction.layers[0])
          if free:
            settings_i.update(attention_free=i in free)
          if spectral:
            settings_i.update(spectral_grid=self.grid if i in spectral else None)
          local = dict(self.local_block_args or {}) if i < self.local_layers else {}
          blocks[i] = block(name=f"encoderblock_{i}", **dict(settings_i, **local))
        return blocks[i]

      for i in range(self.depth):
        if late and i == self.local_layers:
          x = jnp.concatenate([late_tokens.astype(x.dtype), x], axis=1)
        if lookup and i == reduction.layers[0]:
          x, size = token_reduction_lib.compress(x, size, reduction.num_tokens,
                                                 num_protected=self.num_protected)
        if reduction is not None and reduction.scales and i == reduction.layers[0]:
          x = token_reduction_lib.multi_scale_fuse(x, reduction.scales,
                                                   num_protected=self.num_protected)
        if pool and i in reduction.layers:
          x, size = token_reduction_lib.max_pool_tokens(
              x, size, reduction.kernel_size, reduction.stride,
              num_protected=self.num_protected)
        extra_args = {}
        if ahead and i in reduction.layers and i + 1 < self.depth and i + 1 not in free:
          extra_args["lookahead"] = lambda y, s, nxt=make_block(i + 1): nxt(y, True, s,
                                                                             probe=True)
        x, size = make_block(i)(x, deterministic, size, **extra_args)
        if i == 0 and self.peg_grid is not None:
          start = self.num_protected - late
          x = PEG(grid=self.peg_grid, start=start, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="peg")(x)
        if self.output_blocks is not None and i in self.output_blocks:
          outputs.append(x)
      if self.output_blocks is not None:
        return outputs
      if lookup:
        x = x[:, :self.num_protected + reduction.num_tokens]
    if not self.final_norm:
      return x
    return layer_norm(self.dtype, self.param_dtype, "encoder_norm",
                      epsilon=kwargs.get("norm_eps", 1e-6))(x)

  def _check_loops(self, reduction, free, spectral, late_tokens):
    if not isinstance(self.loops, int) or isinstance(self.loops, bool) or self.loops < 1:
      raise ValueError(f"loops must be an int >= 1 or None, got {self.loops!r}")
    if (reduction is not None or free or spectral or self.local_layers
        or self.peg_grid is not None or late_tokens is not None):
      raise ValueError("loops runs the same plain blocks again: it does not combine with "
                       "token_reduction, attention_free_layers, spectral_layers, local_layers, "
                       "a PEG or late tokens")

  def _looped(self, run, x):
    """`run` (the blocks) applied `loops` times (once without loops), with input injection."""
    inputs = x
    for t in range(self.loops or 1):
      x = run(x + inputs if self.loop_injection and t else x)
    return x


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends to the tokens (softmax), + MLP."""
  num_heads: int
  mlp_dim: int | None = None
  approximate_gelu: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                             (None, "embed")),
                       (1, d), self.param_dtype)
    probe = jnp.broadcast_to(jnp.asarray(probe, self.dtype), (n, 1, d))
    x = Attention(num_heads=self.num_heads, use_bias=True, dtype=self.dtype,
                  param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform(),
                  name="MultiHeadAttention")(probe, x)
    y = layer_norm(self.dtype, self.param_dtype, "LayerNorm_0")(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, approximate_gelu=self.approximate_gelu,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="MlpBlock")(y)
    return x[:, 0]


def embed_patches(images, width: int, patch: tuple[int, int], posemb: str, dtype: Any,
                  param_dtype: Any, channel_tokens: bool = False):
  """`[b, H, W, C]` -> `[b, patches, width]`: strided-conv patch embedding plus the position
  embedding ("learn", "sincos2d"; "peg": none, the encoder's `PEG` gives positions). Called inside a compact method, it creates the caller's `embedding` and `posemb`.

  With `channel_tokens` (ChannelViT) each channel is embedded on its own by the one
  single-channel convolution, the position embedding of the patch grid added to every
  channel's patches and a learned embedding of the channel (`channel_embedding`, `[C,
  width]`) to all of them: `[b, C·patches, width]`, channel-major (the channels' grids
  stacked along the height)."""
  if channel_tokens:
    n, h, w, c = images.shape
    x = embed_patches(jnp.reshape(jnp.moveaxis(images, -1, 1), (n * c, h, w, 1)), width, patch,
                      posemb, dtype, param_dtype)
    channels = nn.Embed(c, width, dtype=dtype, param_dtype=param_dtype,
                        name="channel_embedding",
                        embedding_init=nn.with_logical_partitioning(
                            nn.initializers.normal(stddev=0.02), (None, "embed")))(jnp.arange(c))
    return jnp.reshape(jnp.reshape(x, (n, c, -1, width)) + channels[None, :, None],
                       (n, -1, width))
  x = nn.Conv(width, patch, strides=patch, padding="VALID", dtype=dtype, param_dtype=param_dtype,
              name="embedding",
              kernel_init=nn.with_logical_partitioning(
                  nn.initializers.lecun_normal(), ("patch_h", "patch_w", "channels_in", "embed")),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
              )(jnp.asarray(images, dtype))
  n, gh, gw, _ = x.shape
  x = jnp.reshape(x, (n, gh * gw, width))
  if posemb == "peg":  # CPVT: the encoder's PEG encodes positions
    return x
  return x + PositionEmbedding(posemb, dtype=dtype, param_dtype=param_dtype,
                               name="posemb")((gh, gw), width)[None]


def resolve_sizes(model: nn.Module) -> None:
  """A ViT-like `model`'s sizes from its variant and fields (`common.resolve_variant`):
  `mlp_dim` 4·width and `patch_size` (16, 16) unless given, an int patch as a pair."""
  common.resolve_variant(model, decode_variant, required=("width", "depth", "num_heads"),
                         defaults=dict(mlp_dim=lambda sizes: 4 * sizes["width"],
                                       patch_size=(16, 16)))
  patch = model.patch_size
  common.set_fields(model, patch_size=(patch, patch) if isinstance(patch, int) else patch)


def check_encoder_inputs(model: nn.Module, images) -> None:
  """The checks a ViT-like `model` (remat_policy, attention_args fields) makes of its images."""
  if model.remat_policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {model.remat_policy!r}; expected one of "
                     f"{REMAT_POLICIES}")
  if model.attention_args is not None and not hasattr(model.attention_args, "keys"):
    raise TypeError(f"attention_args must be a dict, got {type(model.attention_args).__name__}")
  if images.ndim != 4:
    raise ValueError(f"images must be [batch, height, width, channels], got shape "
                     f"{images.shape}")
  patch = model.patch_size
  if not isinstance(patch, tuple) or len(patch) != 2 or not all(
      isinstance(p, int) and p > 0 for p in patch):
    raise ValueError(f"patch_size must be a positive int or a pair of them, got {patch!r}")
  (ph, pw), (h, w) = patch, images.shape[1:3]
  if h % ph or w % pw:
    raise ValueError(f"image size {(h, w)} must be divisible by patch_size {(ph, pw)}")
  spatial.check_op(model.attention, type(model).__module__.rsplit(".", 1)[-1])


def token_grid(images, patch: tuple[int, int], channel_tokens: bool = False) -> tuple[int, int]:
  """The grid of the patch tokens `embed_patches` makes of `images`: the patch grid, or with
  `channel_tokens` the channels' patch grids stacked along the height."""
  grid = (images.shape[1] // patch[0], images.shape[2] // patch[1])
  return (images.shape[3] * grid[0], grid[1]) if channel_tokens else grid


def encoder_op_args(model: nn.Module, images, patch: tuple[int, int], extra_tokens: int,
                    op: str | None = None, op_args: Any = None,
                    grid: tuple[int, int] | None = None):
  """The op arguments of a ViT-like `model`'s blocks: its `attention_args` (or `op_args` of
  `op`), plus the token grid (`grid`; None: the patch grid), the `extra_tokens` before the
  patches and clipped sizes for a 2-D op (`big_attn.ops.spatial.op_args`)."""
  grid = grid or token_grid(images, patch)
  if op is None:
    op, op_args = model.attention, model.attention_args
  return spatial.op_args(op, op_args, grid, extra_tokens)


class Model(nn.Module):
  """ViT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the pooled pre-logits `[batch, width]`.
    variant: size name for `decode_variant` ("B/16", "ConViT-S/16", "CPVT-Ti/16",
      "ChannelViT-S/16"); explicit
      fields below override it, and the fields left at None hold the variant's sizes once the
      model is built. A family's options (posemb, pool_type, local_layers, channel_tokens) fill those fields
      left at their defaults.
    width, depth, mlp_dim, num_heads, patch_size: the sizes (`mlp_dim` defaults to 4·width,
      `patch_size` to (16, 16)); `width`, `depth` and `num_heads` are needed without a variant.
    posemb: "learn" (default), "sincos2d", or "peg": no absolute position embedding and a
      `PEG` after the first block (CPVT; needs `scan_layers=False`).
    pool_type: "gap" (default), "cls" (alias "tok", big_vision's name) or "map".
    fc_norm: the final LayerNorm after pooling (`fc_norm`) instead of on every token before it
      (timm's default for "gap", MAE's).
    num_registers: learned register tokens appended to the sequence and dropped at the output.
    attention: registry name of the attention op (`big_attn.ops.names()`).
    attention_args: dict of op keyword arguments; attention_impl: the op's `implementation`.
      A 2-D op also gets the patch `grid`, the class and register tokens as `extra_tokens`
      and its sizes clipped to the grid (`big_attn.ops.spatial`; registers then sit after the
      class token inside the encoder).
    qk_norm, num_kv_heads, projections: as in `big_attn.layers.Attention` (projections
      "optimised" / "efficient": You Need to Pay Better Attention; with attention
      "super_attention", its Super Attention).
    head_dim: the per-head size of the blocks' attention; None: width / num_heads; "tokens": the
      number of tokens entering the encoder, n (Low-Rank Bottleneck in Multi-head Attention
      Models: a head size of n lets every head express any n×n attention map, whatever the
      number of heads).
    dropout: rate after the embeddings and inside every block.
    norm_eps: epsilon of the LayerNorms (1e-6; Hugging Face's ViT uses 1e-12).
    approximate_gelu: tanh-approximate GELU in the MLPs (big_vision's); False: exact (timm's).
    layer_scale_init: per-channel LayerScale of both branches of every block, initialised to
      this value (DeiT III, DINOv2, timm's `init_values`); None: none.
    head_zeroinit: zero-initialised classifier head (as big_vision).
    remat_policy: "none" or a `jax.checkpoint_policies` name applied to every block.
    scan_layers: stack the blocks with `nn.scan` (parameters get a leading `layers` axis).
    token_reduction: None, or a dict `{"method": NAME, ...}` of the method's settings (NAME
      one of `big_attn.layers.token_reduction.METHODS`: evit, tome, mctf, stvit, sit, spa,
      dependencyvit, lookupvit, hvt, mstm; settings in its `DEFAULTS`, e.g. `{"method": "evit",
      "keep_rate": 0.7, "layers": (3, 6, 9)}`): the patch tokens are pruned, merged or
      replaced between the attention and the MLP of those blocks (LookupViT: before its block,
      then exchanged with in every later block; HVT: max-pooled before them), the class and
      register tokens never
      (registers then sit after the class token inside the encoder). Needs
      `scan_layers=False` and an op without a patch grid; "evit", and "spa" with a
      `threshold` (a variable number of tokens per image, the rest masked), and "mstm" need
      pool_type "cls";
      "stvit" and "lookupvit" a square patch grid.
    attention_free_layers: block indices without an attention branch (MLP Can Be A Good
      Transformer Learner: x + MLP(LN(x)) only); needs `scan_layers=False`.
    parallel_block: every block computes x + Attn(LN(x)) + MLP(LN(x)), one LayerNorm for both
      branches (PAF: Investigating the Role of Feed-Forward Networks in Transformers Using
      Parallel Attention and Feed-Forward Net Design); no token reduction.
    spectral_layers: block indices that are GFNet's spectral blocks (SpectFormer: the first 4;
      the spectformer_* variants set it); needs `scan_layers=False`, pool_type "gap" or "map",
      no registers and no token reduction (the tokens must be the patch grid).
    local_layers: the first blocks run `local_attention` (default 0); with a class token and
      `0 < local_layers < depth` the class token joins after them (ConViT: 10 GPSA blocks).
      Needs `scan_layers=False` and no token reduction.
    local_attention: registry name of the local blocks' op ("gpsa", ConViT's); a 2-D op gets
      the patch grid as the main op does.
    channel_tokens: a token per channel and patch (ChannelViT, `embed_patches`); a 2-D op
      gets the channels' patch grids stacked along the height as its grid.
    token_pooling_scales: K >= 2 puts token-aware average pooling (`TokenAwarePooling`, K
      dilations) before the attention of every block (Robustifying Token Attention for Vision
      Transformers); None or 0: none. Needs no registers, token reduction, local layers or channel
      tokens (the tokens after the class token must be the patch grid).
    loops: T runs of the `depth` weight-tied blocks (Looped Transformers as Programmable
      Computers; parameters independent of T); None: one. `loop_injection` adds the encoder's
      input before every run after the first. Plain blocks only (no token reduction,
      attention-free, spectral or local layers, or PEG).
    output_blocks: increasing block indices; the model then returns the tuple of those blocks'
      outputs `[batch, tokens, width]` (class token first with pool_type "cls"; no final LN,
      pooling or head) instead of logits: the inputs of a dense head (`big_attn.models.dpt`).
      None (default): logits. Needs no registers, token reduction or local layers.
    dtype: compute dtype (e.g. bfloat16); param_dtype: parameter dtype.
  Parameters carry the logical axis names embed, mlp, heads, kv_heads, head_dim, norm,
  patch_h, patch_w, channels_in, position, classes and layers.
  """
  num_classes: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: tuple[int, int] | None = None
  posemb: str = "learn"
  pool_type: str = "gap"
  fc_norm: bool = False
  num_registers: int = 0
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  qk_norm: bool = False
  num_kv_heads: int | None = None
  projections: str | None = None
  head_dim: int | str | None = None
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  layer_scale_init: float | None = None
  head_zeroinit: bool = True
  remat_policy: str = "none"
  scan_layers: bool = False
  token_reduction: Any = None
  attention_free_layers: Any = None
  parallel_block: bool = False
  spectral_layers: Any = None
  local_layers: int = 0
  local_attention: str = "gpsa"
  channel_tokens: bool = False
  token_pooling_scales: int | None = None
  loops: int | None = None
  loop_injection: bool = False
  output_blocks: tuple[int, ...] | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.variant is not None:  # a family's options fill the fields left at their defaults
      defaults = {f.name: f.default for f in dataclasses.fields(self)}
      options = {name: value for name, value in decode_variant(self.variant).items()
                 if name in FAMILY_OPTIONS and getattr(self, name) == defaults[name]}
      common.set_fields(self, **options)
    resolve_sizes(self)
    super().__post_init__()

  def _check(self, images):
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"unknown pool_type {self.pool_type!r}; expected one of {POOL_TYPES}")
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f"unknown posemb {self.posemb!r}; expected one of {POSEMB_TYPES}")
    if self.num_registers < 0:
      raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")
    if self.parallel_block and self.token_reduction is not None:
      raise ValueError("parallel_block computes the attention and the MLP from the same input: "
                       "it does not combine with token_reduction, which acts between them")
    if self.head_dim is not None and self.head_dim != "tokens" and (
        not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool)
        or self.head_dim < 1):
      raise ValueError(f"head_dim must be None, a positive int or 'tokens', got "
                       f"{self.head_dim!r}")
    if (not isinstance(self.local_layers, int) or isinstance(self.local_layers, bool)
        or not 0 <= self.local_layers <= self.depth):
      raise ValueError(f"local_layers must be an int in [0, depth={self.depth}], got "
                       f"{self.local_layers!r}")
    check_encoder_inputs(self, images)
    if self.spectral_layers and (self.pool_type in ("cls", "tok") or self.num_registers
                                 or self.token_reduction is not None):
      raise ValueError(f"spectral_layers filter the patch grid: they need pool_type 'gap' or "
                       f"'map', no registers and no token_reduction, got pool_type "
                       f"{self.pool_type!r}, num_registers {self.num_registers}, "
                       f"token_reduction {self.token_reduction!r}")
    if self.local_layers:
      spatial.check_op(self.local_attention, "vit")
    if self.token_pooling_scales and (self.num_registers or self.token_reduction is not None
                                      or self.local_layers or self.channel_tokens):
      raise ValueError(f"token_pooling_scales pools the patch grid: it needs no registers, "
                       f"token_reduction, local_layers or channel_tokens, got num_registers "
                       f"{self.num_registers}, token_reduction {self.token_reduction!r}, "
                       f"local_layers {self.local_layers}, channel_tokens "
                       f"{self.channel_tokens}")
    if self.output_blocks is not None:
      blocks = self.output_blocks
      if (not isinstance(blocks, (tuple, list)) or not blocks
          or any(not isinstance(i, int) or isinstance(i, bool) for i in blocks)
          or list(blocks) != sorted(set(blocks)) or not 0 <= blocks[0] <= blocks[-1] < self.depth):
        raise ValueError(f"output_blocks must be increasing block indices in [0, depth="
                         f"{self.depth}), got {blocks!r}")
      if self.num_registers or self.token_reduction is not None or self.local_layers:
        raise ValueError("output_blocks returns every block's tokens in input order: it needs "
                         "no registers, token_reduction or local_layers")
    if self.token_pooling_scales and self.parallel_block:
      raise ValueError("token_pooling_scales pools the tokens the attention reads, so it needs "
                       "parallel_block=False (the parallel block's MLP reads the same normalised "
                       "tokens as its attention)")
    return token_reduction_lib.resolve(self.token_reduction, self.depth, op=self.attention,
                                       has_class_token=self.pool_type in ("cls", "tok"))

  def removed_parameters(self) -> tuple[tuple[str, ...], ...]:
    """The parameter subtrees a full model has and this one lacks: the attention branch
    (`LayerNorm_0`, `MultiHeadAttention`, `layer_scale_1`) of each block of
    `attention_free_layers`. Fine-tuning from the full model's weights (`config.init_from`)
    drops them (MLP Can Be A Good Transformer Learner)."""
    free = settings.block_indices("attention_free_layers", self.attention_free_layers,
                                  self.depth)
    return tuple(("Transformer", f"encoderblock_{i}", name) for i in sorted(free)
                 for name in ("LayerNorm_0", "MultiHeadAttention", "layer_scale_1"))

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    reduction = self._check(images)
    width, patch = self.width, self.patch_size
    deterministic = not train
    param = lambda name, init, shape, axes: jnp.asarray(  # pylint: disable=g-long-lambda
        self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype),
        self.dtype)

    x = embed_patches(images, width, patch, self.posemb, self.dtype, self.param_dtype,
                      self.channel_tokens)
    n = x.shape[0]
    grid = token_grid(images, patch, self.channel_tokens)

    num_prefix, late_tokens = 0, None
    if self.pool_type in ("cls", "tok"):
      cls = param("cls", nn.initializers.zeros_init(), (1, width), (None, "embed"))
      cls = jnp.broadcast_to(cls[None], (n, 1, width))
      if 0 < self.local_layers < self.depth:  # ConViT: joins after the local blocks
        late_tokens = cls
      else:
        x = jnp.concatenate([cls, x], axis=1)
      num_prefix = 1
    # Registers follow the patches; for a 2-D op, with token reduction, local blocks or a PEG
    # they join the extra tokens before them (timm's order) inside the encoder.
    registers_first = bool(self.num_registers) and (
        spatial.takes_grid(self.attention) or reduction is not None or self.local_layers > 0
        or self.posemb == "peg")
    if self.num_registers:
      reg = param("registers", nn.initializers.normal(stddev=0.02),
                  (self.num_registers, width), (None, "embed"))
      reg = jnp.broadcast_to(reg[None], (n,) + reg.shape)
      early = num_prefix - (late_tokens is not None)
      x = jnp.concatenate([x[:, :early], reg, x[:, early:]] if registers_first
                          else [x, reg], axis=1)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = nn.Dropout(rate=self.dropout)(x, deterministic)

    extra = num_prefix + self.num_registers
    head_dim = x.shape[1] + (late_tokens is not None) if self.head_dim == "tokens" else (
        self.head_dim)
    block_args = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                      num_kv_heads=self.num_kv_heads, head_dim=head_dim,
                      attention=self.attention,
                      attention_args=encoder_op_args(self, images, patch, extra, grid=grid),
                      attention_impl=self.attention_impl, qk_norm=self.qk_norm,
                      projections=self.projections, dropout=self.dropout, norm_eps=self.norm_eps,
                      approximate_gelu=self.approximate_gelu,
                      layer_scale_init=self.layer_scale_init, parallel=self.parallel_block)
    if self.token_pooling_scales:
      block_args.update(token_pooling_scales=self.token_pooling_scales,
                        token_pooling_grid=grid, token_pooling_start=num_prefix)
    local_block_args = None
    if self.local_layers:
      local_extra = extra - (late_tokens is not None)
      local_block_args = dict(attention=self.local_attention, attention_impl=None,
                              attention_args=encoder_op_args(self, images, patch, local_extra,
                                                             op=self.local_attention,
                                                             grid=grid))
    x = Encoder(depth=self.depth, block_args=block_args, remat_policy=self.remat_policy,
                scan_layers=self.scan_layers, final_norm=not self.fc_norm,
                token_reduction=reduction, num_protected=extra,
                attention_free_layers=self.attention_free_layers,
                spectral_layers=self.spectral_layers, grid=grid,
                local_layers=self.local_layers, local_block_args=local_block_args,
                peg_grid=grid if self.posemb == "peg" else None,
                loops=self.loops, loop_injection=self.loop_injection,
                output_blocks=None if self.output_blocks is None else tuple(self.output_blocks),
                dtype=self.dtype, param_dtype=self.param_dtype, name="Transformer")(
                    x, deterministic, late_tokens)
    if self.output_blocks is not None:
      return tuple(x)
    if registers_first:
      x = jnp.concatenate([x[:, :num_prefix], x[:, extra:], x[:, num_prefix:extra]], axis=1)
    if self.num_registers:
      x = x[:, :-self.num_registers]

    if self.pool_type == "map":
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="MAPHead")(x[:, num_prefix:])
    elif self.pool_type == "gap":
      x = jnp.mean(x, axis=1)
    else:
      x = x[:, 0]
    if self.fc_norm:
      x = layer_norm(self.dtype, self.param_dtype, "fc_norm")(x)

    if self.num_classes:
      kernel_init = (nn.initializers.zeros_init() if self.head_zeroinit
                     else nn.initializers.lecun_normal())
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                   kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "classes")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("classes",)))(x)
    return x.astype(jnp.float32)
