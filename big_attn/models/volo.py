"""VOLO (VOLO: Vision Outlooker for Visual Recognition, Yuan et al. 2022).

    model = Model(num_classes=1000, variant="D1")
    variables = model.init(jax.random.key(0), images)          # params and batch_stats
    logits = model.apply(variables, images, train=False)       # images: [batch, H, W, C]

A convolutional stem (7x7 stride 2, two 3x3; `stem_dim` channels, each BatchNorm and ReLU)
and a strided convolution embed the image into a grid of 8x8 patches (28x28 at 224x224).
Stage 1 is `depths[0]` Outlookers on that grid: pre-LayerNorm blocks

    x + OutlookAttn(LN x),   x + MLP(LN x),

the attention the `outlook_attention` op by name (`local_attention`; 3x3 windows, stride 2 as
VOLO's code) with the grid. A 2x2 stride-2 convolution halves the grid and widens it, a learned
position embedding is added, and stage 2 is `depths[1]` ViT blocks (`attention`, any op by
name; a 2-D op gets the grid). A class token then joins and `class_blocks` class-attention
blocks (CaiT's, only the class token queries; `class_attention`, softmax) update it:

    c <- c + Attn(LN[c, x]_0, LN[c, x]),   c <- c + MLP(LN c).

After a final LayerNorm the class token is classified; with `aux_head` (token labelling, the
paper's counts include it) the logits are `head(c) + 0.5 · max_tokens aux_head(x_i)`.

Parameter counts (224x224x3 input, 1000 classes; `jax.eval_shape`) against the paper's Table 2
(whose counts include the token-labelling head):

| variant | depths   | widths     | heads    | mlp | parameters  | paper |
|---------|----------|------------|----------|-----|-------------|-------|
| D1      | (4, 14)  | (192, 384) | (6, 12)  |  3  |  26,634,344 | 26.6M |
| D2      | (6, 18)  | (256, 512) | (8, 16)  |  3  |  58,626,112 | 58.7M |
| D3      | (8, 28)  | (256, 512) | (8, 16)  |  3  |  86,261,584 | 86.3M |
| D4      | (8, 28)  | (384, 768) | (12, 16) |  3  | 192,657,392 |  193M |
| D5      | (12, 36) | (384, 768) | (12, 16) |  4  | 294,985,568 |  296M |

The outlook attention's weights factor through the layer's query projection (see
`big_attn.ops.outlook`; the layer's key projection is unused by that op but counted: 148,224
parameters in D1), and the attention layers of both stages carry query/key/value biases.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_attn.layers import Attention, MlpBlock, PositionEmbedding, batch_norm, layer_norm
from big_attn.models import common
from big_attn.models import vit
from big_attn.ops import checks
from big_attn.ops import spatial

# depths (outlookers, transformers), widths, heads, mlp_ratio, stem_dim (the paper's Table 2).
_SIZES = {
    "D1": ((4, 14), (192, 384), (6, 12), 3, 64),
    "D2": ((6, 18), (256, 512), (8, 16), 3, 64),
    "D3": ((8, 28), (256, 512), (8, 16), 3, 64),
    "D4": ((8, 28), (384, 768), (12, 16), 3, 64),
    "D5": ((12, 36), (384, 768), (12, 16), 4, 128),
}
# VOLO's outlooker: 3x3 windows every 2 tokens.
OUTLOOK_ARGS = {"kernel_size": 3, "stride": 2}
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"VOLO-D1" (or "D1") -> dict(depths=(4, 14), widths=(192, 384), num_heads=(6, 12),
  mlp_ratio=3, stem_dim=64). Sizes: D1 ... D5."""
  size = variant[5:] if isinstance(variant, str) and variant.startswith("VOLO-") else variant
  if not isinstance(size, str) or size not in _SIZES:
    raise ValueError(f"unknown VOLO variant {variant!r}; expected VOLO-SIZE or SIZE with SIZE "
                     f"in {', '.join(_SIZES)}")
  depths, widths, heads, mlp_ratio, stem_dim = _SIZES[size]
  return dict(depths=depths, widths=widths, num_heads=heads, mlp_ratio=mlp_ratio,
              stem_dim=stem_dim)


