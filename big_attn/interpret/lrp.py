"""Relevance propagation of Transformer Interpretability Beyond Attention Visualization.

Chefer, Gur & Wolf (CVPR 2021), for `big_attn.models.vit.Model` with the softmax op:

    maps = lrp.lrp_relevance(model, variables, images, target)   # {layer path: R(A) [b, h, n, n]}
    heat = lrp.transformer_attribution(model, variables, images, target)   # [b, num_patches]

1. An LRP pass through the network, recomputed from its parameters (float32). It starts at the
   target logit, R⁽⁰⁾ = onehot(t)·f_t(x) (`scale_by_logit=False`: the bare one-hot, as the
   authors' `generate_LRP`), and propagates backwards with
   - linear layers (head, MLP, q/k/v and output projections), the αβ rule with α=1, β=0:
     R_j = Σ_i (x_j w_ji)⁺ / Σ_j' (x_j' w_j'i)⁺ · R_i, where (x w)⁺ keeps the positive products
     x⁺w⁺ + x⁻w⁻ and biases take no relevance (Σ_j R_j = Σ_i R_i over the outputs i with
     some positive contribution; the relevance of the others is dropped, as in their code);
   - the generic rule G(u, v, R)_j = Σ_i u_j ∂L_i(u, v)/∂u_j · R_i / L_i(u, v) (gradient times
     input, ε-stabilised: z → z + ε·sign(z), 0 where z = 0) for every operation of two tensors,
     the residual add u + v and the products A·V and Q·Kᵀ, followed by the paper's
     normalisation (Eqs. 6-7), per example:
       R̄ᵘ = Rᵘ · |ΣRᵘ| / (|ΣRᵘ| + |ΣRᵛ|) · ΣR / ΣRᵘ   (and the same for v),
     which conserves ΣR̄ᵘ + ΣR̄ᵛ = ΣR and, for a bilinear product (where ΣRᵘ = ΣRᵛ = ΣR),
     halves the relevance between the operands exactly as the authors' `cam /= 2`;
   - "gap" pooling by the generic rule of the mean (a class token takes all of R at "cls");
   - LayerNorm, GELU and softmax pass relevance through unchanged, and a token used twice (the
     residual branch point) sums the relevance of its uses — all as the authors' code
     (`modules/layers_ours.py`: `LayerNorm`, `GELU`, `Softmax` are plain `RelProp`;
     `Clone.relprop` sums; the generic rule would give a LayerNorm no relevance at all, since
     LN(c·x) = LN(x) makes Σ_j x_j ∂LN_i/∂x_j = 0).
   R(A_b), the relevance of block b's attention map, is the A-half of the A·V rule, taken
   before the softmax (as the authors' `save_attn_cam`). The total is conserved by every rule
   but the dropped outputs of the αβ rule, which can matter after Q·Kᵀ: its relevance is
   divided by the logits, large where they are near 0.
2. Ā_b = I + E_h[(∇A_b ⊙ R(A_b))⁺] with ∇A_b = ∂f_t/∂A_b (`capture.attention_gradients`), the
   product C = Ā_B ··· Ā_1 (`relevance.gradient_rollout`), and the class token's row of C over
   the patch tokens (pool "cls"), or for pool "gap" the mean of the patch rows.

Differences from the authors' code (`baselines/ViT/ViT_LRP.py`): the start is scaled by the
logit unless `scale_by_logit=False` (identical up to a positive factor when the logit is
positive; a negative logit flips the sign of R(A) and so which entries (∇A ⊙ R(A))⁺ keeps); the
normalisation of the add sums per example (theirs over the whole batch, which they run with
batch 1); the product is written C = Ā_B ··· Ā_1 as their `compute_rollout_attention` computes
it (the paper writes Ā⁽¹⁾·Ā⁽²⁾···Ā⁽ᴮ⁾); the ε-stabiliser is ε·sign(z) (theirs adds 1e-9).
Not supported (`ValueError`): other attention ops or op arguments, qk-norm, grouped key/value
heads, "map" pooling, scanned layers (build the model with `scan_layers=False`) and
`num_classes=0`. Register tokens are supported (they take relevance inside the blocks only).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.interpret import capture
from big_attn.interpret import relevance
from big_attn.layers import layer_norm
from big_attn.models import vit

Array = jax.Array
EPSILON = 1e-9


def safe_divide(a: Array, b: Array, epsilon: float = EPSILON) -> Array:
  """`a / (b + ε·sign(b))`, and 0 where `b == 0` (the ε-rule's stabiliser)."""
  den = b + epsilon * jnp.where(b >= 0, 1.0, -1.0)
  return jnp.where(b == 0, 0.0, a / den)


def gradient_times_input(fn, inputs: Sequence[Array], r: Array) -> list[Array]:
  """LRP's generic rule for each input x of z = fn(*inputs): `x ⊙ (∂z/∂x)ᵀ·(r / z)`."""
  z, vjp = jax.vjp(fn, *inputs)
  return [x * g for x, g in zip(inputs, vjp(safe_divide(r, z)))]


def lrp_linear(x: Array, kernel: Array, r: Array, *, contract: int = 1,
               alpha: float = 1.0) -> Array:
  """The αβ rule (β = α - 1) through `z = x·kernel` (bias ignored): relevance of x.

  `x: [..., in...]`, `kernel: [in..., out...]` with `contract` input axes, `r` shaped like z.
  α=1, β=0 (the paper's choice) conserves Σr wherever some contribution x_j·w_ji is positive.
  """
  xp, xn = jnp.maximum(x, 0.0), jnp.minimum(x, 0.0)
  wp, wn = jnp.maximum(kernel, 0.0), jnp.minimum(kernel, 0.0)
  dot = lambda a, w: jnp.tensordot(a, w, axes=contract)

  def part(w_pos_x, w_neg_x):
    p, n = gradient_times_input(lambda a, b: dot(a, w_pos_x) + dot(b, w_neg_x), (xp, xn), r)
    return p + n

  out = alpha * part(wp, wn)
  if alpha != 1.0:
    out = out - (alpha - 1.0) * part(wn, wp)
  return out


def _normalised(parts: Sequence[Array], r: Array) -> list[Array]:
  """The paper's Eqs. 6-7, per example (axis 0): part u scaled to |ΣRᵘ| / Σ_v |ΣRᵛ| · ΣR."""
  total = lambda t: t.reshape(t.shape[0], -1).sum(1)
  sums = [total(p) for p in parts]
  norm = sum(jnp.abs(s) for s in sums)
  out = []
  for p, s in zip(parts, sums):
    factor = safe_divide(safe_divide(jnp.abs(s), norm) * total(r), s)
    out.append(p * factor.reshape((-1,) + (1,) * (p.ndim - 1)))
  return out


def lrp_add(a: Array, b: Array, r: Array) -> tuple[Array, Array]:
  """Relevance of the two summands of `a + b` (batch on axis 0): the generic rule, normalised."""
  return tuple(_normalised(gradient_times_input(jnp.add, (a, b), r), r))


def lrp_matmul(equation: str, a: Array, b: Array, r: Array) -> tuple[Array, Array]:
  """Relevance of both operands of `einsum(equation, a, b)` (batch on axis 0), normalised."""
  fn = functools.partial(jnp.einsum, equation)
  return tuple(_normalised(gradient_times_input(fn, (a, b), r), r))


class LRP(NamedTuple):
  """One relevance pass: `maps` {layer path: R(A) [b, h, n, n]} in block order, `tokens` the
  relevance of the encoder's input tokens `[b, n, width]`, `logits` `[b, classes]` (recomputed
  from the parameters, equal to `model.apply`'s)."""
  maps: dict[str, Array]
  tokens: Array
  logits: Array


def unsupported(model: Any) -> str | None:
  """Why relevance propagation cannot explain `model`, or None when it can."""
  if not isinstance(model, vit.Model):
    return f"a big_attn.models.vit.Model, got {type(model).__name__}"
  requirements = {
      "attention": (model.attention != "softmax", f"the softmax op, got {model.attention!r}"),
      "attention_args": (bool(model.attention_args), "no op arguments"),
      "qk_norm": (model.qk_norm, "qk_norm=False"),
      "num_kv_heads": (model.num_kv_heads not in (None, model.num_heads),
                       "as many key/value heads as query heads"),
      "pool_type": (model.pool_type not in ("gap", "cls", "tok"), "'gap' or 'cls'"),
      "local_layers": (model.local_layers > 0, "every block on the softmax op (local_layers=0)"),
      "posemb": (model.posemb == "peg", "no PEG between the blocks (posemb 'learn' or "
                 "'sincos2d')"),
      "scan_layers": (model.scan_layers, "scan_layers=False (the same parameters with the "
                      "'layers' axis unstacked)"),
      "num_classes": (not model.num_classes, "a classifier head (num_classes > 0)"),
      "spectral_layers": (bool(model.spectral_layers), "attention in every block, no spectral "
                          "blocks"),
  }
  for name, (bad, expected) in requirements.items():
    if bad:
      return f"{expected} (model.{name})"
  return None


def supports(model: Any) -> bool:
  """Whether `lrp_relevance`/`transformer_attribution` can explain `model`."""
  return unsupported(model) is None


def _check(model: Any, images: Any, target: Any) -> tuple[Array, Array]:
  reason = unsupported(model)
  if reason is not None:
    raise ValueError(f"relevance propagation needs {reason}")
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [batch, height, width, channels], got shape "
                     f"{images.shape}")
  target = np.asarray(target)
  if not np.issubdtype(target.dtype, np.integer):
    raise TypeError(f"target must be integer class indices, got dtype {target.dtype}")
  target = np.broadcast_to(target, (images.shape[0],)) if target.ndim == 0 else target
  if target.shape != (images.shape[0],) or np.any((target < 0) | (target >= model.num_classes)):
    raise ValueError(f"target must be a class index in [0, {model.num_classes}) or one per "
                     f"image ({images.shape[0]}), got {target.tolist()}")
  return images, jnp.asarray(target, jnp.int32)


