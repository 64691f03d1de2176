"""Analyses of heads, queries and keys, token transformations, concepts and map similarity.

    imp = analysis.head_importance(vit, variables, loss_fn, images)    # {layer: [heads]}
    qk = analysis.query_key_vectors(vit, variables, images)[path]      # query, key, map
    q2, k2 = analysis.joint_query_key_embedding(qk["query"], qk["key"])  # AttentionViz, 2-D
    rel = analysis.tokentm(vit, variables, images)                     # [b, n, n] relevance
    out, sal = analysis.concept_attention(dit, variables, concepts, x_t, t, labels)
    sim = analysis.attention_similarity(list(maps.values()))           # per head [L, L]
    heads = analysis.offset_local_heads(maps[path], (gh, gw), num_prefix=1)  # Teaching Matters
    prof = analysis.spatial_attention_profile(maps[path], (gh, gw), num_prefix=1)  # per distance
    ae = analysis.attention_pattern_autoencoder(
        analysis.attention_patterns(maps[path], (gh, gw), num_prefix=1))  # ae["head_codes"]

Every model-level analysis observes the `Attention` layers with `flax.linen.intercept_methods`
(`capture.hook_ops` for the op calls): the model code is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_attn.interpret import capture
from big_attn.interpret import relevance
from big_attn.layers.attention import Attention
from big_attn.models import dit
from big_attn.ops import spatial


def _layer_outputs(model: nn.Module, variables: Any, args, kwargs
                   ) -> tuple[dict[str, Any], Any]:
  """`({layer path: ShapeDtypeStruct of its op's output}, model output shapes)`, the layers in
  execution order (traced, nothing computed)."""
  shapes: dict[str, Any] = {}

  def hook(path, op_fn, query, key, value, op_kwargs):
    out = op_fn(query, key, value, **op_kwargs)
    _check_once(path, shapes)
    shapes[path] = jax.ShapeDtypeStruct(out.shape, out.dtype)
    return out

  output = jax.eval_shape(lambda v, a: capture.apply_with_hook(model, v, hook, *a, **kwargs),
                          variables, args)
  return shapes, output


def _check_once(path: str, seen: dict[str, Any]) -> None:
  if path in seen:
    raise ValueError(f"attention layer {path!r} ran twice in one call (a scanned or shared "
                     "layer); analyse a model without nn.scan")


def _layer_tensors(model: nn.Module, variables: Any, args, kwargs
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
  """`({layer path: {query, key, value, inputs, map}}, {layer path: capture.map_error})` of
  every `Attention` layer, in execution order.

  `query` `[b, t, heads, d]`, `key` and `value` `[b, s, heads, d]` as the op receives them
  (after the projections, qk-norm, RoPE and the op's own parameters; key/value heads repeated
  for their query group), `inputs` `[b, s, features]` the layer's key/value input (its
  `context`, else its `inputs_q`), `map` the op's `[b, heads, t, s]` mixing matrix
  (`capture.mixing_matrix`). One compiled call, shared by the analyses; `kwargs` are static.
  """
  order: list[str] = []
  inputs: dict[str, Any] = {}

  def interceptor(next_fun, args_, kwargs_, context):
    if isinstance(context.module, Attention) and context.method_name == "__call__":
      context_arg = kwargs_.get("context", args_[1] if len(args_) > 1 else None)
      inputs[capture.layer_path(context.module)] = (
          args_[0] if context_arg is None else context_arg)
    return next_fun(*args_, **kwargs_)

  def run(variables, args):
    tensors: dict[str, Any] = {}
    errors: dict[str, Any] = {}

    def hook(path, op_fn, query, key, value, op_kwargs):
      _check_once(path, tensors)
      out = op_fn(query, key, value, **op_kwargs)
      weights = capture.mixing_matrix(op_fn, query, key, value, op_kwargs)
      errors[path] = capture.map_error(weights, query, key, value, out)
      group = query.shape[2] // key.shape[2]
      tensors[path] = dict(query=query, key=jnp.repeat(key, group, axis=2),
                           value=jnp.repeat(value, group, axis=2), map=weights)
      order.append(path)
      return out

    inputs.clear()
    with nn.intercept_methods(interceptor):
      capture.apply_with_hook(model, variables, hook, *args, **kwargs)
    return {path: dict(t, inputs=inputs[path]) for path, t in tensors.items()}, errors

  tensors, errors = jax.jit(run)(variables, args)
  return {path: tensors[path] for path in order}, errors


# ------------------------------------------------------------------------------ head importance
def head_importance(model: nn.Module, variables: Any, loss_fn: Callable[[Any], jax.Array],
                    *args, normalize: bool = False, **kwargs) -> dict[str, np.ndarray]:
  """Head importance of Are Sixteen Heads Really Better than One? (Michel, Levy & Neubig 2019).

  Each head's output is multiplied by a gate ξ_h = 1 (the op's `[b, q, heads, d]` output, before
  the output projection) and I_h = E_x |∂L(x)/∂ξ_h|, the mean over the batch of the
  per-example gradient: `loss_fn(output)` returns one loss per example `[batch]`, and each
  example has its own gates (exact for models whose examples do not interact). `normalize`
  divides each layer's scores by their L2 norm, as the paper does before pruning across
  layers. The head rankings of How Does Attention Work in Vision Transformers? A Visual
  Analytics Attempt start from these pruning-based scores. Returns `{layer path: [heads]}`
  in execution order; `kwargs` are static.
  """
  shapes, output = _layer_outputs(model, variables, args, kwargs)
  losses = jax.eval_shape(loss_fn, output)
  if getattr(losses, "ndim", None) != 1:
    raise ValueError(f"loss_fn must return one loss per example [batch], got shape "
                     f"{getattr(losses, 'shape', None)}")
  gates = {path: jnp.ones((s.shape[0], s.shape[2]), jnp.float32) for path, s in shapes.items()}

  def total(gates, variables, args):
    def hook(path, op_fn, query, key, value, op_kwargs):
      out = op_fn(query, key, value, **op_kwargs)
      return out * gates[path][:, None, :, None].astype(out.dtype)

    return jnp.sum(loss_fn(capture.apply_with_hook(model, variables, hook, *args, **kwargs)))

  grads = jax.jit(jax.grad(total))(gates, variables, args)
  out = {}
  for path in shapes:
    score = np.abs(np.asarray(grads[path], np.float64)).mean(0)
    if normalize:
      score = score / max(np.linalg.norm(score), 1e-30)
    out[path] = score
  return out


# -------------------------------------------------------------------------------- AttentionViz
def query_key_vectors(model: nn.Module, variables: Any, *args, tolerance: float | None = 1e-3,
                      **kwargs) -> dict[str, dict[str, jax.Array]]:
  """`{layer path: {"query", "key", "map"}}`: what AttentionViz embeds and draws, per layer.

  `query` `[b, t, heads, d]` and `key` `[b, s, heads, d]` as the op receives them (after the
  projections, qk-norm, RoPE and the op's own parameters; key heads repeated for their query
  group, so key h is the one query head h scores against), and `map` the `[b, heads, t, s]`
  attention between them (`capture.capture_attention`'s map, `tolerance` as there), which
  AttentionViz shows as lines between query and key points. One compiled call (`kwargs`
  static); layers in execution order.
  """
  tensors, errors = _layer_tensors(model, variables, args, kwargs)
  capture.check_linear(errors, tolerance)
  return {path: {name: t[name] for name in ("query", "key", "map")}
          for path, t in tensors.items()}


def _check_query_key(query: Any, key: Any) -> tuple[np.ndarray, np.ndarray]:
  query, key = np.asarray(query, np.float64), np.asarray(key, np.float64)
  if query.ndim != 4 or key.ndim != 4 or query.shape[2:] != key.shape[2:]:
    raise ValueError(f"query and key must be [batch, len, heads, dim] with the same heads and "
                     f"dim, got shapes {query.shape} and {key.shape}")
  return query, key


def normalize_queries_keys(query: Any, key: Any) -> tuple[np.ndarray, np.ndarray]:
  """AttentionViz's key translation and scaling, per head, over all batch rows and positions.

  AttentionViz: A Global View of Transformer Attention (Yeh et al. 2023): keys are translated
  so that their centroid is the queries' centroid, k' = k - μ_k + μ_q, then queries are
  multiplied and keys divided by c = √(mean‖k'‖ / mean‖q‖), so both have the same mean norm.
  q·k' = q·k + q·(μ_q - μ_k) changes by a constant per query, and the scaling cancels in the
  product: every softmax(q·kᵀ) row is unchanged. float64 `(query, key)` as given.
  """
  query, key = _check_query_key(query, key)
  mean_q, mean_k = query.mean((0, 1)), key.mean((0, 1))  # [heads, d]
  key = key - mean_k + mean_q
  norm_q = np.linalg.norm(query, axis=-1).mean((0, 1))  # [heads]
  norm_k = np.linalg.norm(key, axis=-1).mean((0, 1))
  c = np.sqrt(norm_k / np.where(norm_q > 0, norm_q, 1.0))
  c = np.where((norm_q > 0) & (norm_k > 0), c, 1.0)[:, None]
  return query * c, key / c


def joint_query_key_embedding(query: Any, key: Any, *, dims: int = 2
                              ) -> tuple[np.ndarray, np.ndarray]:
  """AttentionViz's joint embedding: queries and keys of each head in one `dims`-D space.

  After `normalize_queries_keys`, the queries and keys of one head (all batch rows and
  positions) are projected together on their first `dims` principal components (SVD of the
  centred `[b·t + b·s, d]` set; each component's sign makes its largest loading positive).
  The paper also offers t-SNE and UMAP; PCA is the projection that needs no new dependency.
  Returns `(query [b, t, heads, dims], key [b, s, heads, dims])`.
  """
  query, key = normalize_queries_keys(query, key)
  b, t, heads, d = query.shape
  s = key.shape[1]
  if not isinstance(dims, int) or not 1 <= dims <= d:
    raise ValueError(f"dims must be an int in [1, {d}] (the head dim), got {dims!r}")
  q_out = np.zeros((b, t, heads, dims))
  k_out = np.zeros((b, s, heads, dims))
  for h in range(heads):
    points = np.concatenate([query[:, :, h].reshape(-1, d), key[:, :, h].reshape(-1, d)])
    points = points - points.mean(0)
    _, _, vt = np.linalg.svd(points, full_matrices=False)
    axes = vt[:dims]
    axes = axes * np.sign(axes[np.arange(dims), np.abs(axes).argmax(1)])[:, None]
    proj = points @ axes.T
    q_out[:, :, h] = proj[:b * t].reshape(b, t, dims)
    k_out[:, :, h] = proj[b * t:].reshape(b, s, dims)
  return q_out, k_out


# ------------------------------------------------------------------------------------- TokenTM
def _param(variables: Any, path: Sequence[str]) -> np.ndarray:
  tree = nn.unbox(variables)["params"]
  for name in path:
    tree = tree[name]
  return np.asarray(tree, np.float64)


def transformation_effects(model: nn.Module, variables: Any, *args, **kwargs
                           ) -> dict[str, np.ndarray]:
  """`{layer path: [b, heads, s]}` token transformation effects of every `Attention` layer.

  After Token Transformation Matters: Towards Faithful Post-hoc Explanation for Vision
  Transformer (TokenTM, Wu et al. 2024): an attention layer outputs
  `o_i = Σ_h Σ_j A_hij T_h(x_j)` with `T_h(x_j) = v_hj · W_o,h` (token j's value through head
  h's slice of the output projection, bias-free), so token j enters with length change
  `‖T_h(x_j)‖ / ‖x_j‖` and direction change `cos(x_j, T_h(x_j))`, x_j the layer's key/value
  input. The effect is `E_hj = ‖T_h(x_j)‖ / ‖x_j‖ · (exp(cos) - e⁻¹) / (e - e⁻¹)`: the length
  ratio times the normalised exponential of the cosine, a direction factor in [0, 1] (1 for
  an unrotated token, 0 for a reversed one). The paper's exact direction weight is not in its
  abstract; this one is monotone in the cosine.
  """
  return _effects(variables, _layer_tensors(model, variables, args, kwargs)[0])


def _effects(variables: Any, tensors: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
  """`transformation_effects` from the tensors of `_layer_tensors`."""
  effects = {}
  for path, captured in tensors.items():
    # x: [b, s, f] the layer's key/value input, v: [b, s, heads, d]
    x, v = (np.asarray(captured[n], np.float64) for n in ("inputs", "value"))
    w_out = _param(variables, path.split("/") + ["out", "kernel"])  # [h, d, f]
    t = np.einsum("bshd,hdf->bhsf", v, w_out)
    norm_x = np.linalg.norm(x, axis=-1)[:, None]  # [b, 1, s]
    norm_t = np.linalg.norm(t, axis=-1)
    denom = np.where(norm_x * norm_t > 0, norm_x * norm_t, 1.0)
    cos = np.einsum("bsf,bhsf->bhs", x, t) / denom
    direction = (np.exp(cos) - np.exp(-1.0)) / (np.e - np.exp(-1.0))
    effects[path] = norm_t / np.where(norm_x > 0, norm_x, 1.0) * direction
  return effects


def tokentm(model: nn.Module, variables: Any, *args, residual: float = 0.5,
            tolerance: float | None = 1e-3, **kwargs) -> np.ndarray:
  """TokenTM relevance `[batch, n, n]`: attention weighted by token transformation effects,
  aggregated over the layers as attention rollout.

  Token Transformation Matters: Towards Faithful Post-hoc Explanation for Vision Transformer
  (Wu et al. 2024) weights each attention weight by the effect of the token it reads
  (`transformation_effects`): W_l = mean_h(A_hij · E_hj), and aggregates the layers from the
  identity: R = Ã_L ··· Ã_1 with Ã = norm((1-r)·W/rowsum(W) + r·I) (`attention_rollout` of
  Quantifying Attention Flow in Transformers). What differs from the paper: its direction
  weight and its initialisation and aggregation rules are not in its abstract; this is the
  documented core, rollout of effect-weighted attention, with the weighted rows renormalised
  to sum to 1 before the residual. Layers are the self-attention layers of the most common
  token count (`relevance.self_attention_maps`), maps as `capture.capture_attention` finds
  them (`tolerance` as there: an op not linear in the values raises `ValueError`).
  """
  tensors, errors = _layer_tensors(model, variables, args, kwargs)
  capture.check_linear(errors, tolerance)
  maps = {path: t["map"] for path, t in tensors.items()}
  effects = _effects(variables, tensors)
  chosen = relevance.self_attention_maps(maps)
  weighted = []
  for path, m in maps.items():
    if not any(m is c for c in chosen):
      continue
    w = np.asarray(m, np.float64) * effects[path][:, :, None, :]
    w = w.mean(1, keepdims=True)
    rows = w.sum(-1, keepdims=True)
    weighted.append(w / np.where(rows > 0, rows, 1.0))
  return relevance.attention_rollout(weighted, residual=residual)


# ---------------------------------------------------------------------------- ConceptAttention
def concept_attention(model: dit.Model, variables: Any, concepts: Any, images: Any, t: Any = None,
                      labels: Any = None, *, layers: Sequence[int] | None = None, **kwargs
                      ) -> tuple[jax.Array, jax.Array]:
  """ConceptAttention saliency maps of a DiT (`big_attn.models.dit.Model`): `(output, saliency)`.

  ConceptAttention: Diffusion Transformers Learn Highly Interpretable Features (Helbling et al.
  2025). `concepts` `[num_concepts, width]` or `[batch, num_concepts, width]` are extra tokens
  (e.g. rows of the class table `params["y_embedder"]`) that run through every block with the
  image tokens' own parameters (the same adaLN modulation, attention projections and MLP),
  one-directionally: in each self-attention concept queries read image and concept keys, image
  queries read image keys only, so the image tokens, and the model's `output`, are those of
  `model.apply(variables, images, t, labels, **kwargs)`. With o_x `[N, width]` and o_c
  `[C, width]` the attention layer's outputs (after its output projection, before the block's
  gate) for image patches and concepts, saliency = softmax over concepts of mean over `layers`
  (block indices; default all) of o_c·o_xᵀ: `[batch, num_concepts, gh, gw]` on the patch grid.
  The self-attention op must not take a patch grid; blocks must not be rematerialised.
  `kwargs` (e.g. `cond_tokens`) go to `model.apply`; one compiled call.
  """
  if not isinstance(model, dit.Model):
    raise TypeError(f"model must be a big_attn.models.dit.Model, got {type(model).__name__}")
  if spatial.takes_grid(model.attention):
    raise ValueError(f"concept_attention: op {model.attention!r} works on the patch grid, "
                     "which has no place for concept tokens; use a sequence op")
  if model.remat_policy != "none":
    raise ValueError(f"concept_attention needs remat_policy='none', got {model.remat_policy!r}")
  layers = list(range(model.depth)) if layers is None else [int(i) for i in layers]
  if not layers or any(not 0 <= i < model.depth for i in layers):
    raise ValueError(f"layers must be block indices in [0, {model.depth}), got {layers}")
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [batch, height, width, channels], got shape "
                     f"{images.shape}")
  concepts = jnp.asarray(concepts)
  b = images.shape[0]
  if concepts.ndim == 2:
    concepts = jnp.broadcast_to(concepts[None], (b, *concepts.shape))
  if concepts.ndim != 3 or concepts.shape[0] != b or concepts.shape[2] != model.width:
    raise ValueError(f"concepts must be [num_concepts, {model.width}] or [batch, num_concepts, "
                     f"{model.width}], got shape {jnp.shape(concepts)}")
  blocks = [f"block_{i}" for i in layers]

  def run(variables, concepts, images, t, labels):
    state = {"c": concepts.astype(model.dtype)}
    outputs = {}

    def interceptor(next_fun, args_, kwargs_, context):
      module, method = context.module, context.method_name
      if isinstance(module, dit.DiTBlock) and method == "__call__":
        x, rest = args_[0], args_[1:]
        n = x.shape[1]
        out = next_fun(jnp.concatenate([x, state["c"].astype(x.dtype)], 1), *rest, **kwargs_)
        state["c"] = out[:, n:]
        return out[:, :n]
      if not (isinstance(module, Attention) and module.name == "attn"
              and isinstance(module.parent, dit.DiTBlock)):
        return next_fun(*args_, **kwargs_)
      if method == "attend":
        total, concepts_len = args_[0].shape[1], state["c"].shape[1]
        rows = jnp.arange(total)[:, None] >= total - concepts_len  # concept queries
        cols = jnp.arange(total)[None, :] < total - concepts_len   # image keys
        mask = (rows | cols)[None, None]
        if kwargs_.get("mask") is not None:
          mask = mask & kwargs_["mask"]
        return next_fun(*args_, **dict(kwargs_, mask=mask))
      out = next_fun(*args_, **kwargs_)
      if method == "__call__":
        outputs[module.parent.name] = out
      return out

    with nn.intercept_methods(interceptor):
      output = model.apply(variables, images, t, labels, **kwargs)
    concepts_len = concepts.shape[1]
    logits = jnp.mean(jnp.stack([
        jnp.einsum("bcf,bnf->bcn", outputs[name][:, -concepts_len:].astype(jnp.float32),
                   outputs[name][:, :-concepts_len].astype(jnp.float32))
        for name in blocks]), 0)
    return output, jax.nn.softmax(logits, axis=1)

  output, saliency = jax.jit(run)(variables, concepts, images, t, labels)
  gh, gw = images.shape[1] // model.patch_size[0], images.shape[2] // model.patch_size[1]
  return output, saliency.reshape(*saliency.shape[:2], gh, gw)


# ------------------------------------------------------------------- similarity of attention maps
def attention_similarity(maps: Sequence[Any]) -> dict[str, np.ndarray]:
  """Per-head similarity of attention maps of several layers or diffusion steps.

  The measure behind DiTFastAttn (Attention Compression for Diffusion Transformer Models:
  similar attention of neighbouring steps), Pyramid Attention Broadcast (the attention
  difference across diffusion steps) and EchoAtt (similar attention matrices across layers).
  `maps`: L maps `[batch, heads, q, k]` of one shape (`capture_attention`'s values, or
  `dit_timestep_maps` of one layer). Returns `cosine` `[heads, L, L]`, the mean over batch
  and query rows of the cosine similarity of the two maps' rows (0 where a row is all zero),
  and `mean_abs_diff` `[heads, L, L]`, the mean over batch, queries and keys of |A_l - A_m|.
  """
  maps = [np.asarray(m, np.float64) for m in maps]
  if not maps or any(m.ndim != 4 or m.shape != maps[0].shape for m in maps):
    raise ValueError(f"maps must be one or more [batch, heads, q, k] maps of one shape, got "
                     f"shapes {[m.shape for m in maps]}")
  a = np.stack(maps)  # [L, b, h, q, k]
  norms = np.linalg.norm(a, axis=-1)  # [L, b, h, q]
  dots = np.einsum("lbhqk,mbhqk->hlmbq", a, a)
  denom = norms.transpose(2, 0, 1, 3)[:, :, None] * norms.transpose(2, 0, 1, 3)[:, None]
  cosine = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0).mean((-1, -2))
  diff = np.abs(a[:, None] - a[None]).mean((2, 4, 5)).transpose(2, 0, 1)
  return {"cosine": cosine, "mean_abs_diff": diff}


def dit_timestep_maps(model: dit.Model, variables: Any, images: Any, timesteps: Sequence[int],
                      labels: Any = None, *, noise: Any, **kwargs) -> dict[str, np.ndarray]:
  """`{layer path: [steps, batch, heads, n, n]}`: a DiT's maps at each of `timesteps`.

  Step k runs on x_t = √ᾱ_t·images + √(1 - ᾱ_t)·noise (`dit.q_sample`, the model's schedule)
  at t = timesteps[k]: the same image and noise along the diffusion trajectory. All steps run
  as one batch of one compiled `capture_attention` call. Feed one layer's maps to
  `attention_similarity(list(maps[path]))` for the cross-step similarity of DiTFastAttn and
  Pyramid Attention Broadcast.
  """
  images = jnp.asarray(images, jnp.float32)
  timesteps = [int(s) for s in timesteps]
  if not timesteps or any(not 0 <= s < model.num_timesteps for s in timesteps):
    raise ValueError(f"timesteps must be in [0, {model.num_timesteps}), got {timesteps}")
  if jnp.shape(noise) != images.shape:
    raise ValueError(f"noise must have the images' shape {images.shape}, got "
                     f"{jnp.shape(noise)}")
  b, steps = images.shape[0], len(timesteps)
  t = jnp.repeat(jnp.asarray(timesteps, jnp.int32), b)
  tile = lambda a: jnp.tile(jnp.asarray(a), (steps,) + (1,) * (jnp.ndim(a) - 1))
  x_t = dit.q_sample(tile(images), t, tile(noise), dit.noise_schedule(model.num_timesteps))
  maps = capture.capture_attention(model, variables, x_t, t,
                                   None if labels is None else tile(labels), **kwargs)
  return {path: np.asarray(m).reshape(steps, b, *m.shape[1:]) for path, m in maps.items()}


# ------------------------------------------------------------------------- offset local heads
def _patch_maps(attn: Any, grid: tuple[int, int], num_prefix: int) -> np.ndarray:
  """`[batch, heads, gh·gw, gh·gw]` patch-to-patch weights, each query row renormalised over
  the patches (attention to class or register tokens left out)."""
  attn = np.asarray(attn, np.float64)
  gh, gw = grid
  if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] < num_prefix + gh * gw:
    raise ValueError(f"attn must be [batch, heads, n, n] with n >= num_prefix + gh·gw = "
                     f"{num_prefix + gh * gw}, got shape {attn.shape}")
  patches = slice(num_prefix, num_prefix + gh * gw)
  a = attn[:, :, patches, patches]
  rows = a.sum(-1, keepdims=True)
  return a / np.where(rows > 0, rows, 1.0)


def offset_local_heads(attn: Any, grid: tuple[int, int], *, num_prefix: int = 0,
                       radius: int = 1, threshold: float = 0.5) -> dict[str, np.ndarray]:
  """Offset local attention heads (Teaching Matters: Investigating the Role of Supervision in
  Vision Transformers): heads that put most of their attention on the token at one fixed,
  non-zero grid offset from the query.

  `attn` `[batch, heads, n, n]` (a `capture_attention` value), patch tokens `num_prefix ..
  num_prefix + gh·gw` in row-major order on `grid` = (gh, gw). Each query's weights are
  renormalised over the patches; `offset_mass[h, dy + radius, dx + radius]` is the mean over
  the batch and over the queries p whose p + (dy, dx) lies on the grid of A[p, p + (dy, dx)],
  for |dy|, |dx| <= radius. Returns `offset_mass` `[heads, 2r+1, 2r+1]`, `offset` `[heads, 2]`
  (dy, dx) of its maximum, `mass` `[heads]` that maximum, and `is_offset_local` `[heads]`:
  mass >= `threshold` at an offset other than (0, 0).
  """
  gh, gw = grid
  a = _patch_maps(attn, grid, num_prefix)
  if not 1 <= radius < max(gh, gw):
    raise ValueError(f"radius must be in [1, {max(gh, gw)}) for grid {grid}, got {radius}")
  a = a.reshape(*a.shape[:2], gh, gw, gh, gw)
  width = 2 * radius + 1
  mass = np.zeros((a.shape[1], width, width))
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      ys = np.arange(max(0, -dy), min(gh, gh - dy))
      xs = np.arange(max(0, -dx), min(gw, gw - dx))
      if ys.size and xs.size:
        y, x = np.meshgrid(ys, xs, indexing="ij")
        mass[:, dy + radius, dx + radius] = a[:, :, y, x, y + dy, x + dx].mean((0, 2, 3))
  flat = mass.reshape(mass.shape[0], -1).argmax(-1)
  offset = np.stack(np.unravel_index(flat, (width, width)), -1) - radius
  peak = mass.reshape(mass.shape[0], -1).max(-1)
  return {"offset_mass": mass, "offset": offset, "mass": peak,
          "is_offset_local": (peak >= threshold) & np.any(offset != 0, -1)}


# ----------------------------------------------- spatial attention profiles and head patterns
def spatial_attention_profile(attn: Any, grid: tuple[int, int], *, num_prefix: int = 0
                              ) -> dict[str, np.ndarray]:
  """Each head's attention strength as a function of the spatial distance between patches.

  How Does Attention Work in Vision Transformers? A Visual Analytics Attempt (Li et al. 2023)
  profiles how strongly patches attend to their spatial neighbours in each head. `attn`
  `[batch, heads, n, n]` (a `capture_attention` value), patch tokens `num_prefix .. num_prefix
  + gh·gw` in row-major order on `grid` = (gh, gw); each query's weights are renormalised over
  the patches. Query patch p and key patch q are at distance bin d = round(‖p - q‖) (Euclidean,
  in patches), d = 0 .. D = round(√((gh-1)² + (gw-1)²)), and `profile[h, d]` is the mean over
  the batch and over all (p, q) pairs in bin d of A_h[p, q] (every bin holds a pair: a uniform
  head's profile is 1/(gh·gw) throughout). Apply it to each layer's map for the trend across
  layers. Returns `profile` `[heads, D + 1]`, `distance` `[D + 1]` the bins and `pairs`
  `[D + 1]` the number of (p, q) pairs in each.
  """
  a = _patch_maps(attn, grid, num_prefix)
  gh, gw = grid
  ys, xs = np.divmod(np.arange(gh * gw), gw)
  bins = np.rint(np.hypot(ys[:, None] - ys[None], xs[:, None] - xs[None])).astype(int)
  pairs = np.bincount(bins.ravel())
  sums = np.stack([np.bincount(bins.ravel(), a[:, h].sum(0).ravel(), pairs.size)
                   for h in range(a.shape[1])])
  return {"profile": sums / (pairs * a.shape[0]), "distance": np.arange(pairs.size),
          "pairs": pairs}


def attention_patterns(attn: Any, grid: tuple[int, int], *, num_prefix: int = 0) -> np.ndarray:
  """`[heads, batch·gh·gw, gh, gw]`: every query patch's attention over the patch grid, per head
  (rows renormalised over the patches), the input of `attention_pattern_autoencoder`."""
  a = _patch_maps(attn, grid, num_prefix)
  return a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1, *grid)


class _PatternAutoencoder(nn.Module):
  """Flattened pattern -> `latent_dims` code -> pattern in [0, 1], one hidden layer each way."""
  hidden: int
  latent_dims: int
  features: int

  def setup(self):
    self.encoder_hidden = nn.Dense(self.hidden)
    self.encoder_out = nn.Dense(self.latent_dims)
    self.decoder_hidden = nn.Dense(self.hidden)
    self.decoder_out = nn.Dense(self.features)

  def encode(self, x):
    return self.encoder_out(nn.gelu(self.encoder_hidden(x)))

  def __call__(self, x):
    code = self.encode(x)
    return code, nn.sigmoid(self.decoder_out(nn.gelu(self.decoder_hidden(code))))


def _normalized_patterns(patterns: Any) -> np.ndarray:
  """`[heads, m, ...]` patterns flattened to `[heads, m, features]` and divided by their
  maximum (shape, not scale)."""
  x = np.asarray(patterns, np.float64)
  if x.ndim < 3 or x.size == 0 or not np.all(np.isfinite(x)) or np.any(x < 0):
    raise ValueError(f"patterns must be finite non-negative attention weights [heads, "
                     f"patterns per head, ...] (3 axes or more), got shape {x.shape}")
  x = x.reshape(*x.shape[:2], -1)
  peak = x.max(-1, keepdims=True)
  return x / np.where(peak > 0, peak, 1.0)


def _autoencoder(params: Any) -> _PatternAutoencoder:
  hidden, latent_dims = params["params"]["encoder_out"]["kernel"].shape
  features = params["params"]["decoder_out"]["kernel"].shape[1]
  return _PatternAutoencoder(hidden, latent_dims, features)


def attention_pattern_autoencoder(patterns: Any, *, latent_dims: int = 2, hidden: int = 64,
                                  steps: int = 300, learning_rate: float = 1e-2, seed: int = 0
                                  ) -> dict[str, Any]:
  """An autoencoder summary of the heads' attention patterns (How Does Attention Work in Vision
  Transformers? A Visual Analytics Attempt, Li et al. 2023).

  `patterns` `[heads, m, ...]`: m patterns per head (`attention_patterns`' per-query maps, or
  any one map per head with m = 1), each flattened and divided by its maximum. A one-hidden-
  layer GELU encoder to `latent_dims` and a decoder with a sigmoid output are trained on all of
  them together by full-batch Adam (`steps`, `learning_rate`) on the mean squared
  reconstruction error, from initial parameters drawn with `seed`: the same inputs and seed give
  the same result. Returns `codes` `[heads, m, latent_dims]`, `head_codes` `[heads,
  latent_dims]` (the mean code of each head's patterns, the point that places the head among
  the others), `error` `[heads]` (the mean squared error of the head's reconstructed patterns),
  `losses` `[steps]` (the training loss before each step) and `params` (for
  `embed_attention_patterns`). The paper's architecture and training set are not in its
  abstract; this is the small dense version of the idea.
  """
  x = _normalized_patterns(patterns)
  for name, value in (("latent_dims", latent_dims), ("hidden", hidden), ("steps", steps)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
  heads, m, features = x.shape
  model = _PatternAutoencoder(hidden, latent_dims, features)
  data = jnp.asarray(x.reshape(heads * m, features), jnp.float32)
  params = model.init(jax.random.key(seed), data[:1])
  optimizer = optax.adam(learning_rate)

  def loss_fn(params):
    return jnp.mean((model.apply(params, data)[1] - data) ** 2)

  def step(state, _):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  train = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), length=steps))
  (params, _), losses = train(params)
  codes, recon = jax.jit(model.apply)(params, data)
  error = np.mean((np.asarray(recon, np.float64) - x.reshape(heads * m, features)) ** 2, -1)
  codes = np.asarray(codes, np.float64).reshape(heads, m, latent_dims)
  return {"codes": codes, "head_codes": codes.mean(1), "error": error.reshape(heads, m).mean(1),
          "losses": np.asarray(losses, np.float64), "params": params}


def embed_attention_patterns(params: Any, patterns: Any) -> np.ndarray:
  """`[heads, m, latent_dims]` codes of new `patterns` `[heads, m, ...]` with the `params` of
  `attention_pattern_autoencoder` (each pattern divided by its maximum, as in training)."""
  model = _autoencoder(params)
  x = _normalized_patterns(patterns)
  if x.shape[-1] != model.features:
    raise ValueError(f"patterns must have {model.features} values each (the trained pattern "
                     f"size), got shape {np.shape(patterns)}")
  codes = model.apply(params, jnp.asarray(x, jnp.float32), method=_PatternAutoencoder.encode)
  return np.asarray(codes, np.float64)
