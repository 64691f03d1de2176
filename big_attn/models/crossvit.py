"""CrossViT (CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification,
Chen, Fan and Panda 2021).

    model = Model(num_classes=1000, variant="CrossViT-S", attention="softmax")
    params = model.init(jax.random.key(0), images)["params"]     # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)  # [batch, 1000]

Two ViT branches see the image at two patch sizes: the small branch (patch 12 on a 240x240
image, a 20x20 grid, the narrower width) and the large branch (patch 16 on 224x224, 14x14,
twice the width); with `image_sizes` each branch resizes the input (bicubic) to its own size.
Each branch embeds its patches (strided convolution, learned position embedding of the grid)
and prepends a class token. `num_stages` multi-scale encoders follow; in each, the branches run
`depths` = (N, M) of ViT's pre-LayerNorm blocks (`big_attn.models.vit.Encoder`, any attention op
by name; a 2-D op gets the branch's grid and the class token as an extra token), then a
`CrossAttentionFusion` for each branch exchanges information through the class tokens:

    c' = f(CLS_i)                        f: LN, GELU, Dense to the other branch's width
    y  = c' + Proj(Attn(LN(c')·W_q, LN([c', P_j])·W_k, LN([c', P_j])·W_v))
    CLS_i <- g(y)                        g: LN, GELU, Dense back to branch i's width

where P_j are the other branch's patch tokens: cross-attention with one query, linear in the
number of tokens (`fusion_attention`, an op by name, with the other branch's heads). Each
branch's class token is LayerNorm'd and classified by its own head; the logits are averaged.

Parameter counts (240x240x3 input for the small branch, 224x224 for the large, 1000 classes;
counted with `jax.eval_shape`, nothing allocated) against the paper's Table 2 (K = 3 stages,
one cross-attention per fusion). timm's `crossvit_*_240` (the authors' code) count exactly
ours plus a position embedding of each class token (widths_0 + widths_1 more: 7,014,800 for
Ti, 26,856,272 for S).

| variant     | widths     | heads   | depths (N, M) | mlp ratio | parameters  | paper  |
|-------------|------------|---------|---------------|-----------|-------------|--------|
| CrossViT-Ti |  (96, 192) |  (3, 3) |        (1, 4) |         4 |   7,014,512 |   6.9M |
| CrossViT-S  | (192, 384) |  (6, 6) |        (1, 4) |         4 |  26,855,696 |  26.7M |
| CrossViT-B  | (384, 768) | (12,12) |        (1, 4) |         4 | 105,024,080 | 104.7M |
| CrossViT-9  | (128, 256) |  (4, 4) |        (1, 3) |         3 |   8,552,912 |   8.6M |
| CrossViT-15 | (192, 384) |  (6, 6) |        (1, 5) |         3 |  27,527,888 |  27.4M |
| CrossViT-18 | (224, 448) |  (7, 7) |        (1, 6) |         3 |  43,270,736 |  43.3M |

The paper's † variants (a convolutional patch embedding) are not built.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.layers import Attention, PositionEmbedding, layer_norm
from big_attn.models import common
from big_attn.models import vit
from big_attn.ops import checks
from big_attn.ops import spatial

# widths, num_heads, depths (N, M), mlp_ratio (the paper's Table 2; K = 3 stages).
_SIZES = {
    "Ti": ((96, 192), (3, 3), (1, 4), 4),
    "S": ((192, 384), (6, 6), (1, 4), 4),
    "B": ((384, 768), (12, 12), (1, 4), 4),
    "9": ((128, 256), (4, 4), (1, 3), 3),
    "15": ((192, 384), (6, 6), (1, 5), 3),
    "18": ((224, 448), (7, 7), (1, 6), 3),
}
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"CrossViT-S" (or "S") -> dict(widths=(192, 384), num_heads=(6, 6), depths=(1, 4),
  mlp_ratio=4, num_stages=3, patch_sizes=(12, 16), image_sizes=(240, 224)).

  Sizes: Ti, S, B, 9, 15, 18."""
  size = variant[9:] if isinstance(variant, str) and variant.startswith("CrossViT-") else variant
  if not isinstance(size, str) or size not in _SIZES:
    raise ValueError(f"unknown CrossViT variant {variant!r}; expected CrossViT-SIZE or SIZE with "
                     f"SIZE in {', '.join(_SIZES)}")
  widths, heads, depths, mlp_ratio = _SIZES[size]
  return dict(widths=widths, num_heads=heads, depths=depths, mlp_ratio=mlp_ratio, num_stages=3,
              patch_sizes=(12, 16), image_sizes=(240, 224))


