"""Classification accuracy and loss on a held-out split (one padded pass, padding masked)."""
from __future__ import annotations

from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from big_attn.evaluators import _base
from big_attn.train import step as step_lib

_KEYS = ("image", "labels", "label", "mask")


class Evaluator:
  """Top-1 accuracy and mean softmax cross-entropy of `model` on `split` of `input_config`.

    for name, value in Evaluator(model, input_config=config.input, batch_size=256, mesh=mesh,
                                 rules=config.sharding_rules).run(state):
      ...   # ("accuracy", 0.97), ("loss", 0.11)
  """

  def __init__(self, model: nn.Module, *, input_config: Any, batch_size: int, mesh: Mesh,
               rules: Any, split: str = "test", seed: int = 0):
    self.held_out = _base.HeldOut(input_config=input_config, batch_size=batch_size, mesh=mesh,
                                  rules=rules, split=split, seed=seed)

    @jax.jit
    def eval_step(variables, batch):
      logits = model.apply(variables, batch["image"], train=False)
      mask = batch["mask"].astype(jnp.float32)
      losses = step_lib.classification_losses(logits, batch["labels"])
      correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
      return jnp.sum(losses * mask), jnp.sum(correct * mask), jnp.sum(mask)

    self._eval_step = eval_step

  def compile(self, state: dict[str, Any]) -> None:
    """Compiles the evaluation step for `state` (arrays or `ShapeDtypeStruct`s with shardings)
    before the first `run`."""
    self._eval_step.lower(step_lib.model_variables(state),
                          self.held_out.abstract_batch(_KEYS)).compile()

  def run(self, state: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """Yields `("accuracy", a)` and `("loss", l)` over the whole split."""
    loss_sum, correct, count = self.held_out.sums(
        lambda batch: self._eval_step(step_lib.model_variables(state), batch), _KEYS)
    if count == 0:
      raise ValueError("the evaluation split has no examples")
    yield "accuracy", float(correct / count)
    yield "loss", float(loss_sum / count)
