"""T2T-ViT (Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet, Yuan et
al. 2021).

    model = Model(num_classes=1000, variant="T2T-ViT-14", attention="softmax")
    params = model.init(jax.random.key(0), images)["params"]     # images: [batch, H, W, C]
    logits = model.apply({"params": params}, images, train=False)  # [batch, 1000]

The tokens-to-token module turns the image into tokens progressively. A soft split
(`soft_split`: overlapping k x k patches, each flattened channel-major as PyTorch's `Unfold`)
with kernels 7, 3, 3, strides 4, 2, 2 and paddings 2, 1, 1 (a 56x56, 28x28 then 14x14 grid at
224x224) alternates with a token transformer layer (`TokenTransformer`, one head of
`token_dim` = 64 channels, any attention op by name, `token_attention`) that re-structures the
tokens before they are folded back into an image; the last split is projected to the width.
A class token and a fixed 2-D sine-cosine position embedding of the grid join, then ViT's
pre-LayerNorm blocks (`big_attn.models.vit.Encoder`, `attention` by name, MLP ratio 3) and a
final LayerNorm; the class token is classified.

`token_attention="softmax"` is the paper's Transformer T2T layer (T2T-ViTt); the paper's
T2T-ViT-14/19/24 use a Performer layer there (`token_attention="performer"`); both count the
same parameters here (the Performer's random features are fixed). Deviations from the
official code: the position embedding is 2-D sine-cosine over the patch grid (the official is
1-D over the class token and the patches), the token layers' logit scale is the op's
1/sqrt(token_dim) (the official 1/sqrt(input width)), and the blocks' query/key/value
projections have biases.

Parameter counts (224x224x3 input, 1000 classes; counted with `jax.eval_shape`, nothing
allocated) against the paper's Table 3:

| variant    | width | depth | heads | mlp_dim | parameters | paper |
|------------|-------|-------|-------|---------|------------|-------|
| T2T-ViT-14 |   384 |    14 |     6 |    1152 | 21,481,550 | 21.5M |
| T2T-ViT-19 |   448 |    19 |     7 |    1344 | 39,110,222 | 39.2M |
| T2T-ViT-24 |   512 |    24 |     8 |    1536 | 64,037,454 | 64.1M |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.layers import MlpBlock, layer_norm
from big_attn.layers import posemb_sincos_2d
from big_attn.layers.attention import Attention, Projection, learned_op_args
from big_attn.models import common
from big_attn.models import vit
from big_attn.ops import checks
from big_attn.ops import spatial

_SIZES = {"14": (384, 14, 6), "19": (448, 19, 7), "24": (512, 24, 8)}  # width, depth, heads
# The soft splits of the T2T module (kernel, stride, padding), as the paper's.
SPLIT_KERNELS = (7, 3, 3)
SPLIT_STRIDES = (4, 2, 2)
SPLIT_PADDINGS = (2, 1, 1)
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"T2T-ViT-14" (or "14") -> dict(width=384, depth=14, num_heads=6, mlp_dim=1152).

  Sizes: 14, 19, 24 (MLP ratio 3)."""
  size = variant[8:] if isinstance(variant, str) and variant.startswith("T2T-ViT-") else variant
  if not isinstance(size, str) or size not in _SIZES:
    raise ValueError(f"unknown T2T-ViT variant {variant!r}; expected T2T-ViT-14, T2T-ViT-19 or "
                     "T2T-ViT-24 (or 14, 19, 24)")
  width, depth, heads = _SIZES[size]
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=3 * width)


