"""Optimizers, learning-rate schedules and weight-decay masks from the config.

    config.optax_name = "adamw"            # adamw | lion | sgd (with momentum) | adafactor
    config.optax = dict(b2=0.95, weight_decay=1e-4)
    config.wd_head = 3.0                   # the classifier head's own weight decay; None: same
    config.lr = 1e-3
    config.schedule = dict(warmup_steps=100, decay_type="cosine")   # cosine | rsqrt | constant
    config.grad_clip_norm = 1.0            # global-norm clipping; None or 0 disables

Weight decay never touches parameters of rank < 2 (norm scales, biases): `decay_mask`.
"adafactor" is the memory-saving Adafactor of Scaling Vision Transformers (`scale_by_adafactor`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "lion", "sgd", "adafactor")
HEAD = "head"  # the top-level parameter collection of a classifier head (`models.common.classifier`)
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


def scale_by_adafactor(momentum: float | None = 0.9, momentum_dtype: Any = "bfloat16",
                       decay_exponent: float = 0.8, beta2_cap: float = 0.999,
                       clip_threshold: float | None = 1.0, min_dim_size_to_factor: int = 32,
                       epsilon: float = 1e-30) -> optax.GradientTransformation:
  """The memory-saving Adafactor of Scaling Vision Transformers (Zhai et al., CVPR 2022).

  At step k = 1, 2, ... with gradient g: the second moment of a matrix (two largest dimensions
  >= `min_dim_size_to_factor`) is kept factored, its row and column means R, C of g² + ε as
  moving averages with decay β_k = min(1 - k^-`decay_exponent`, `beta2_cap`), V̂ = R Cᵀ / mean(R);
  a smaller parameter keeps V of g² + ε in full. u = g / sqrt(V̂), divided by
  max(1, rms(u) / `clip_threshold`) (Adafactor's update clipping; None: none); the result is
  m = `momentum`·m + (1 - `momentum`)·u, stored in `momentum_dtype` (the paper's half
  precision; None `momentum`: u itself, no state). `make_optimizer` then adds decoupled weight
  decay and scales by -lr, without Adafactor's scaling by the parameter norm.
  """
  for arg, value in (("decay_exponent", decay_exponent), ("beta2_cap", beta2_cap)):
    if not 0 < value <= 1:
      raise ValueError(f"adafactor {arg} must be in (0, 1], got {value}")
  if momentum is not None and not 0 <= momentum < 1:
    raise ValueError(f"adafactor momentum must be in [0, 1) or None, got {momentum}")
  if clip_threshold is not None and clip_threshold <= 0:
    raise ValueError(f"adafactor clip_threshold must be > 0 or None, got {clip_threshold}")

  def capped_decay(step, exponent):
    return jnp.minimum(1.0 - (step + 1.0) ** (-exponent), beta2_cap)

  return optax.chain(
      optax.scale_by_factored_rms(decay_rate=decay_exponent, epsilon=epsilon,
                                  min_dim_size_to_factor=min_dim_size_to_factor,
                                  decay_rate_fn=capped_decay),
      optax.clip_by_block_rms(clip_threshold) if clip_threshold else optax.identity(),
      (optax.ema(momentum, debias=False, accumulator_dtype=jnp.dtype(momentum_dtype))
       if momentum is not None else optax.identity()))


def head_and_body_weight_decay(body: float, head: float) -> optax.GradientTransformation:
  """Adds `head`·p to the update of each parameter of rank >= 2 under the top-level `HEAD`
  collection (the classifier) and `body`·p to the others (`decay_mask`'s); stateless."""

  def init(params):
    if not isinstance(params, Mapping) or HEAD not in params:
      raise ValueError(f"config.wd_head needs a model whose classifier is the top-level "
                       f"parameter collection {HEAD!r}; its collections are "
                       f"{sorted(params) if isinstance(params, Mapping) else type(params)}")
    return optax.EmptyState()

  def update(updates, state, params):
    def decayed(u, p, rate):
      return u + rate * p if jnp.ndim(p) > 1 else u
    return ({k: jax.tree.map(functools.partial(decayed, rate=head if k == HEAD else body),
                             u, params[k]) for k, u in updates.items()}, state)

  return optax.GradientTransformation(init, update)


_SCALINGS = {"adamw": optax.scale_by_adam, "lion": optax.scale_by_lion,
             "adafactor": scale_by_adafactor}


def make_optimizer(name: str, kwargs: Mapping[str, Any] | None, schedule: Callable,
                   grad_clip_norm: float | None = None, head_weight_decay: float | None = None
                   ) -> optax.GradientTransformation:
  """`optax` chain: global-norm clipping, then `name` with masked weight decay.

  `kwargs` go to the scaling (`optax.scale_by_adam`, `optax.scale_by_lion`, `scale_by_adafactor`)
  or to `optax.sgd`; `weight_decay` (default 0) is decoupled for adamw, lion and adafactor
  (optax's form, scaled by the learning rate: the chain and state of `optax.adamw`) and an L2
  term added to the gradient for sgd. `head_weight_decay` (None: `weight_decay` everywhere) is
  the classifier head's own (`head_and_body_weight_decay`; Scaling Vision Transformers'
  decoupled head and body weight decay).
  """
  kwargs = dict(kwargs or {})
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optax_name must be one of {OPTIMIZERS}, got {name!r}")
  weight_decay = float(kwargs.pop("weight_decay", 0.0))
  if head_weight_decay is None:
    decay = optax.add_decayed_weights(weight_decay, mask=decay_mask)
  elif head_weight_decay < 0:
    raise ValueError(f"config.wd_head must be >= 0 or None, got {head_weight_decay}")
  else:
    decay = head_and_body_weight_decay(weight_decay, float(head_weight_decay))
  try:
    if name == "sgd":
      kwargs.setdefault("momentum", 0.9)
      tx = optax.chain(decay, optax.sgd(schedule, **kwargs))
    else:  # optax.adamw / optax.lion's chain, with our decay
      tx = optax.chain(_SCALINGS[name](**kwargs), decay, optax.scale_by_learning_rate(schedule))
  except TypeError as e:
    raise ValueError(f"config.optax has an argument {name} does not take: {e}") from None
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(float(grad_clip_norm)), tx)
  return tx
