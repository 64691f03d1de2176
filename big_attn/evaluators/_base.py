"""What every evaluator shares: the padded held-out pass, placed on the mesh, and its sums."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.sharding import Mesh

from big_attn import data
from big_attn.parallel import mesh as mesh_lib


class HeldOut:
  """One ordered, padded pass over `split`, each batch sharded like the training batches."""

  def __init__(self, *, input_config: Any, batch_size: int, mesh: Mesh, rules: Any, split: str,
               seed: int):
    divisor = mesh_lib.batch_divisor(mesh, rules)
    if batch_size % divisor:
      raise ValueError(f"evaluator batch_size {batch_size} must be a multiple of the {divisor} "
                       "ways the mesh splits a batch")
    self.sharding = mesh_lib.data_sharding(mesh, rules)
    self.batch_size = batch_size
    self.dataset = data.get_dataset(
        input_config, split=split, batch_size=batch_size, seed=seed, train=False,
        rows=mesh_lib.process_rows(self.sharding, batch_size))

  def abstract_batch(self, keys: Iterable[str]) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shape, dtype and sharding of the `keys` of the batches `sums` feeds its step (read
    from the first batch), to compile the step ahead of the first pass."""
    first = next(iter(self.dataset))
    return {k: jax.ShapeDtypeStruct((self.batch_size, *np.shape(first[k])[1:]),
                                    np.asarray(first[k]).dtype, sharding=self.sharding)
            for k in keys}

  def sums(self, step: Callable[[Any], Any], keys: Iterable[str],
           batches: Iterable[Any] | None = None) -> np.ndarray:
    """Σ over the pass (or `batches` of it) of `step(sharded batch)`'s tuple, in float64."""
    keys = tuple(keys)
    totals = None
    for batch in self.dataset if batches is None else batches:
      sharded = mesh_lib.shard_batch({k: batch[k] for k in keys}, self.sharding,
                                     self.batch_size)
      values = np.asarray(jax.device_get(step(sharded)), np.float64)
      totals = values if totals is None else totals + values
    if totals is None:
      raise ValueError("the evaluation split has no examples")
    return totals