class ClassBlock(nn.Module):
  """CaiT's class-attention block on `[batch, 1 + tokens, width]`: only the class token (the
  first) queries, attending to every token, then an MLP on it; the other tokens pass unchanged.

      y = LN x,   c = x_0 + Attn(y_0, y),   c <- c + MLP(LN c),   out = [c, x_1, ...].

  The attention is op `attention` (softmax; any op that attends one query to other keys), its
  query, key and value projections without bias (VOLO's), the output projection with bias.
  """
  num_heads: int
  mlp_dim: int
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  norm_eps: float = 1e-5
  approximate_gelu: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    y = layer_norm(self.dtype, self.param_dtype, "norm1", epsilon=self.norm_eps)(x)
    cls = x[:, :1] + Attention(
        num_heads=self.num_heads, op=self.attention, op_args=self.attention_args,
        implementation=self.attention_impl, use_bias=False, out_bias=True, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=_INIT, name="attention")(y[:, :1], y)
    y = layer_norm(self.dtype, self.param_dtype, "norm2", epsilon=self.norm_eps)(cls)
    cls = cls + MlpBlock(mlp_dim=self.mlp_dim, approximate_gelu=self.approximate_gelu,
                         dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
                             y, deterministic)
    return jnp.concatenate([cls, x[:, 1:]], axis=1)


