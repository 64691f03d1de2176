"""Per-pixel accuracy and loss of a dense model (`big_attn.models.dpt`) on a held-out split,
against `dpt.pixel_targets` (background, or the image's class at ink pixels)."""
from __future__ import annotations

from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.evaluators import _base
from big_attn.models import dpt
from big_attn.train import step as step_lib

_KEYS = ("image", "labels", "mask")


class Evaluator:
  """Pixel accuracy, accuracy at ink pixels (the class right where the digit is) and mean
  per-pixel cross-entropy of `model` on a held-out split; `held_out` are `_base.HeldOut`'s
  arguments (input_config, batch_size, mesh, rules; split "test" and seed 0 by default). Yields
  `("pixel_accuracy", a)`, `("ink_accuracy", a)` and `("loss", l)`.
  """

  def __init__(self, model: nn.Module, **held_out: Any):
    self.held_out = _base.HeldOut(**dict(dict(split="test", seed=0), **held_out))

    @jax.jit
    def eval_step(variables, batch):
      logits = model.apply(variables, batch["image"], train=False)
      targets = dpt.pixel_targets(batch["image"], batch["labels"])
      mask = batch["mask"].astype(jnp.float32)
      correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
      ink = (targets > 0).astype(jnp.float32)
      return jnp.stack([jnp.sum(dpt.pixel_losses(logits, targets) * mask),
                        jnp.sum(correct.mean(axis=(1, 2)) * mask),
                        jnp.sum(jnp.sum(correct * ink, axis=(1, 2)) * mask),
                        jnp.sum(jnp.sum(ink, axis=(1, 2)) * mask), jnp.sum(mask)])

    self._eval_step = eval_step

  def compile(self, state: dict[str, Any]) -> None:
    """Compiles the evaluation step for `state` before the first `run`."""
    self._eval_step.lower(step_lib.model_variables(state),
                          self.held_out.abstract_batch(_KEYS)).compile()

  def run(self, state: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """Yields `("pixel_accuracy", a)`, `("ink_accuracy", a)` and `("loss", l)` over the split."""
    loss_sum, correct, ink_correct, ink, count = self.held_out.sums(
        lambda batch: self._eval_step(step_lib.model_variables(state), batch), _KEYS)
    if count == 0:
      raise ValueError("the evaluation split has no examples")
    yield "pixel_accuracy", float(correct / count)
    yield "ink_accuracy", float(ink_correct / max(float(ink), 1.0))
    yield "loss", float(loss_sum / count)
