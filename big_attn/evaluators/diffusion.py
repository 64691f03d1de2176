"""Held-out denoising loss of a diffusion model (`big_attn.models.dit`), and a sample grid."""
from __future__ import annotations

import itertools
import os
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from big_attn.evaluators import _base
from big_attn.models import dit

_KEYS = ("image", "label", "mask")


class Evaluator:
  """Mean ε-MSE (and VLB term, with `learn_sigma`) of `model` on `split`, padding masked.

    for name, value in Evaluator(model, input_config=config.input, batch_size=128, mesh=mesh,
                                 rules=config.sharding_rules).run(state):
      ...   # ("loss", 0.21), ("mse", 0.2), ("vb", 0.01)

  Batch i is noised with timesteps and noise from `fold_in(key(seed), i)`, so every run sees
  the same t and ε and the numbers are comparable across steps. With `sample_dir`, each run also
  writes a PNG grid (`samples_STEP.png`: one row per class, `samples_per_class` columns) of
  DDIM samples (`sample_steps` steps, `guidance_scale`, x̂_0 clipped to [-1, 1] with
  `clip_denoised`, attention reused across steps by `attention_reuse`, a
  `big_attn.layers.attention_reuse` dict); pixel images in [-1, 1] only.
  """

  def __init__(self, model: nn.Module, *, input_config: Any, batch_size: int, mesh: Mesh,
               rules: Any, split: str = "test", max_batches: int | None = None,
               sample_dir: str | None = None, samples_per_class: int = 8,
               sample_steps: int = 50, guidance_scale: float = 1.0, clip_denoised: bool = True,
               attention_reuse: Any = None, seed: int = 0):
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
      raise ValueError(f"max_batches must be None or a positive int, got {max_batches!r}")
    if not isinstance(samples_per_class, int) or samples_per_class < 1:
      raise ValueError(f"samples_per_class must be a positive int, got {samples_per_class!r}")
    dit.ddim_timesteps(model.num_timesteps, sample_steps)
    self.model, self.max_batches, self.seed = model, max_batches, seed
    self.sample_args = (sample_dir, samples_per_class, sample_steps, guidance_scale,
                        clip_denoised)
    self.attention_reuse = None if attention_reuse is None else dict(attention_reuse)
    self.held_out = _base.HeldOut(input_config=input_config, batch_size=batch_size, mesh=mesh,
                                  rules=rules, split=split, seed=seed)

    @jax.jit
    def eval_step(params, batch, rng):
      mse, vb = dit.diffusion_losses(model, params, batch["image"], batch["label"], rng,
                                     train=False)
      mask = batch["mask"].astype(jnp.float32)
      return jnp.sum(mse * mask), jnp.sum(vb * mask), jnp.sum(mask)

    self._eval_step = eval_step

  def compile(self, state: dict[str, Any]) -> None:
    """Compiles the evaluation step for `state` (arrays or `ShapeDtypeStruct`s with shardings)
    before the first `run`."""
    self._eval_step.lower(state["params"], self.held_out.abstract_batch(_KEYS),
                          jax.random.fold_in(jax.random.key(self.seed), 0)).compile()

  def run(self, state: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """Yields `("loss", mse + vb)`, `("mse", ε-MSE)` and, with `learn_sigma`, `("vb", ...)`."""
    key = jax.random.key(self.seed)
    index = itertools.count()
    mse, vb, count = self.held_out.sums(
        lambda batch: self._eval_step(state["params"], batch,
                                      jax.random.fold_in(key, next(index))),
        _KEYS, itertools.islice(self.held_out.dataset, self.max_batches))
    if count == 0:
      raise ValueError("the evaluation split has no examples")
    yield "loss", float((mse + vb) / count)
    yield "mse", float(mse / count)
    if self.model.learn_sigma:
      yield "vb", float(vb / count)
    if self.sample_args[0]:
      self.write_grid(state)

  def write_grid(self, state: dict[str, Any]) -> str:
    """Writes the sample grid of `state`'s parameters; returns its path."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
    sample_dir, per_class, num_steps, guidance, clip = self.sample_args
    batch = next(iter(self.held_out.dataset))
    shape = tuple(batch["image"].shape[1:])
    classes = self.model.num_classes
    labels = np.repeat(np.arange(classes), per_class)
    images = dit.sample(self.model, state["params"], labels, jax.random.key(self.seed + 1),
                        num_steps, guidance, image_shape=shape, clip_denoised=clip,
                        attention_reuse=self.attention_reuse)
    images = np.clip((np.asarray(jax.device_get(images)) + 1.0) / 2.0, 0.0, 1.0)
    h, w, c = shape
    grid = images.reshape(classes, per_class, h, w, c).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(classes * h, per_class * w, c)
    os.makedirs(sample_dir, exist_ok=True)
    path = os.path.join(sample_dir, f"samples_{int(jax.device_get(state['step']))}.png")
    plt.imsave(path, grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None,
               vmin=0.0, vmax=1.0)
    return path
