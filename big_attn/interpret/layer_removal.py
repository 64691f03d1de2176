"""Entropy-guided removal of attention layers: MLP Can Be A Good Transformer Learner (Lin et al.,
CVPR 2024).

The attention layers that carry the least information are removed, their blocks keeping only
the MLP (`vit.Model(attention_free_layers=...)`); the pruned model is then fine-tuned from the
full model's weights (`config.init_from`, which drops the removed layers' parameters,
`vit.Model.removed_parameters`):

    layers = interpret.entropy_guided_attention_free_layers(model, variables, images, 4)
    # python -m big_attn.main ... --config.model.attention_free_layers="(…)" \\
    #   --config.init_from.path=<the full model's workdir>/checkpoints

A layer's information is measured by the entropy of its attention maps on a batch,
`H = -Σ_j A_ij log A_ij` averaged over the batch, heads and queries i; the layers of lowest
entropy are removed (our reading of the paper's entropy criterion on the attention itself).
"""
from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp

from big_attn.interpret.capture import capture_attention

_BLOCK = re.compile(r"encoderblock_(\d+)")


def attention_entropy(attention_map: Any) -> Any:
  """`-Σ_j A_ij log A_ij` of a map `[batch, heads, q, kv]` (rows summing to 1; 0 log 0 = 0),
  averaged over the batch, heads and queries: a float32 scalar."""
  if attention_map.ndim != 4:
    raise ValueError(f"attention_map must be [batch, heads, q, kv], got shape "
                     f"{attention_map.shape}")
  a = jnp.asarray(attention_map, jnp.float32)
  return -jnp.mean(jnp.sum(jnp.where(a > 0, a * jnp.log(jnp.where(a > 0, a, 1.0)), 0.0), -1))


def layer_attention_entropy(model: Any, variables: Any, images: Any) -> dict[int, float]:
  """`{block index: attention_entropy}` of each encoder block's self-attention
  (`Transformer/encoderblock_i`) of a ViT or DeiT `model` on `images`, in inference mode
  (`capture_attention`: an op whose output is not linear in the values raises)."""
  out = {}
  for path, attention_map in capture_attention(model, variables, images).items():
    block = _BLOCK.search(path)
    if block and attention_map.shape[-1] == attention_map.shape[-2]:
      out[int(block.group(1))] = float(attention_entropy(attention_map))
  if not out:
    raise ValueError(f"{type(model).__name__} ran no encoder block's self-attention "
                     "(Transformer/encoderblock_i)")
  return out


def entropy_guided_attention_free_layers(model: Any, variables: Any, images: Any,
                                         num_layers: int) -> tuple[int, ...]:
  """The `attention_free_layers` setting: the `num_layers` blocks whose attention has the
  lowest entropy on `images` (`layer_attention_entropy`; ties: the lower index), sorted."""
  entropy = layer_attention_entropy(model, variables, images)
  if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not (
      0 <= num_layers <= len(entropy)):
    raise ValueError(f"num_layers must be an int in [0, {len(entropy)}] (the blocks with "
                     f"attention), got {num_layers!r}")
  return tuple(sorted(sorted(entropy, key=lambda i: (entropy[i], i))[:num_layers]))
