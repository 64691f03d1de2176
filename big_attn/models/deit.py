"""DeiT (Training data-efficient image transformers & distillation through attention, Touvron et
al. 2021): a ViT with a class token and a distillation token.

    model = Model(num_classes=1000, variant="B/16")
    params = model.init(jax.random.key(0), images)["params"]             # [batch, H, W, C]
    cls_logits, dist_logits = model.apply({"params": params}, images, train=True,
                                          rngs={"dropout": rng})
    logits = model.apply({"params": params}, images)   # (cls_logits + dist_logits) / 2

The patch embedding, position embedding and encoder are ViT's (`big_attn.models.vit.Encoder`,
any attention op by name). Two learned tokens are prepended: the class token, read by `head`,
and the distillation token, read by `head_dist`. Training returns both heads' logits; inference
returns their average (the paper's late fusion of the two softmax-free outputs).

Hard-label distillation (the paper's best): with `teacher` logits Z_t,

    loss = ½ CE(cls_logits, y) + ½ CE(dist_logits, argmax Z_t(x))

`TASK` is this loss for `big_attn.main`. `teacher` is either a callable `images -> logits` or a
dict `dict(model_name=..., model={...}, workdir=DIR)` naming a classifier trained by
`big_attn.main` in `DIR` (its `config.model_name` and `config.model`; `num_classes` defaults to
the student's). The loop restores that teacher's parameters (and BatchNorm statistics) once
(`TASK.constants`, `big_attn.checkpoint_io`) and passes them to every step as arguments, so
they are neither trained nor compiled into the step.
Without a teacher the distillation head is trained on the labels (`y` in both terms), and a
warning says so. With `distilled=False` the model is the plain DeiT (class token, one head).

Deviation from the paper's code: the position embedding covers the patches only; the learned
class and distillation tokens absorb their own (a learned token plus a learned position is one
learned vector), so the counts are 2·width below the paper's code, which changes nothing else.

Parameter counts (224x224x3 input, 1000 classes; counted with `jax.eval_shape`, nothing
allocated) against the paper's Table 1 (and the distilled model of Table 5):

| variant        | width | depth | heads | parameters | paper |
|----------------|-------|-------|-------|------------|-------|
| Ti/16          |   192 |    12 |     3 |  5,717,224 |  5M   |
| S/16           |   384 |    12 |     6 | 22,050,280 |  22M  |
| B/16           |   768 |    12 |    12 | 86,566,888 |  86M  |
| Ti/16 ⚗        |   192 |    12 |     3 |  5,910,416 |  6M   |
| S/16 ⚗         |   384 |    12 |     6 | 22,435,664 |  22M  |
| B/16 ⚗         |   768 |    12 |    12 | 87,336,656 |  87M  |
"""
from __future__ import annotations

from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn import checkpoint_io, models, tasks
from big_attn.layers import token_reduction as token_reduction_lib
from big_attn.models import vit

decode_variant = vit.decode_variant  # DeiT-Ti/S/B are ViT-Ti/S/B (the paper's Table 1)


class Model(nn.Module):
  """DeiT classifier: `[batch, H, W, C]` images -> float32 logits `[batch, num_classes]`.

  `train=True` with `distilled` returns the pair `(cls_logits, dist_logits)`; otherwise one
  array (the average of the two heads when distilled).

  Attributes:
    num_classes: logits width (positive).
    variant: ViT size name ("B/16"); explicit width, depth, mlp_dim, num_heads, patch_size
      override it (as `big_attn.models.vit.Model`).
    distilled: add the distillation token and head.
    teacher: the distillation teacher read by `TASK`'s loss (not by `__call__`): None, a
      callable `images -> logits`, or `dict(model_name=..., model={...}, workdir=DIR)`.
    posemb: "learn" or "sincos2d" (patch position embedding).
    attention, attention_args, attention_impl, qk_norm, num_kv_heads, dropout, norm_eps,
      approximate_gelu, head_zeroinit, remat_policy, scan_layers, token_reduction, dtype,
      param_dtype: as in `big_attn.models.vit.Model` (token reduction keeps the class and
      distillation tokens).
  """
  num_classes: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: tuple[int, int] | None = None
  distilled: bool = True
  teacher: Any = None
  posemb: str = "learn"
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  qk_norm: bool = False
  num_kv_heads: int | None = None
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  head_zeroinit: bool = True
  remat_policy: str = "none"
  scan_layers: bool = False
  token_reduction: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    vit.resolve_sizes(self)  # the same fields, resolved the same way
    super().__post_init__()

  def _check(self, images):
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
    if not (self.teacher is None or callable(self.teacher) or hasattr(self.teacher, "keys")):
      raise TypeError(f"teacher must be None, a callable or a dict, got "
                      f"{type(self.teacher).__name__}")
    if self.teacher is not None and not self.distilled:
      raise ValueError("a teacher needs distilled=True (the distillation token learns from it)")
    vit.check_encoder_inputs(self, images)
    return token_reduction_lib.resolve(self.token_reduction, self.depth, op=self.attention)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    reduction = self._check(images)
    width, patch = self.width, self.patch_size
    deterministic = not train

    x = vit.embed_patches(images, width, patch, self.posemb, self.dtype, self.param_dtype)
    n = x.shape[0]
    token_names = ("cls", "dist") if self.distilled else ("cls",)
    tokens = [jnp.asarray(self.param(name, nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), (None, "embed")), (1, width), self.param_dtype),
                          self.dtype) for name in token_names]
    x = jnp.concatenate([jnp.broadcast_to(t[None], (n, 1, width)) for t in tokens] + [x], axis=1)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = nn.Dropout(rate=self.dropout)(x, deterministic)

    block_args = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                      num_kv_heads=self.num_kv_heads, attention=self.attention,
                      attention_args=vit.encoder_op_args(self, images, patch, len(tokens)),
                      attention_impl=self.attention_impl, qk_norm=self.qk_norm,
                      dropout=self.dropout, norm_eps=self.norm_eps,
                      approximate_gelu=self.approximate_gelu)
    x = vit.Encoder(depth=self.depth, block_args=block_args, remat_policy=self.remat_policy,
                    scan_layers=self.scan_layers, token_reduction=reduction,
                    num_protected=len(tokens), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="Transformer")(x, deterministic)

    kernel_init = (nn.initializers.zeros_init() if self.head_zeroinit
                   else nn.initializers.truncated_normal(stddev=0.02))
    head = lambda name: nn.Dense(  # pylint: disable=g-long-lambda
        self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "classes")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)))
    logits = head("head")(x[:, 0]).astype(jnp.float32)
    if not self.distilled:
      return logits
    dist_logits = head("head_dist")(x[:, 1]).astype(jnp.float32)
    if train:
      return logits, dist_logits
    return (logits + dist_logits) / 2


