"""Token relevance from attention maps: rollout, flow, gradient-weighted rollout, AtMan.

Maps are `[batch, heads, n, n]` self-attention maps of consecutive layers (as
`capture.capture_attention` returns them); relevance matrices are `[batch, n, n]` with row i
the relevance of every input token for output token i.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.interpret import capture


def _check_maps(name: str, maps: Sequence[Any]) -> list[np.ndarray]:
  """float64 `[batch, heads, n, n]` maps of one batch and n (heads may differ per layer)."""
  maps = [np.asarray(m, np.float64) for m in maps]
  if not maps:
    raise ValueError(f"{name} must hold at least one attention map")
  b, n = maps[0].shape[0], maps[0].shape[-1]
  if any(m.ndim != 4 or m.shape[0] != b or m.shape[-2:] != (n, n) for m in maps):
    raise ValueError(f"{name} must be [batch, heads, n, n] self-attention maps of one batch and "
                     f"n, got shapes {[m.shape for m in maps]}")
  return maps


def self_attention_maps(maps: dict[str, Any]) -> list[Any]:
  """The maps of `capture_attention` whose queries and keys are the model's n tokens.

  Keeps, in order, the square maps of the most common size (drops attention-pooling heads and
  cross-attention).
  """
  square = [m for m in maps.values() if m.shape[-1] == m.shape[-2]]
  if not square:
    raise ValueError("no self-attention map among the captured layers")
  n = collections.Counter(m.shape[-1] for m in square).most_common(1)[0][0]
  return [m for m in square if m.shape[-1] == n]


def _residual(a: np.ndarray, residual: float) -> np.ndarray:
  """`(1-r)·A + r·I`, rows re-normalised (rows that were all zero stay `r·I`)."""
  n = a.shape[-1]
  a = (1.0 - residual) * a + residual * np.eye(n)
  rows = a.sum(-1, keepdims=True)
  return a / np.where(rows > 0, rows, 1.0)


def attention_rollout(maps: Sequence[Any], *, residual: float = 0.5) -> np.ndarray:
  """Attention rollout (Quantifying Attention Flow in Transformers, Abnar & Zuidema 2020).

  Ã_l = norm(0.5·mean_heads(A_l) + 0.5·I), rollout = Ã_L ··· Ã_1: `[batch, n, n]` whose rows
  sum to 1.
  `maps` are the layers' `[batch, heads, n, n]` maps, first layer first.
  """
  maps = _check_maps("maps", maps)
  out = None
  for a in maps:
    a = _residual(a.mean(1), residual)
    out = a if out is None else a @ out
  return out


def max_flow(capacity: np.ndarray, source: int, sink: int, *, tol: float = 1e-12) -> float:
  """Maximum flow from `source` to `sink` of a graph of real `[V, V]` edge capacities.

  Edmonds-Karp: augment along shortest residual paths (breadth-first search) until none is
  left. O(V·E²); meant for the small graphs of `attention_flow`.
  """
  capacity = np.asarray(capacity, np.float64)
  if capacity.ndim != 2 or capacity.shape[0] != capacity.shape[1]:
    raise ValueError(f"capacity must be a square [V, V] matrix, got shape {capacity.shape}")
  if np.any(capacity < 0):
    raise ValueError("capacity must be non-negative")
  v = capacity.shape[0]
  if source == sink:
    raise ValueError(f"source and sink must differ, got {source}")
  residual = capacity.copy()
  total = 0.0
  while True:
    parent = np.full(v, -1)
    parent[source] = source
    queue = collections.deque([source])
    while queue and parent[sink] < 0:
      u = queue.popleft()
      for w in np.flatnonzero((residual[u] > tol) & (parent < 0)):
        parent[w] = u
        queue.append(w)
    if parent[sink] < 0:
      return total
    path, w = [], sink
    while w != source:
      path.append((parent[w], w))
      w = parent[w]
    push = min(residual[u, w] for u, w in path)
    for u, w in path:
      residual[u, w] -= push
      residual[w, u] += push
    total += push


def attention_flow(maps: Sequence[Any], *, residual: float = 0.5,
                   outputs: Sequence[int] | None = None) -> np.ndarray:
  """Attention flow (Quantifying Attention Flow in Transformers): `[n_outputs, n]` per example.

  The layers form a DAG with n nodes per layer l = 0..L; node j of layer l-1 feeds node i of
  layer l with capacity Ã_l[i, j] (Ã as in `attention_rollout`). The flow of input j to output
  i is the maximum flow from node j of layer 0 to node i of layer L. `maps` are
  `[batch, heads, n, n]`; `outputs` the output tokens (rows; default all). Returns
  `[batch, n_outputs, n]`. Needs n² max-flows per example: for small n.
  """
  maps = _check_maps("maps", maps)
  batch, _, n, _ = maps[0].shape
  num_layers = len(maps)
  outputs = list(range(n)) if outputs is None else [int(i) for i in outputs]
  if any(not 0 <= i < n for i in outputs):
    raise ValueError(f"outputs must be token indices in [0, {n}), got {outputs}")
  result = np.zeros((batch, len(outputs), n))
  for b in range(batch):
    graph = np.zeros(((num_layers + 1) * n,) * 2)
    for l, a in enumerate(maps):
      # edge (layer l, token j) -> (layer l+1, token i) with capacity Ã[i, j]
      graph[l * n:(l + 1) * n, (l + 1) * n:(l + 2) * n] = _residual(a[b].mean(0), residual).T
    for r, i in enumerate(outputs):
      for j in range(n):
        result[b, r, j] = max_flow(graph, j, num_layers * n + i)
  return result


def gradient_rollout(maps: Sequence[Any], grads: Sequence[Any]) -> np.ndarray:
  """Gradient-weighted attention rollout: `[batch, n, n]` relevance R.

  The rule of Generic Attention-model Explainability for Interpreting Bi-Modal and
  Encoder-Decoder Transformers (Chefer, Gur & Wolf 2021), the follow-up of Transformer
  Interpretability Beyond Attention Visualization: R = I, then for each layer
  Ā = mean_heads((∇A ⊙ A)⁺), R ← R + Ā·R. The earlier paper's form, with the LRP relevance
  of each map in place of A, is `interpret.lrp.transformer_attribution`. `grads` are `∂target/∂A`
  (`capture.attention_gradients`).
  """
  maps = _check_maps("maps", maps)
  grads = _check_maps("grads", grads)
  if [g.shape for g in grads] != [m.shape for m in maps]:
    raise ValueError(f"grads must match maps, got shapes {[g.shape for g in grads]} for "
                     f"{[m.shape for m in maps]}")
  n = maps[0].shape[-1]
  r = np.broadcast_to(np.eye(n), (maps[0].shape[0], n, n))
  for a, g in zip(maps, grads):
    r = r + np.maximum(g * a, 0.0).mean(1) @ r
  return r


def atman(model: nn.Module, variables: Any, loss_fn: Callable[[Any], jax.Array], *args,
          num_tokens: int, tokens: Sequence[int] | None = None, factor: float = 0.9,
          mode: str = "scores", **kwargs) -> np.ndarray:
  """AtMan relevance: `loss(token j suppressed) - loss(original)` for each token j.

  AtMan: Understanding Transformer Predictions Through Memory Efficient Attention Manipulation
  (Deiseroth et al. 2023): the attention to token j is suppressed in every layer, for every
  query and head (`capture.suppression_hook`: scores times `1 - factor`), and the change of the
  target's loss (e.g. its cross-entropy) is the token's relevance. `loss_fn(output)` returns one
  loss per example `[batch]`; `num_tokens` is the sequence length of the layers to manipulate
  (layers with another key length, e.g. attention pooling, are left alone). Returns
  `[batch, len(tokens)]` (tokens default to all).
  """
  tokens = list(range(num_tokens)) if tokens is None else [int(t) for t in tokens]
  if any(not 0 <= t < num_tokens for t in tokens):
    raise ValueError(f"tokens must be in [0, {num_tokens}), got {tokens}")
  @jax.jit
  def losses(variables, args):
    base = loss_fn(model.apply(variables, *args, **kwargs))

    def suppressed(token):
      hook = capture.suppression_hook(token, factor, num_tokens=num_tokens, mode=mode)
      return loss_fn(capture.apply_with_hook(model, variables, hook, *args, **kwargs)) - base

    return jax.lax.map(suppressed, jnp.asarray(tokens, jnp.int32))  # [len(tokens), batch]

  return np.asarray(losses(variables, args)).T


def token_relevance(relevance: Any, *, query: int | None = None, num_prefix: int = 0,
                    num_patches: int | None = None) -> np.ndarray:
  """`[batch, n, n]` relevance -> `[batch, num_patches]` relevance of the patch tokens.

  Row `query` (a class token), or with `query=None` the mean over the patch rows (the output
  of mean pooling). Patch tokens are `num_prefix .. num_prefix + num_patches`.
  """
  relevance = np.asarray(relevance)
  if relevance.ndim != 3:
    raise ValueError(f"relevance must be [batch, n, n], got shape {relevance.shape}")
  n = relevance.shape[-1]
  num_patches = n - num_prefix if num_patches is None else num_patches
  patches = slice(num_prefix, num_prefix + num_patches)
  rows = relevance[:, query] if query is not None else relevance[:, patches].mean(1)
  return rows[:, patches]


def attention_distance(attn: Any, grid: tuple[int, int], *, patch_size: Sequence[int] = (1, 1),
                       num_prefix: int = 0) -> np.ndarray:
  """Mean attention distance per head in pixels (An Image is Worth 16x16 Words, Figure 7).

  For each head: Σ_ij A_ij·‖p_i - p_j‖ / Σ_ij A_ij over the patch tokens (queries and keys
  `num_prefix .. num_prefix + gh·gw` of `attn: [batch, heads, n, n]`), p the patch centres in
  pixels (`patch_size` = (ph, pw)); the mean over the batch: `[heads]`. Attention to class or
  register tokens is left out (weights are renormalised over the patches).
  """
  attn = np.asarray(attn, np.float64)
  gh, gw = grid
  if attn.ndim != 4 or attn.shape[-1] < num_prefix + gh * gw:
    raise ValueError(f"attn must be [batch, heads, n, n] with n >= num_prefix + gh·gw = "
                     f"{num_prefix + gh * gw}, got shape {attn.shape}")
  patches = slice(num_prefix, num_prefix + gh * gw)
  a = attn[:, :, patches, patches]
  ys, xs = np.meshgrid(np.arange(gh) * patch_size[0], np.arange(gw) * patch_size[1],
                       indexing="ij")
  pos = np.stack([ys.ravel(), xs.ravel()], -1).astype(np.float64)
  dist = np.linalg.norm(pos[:, None] - pos[None, :], axis=-1)
  total = a.sum((-1, -2))
  return ((a * dist).sum((-1, -2)) / np.where(total > 0, total, 1.0)).mean(0)


def high_norm_tokens(norms: Any, *, threshold: float | None = None, k: float = 5.0
                     ) -> np.ndarray:
  """Boolean `[..., n]`: tokens whose output norm is an outlier (Vision Transformers Need
  Registers: high-norm "artifact" tokens).

  `norms` are one layer's token norms `[batch, n]`. Above `threshold` when given, else above
  median + k·MAD of that layer's norms (1.4826·median absolute deviation, robust to the
  outliers themselves).
  """
  norms = np.asarray(norms, np.float64)
  if threshold is None:
    median = np.median(norms)
    threshold = median + k * 1.4826 * np.median(np.abs(norms - median))
  return norms > threshold


def token_norms(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
  """`{block path: [batch, n] L2 norms}` of `capture.block_outputs`."""
  return {path: np.linalg.norm(np.asarray(x, np.float64), axis=-1)
          for path, x in outputs.items()}