def _dense(features, name, dtype, param_dtype):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(_INIT, ("channels_in", "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         ("embed",)))


class CrossAttentionFusion(nn.Module):
  """CrossViT's fusion of branch i's class token `cls: [batch, 1, width_i]` with the other
  branch's tokens `other: [batch, 1 + patches, width_j]` (its class token is dropped) ->
  the new class token `[batch, 1, width_i]`:

      c' = Dense_j(GELU(LN(cls))),   t = [c', other[:, 1:]],
      y = c' + Attention(LN(t)[:, :1], LN(t)),   out = Dense_i(GELU(LN(y))).

  The attention (`num_heads` heads over width_j, projections with biases) runs the op `op`
  by name with `op_args`.
  """
  num_heads: int
  op: str = "softmax"
  op_args: Any = None
  qk_norm: bool = False
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cls, other, deterministic: bool = True):
    if cls.ndim != 3 or cls.shape[1] != 1 or other.ndim != 3 or other.shape[0] != cls.shape[0]:
      raise ValueError(f"CrossAttentionFusion: cls must be [batch, 1, width] and other [batch, "
                       f"tokens, width'] with the same batch, got {cls.shape} and {other.shape}")
    width_i, width_j = cls.shape[-1], other.shape[-1]
    norm = lambda name: layer_norm(self.dtype, self.param_dtype, name, epsilon=self.norm_eps)
    gelu = lambda y: nn.gelu(y, approximate=self.approximate_gelu)
    c = _dense(width_j, "proj", self.dtype, self.param_dtype)(gelu(norm("proj_norm")(cls)))
    t = norm("LayerNorm_0")(jnp.concatenate([c, other[:, 1:].astype(c.dtype)], axis=1))
    y = Attention(num_heads=self.num_heads, op=self.op, op_args=self.op_args,
                  qk_norm=self.qk_norm, use_bias=True,
                  dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=nn.initializers.xavier_uniform(),
                  name="MultiHeadAttention")(t[:, :1], t)
    y = c + nn.Dropout(rate=self.dropout)(y, deterministic)
    return _dense(width_i, "revert_proj", self.dtype, self.param_dtype)(
        gelu(norm("revert_norm")(y)))


class Model(nn.Module):
  """CrossViT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns both normalised class tokens concatenated
      `[batch, width_0 + width_1]`.
    variant: size name for `decode_variant` ("CrossViT-S" or "S"); explicit fields override it.
    widths, num_heads: of the small-patch and the large-patch branch.
    depths: (N, M) blocks of each branch in each multi-scale stage.
    num_stages: multi-scale stages K (default 3), each ending with the fusions.
    mlp_ratio: MLP width over the branch width (4).
    patch_sizes: the two branches' patch sizes (default (12, 16)).
    image_sizes: the (square) image size each branch resizes its input to (bicubic; the
      variants: (240, 224)); None: both take the input as it is.
    posemb: "learn" (the paper's) or "sincos2d", on each branch's grid.
    attention: registry name of the branches' attention op; attention_args its keyword
      arguments; attention_impl its `implementation`. A 2-D op gets each branch's `grid` and
      the class token as `extra_tokens` (`big_attn.ops.spatial`).
    fusion_attention: registry name of the cross-attention op of the fusions ("softmax", the
      paper's; one query against a 1-D token sequence); fusion_attention_args its arguments.
    qk_norm: as in `big_attn.layers.Attention`.
    dropout: rate after the embeddings and inside every block.
    norm_eps: every LayerNorm's eps (1e-6, timm's).
    approximate_gelu: tanh-approximate GELU (True); False: exact, the authors'.
    head_zeroinit: zero-initialised classifier heads.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  num_classes: int
  variant: str | None = None
  widths: tuple[int, int] | None = None
  num_heads: tuple[int, int] | None = None
  depths: tuple[int, int] | None = None
  num_stages: int | None = None
  mlp_ratio: int | None = None
  patch_sizes: tuple[int, int] | None = None
  image_sizes: tuple[int, int] | None = None
  posemb: str = "learn"
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  fusion_attention: str = "softmax"
  fusion_attention_args: Any = None
  qk_norm: bool = False
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("widths", "num_heads", "depths"),
                           defaults=dict(num_stages=3, mlp_ratio=4, patch_sizes=(12, 16)))
    super().__post_init__()

  def _check(self, images):
    checks.int_tuple("widths", self.widths, 2, allow_int=False)
    checks.int_tuple("num_heads", self.num_heads, 2, allow_int=False)
    checks.int_tuple("depths", self.depths, 2, allow_int=False)
    checks.int_tuple("patch_sizes", self.patch_sizes, 2, allow_int=False)
    if self.image_sizes is not None:
      checks.int_tuple("image_sizes", self.image_sizes, 2, allow_int=False)
    checks.positive_int("num_stages", self.num_stages)
    checks.positive_int("mlp_ratio", self.mlp_ratio)
    for name in ("attention_args", "fusion_attention_args"):
      value = getattr(self, name)
      if value is not None and not hasattr(value, "keys"):
        raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    sizes = self.image_sizes or (images.shape[1:3],) * 2
    for branch, (size, patch) in enumerate(zip(sizes, self.patch_sizes)):
      size = (size, size) if isinstance(size, int) else tuple(size)
      if size[0] % patch or size[1] % patch:
        raise ValueError(f"branch {branch}: image size {size} must be divisible by its patch "
                         f"size {patch} (patch_sizes {self.patch_sizes}, image_sizes "
                         f"{self.image_sizes})")
    spatial.check_op(self.attention, "CrossViT")
    spatial.check_op(self.fusion_attention, "CrossViT fusion", grid=False, same_grid=False)

  def _embed(self, images, branch):
    """Branch `branch`'s tokens `[batch, 1 + patches, width]` and patch grid."""
    n, _, _, c = images.shape
    if self.image_sizes is not None and images.shape[1:3] != (self.image_sizes[branch],) * 2:
      images = jax.image.resize(images, (n, self.image_sizes[branch],
                                         self.image_sizes[branch], c), "bicubic")
    width, patch = self.widths[branch], self.patch_sizes[branch]
    x = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"embedding_{branch}",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(),
                    ("patch_h", "patch_w", "channels_in", "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
                )(jnp.asarray(images, self.dtype))
    _, h, w, _ = x.shape
    x = jnp.reshape(x, (n, h * w, width)) + PositionEmbedding(
        self.posemb, dtype=self.dtype, param_dtype=self.param_dtype, name=f"posemb_{branch}")(
            (h, w), width)[None]
    cls = self.param(f"cls_{branch}", nn.with_logical_partitioning(_INIT, (None, "embed")),
                     (1, width), self.param_dtype)
    cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype)[None], (n, 1, width))
    return jnp.concatenate([cls, x], axis=1), (h, w)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    deterministic = not train
    xs, grids = zip(*(self._embed(images, b) for b in range(2)))
    xs = [nn.Dropout(rate=self.dropout)(x, deterministic) for x in xs]
    for stage in range(self.num_stages):
      for b in range(2):
        block_args = dict(num_heads=self.num_heads[b], mlp_dim=self.mlp_ratio * self.widths[b],
                          attention=self.attention,
                          attention_args=spatial.op_args(self.attention, self.attention_args,
                                                         grids[b], 1),
                          attention_impl=self.attention_impl, qk_norm=self.qk_norm,
                          dropout=self.dropout, norm_eps=self.norm_eps,
                          approximate_gelu=self.approximate_gelu)
        xs[b] = vit.Encoder(depth=self.depths[b], block_args=block_args, final_norm=False,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            name=f"stage_{stage}_branch_{b}")(xs[b], deterministic)
      fused = [CrossAttentionFusion(
          num_heads=self.num_heads[1 - b], op=self.fusion_attention,
          op_args=self.fusion_attention_args, qk_norm=self.qk_norm, dropout=self.dropout,
          norm_eps=self.norm_eps, approximate_gelu=self.approximate_gelu, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f"stage_{stage}_fusion_{b}")(
              xs[b][:, :1], xs[1 - b], deterministic) for b in range(2)]
      xs = [jnp.concatenate([c, x[:, 1:]], axis=1) for c, x in zip(fused, xs)]

    tokens = [layer_norm(self.dtype, self.param_dtype, f"norm_{b}", epsilon=self.norm_eps)(
        x[:, 0]) for b, x in enumerate(xs)]
    if not self.num_classes:
      return jnp.concatenate(tokens, axis=-1).astype(jnp.float32)
    kernel_init = nn.initializers.zeros_init() if self.head_zeroinit else _INIT
    logits = [nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"head_{b}",
                       kernel_init=nn.with_logical_partitioning(kernel_init,
                                                                ("embed", "classes")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              ("classes",)))(t)
              for b, t in enumerate(tokens)]
    return jnp.mean(jnp.stack(logits).astype(jnp.float32), axis=0)