def soft_split(images, kernel: int, stride: int, padding: int):
  """`[b, h, w, c]` -> (`[b, h'·w', c·kernel²]`, `(h', w')`): every `kernel` x `kernel` patch at
  `stride` of the zero-padded image, flattened channel-major (c, dy, dx) as PyTorch's
  `nn.Unfold`, patches in row-major order."""
  patches = jax.lax.conv_general_dilated_patches(
      images, (kernel, kernel), (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  n, h, w, features = patches.shape
  return jnp.reshape(patches, (n, h * w, features)), (h, w)


class TokenTransformer(nn.Module):
  """T2T's token layer: `[batch, tokens, dim]` -> `[batch, tokens, features]` with one head,

      v = LN(x)·W_v,   y = v + Proj(op(LN(x)·W_q, LN(x)·W_k, v)),   y + MLP(LN(y)),

  (the skip connection through v because the width changes; MLP hidden width
  `features · mlp_ratio`). The op (registry name `op`, with `op_args`) attends through
  `layers.Attention.attend`.
  """
  features: int
  op: str = "softmax"
  op_args: Any = None
  implementation: str | None = None
  mlp_ratio: float = 1.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = layer_norm(self.dtype, self.param_dtype, "LayerNorm_0", epsilon=self.norm_eps)(x)
    proj = lambda name: Projection(  # pylint: disable=g-long-lambda
        shape=(x.shape[-1], 1, self.features), logical_axes=("embed", "heads", "head_dim"),
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name=name)
    query, key, value = proj("query")(y), proj("key")(y), proj("value")(y)
    op_args = learned_op_args(self.op, self.op_args, self.implementation, y, query, key, value,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    out = Attention(num_heads=1, op=self.op, name="attention_op").attend(
        query, key, value, op_args=op_args)
    x = value[:, :, 0] + Projection(
        shape=(1, self.features, self.features), logical_axes=("heads", "head_dim", "embed"),
        contract=2, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name="out")(out)
    y = layer_norm(self.dtype, self.param_dtype, "LayerNorm_1", epsilon=self.norm_eps)(x)
    return x + MlpBlock(mlp_dim=int(self.features * self.mlp_ratio),
                        approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="MlpBlock")(y)


class Model(nn.Module):
  """T2T-ViT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the normalised class token `[batch, width]`.
    variant: size name for `decode_variant` ("T2T-ViT-14" or "14"); explicit fields override it.
    width, depth, num_heads, mlp_dim: the encoder's sizes (`mlp_dim` 3·width when None).
    token_dim: width of the T2T module's tokens (64).
    split_kernels, split_strides, split_paddings: the soft splits (the paper's (7, 3, 3),
      (4, 2, 2), (2, 1, 1)); a token layer sits between consecutive splits.
    token_attention: registry name of the token layers' op ("softmax": the Transformer T2T
      layer; "performer": the paper's default); token_attention_args its keyword arguments.
      A 2-D op gets each split's grid.
    attention: registry name of the encoder's op (`big_attn.ops.names()`); attention_args its
      keyword arguments; attention_impl its `implementation` (the token layers' too). A 2-D op
      gets the last split's grid and the class token as `extra_tokens`.
    dropout: rate after the embedding and inside every block.
    norm_eps: every LayerNorm's eps (1e-6).
    approximate_gelu: tanh-approximate GELU (True); False: exact, the official `nn.GELU()`.
    head_zeroinit: zero-initialised classifier head.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  num_classes: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  mlp_dim: int | None = None
  token_dim: int = 64
  split_kernels: tuple[int, ...] = SPLIT_KERNELS
  split_strides: tuple[int, ...] = SPLIT_STRIDES
  split_paddings: tuple[int, ...] = SPLIT_PADDINGS
  token_attention: str = "softmax"
  token_attention_args: Any = None
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("width", "depth", "num_heads"),
                           defaults=dict(mlp_dim=lambda sizes: 3 * sizes["width"]))
    super().__post_init__()

  def _check(self, images):
    for name in ("width", "depth", "num_heads", "mlp_dim", "token_dim"):
      checks.positive_int(name, getattr(self, name))
    splits = len(self.split_kernels)
    if not splits or len(self.split_strides) != splits or len(self.split_paddings) != splits:
      raise ValueError(f"split_kernels {self.split_kernels}, split_strides "
                       f"{self.split_strides} and split_paddings {self.split_paddings} must "
                       "have one entry per soft split each (at least one)")
    checks.int_tuple("split_kernels", self.split_kernels, splits, allow_int=False)
    checks.int_tuple("split_strides", self.split_strides, splits, allow_int=False)
    if not all(isinstance(p, int) and p >= 0 for p in self.split_paddings):
      raise ValueError(f"split_paddings must be ints >= 0, got {self.split_paddings}")
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape "
                       f"{images.shape}")
    for name in ("attention_args", "token_attention_args"):
      if getattr(self, name) is not None and not hasattr(getattr(self, name), "keys"):
        raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
    spatial.check_op(self.attention, "T2T-ViT")
    spatial.check_op(self.token_attention, "T2T-ViT")

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    deterministic = not train
    x = jnp.asarray(images, self.dtype)
    n = x.shape[0]
    splits = len(self.split_kernels)
    for i, (k, s, p) in enumerate(zip(self.split_kernels, self.split_strides,
                                      self.split_paddings)):
      if min(x.shape[1:3]) + 2 * p < k:
        raise ValueError(f"soft split {i}: a {k}x{k} kernel does not fit the "
                         f"{x.shape[1:3]} map with padding {p}")
      x, grid = soft_split(x, k, s, p)
      if i < splits - 1:  # re-structurize, then fold back into an image
        x = TokenTransformer(
            self.token_dim, op=self.token_attention,
            op_args=spatial.op_args(self.token_attention, self.token_attention_args, grid),
            implementation=self.attention_impl, norm_eps=self.norm_eps,
            approximate_gelu=self.approximate_gelu, dtype=self.dtype,
            param_dtype=self.param_dtype, name=f"t2t_{i}")(x)
        x = jnp.reshape(x, (n, *grid, self.token_dim))
    x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="project",
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ("channels_in", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                        ("embed",)))(x)
    x = x + posemb_sincos_2d(*grid, self.width, dtype=self.dtype)[None]
    cls = self.param("cls", nn.with_logical_partitioning(_INIT, (None, "embed")),
                     (1, self.width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype)[None],
                                          (n, 1, self.width)), x], axis=1)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)

    block_args = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, attention=self.attention,
                      attention_args=spatial.op_args(self.attention, self.attention_args,
                                                     grid, 1),
                      attention_impl=self.attention_impl, dropout=self.dropout,
                      norm_eps=self.norm_eps, approximate_gelu=self.approximate_gelu)
    x = vit.Encoder(depth=self.depth, block_args=block_args, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="Transformer")(x, deterministic)
    x = x[:, 0]
    if self.num_classes:
      kernel_init = nn.initializers.zeros_init() if self.head_zeroinit else _INIT
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                   kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "classes")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("classes",)))(x)
    return x.astype(jnp.float32)
