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

from big_attn import data
from big_attn.data import text
from big_attn.models import lm
from big_attn.parallel import mesh as mesh_lib


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
    divisor = mesh_lib.batch_divisor(mesh, rules)
    if batch_size % divisor:
      raise ValueError(f"evaluator batch_size {batch_size} must be a multiple of the {divisor} "
                       "ways the mesh splits a batch")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
      raise ValueError(f"max_batches must be None or a positive int, got {max_batches!r}")
    if sample_prompt is not None and not isinstance(sample_prompt, str):
      raise TypeError(f"sample_prompt must be a string, got {type(sample_prompt).__name__}")
    self.model, self.max_batches = model, max_batches
    self.sample = (sample_prompt, sample_tokens, temperature, top_k, seed)
    self.dataset = data.get_dataset(
        input_config, split=split, batch_size=batch_size, seed=seed, train=False,
        process_index=jax.process_index(), process_count=jax.process_count())
    self.sharding = mesh_lib.data_sharding(mesh, rules)

    @jax.jit
    def eval_step(params, batch):
      losses, weights = lm.token_losses(model, params, batch)
      striped = lm.stripe_batch(model, batch)
      byte_targets = weights * (striped["targets"] < 256).astype(jnp.float32)
      return jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(byte_targets)

    self._eval_step = eval_step

  def run(self, state: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """Yields `("loss", nats per token)` and `("bits_per_byte", bpb)`."""
    totals = np.zeros(3, np.float64)
    for batch in itertools.islice(self.dataset, self.max_batches):
      batch = {k: batch[k] for k in lm.BATCH_KEYS}
      sums = self._eval_step(state["params"], mesh_lib.shard_batch(batch, self.sharding))
      totals += np.asarray(jax.device_get(sums), np.float64)
    loss_sum, count, num_bytes = totals
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
