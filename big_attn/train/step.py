"""Train state, its shardings, and the update step (with gradient accumulation).

The state is a plain dict `{"step": int32[], "params": ..., "opt_state": ...}` so that orbax saves
and restores it as an ordinary pytree. A model with BatchNorm (`conv_norm="batch"` of MaxViT,
CvT, BiFormer and RMT) adds `"batch_stats"`: its running statistics, updated by every train step
(the model is applied with `mutable=["batch_stats"]`), replicated, saved in checkpoints and read
by evaluators (`model_variables(state)`). The task of a model family (batch, init input, loss)
is `big_attn.tasks.Task`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from big_attn.parallel import mesh as mesh_lib
# The task definitions live in `big_attn.tasks` (models import them without the loop); they
# stay importable from here.
from big_attn.tasks import (  # pylint: disable=unused-import
    BATCH_STATS, CLASSIFICATION, Task, classification_loss, classification_loss_with_stats,
    classification_losses, count_params, init_model_variables)


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...],
                   input_dtype: Any = jnp.float32) -> Any:
  """Boxed (logically annotated) params of `model` (`init_model_variables`' `params`)."""
  return init_model_variables(model, rng, image_shape, input_dtype)["params"]


def model_variables(state: dict[str, Any]) -> dict[str, Any]:
  """The variables to apply the model with in evaluation: params and any batch statistics."""
  return {k: state[k] for k in ("params", BATCH_STATS) if k in state}


def abstract_state(model: nn.Module, tx: optax.GradientTransformation,
                   image_shape: tuple[int, ...], input_dtype: Any = jnp.float32
                   ) -> dict[str, Any]:
  """Shapes of the state, with the logical names of params carried into the optimizer state."""
  variables = jax.eval_shape(
      lambda rng: init_model_variables(model, rng, image_shape, input_dtype), jax.random.key(0))
  boxed = variables.pop("params")
  return {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": boxed,
          "opt_state": jax.eval_shape(tx.init, boxed), **variables}


def state_shardings(boxed_abstract_state: Any, mesh, rules) -> Any:
  """`NamedSharding` tree of the (unboxed) state under `rules`."""
  return mesh_lib.logical_shardings(boxed_abstract_state, mesh, rules)


def with_shardings(boxed_abstract_state: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct`s of the unboxed state carrying `shardings` (for restore / dry run)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed_abstract_state), shardings)


def post_update_fn(model: nn.Module) -> Callable[[Any], Any]:
  """`params -> params` applied after init and after every optimizer update: the model's
  `post_update` method when it has one (nGPT projects its weights back onto the unit sphere),
  the identity otherwise."""
  post_update = getattr(model, "post_update", None)
  return post_update if callable(post_update) else (lambda params: params)


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation,
                 image_shape: tuple[int, ...], input_dtype: Any = jnp.float32
                 ) -> Callable[[jax.Array], dict[str, Any]]:
  """`rng -> state` (jit it with `out_shardings=state_shardings(...)`)."""

  post_update = post_update_fn(model)

  def init(rng):
    variables = nn.unbox(init_model_variables(model, rng, image_shape, input_dtype))
    params = post_update(variables.pop("params"))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            **variables}

  return init


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
                    *, grad_accum_steps: int = 1, micro_sharding: NamedSharding | None = None,
                    loss_fn: Callable[..., jax.Array] = classification_loss,
                    loss_with_stats_fn: Callable[..., Any] | None = classification_loss_with_stats
                    ) -> Callable:
  """`(state, batch, rng) -> (state, metrics)`: one optimizer update on the whole batch.

  With `grad_accum_steps > 1` the batch is split into that many microbatches (example `i` goes
  to microbatch `i % grad_accum_steps`, so each stays spread over the data devices), scanned
  with `lax.scan`, and the mean of their gradients is applied: the same update as the whole
  batch at once. `micro_sharding` (batch dim over the data axes) keeps microbatches sharded.
  The dropout key of step `s`, microbatch `m` is `fold_in(fold_in(rng, s), m)`. The updated
  params go through `post_update_fn(model)` (the model's `post_update`, e.g. nGPT's weight
  normalisation).
  `loss_fn(model, params, batch, rng)` is the task's loss (a `Task.loss`); every array of the
  batch is split along its leading dimension. A state with `batch_stats` is trained with
  `loss_with_stats_fn` (a `Task.loss_with_stats`) instead, and the statistics it returns are
  carried from microbatch to microbatch into the new state.
  """
  if grad_accum_steps < 1:
    raise ValueError(f"config.grad_accum_steps must be >= 1, got {grad_accum_steps}")

  def loss_and_stats(params, stats, batch, rng):
    if stats is None:
      return loss_fn(model, params, batch, rng), None
    if loss_with_stats_fn is None:
      raise ValueError(f"{type(model).__name__} has batch statistics (BatchNorm) but its task "
                       "has no loss_with_stats")
    return loss_with_stats_fn(model, {"params": params, BATCH_STATS: stats}, batch, rng)

  grad_fn = jax.value_and_grad(loss_and_stats, has_aux=True)
  post_update = post_update_fn(model)

  def split(x):
    b = x.shape[0]
    if b % grad_accum_steps:
      raise ValueError(f"batch size {b} is not divisible by grad_accum_steps "
                       f"{grad_accum_steps}")
    x = x.reshape(b // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1)
    if micro_sharding is not None:
      spec = PartitionSpec(None, *micro_sharding.spec)
      x = jax.lax.with_sharding_constraint(x, NamedSharding(micro_sharding.mesh, spec))
    return x

  def train_step(state, batch, rng):
    step = state["step"]
    rng = jax.random.fold_in(rng, step)
    params, stats = state["params"], state.get(BATCH_STATS)
    if grad_accum_steps == 1:
      (loss, stats), grads = grad_fn(params, stats, batch, rng)
    else:
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        loss_sum, grad_sum, stats = carry
        i, mb = xs
        (loss, stats), grads = grad_fn(params, stats, mb, jax.random.fold_in(rng, i))
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads), stats), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (loss, grads, stats), _ = jax.lax.scan(
          body, (jnp.zeros((), jnp.float32), zeros, stats),
          (jnp.arange(grad_accum_steps), micro))
      loss = loss / grad_accum_steps
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"step": step + 1,
                 "params": post_update(optax.apply_updates(params, updates)),
                 "opt_state": opt_state}
    if stats is not None:
      new_state[BATCH_STATS] = stats
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree_utils.tree_norm(grads),
               "train/lr": schedule(step)}
    return new_state, metrics

  return train_step
