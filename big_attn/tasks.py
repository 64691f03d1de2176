"""Tasks: what a model family trains on (its batch, its init input, its loss).

Shared by the models that define a task (`TASK` of a model module) and the training loop that
runs it (`big_attn.train.step`, `big_attn.main`), so that models never import the loop.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

BATCH_STATS = "batch_stats"


def init_model_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...],
                         input_dtype: Any = jnp.float32) -> dict[str, Any]:
  """`{"params": boxed params}` of `model` for one input of `image_shape` ([h, w, c] images, or
  any example shape such as `[length]` tokens with `input_dtype=jnp.int32`), plus
  `"batch_stats"` when the model has BatchNorm."""
  dummy = jnp.zeros((1, *image_shape), input_dtype)
  variables = model.init({"params": rng, "dropout": rng}, dummy, train=False)
  return {k: v for k, v in variables.items() if k in ("params", BATCH_STATS)}


def classification_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32 against (soft) `labels` `[b, classes]`."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32))


def classification_loss(model: nn.Module, params: Any, batch: dict[str, Any],
                        rng: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of `model` on `batch["image"]` against `batch["labels"]`."""
  logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
  return classification_losses(logits, batch["labels"]).mean()


def classification_loss_with_stats(model: nn.Module, variables: dict[str, Any],
                                   batch: dict[str, Any], rng: jax.Array
                                   ) -> tuple[jax.Array, Any]:
  """`classification_loss` of a model with BatchNorm: `variables` holds `params` and
  `batch_stats`; returns the loss and the updated `batch_stats`."""
  logits, updates = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng},
                                mutable=[BATCH_STATS])
  return classification_losses(logits, batch["labels"]).mean(), updates[BATCH_STATS]


@dataclasses.dataclass(frozen=True)
class Task:
  """What the loop needs from a model family: its batch, its init input and its loss.

  A model module may expose `TASK`; image classification (`CLASSIFICATION`) otherwise.
  `batch_spec(info, batch_size)` gives `{key: (shape, dtype)}` of a global batch (the keys the
  loop feeds the step), `example_input(info)` the `(shape, dtype)` of one model input (for
  init), `loss(model, params, batch, rng)` the scalar training loss; `info` is
  `data.dataset_info(config.input)`. Optional `constants(model, info)`: frozen arrays the loss
  reads (a distillation teacher's parameters), loaded once by the loop, placed on every device
  and passed to each step as an argument, `loss(..., constants=...)`: neither trained nor
  compiled into the step. Optional `tokens_per_example(info)`: the tokens of one example of a
  sequence model, for the loop's tokens/s. Optional `loss_with_stats(model, variables, batch,
  rng) -> (loss, batch_stats)`: the loss of a model with BatchNorm (`variables` holds `params`
  and `batch_stats`), used when the state has batch statistics.
  """
  batch_spec: Callable[[dict[str, Any], int], dict[str, tuple[tuple[int, ...], Any]]]
  example_input: Callable[[dict[str, Any]], tuple[tuple[int, ...], Any]]
  loss: Callable[..., jax.Array]
  constants: Callable[[Any, dict[str, Any]], Any] | None = None
  tokens_per_example: Callable[[dict[str, Any]], int] | None = None
  loss_with_stats: Callable[..., tuple[jax.Array, Any]] | None = None


CLASSIFICATION = Task(
    batch_spec=lambda info, b: {"image": ((b, *info["image_shape"]), jnp.float32),
                                "labels": ((b, info["num_classes"]), jnp.float32)},
    example_input=lambda info: (tuple(info["image_shape"]), jnp.float32),
    loss=classification_loss, loss_with_stats=classification_loss_with_stats)


def count_params(params: Any) -> int:
  """Number of scalars in a (possibly abstract or boxed) parameter tree."""
  return int(sum(x.size for x in jax.tree.leaves(nn.unbox(params))))