class Model(nn.Module):
  """VOLO classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the normalised class token `[batch, width]`.
    variant: size name for `decode_variant` ("VOLO-D1" or "D1"); explicit fields override it.
    depths: (Outlookers, transformer blocks); widths, num_heads: of the two stages.
    mlp_ratio: MLP width over the stage width (3; D5 4).
    stem_dim: channels of the convolutional stem (64; D5 128).
    patch_size: the embedding's total stride (8): the 7x7 stride-2 stem, then a
      `patch_size // 2` strided convolution; image sides must be divisible by 2·patch_size.
    class_blocks: class-attention blocks (2).
    aux_head: the token-labelling head (`head(c) + 0.5 · max_i aux_head(x_i)`; True as the
      paper's counts).
    attention, attention_args: stage 2's op by registry name and its arguments (softmax); a 2-D
      op gets the stage's grid.
    local_attention, local_attention_args: stage 1's op ("outlook_attention", arguments
      `OUTLOOK_ARGS` when None); a 2-D op gets the stage's grid.
    class_attention, class_attention_args: the class blocks' op (softmax); it must attend one
      query to other keys (no grid).
    attention_impl: the ops' `implementation`.
    dropout: rate after the position embedding and inside the blocks.
    norm_eps: every LayerNorm's eps (1e-5, PyTorch's).
    approximate_gelu: tanh-approximate GELU (False: exact, the authors').
    head_zeroinit: zero-initialised classifier heads.
    dtype: compute dtype; param_dtype: parameter dtype.
  BatchNorm statistics of the stem live in `batch_stats`.
  """
  num_classes: int
  variant: str | None = None
  depths: tuple[int, int] | None = None
  widths: tuple[int, int] | None = None
  num_heads: tuple[int, int] | None = None
  mlp_ratio: int | None = None
  stem_dim: int | None = None
  patch_size: int = 8
  class_blocks: int = 2
  aux_head: bool = True
  attention: str = "softmax"
  attention_args: Any = None
  local_attention: str = "outlook_attention"
  local_attention_args: Any = None
  class_attention: str = "softmax"
  class_attention_args: Any = None
  attention_impl: str | None = None
  dropout: float = 0.0
  norm_eps: float = 1e-5
  approximate_gelu: bool = False
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("depths", "widths", "num_heads"),
                           defaults=dict(mlp_ratio=3, stem_dim=64))
    super().__post_init__()

  def _check(self, images):
    for name in ("depths", "widths", "num_heads"):
      checks.int_tuple(name, getattr(self, name), 2, allow_int=False)
    for name in ("mlp_ratio", "stem_dim", "class_blocks"):
      checks.positive_int(name, getattr(self, name))
    checks.positive_int("patch_size", self.patch_size)
    if self.patch_size % 2:
      raise ValueError(f"patch_size must be even (a stride-2 stem, then patch_size // 2), got "
                       f"{self.patch_size}")
    if any(w % h for w, h in zip(self.widths, self.num_heads)):
      raise ValueError(f"widths {self.widths} must be divisible by num_heads {self.num_heads}")
    for name in ("attention_args", "local_attention_args", "class_attention_args"):
      value = getattr(self, name)
      if value is not None and not hasattr(value, "keys"):
        raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    if any(side % (2 * self.patch_size) for side in images.shape[1:3]):
      raise ValueError(f"image size {images.shape[1:3]} must be divisible by 2·patch_size "
                       f"({2 * self.patch_size}: the patch grid is downsampled by 2)")
    spatial.check_op(self.attention, "VOLO")
    spatial.check_op(self.local_attention, "VOLO")
    spatial.check_op(self.class_attention, "VOLO class attention", grid=False,
                     same_grid=False)

  def _stage(self, x, grid, stage, op, op_args, deterministic):
    width = self.widths[stage]
    block_args = dict(num_heads=self.num_heads[stage], mlp_dim=self.mlp_ratio * width,
                      attention=op, attention_args=spatial.op_args(op, op_args, grid),
                      attention_impl=self.attention_impl, dropout=self.dropout,
                      norm_eps=self.norm_eps, approximate_gelu=self.approximate_gelu)
    return vit.Encoder(depth=self.depths[stage], block_args=block_args, final_norm=False,
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"stage_{stage + 1}")(x, deterministic)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    deterministic = not train
    conv = lambda features, kernel, stride, pad, name, bias: nn.Conv(  # pylint: disable=g-long-lambda
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.kaiming_normal(), ("conv_height", "conv_width", "channels_in",
                                               "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))
    x = jnp.asarray(images, self.dtype)
    for i, (kernel, stride) in enumerate(((7, 2), (3, 1), (3, 1))):
      x = conv(self.stem_dim, kernel, stride, kernel // 2, f"stem_{i}", False)(x)
      x = nn.relu(batch_norm(deterministic, self.dtype, self.param_dtype, f"stem_{i}_norm",
                             epsilon=1e-5, momentum=0.9)(x))
    half = self.patch_size // 2
    x = conv(self.widths[0], half, half, 0, "patch_embed", True)(x)
    n, h, w, _ = x.shape
    x = self._stage(jnp.reshape(x, (n, h * w, -1)), (h, w), 0, self.local_attention,
                    OUTLOOK_ARGS if self.local_attention_args is None
                    and self.local_attention == "outlook_attention"
                    else self.local_attention_args, deterministic)

    x = conv(self.widths[1], 2, 2, 0, "downsample", True)(jnp.reshape(x, (n, h, w, -1)))
    h, w, width = h // 2, w // 2, self.widths[1]
    x = jnp.reshape(x, (n, h * w, width)) + PositionEmbedding(
        "learn", dtype=self.dtype, param_dtype=self.param_dtype, name="posemb")((h, w),
                                                                                width)[None]
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    x = self._stage(x, (h, w), 1, self.attention, self.attention_args, deterministic)

    cls = self.param("cls", nn.with_logical_partitioning(_INIT, (None, "embed")), (1, width),
                     self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype)[None], (n, 1, width)),
                         x], axis=1)
    for i in range(self.class_blocks):
      x = ClassBlock(num_heads=self.num_heads[1], mlp_dim=self.mlp_ratio * width,
                     attention=self.class_attention, attention_args=self.class_attention_args,
                     attention_impl=self.attention_impl, norm_eps=self.norm_eps,
                     approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f"class_block_{i}")(x, deterministic)
    x = layer_norm(self.dtype, self.param_dtype, "norm", epsilon=self.norm_eps)(x)
    if not self.num_classes:
      return x[:, 0].astype(jnp.float32)
    kernel_init = nn.initializers.zeros_init() if self.head_zeroinit else _INIT
    head = lambda name: nn.Dense(  # pylint: disable=g-long-lambda
        self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "classes")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)))
    logits = head("head")(x[:, 0])
    if self.aux_head:
      logits = logits + 0.5 * jnp.max(head("aux_head")(x[:, 1:]), axis=1)
    return logits.astype(jnp.float32)
