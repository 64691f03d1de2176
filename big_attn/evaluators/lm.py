"""Held-out next-token loss and bits per byte of an LM, and an optional sample of its text."""
from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from big_attn.data import text
from big_attn.evaluators import _base
from big_attn.models import lm


class Evaluator:
  """Mean cross-entropy (nats per token) and bits per byte of `model` on `split`.

    for name, value in Evaluator(model, input_config=config.input, batch_size=16, mesh=mesh,
                                 rules=config.sharding_rules, max_batches=8).run(state):
      ...   # ("loss", 1.9), ("bits_per_byte", 2.8)

  Bits per byte = (Σ cross-entropy of all weighted targets, EOS included) / (ln 2 · number of
  byte targets): the cost of coding the documents' bytes. With a non-empty `sample_prompt`
  (config: `--config.evals.eval.sample_prompt="def "`), every run
  also logs and prints `generate`'s continuation of that text (`sample_tokens` bytes at
  `temperature`, `top_k`).
  """

  def __init__(self, model: nn.Module, *, input_config: Any, batch_size: int, mesh: Mesh,
               rules: Any, split: str = "test", max_batches: int | None = None,
               sample_prompt: str | None = None, sample_tokens: int = 64,
               temperature: float = 0.8, top_k: int | None = 20, seed: int = 0):
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
      raise ValueError(f"max_batches must be None or a positive int, got {max_batches!r}")
    if sample_prompt is not None and not isinstance(sample_prompt, str):
      raise TypeError(f"sample_prompt must be a string, got {type(sample_prompt).__name__}")
    self.model, self.max_batches = model, max_batches
    self.sample = (sample_prompt, sample_tokens, temperature, top_k, seed)
    self.held_out = _base.HeldOut(input_config=input_config, batch_size=batch_size, mesh=mesh,
                                  rules=rules, split=split, seed=seed)

    @jax.jit
    def eval_step(params, batch):
      losses, weights = lm.token_losses(model, params, batch)
      striped = lm.stripe_batch(model, batch)
      byte_targets = weights * (striped["targets"] < 256).astype(jnp.float32)
      return jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(byte_targets)

    self._eval_step = eval_step

  def compile(self, state: dict[str, Any]) -> None:
    """Compiles the evaluation step for `state` (arrays or `ShapeDtypeStruct`s with shardings)
    before the first `run`."""
    self._eval_step.lower(state["params"], self.held_out.abstract_batch(lm.BATCH_KEYS)).compile()

  def run(self, state: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """Yields `("loss", nats per token)` and `("bits_per_byte", bpb)`."""
    loss_sum, count, num_bytes = self.held_out.sums(
        lambda batch: self._eval_step(state["params"], batch), lm.BATCH_KEYS,
        itertools.islice(self.held_out.dataset, self.max_batches))
    if count == 0 or num_bytes == 0:
      raise ValueError("the evaluation split has no targets")
    yield "loss", float(loss_sum / count)
    yield "bits_per_byte", float(loss_sum / (math.log(2) * num_bytes))
    prompt, num_tokens, temperature, top_k, seed = self.sample
    if prompt:
      sample = sample_text(self.model, state["params"], prompt, num_tokens,
                           temperature=temperature, top_k=top_k, rng=jax.random.key(seed))
      logging.info("sample: %r", sample)
      print(f"sample after step {int(jax.device_get(state['step']))}: {prompt}{sample}")


def sample_text(model: nn.Module, params: Any, prompt: str, num_tokens: int, *,
                temperature: float, top_k: int | None, rng: jax.Array) -> str:
  """`lm.generate`'s continuation of `prompt` (BOS, then its UTF-8 bytes), decoded as text up
  to the first special token."""
  tokens = [text.BOS] + list(prompt.encode("utf-8"))
  out = lm.generate(model, params, np.asarray([tokens], np.int32), num_tokens,
                    temperature=temperature, top_k=top_k, rng=rng)
  new = np.asarray(jax.device_get(out))[0, len(tokens):]
  special = np.nonzero(new >= 256)[0]
  new = new[:special[0]] if special.size else new
  return bytes(new.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
