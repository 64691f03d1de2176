"""Head-level low-rank compression of trained attention layers (COMCAT: Towards Efficient
Compression and Customization of Attention-Based Vision Models, Xiao et al., ICML 2023).

A head's logits depend on its query and key projections only through their product, and its
output on its value and output projections only through theirs. With the input augmented by a
constant 1 (so that biases are part of the weights), x̃ = [x, 1]:

    logits_h = x̃ M_h x̃ᵀ / √d_h,  M_h = [W_q^h; b_q^h] [W_k^h; b_k^h]ᵀ   ((d+1) x (d+1))
    out      = Σ_h A_h x̃ N_h + b_o,  N_h = [W_v^h; b_v^h] W_o^h          ((d+1) x d)

both of rank <= d_h (A_h's rows sum to 1, so the value bias passes through). `comcat_attention`
replaces each product by its best rank-r approximation (truncated SVD, U_r S_r V_rᵀ, split as
U_r S_r^½ and V_r S_r^½) and reads the factors back as projections of head size r: the layer
then has 4·d·H·r weights instead of 4·d·H·d_h and computes the rank-r attention exactly (the
products are rescaled by √(r/d_h) so the op's default 1/√r scale gives the original logits). At
r = d_h nothing changes. `comcat` does this for every such layer of a model's parameters; the
compressed model is the same model with `head_dim=r` (e.g. `vit.Model(..., head_dim=r)`).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

_PROJECTIONS = ("query", "key", "value", "out")


def _augmented(projection: Mapping[str, Any]) -> np.ndarray:
  """`[d+1, H, d_h]`: a query/key/value kernel `[d, H, d_h]` with its bias as the last row."""
  kernel = np.asarray(projection["kernel"], np.float64)
  bias = projection.get("bias")
  bias = np.zeros(kernel.shape[1:]) if bias is None else np.asarray(bias, np.float64)
  return np.concatenate([kernel, bias[None]], axis=0)


def _low_rank(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """`(L, R)` with `L Rᵀ` the best rank-`rank` approximation of `matrix` (split S^½ each)."""
  u, s, vt = np.linalg.svd(matrix, full_matrices=False)
  root = np.sqrt(s[:rank])
  return u[:, :rank] * root, vt[:rank].T * root


def comcat_attention(layer: Mapping[str, Any], rank: int) -> dict[str, Any]:
  """The parameters of one `big_attn.layers.Attention` (query, key, value, out; biases
  optional, as the layer has them) compressed to head size `rank` (module docstring).

  Needs as many key/value heads as query heads and no qk-norm; `rank` in [1, d_h].
  """
  missing = [name for name in _PROJECTIONS if name not in layer]
  if missing:
    raise ValueError(f"layer must hold the projections {_PROJECTIONS}, missing {missing}")
  extra = sorted(set(layer) - set(_PROJECTIONS))
  if extra:
    raise ValueError(f"comcat_attention compresses plain attention layers; this one also has "
                     f"{extra} (qk-norm or op parameters)")
  q, k, v = (_augmented(layer[name]) for name in ("query", "key", "value"))
  d1, heads, head_dim = q.shape
  if k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"comcat_attention needs as many key/value heads as query heads and one "
                     f"head size; query {q.shape[1:]}, key {k.shape[1:]}, value {v.shape[1:]}")
  if not isinstance(rank, int) or not 1 <= rank <= head_dim:
    raise ValueError(f"rank must be an int in [1, head_dim={head_dim}], got {rank!r}")
  out_kernel = np.asarray(layer["out"]["kernel"], np.float64)  # [H, d_h, d]
  new_q, new_k, new_v = (np.zeros((d1, heads, rank)) for _ in range(3))
  new_out = np.zeros((heads, rank, out_kernel.shape[-1]))
  for h in range(heads):
    qk = q[:, h] @ k[:, h].T * np.sqrt(rank / head_dim)
    new_q[:, h], new_k[:, h] = _low_rank(qk, rank)
    left, right = _low_rank(v[:, h] @ out_kernel[h], rank)
    new_v[:, h], new_out[h] = left, right.T

  def projection(name, augmented):
    dtype = np.asarray(layer[name]["kernel"]).dtype
    out = {"kernel": augmented[:-1].astype(dtype)}
    if "bias" in layer[name]:  # a bias-free layer's factors have a zero bias row
      out["bias"] = augmented[-1].astype(dtype)
    return out

  compressed = {"query": projection("query", new_q), "key": projection("key", new_k),
                "value": projection("value", new_v),
                "out": {"kernel": new_out.astype(np.asarray(layer["out"]["kernel"]).dtype)}}
  if "bias" in layer["out"]:
    compressed["out"]["bias"] = np.asarray(layer["out"]["bias"])
  return compressed


def comcat(params: Mapping[str, Any], rank: int) -> dict[str, Any]:
  """`params` with every attention layer (a dict holding exactly query, key, value and out
  projections) compressed to head size `rank` by `comcat_attention`; the rest unchanged.
  Raises `ValueError` when there is none."""
  found = [0]

  def walk(tree):
    if not isinstance(tree, Mapping):
      return tree
    if set(tree) == set(_PROJECTIONS):
      found[0] += 1
      return comcat_attention(tree, rank)
    return {name: walk(sub) for name, sub in tree.items()}

  compressed = walk(params)
  if not found[0]:
    raise ValueError("params hold no attention layer (a dict of exactly query, key, value and "
                     "out projections) to compress")
  return compressed