def _encoder_input(model: vit.Model, variables: Any, images: Array) -> Array:
  """The tokens entering the encoder `[b, n, width]`, read during `model.apply`."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.Encoder) and context.method_name == "__call__":
      seen["x"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  return seen["x"]


def _block_forward(p: Any, x: Array) -> dict[str, Array]:
  """Encoder1DBlock (dropout off) recomputed from its parameters: every intermediate."""
  norm = lambda name, t: layer_norm().apply({"params": p[name]}, t)
  attn, mlp = p["MultiHeadAttention"], p["MlpBlock"]
  proj = lambda name, t, contract=1: (jnp.tensordot(t, attn[name]["kernel"], axes=contract)
                                      + attn[name]["bias"])
  y0 = norm("LayerNorm_0", x)
  q, k, v = proj("query", y0), proj("key", y0), proj("value", y0)  # [b, n, h, d]
  a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5, axis=-1)
  o = jnp.einsum("bhqk,bkhd->bqhd", a, v)
  att = proj("out", o, 2)
  x1 = x + att
  y1 = norm("LayerNorm_1", x1)
  g = nn.gelu(y1 @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
  m = g @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
  return dict(x=x, y0=y0, q=q, k=k, v=v, a=a, o=o, att=att, x1=x1, y1=y1, g=g, m=m, out=x1 + m)


def _block_backward(p: Any, t: dict[str, Array], r: Array) -> tuple[Array, Array]:
  """`(R(x), R(A))` of one block `x1 = x + Attn(LN(x)); out = x1 + MLP(LN(x1))` from R(out).

  LayerNorm, GELU and softmax pass R through; the branch points sum the R of their two uses.
  """
  attn, mlp = p["MultiHeadAttention"], p["MlpBlock"]
  r_x1, r_m = lrp_add(t["x1"], t["m"], r)
  r_g = lrp_linear(t["g"], mlp["Dense_1"]["kernel"], r_m)
  r_x1 = r_x1 + lrp_linear(t["y1"], mlp["Dense_0"]["kernel"], r_g)
  r_x, r_att = lrp_add(t["x"], t["att"], r_x1)
  r_o = lrp_linear(t["o"], attn["out"]["kernel"], r_att, contract=2)
  r_a, r_v = lrp_matmul("bhqk,bkhd->bqhd", t["a"], t["v"], r_o)
  r_q, r_k = lrp_matmul("bqhd,bkhd->bhqk", t["q"], t["k"], r_a)  # the scale does not matter
  r_y0 = sum(lrp_linear(t["y0"], attn[name]["kernel"], rr)
             for name, rr in (("query", r_q), ("key", r_k), ("value", r_v)))
  return r_x + r_y0, r_a


def lrp_pass(model: vit.Model, variables: Any, images: Any, target: Any, *,
             scale_by_logit: bool = True) -> LRP:
  """The LRP pass of the module docstring: R(A) of every block, input relevance, logits.

  `target`: a class index or one per image. One compiled call.
  """
  images, target = _check(model, images, target)

  @jax.jit
  def run(variables, images, target):
    x = _encoder_input(model, variables, images)
    p = jax.tree.map(lambda t: jnp.asarray(t, jnp.float32),
                     nn.meta.unbox(variables["params"]))
    x = x.astype(jnp.float32)
    blocks = [p["Transformer"][f"encoderblock_{i}"] for i in range(model.depth)]
    acts = []
    for bp in blocks:
      acts.append(_block_forward(bp, x))
      x = acts[-1]["out"]
    h = layer_norm().apply({"params": p["Transformer"]["encoder_norm"]}, x)
    if model.num_registers:
      h = h[:, :-model.num_registers]
    pooled = h.mean(1) if model.pool_type == "gap" else h[:, 0]
    onehot = jax.nn.one_hot(target, model.num_classes, dtype=jnp.float32)
    logits = pooled @ p["head"]["kernel"] + p["head"]["bias"]
    r = onehot * logits if scale_by_logit else onehot
    r_pooled = lrp_linear(pooled, p["head"]["kernel"], r)
    if model.pool_type == "gap":
      (r_h,) = gradient_times_input(lambda t: t.mean(1), (h,), r_pooled)
    else:
      r_h = jnp.zeros_like(h).at[:, 0].set(r_pooled)
    r = jnp.pad(r_h, ((0, 0), (0, model.num_registers), (0, 0)))  # final LayerNorm: R through
    maps = {}
    for i in reversed(range(len(blocks))):
      r, maps[i] = _block_backward(blocks[i], acts[i], r)
    return [maps[i] for i in range(len(blocks))], r, logits

  maps, tokens, logits = run(variables, images, target)
  paths = [f"Transformer/encoderblock_{i}/MultiHeadAttention" for i in range(len(maps))]
  return LRP(dict(zip(paths, maps)), tokens, logits)


def lrp_relevance(model: vit.Model, variables: Any, images: Any, target: Any, *,
                  scale_by_logit: bool = True) -> dict[str, Array]:
  """`{layer path: R(A_b) [b, heads, n, n]}`: the relevance of every block's attention map.

  Keys are the paths `capture.capture_attention` uses, first block first; `target` is a class
  index or one per image (see the module docstring for the rules).
  """
  return lrp_pass(model, variables, images, target, scale_by_logit=scale_by_logit).maps


def transformer_attribution(model: vit.Model, variables: Any, images: Any, target: Any, *,
                            scale_by_logit: bool = True) -> np.ndarray:
  """The paper's relevance map `[b, num_patches]` (float64) of the patches for class `target`.

  Ā_b = I + E_h[(∇A_b ⊙ R(A_b))⁺], C = Ā_B ··· Ā_1; the class token's row of C (pool "cls") or
  the mean of the patch rows (pool "gap"), over the patch columns.
  """
  images, target_ = _check(model, images, target)
  maps = lrp_relevance(model, variables, images, target, scale_by_logit=scale_by_logit)
  target_fn = lambda out: jnp.take_along_axis(out, target_[:, None], axis=1).sum()
  _, grads = capture.attention_gradients(model, variables, target_fn, images, train=False)
  rollout = relevance.gradient_rollout(list(maps.values()), [grads[path] for path in maps])
  (ph, pw), (h, w) = model.patch_size, images.shape[1:3]
  cls = model.pool_type in ("cls", "tok")
  return relevance.token_relevance(rollout, query=0 if cls else None, num_prefix=int(cls),
                                   num_patches=(h // ph) * (w // pw))
