"""Optimizers, learning-rate schedules and weight-decay masks from the config.

    config.optax_name = "adamw"            # adamw | lion | sgd (with momentum)
    config.optax = dict(b2=0.95, weight_decay=1e-4)
    config.lr = 1e-3
    config.schedule = dict(warmup_steps=100, decay_type="cosine")   # cosine | rsqrt | constant
    config.grad_clip_norm = 1.0            # global-norm clipping; None or 0 disables

Weight decay never touches parameters of rank < 2 (norm scales, biases): `decay_mask`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "lion", "sgd")
DECAY_TYPES = ("cosine", "rsqrt", "constant")
_SCHEDULE_KEYS = {"warmup_steps", "decay_type", "timescale", "end_lr_ratio"}


def decay_mask(params: Any) -> Any:
  """True for the parameters that weight decay applies to: all of rank >= 2 (no norms/biases)."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_schedule(lr: float, schedule: Mapping[str, Any] | None,
                  total_steps: int) -> Callable[[Any], Any]:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then the decay `decay_type`.

  cosine: `lr * (r + (1 - r) * (1 + cos(pi * t)) / 2)` with `t` the fraction of the post-warmup
  steps done and `r = end_lr_ratio` (default 0); rsqrt: `lr * sqrt(timescale / (timescale + s))`
  with `s` the steps after warmup (`timescale` defaults to `warmup_steps` or 1, big_vision's
  form); constant: `lr`. A warmup longer than the run shrinks to a tenth of it (logged), so a
  short run of any config works.
  """
  schedule = dict(schedule or {})
  unknown = set(schedule) - _SCHEDULE_KEYS
  if unknown:
    raise ValueError(f"config.schedule has unknown keys {sorted(unknown)}; "
                     f"known: {sorted(_SCHEDULE_KEYS)}")
  warmup = int(schedule.get("warmup_steps", 0))
  decay_type = schedule.get("decay_type", "cosine")
  if decay_type not in DECAY_TYPES:
    raise ValueError(f"config.schedule.decay_type must be one of {DECAY_TYPES}, "
                     f"got {decay_type!r}")
  if warmup < 0:
    raise ValueError(f"config.schedule.warmup_steps must be >= 0, got {warmup}")
  if warmup > total_steps:  # a short run of a config made for a long one (`steps=50`)
    logging.warning("config.schedule.warmup_steps=%d is longer than total_steps=%d: warming up "
                    "over the first tenth of the run (%d steps) instead", warmup, total_steps,
                    total_steps // 10)
    warmup = total_steps // 10
  end_ratio = float(schedule.get("end_lr_ratio", 0.0))
  timescale = float(schedule.get("timescale", max(warmup, 1)))
  decay_steps = max(total_steps - warmup, 1)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    after = jnp.maximum(step - warmup, 0.0)
    if decay_type == "cosine":
      frac = jnp.minimum(after / decay_steps, 1.0)
      value = end_ratio + (1.0 - end_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif decay_type == "rsqrt":
      value = jnp.sqrt(timescale / (timescale + after))
    else:
      value = jnp.ones_like(step)
    if warmup:
      value = value * jnp.minimum(step / warmup, 1.0)
    return lr * value

  return fn


def make_optimizer(name: str, kwargs: Mapping[str, Any] | None, schedule: Callable,
                   grad_clip_norm: float | None = None) -> optax.GradientTransformation:
  """`optax` chain: global-norm clipping, then `name` with masked weight decay.

  `kwargs` go to the optax constructor; `weight_decay` (default 0) is decoupled for adamw and
  lion (optax's form, scaled by the learning rate) and an L2 term added to the gradient for sgd.
  """
  kwargs = dict(kwargs or {})
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optax_name must be one of {OPTIMIZERS}, got {name!r}")
  weight_decay = float(kwargs.pop("weight_decay", 0.0))
  try:
    if name == "adamw":
      tx = optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask, **kwargs)
    elif name == "lion":
      tx = optax.lion(schedule, weight_decay=weight_decay, mask=decay_mask, **kwargs)
    else:
      kwargs.setdefault("momentum", 0.9)
      tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                       optax.sgd(schedule, **kwargs))
  except TypeError as e:
    raise ValueError(f"config.optax has an argument {name} does not take: {e}") from None
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(float(grad_clip_norm)), tx)
  return tx
