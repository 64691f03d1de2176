"""LIT (Less is More: Pay Less Attention in Vision Transformers, Pan et al. 2022).

    model = Model(num_classes=1000, variant="S")
    variables = model.init(jax.random.key(0), images)          # params and batch_stats
    logits = model.apply(variables, images, train=False)       # images: [batch, H, W, C]

A four-stage pyramid whose early stages only have MLPs: a 4x4 patch embedding (convolution,
LayerNorm) gives a 56x56 map at 224x224; the first `mlp_stages` (2) stages are blocks
x + MLP(LN(x)) (`vit.Encoder` with every block attention-free), the later ones ViT blocks
x + Attn(LN(x)), x + MLP(LN(x)) (`attention`, any op by name; a 2-D op gets the stage's grid).
Between stages a `DeformableTokenMerging` halves the grid and widens the tokens (a 2x2 stride-2
deformable convolution whose offsets are predicted per output position, BatchNorm, GELU).

Two layouts, as the authors' two codebases:
  - LIT-S, M, B (Swin's widths and depths): attention over the whole map with Swin's relative
    position bias (the `window` op with a window as large as the stage's grid: a table of
    (2h − 1)(2w − 1) biases per head, the authors' `RelPosAttention`), final LayerNorm, mean of
    the tokens, linear classifier.
  - LIT-Ti (`class_token=True`, PVT-S's widths and depths): plain softmax attention, a learned
    position embedding added at each stage's start, a class token joined at the last stage
    (with its position), final LayerNorm, the class token classified.

Parameter counts (224x224x3 input; `jax.eval_shape`, the mergings' BatchNorm scale and bias
included as in PyTorch), equal to the authors' modules' (rebuilt in PyTorch from their code's
layer shapes). The paper's Table 1 (19M, 27M, 48M, 86M) matches the backbones, without the
1000-class classifier, within 2%:

| variant | widths                | heads          | depths        | backbone   | 1000 classes |
|---------|-----------------------|----------------|---------------|------------|--------------|
| Ti      | (64, 128, 320, 512)   | (1, 2, 5, 8)   | (3, 4, 6, 3)  | 19,373,272 | 19,886,272   |
| S       | (96, 192, 384, 768)   | (3, 6, 12, 24) | (2, 2, 6, 2)  | 27,204,720 | 27,973,720   |
| M       | (96, 192, 384, 768)   | (3, 6, 12, 24) | (2, 2, 18, 2) | 48,603,264 | 49,372,264   |
| B       | (128, 256, 512, 1024) | (4, 8, 16, 32) | (2, 2, 18, 2) | 86,267,384 | 87,292,384   |

(MLP ratios 8, 8, 4, 4 in Ti, 4 in S, M, B.)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_attn.layers import layer_norm
from big_attn.layers.token_merging import DeformableTokenMerging
from big_attn.models import common
from big_attn.models import vit
from big_attn.ops import checks
from big_attn.ops import spatial

_SWIN = dict(mlp_ratios=(4, 4, 4, 4), class_token=False, attention="window", norm_eps=1e-5)
_SIZES = {  # the paper's Table 1; Ti is PVT-S's layout, S, M, B Swin's
    "Ti": dict(widths=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), depths=(3, 4, 6, 3),
               mlp_ratios=(8, 8, 4, 4), class_token=True, attention="softmax", norm_eps=1e-6),
    "S": dict(widths=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 6, 2),
              **_SWIN),
    "M": dict(widths=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 18, 2),
              **_SWIN),
    "B": dict(widths=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 2, 18, 2),
              **_SWIN),
}
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict[str, Any]:
  """"LIT-S" (or "S") -> its sizes and layout (widths, num_heads, depths, mlp_ratios,
  class_token, attention, norm_eps). Sizes: Ti, S, M, B."""
  size = variant[len("LIT-"):] if isinstance(variant, str) and variant.startswith(
      "LIT-") else variant
  if not isinstance(size, str) or size not in _SIZES:
    raise ValueError(f"unknown LIT variant {variant!r}; expected LIT-SIZE or SIZE with SIZE in "
                     f"{', '.join(_SIZES)}")
  return dict(_SIZES[size])


class Model(nn.Module):
  """LIT classifier: `[batch, H, W, C]` images -> `[batch, num_classes]` float32 logits.

  Attributes:
    num_classes: logits width; 0 returns the normalised pooled features `[batch, width]`.
    variant: size name for `decode_variant` ("LIT-S" or "S"); explicit fields override it.
    widths, num_heads, depths: of the stages (equal lengths).
    mlp_ratios: MLP width over the stage width, per stage (4 each).
    mlp_stages: how many first stages have MLP blocks only (2).
    class_token: LIT-Ti's layout (learned position embeddings per stage, a class token in the
      last stage, classified); False (the default): the tokens' mean is classified.
    patch_size: the embedding's kernel and stride (4); the grid must then halve evenly at every
      merging.
    attention: registry name of the op of the attending stages (the variant's; "window" when
      neither gives one); `window` without a `window_size` in attention_args attends over the
      whole map. attention_args its arguments; attention_impl its `implementation`.
    norm_eps: every LayerNorm's eps (the variant's; 1e-5 when neither gives one).
    dropout: rate inside every block.
    dtype: compute dtype; param_dtype: parameter dtype.
  The mergings' BatchNorm statistics live in `batch_stats`.
  """
  num_classes: int
  variant: str | None = None
  widths: tuple[int, ...] | None = None
  num_heads: tuple[int, ...] | None = None
  depths: tuple[int, ...] | None = None
  mlp_ratios: tuple[int, ...] | None = None
  mlp_stages: int = 2
  class_token: bool | None = None
  patch_size: int = 4
  attention: str | None = None
  attention_args: Any = None
  attention_impl: str | None = None
  norm_eps: float | None = None
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.resolve_variant(self, decode_variant, required=("widths", "num_heads", "depths"),
                           defaults=dict(mlp_ratios=lambda s: (4,) * len(s["widths"]),
                                         class_token=False, attention="window",
                                         norm_eps=1e-5))
    super().__post_init__()

  def _check(self, images):
    stages = len(self.widths)
    for name in ("widths", "num_heads", "depths", "mlp_ratios"):
      checks.int_tuple(name, getattr(self, name), stages, allow_int=False)
    checks.int_in_range("mlp_stages", self.mlp_stages, 0, stages)
    checks.positive_int("patch_size", self.patch_size)
    checks.positive_float("norm_eps", self.norm_eps)
    if not isinstance(self.class_token, bool):
      raise TypeError(f"class_token must be a bool, got {self.class_token!r}")
    if any(w % h for w, h in zip(self.widths, self.num_heads)):
      raise ValueError(f"widths {self.widths} must be divisible by num_heads {self.num_heads}")
    if self.attention_args is not None and not hasattr(self.attention_args, "keys"):
      raise TypeError(f"attention_args must be a dict, got {type(self.attention_args).__name__}")
    common.check_images(images, self.patch_size * 2 ** (stages - 1),
                        "patch_size · 2^(stages − 1) (the grid halves at every merging) =")
    spatial.check_op(self.attention, "LIT")

  def _op_args(self, grid, extra_tokens):
    """The attention arguments of a stage on `grid` (`window`: the whole map by default)."""
    args = dict(self.attention_args or {})
    if self.attention == "window":
      args.setdefault("window_size", tuple(grid))
    return spatial.op_args(self.attention, args, grid, extra_tokens)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(self.widths[0], (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", name="embedding",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(),
                    ("patch_h", "patch_w", "channels_in", "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                       ("embed",)), **kw
                )(jnp.asarray(images, self.dtype))
    b, h, w, _ = x.shape
    grid = (h, w)
    x = layer_norm(self.dtype, self.param_dtype, "embedding_norm", epsilon=1e-5)(
        x.reshape(b, h * w, -1))
    last = len(self.widths) - 1
    for stage, (width, heads, depth, ratio) in enumerate(zip(
        self.widths, self.num_heads, self.depths, self.mlp_ratios)):
      if stage:
        x = DeformableTokenMerging(width, name=f"merge_{stage}", **kw)(x, grid, train)
        grid = (grid[0] // 2, grid[1] // 2)
      extra = int(self.class_token and stage == last)
      if extra:
        cls = self.param("cls", nn.with_logical_partitioning(_INIT, (None, "embed")),
                         (1, width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype)[None],
                                              (b, 1, width)), x], axis=1)
      if self.class_token:
        posemb = self.param(f"posemb_{stage}", nn.with_logical_partitioning(
            _INIT, ("length", "embed")), x.shape[1:], self.param_dtype)
        x = x + jnp.asarray(posemb, self.dtype)[None]
      attends = stage >= self.mlp_stages
      block_args = dict(num_heads=heads, mlp_dim=ratio * width, attention=self.attention,
                        attention_args=self._op_args(grid, extra) if attends else None,
                        attention_impl=self.attention_impl, dropout=self.dropout,
                        norm_eps=self.norm_eps, approximate_gelu=False)
      x = vit.Encoder(depth=depth, block_args=block_args, final_norm=False,
                      attention_free_layers=None if attends else tuple(range(depth)),
                      name=f"stage_{stage}", **kw)(x, not train)
    x = layer_norm(self.dtype, self.param_dtype, "norm", epsilon=self.norm_eps)(x)
    x = x[:, 0] if self.class_token else jnp.mean(x, axis=1)
    if self.num_classes:
      x = common.classifier(self.num_classes, self.dtype, self.param_dtype)(x)
    return x.astype(jnp.float32)
