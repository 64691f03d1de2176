"""Per-pixel accuracy and loss of a dense model (`big_attn.models.dpt`) on a held-out split,
against `dpt.pixel_targets` (background, or the image's class at ink pixels)."""
from __future__ import annotations

from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from big_attn.evaluators import _base
from big_attn.models import dpt
from big_attn.train import step as step_lib

_KEYS = ("image", "labels", "mask")


class Evaluator:
  """Pixel accuracy, accuracy at ink pixels (the class right where the digit is) and mean
  per-pixel cross-entropy of `model` on `split` of `input_config`.

    for name, value in Evaluator(model, input_config=config.input, batch_size=128, mesh=mesh,
                                 rules=config.sharding_rules).run(state):
      ...   # ("pixel_accuracy", 0.98), ("ink_accuracy", 0.9), ("loss", 0.05)
  """

  def __init__(self, model: nn.Module, *, input_config: Any, batch_size: int, mesh: Mesh,
               rules: Any, split: str = "test", seed: int = 0):
    self.held_out = _base.HeldOut(input_config=input_config, batch_size=batch_size, mesh=mesh,
                                  rules=rules, split=split, seed=seed)

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