# ------------------------------------------------------------------------------------ Distillation
def teacher_spec(teacher: Any, num_classes: int) -> tuple[Any, str]:
  """`(teacher Model, workdir)` of a teacher dict, with `num_classes` defaulting to ours."""
  teacher = dict(teacher)
  missing = {"model_name", "model", "workdir"} - set(teacher)
  extra = set(teacher) - {"model_name", "model", "workdir"}
  if missing or extra:
    raise ValueError(f"teacher dict needs exactly model_name, model and workdir; missing "
                     f"{sorted(missing)}, unknown {sorted(extra)}")
  kwargs = dict(teacher["model"])
  kwargs.setdefault("num_classes", num_classes)
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return models.get(teacher["model_name"]).Model(**kwargs), str(teacher["workdir"])


def restore_teacher(teacher: Any, num_classes: int, image_shape: tuple[int, ...]) -> Any:
  """Variables of a teacher dict's model from the newest checkpoint of its workdir:
  `{"params": ...}`, plus `"batch_stats"` for a teacher with BatchNorm (MaxViT, CvT).

  Only those entries of the saved train state are read (`checkpoint_io.read_state`), as host
  arrays. Raises `FileNotFoundError` when the workdir holds no checkpoint.
  """
  module, workdir = teacher_spec(teacher, num_classes)
  item = nn.unbox(jax.eval_shape(
      lambda rng: tasks.init_model_variables(module, rng, image_shape), jax.random.key(0)))
  directory = checkpoint_io.checkpoints_dir(workdir)
  try:
    step, variables = checkpoint_io.read_state(directory, item)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"teacher workdir {workdir!r}: {e}") from None
  logging.info("DeiT teacher %s restored from step %d of %s", type(module).__module__, step,
               directory)
  return variables


def teacher_constants(model: Model, info: dict[str, Any]) -> Any:
  """`Task.constants`: the teacher dict's restored variables; None for other teachers."""
  if model.teacher is None:
    logging.warning("DeiT without a teacher: the distillation head is trained on the labels")
  if model.teacher is None or callable(model.teacher):
    return None
  return restore_teacher(model.teacher, model.num_classes, tuple(info["image_shape"]))


def teacher_logits(model: Model, images: jax.Array, constants: Any = None) -> jax.Array | None:
  """The teacher's logits on `images` (no gradient); None without a teacher."""
  if model.teacher is None:
    return None
  if callable(model.teacher):
    logits = model.teacher(images)
  else:
    if constants is None:
      raise ValueError("a teacher dict needs its restored parameters (`teacher_constants`)")
    module, _ = teacher_spec(model.teacher, model.num_classes)
    logits = module.apply(constants, images, train=False)
  return jax.lax.stop_gradient(jnp.asarray(logits, jnp.float32))


def hard_distillation_loss(cls_logits: jax.Array, dist_logits: jax.Array, labels: jax.Array,
                           teacher: jax.Array | None) -> jax.Array:
  """½ CE(cls_logits, labels) + ½ CE(dist_logits, onehot(argmax teacher)), per example.

  `labels` are (soft) class probabilities `[b, classes]`; without `teacher` logits the
  distillation term uses `labels` too.
  """
  if teacher is None:
    targets = labels
  else:
    targets = jax.nn.one_hot(jnp.argmax(teacher, axis=-1), dist_logits.shape[-1])
  return 0.5 * (tasks.classification_losses(cls_logits, labels)
                + tasks.classification_losses(dist_logits, targets))


def distillation_loss(model: Model, params: Any, batch: dict[str, Any], rng: jax.Array,
                      constants: Any = None) -> jax.Array:
  """`Task.loss`: mean hard-label distillation loss (plain cross-entropy when not distilled)."""
  out = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
  if not model.distilled:
    return tasks.classification_losses(out, batch["labels"]).mean()
  teacher = teacher_logits(model, batch["image"], constants)
  return hard_distillation_loss(*out, batch["labels"], teacher).mean()


TASK = tasks.Task(batch_spec=tasks.CLASSIFICATION.batch_spec,
                  example_input=tasks.CLASSIFICATION.example_input,
                  loss=distillation_loss, constants=teacher_constants)
