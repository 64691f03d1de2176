"""You Need to Pay Better Attention: `super_attention` and the "optimised" / "efficient"
projections of `layers.Attention`, against float64 references of the paper's formulas, forward
and gradient, and their weight counts (3/4 and 1/2 of standard attention's, 2·d² + ℓ²)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from big_attn.models import vit
from tests import op_checks
from tests import reference as ref
from tests.model_checks import train_digits_config

OP = ops.get("super_attention")
SEGMENTS = np.array([[0] * 3 + [1] * 4, [0] * 7])


def _super_reference(q, k, v, alignment, mask):
  """softmax(s·QKᵀ, masked) (W_A V) in float64, W_A shared by the heads."""
  q, k, v, alignment = ref.f64(q, k, v, alignment)
  p = ref.masked_softmax(ref.attention_logits(q, k), mask)
  mixed = jnp.einsum("bjm,bmnd->bjnd", alignment, ref.repeat_kv(v, q.shape[2]))
  return jnp.einsum("bnts,bsnd->btnd", p, mixed)


def test_op_matches_the_formula_with_causal_segments_and_padding():
  """Causal: W_A lower-triangular; segments: W_A within a segment; a padded key's weight is 0."""
  q, k, v = ref.qkv(t=7, n=4, k=2, d=4)
  alignment = ref.normal(3, (7, 7), std=0.5)
  valid = np.ones((2, 1, 1, 7), bool)
  valid[1, ..., 0] = False
  full = ref.full_mask(2, 1, 7, 7, mask=valid, is_causal=True, segment_ids=SEGMENTS)
  same = SEGMENTS[:, :, None] == SEGMENTS[:, None, :]
  op = functools.partial(OP, mask=valid, is_causal=True, segment_ids=SEGMENTS)
  out = ref.assert_matches(
      lambda q, k, v, a: op(q, k, v, alignment=a),
      lambda q, k, v, a: _super_reference(q, k, v, jnp.tril(a)[None] * same, full),
      (q, k, v, alignment))
  assert np.all(out[1, 0] == 0.0)


def test_identity_alignment_is_softmax_attention():
  q, k, v = ref.qkv(t=5, n=2, k=2, d=4, seed=4)
  with ref.x64():
    want = np.asarray(ref.softmax_attention(q, k, v))
  np.testing.assert_allclose(OP(q, k, v, alignment=jnp.eye(5)), want, rtol=1e-5, atol=1e-5)


def _layer_reference(params, x, projections, is_causal):
  """The paper's layers in float64 from the weights: head h reads the h-th slice X_h of the
  features; standard Q_h = X W_Q^h, K_h = X W_K^h, V_h = X W_V^h; "optimised" V_h = X_h;
  "efficient" K_h = V_h = X_h; Super Attention ("alignment" given) V_h = W_A X_h with W_A
  lower-triangular when causal; out = Σ_h softmax(Q_h K_hᵀ/√d_h) V_h W_O^h."""
  x = ref.f64(x)
  p = {name: ref.f64(w["kernel"]) for name, w in params.items() if name != "op_params"}
  b, t, d = x.shape
  heads = p["query"].shape[1]
  slices = x.reshape(b, t, heads, d // heads)
  q = jnp.einsum("btd,dnh->btnh", x, p["query"])
  k = slices if projections == "efficient" else jnp.einsum("btd,dnh->btnh", x, p["key"])
  v = slices if projections else jnp.einsum("btd,dnh->btnh", x, p["value"])
  if "op_params" in params:
    alignment = ref.f64(params["op_params"]["alignment"])
    v = jnp.einsum("jm,bmnh->bjnh", jnp.tril(alignment) if is_causal else alignment, v)
  mask = ref.full_mask(b, heads, t, t, is_causal=is_causal)
  o = jnp.einsum("bnts,bsnh->btnh", ref.masked_softmax(ref.attention_logits(q, k), mask), v)
  return jnp.einsum("btnh,nhd->btd", o, p["out"])


@pytest.mark.parametrize("projections,op,is_causal",
                         [("optimised", "softmax", False), ("efficient", "softmax", True),
                          ("efficient", "super_attention", False),
                          ("efficient", "super_attention", True)])
def test_layers_match_the_papers_formulas(projections, op, is_causal):
  """Optimised, Efficient and Super Attention layers: forward and gradients wrt the input and
  every weight."""
  model = layers.Attention(num_heads=2, op=op, projections=projections)
  x = ref.normal(0, (2, 6, 8))
  params = nn.unbox(model.init(jax.random.key(0), x)["params"])
  weights, tree = jax.tree.flatten(params)
  weights = [w + 0.3 * ref.normal(i, w.shape) for i, w in enumerate(weights)]  # W_A ≠ I
  ref.assert_matches(
      lambda x, *w: model.apply({"params": tree.unflatten(w)}, x, is_causal=is_causal),
      lambda x, *w: _layer_reference(tree.unflatten(w), x, projections, is_causal),
      (x, *weights))


@pytest.mark.parametrize("projections,op,count", [
    (None, "softmax", lambda d, l: 4 * d * d), ("optimised", "softmax", lambda d, l: 3 * d * d),
    ("efficient", "softmax", lambda d, l: 2 * d * d),
    ("efficient", "super_attention", lambda d, l: 2 * d * d + l * l)])
def test_weight_counts_are_the_papers(projections, op, count):
  """Per attention layer (no biases): standard 4·d², Optimised 3·d², Efficient 2·d², Super
  2·d² + ℓ²; and a ViT-Ti/16 (d = 192, ℓ = 196 patches, 12 blocks) differs from the standard
  one by exactly those amounts per block."""
  width, length = 16, 9
  model = layers.Attention(num_heads=4, op=op, projections=projections)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, length, width)))
  assert sum(a.size for a in jax.tree.leaves(shapes)) == count(width, length)

  def vit_count(**kwargs):
    shapes = jax.eval_shape(vit.Model(num_classes=10, variant="Ti/16", **kwargs).init,
                            jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    return sum(a.size for a in jax.tree.leaves(shapes))

  d = 192
  biases = {None: 0, "optimised": d, "efficient": 2 * d}[projections]  # W_V, W_K biases
  assert vit_count() - vit_count(projections=projections, attention=op) == 12 * (
      4 * d * d - count(d, 196) + biases)


def test_vit_digits_trains_with_super_attention(tmp_path):
  """`configs/vit_digits.py:projections=super` trains through main (W_A over the 16 patches)."""
  train_digits_config(tmp_path, "vit_digits", arg="projections=super,runlocal")


def _bad_calls():
  q, k, v = ref.qkv(t=5, n=2, k=2, d=4)
  x = ref.normal(0, (1, 5, 8))
  init = lambda **kw: layers.Attention(num_heads=2, **kw).init(jax.random.key(0), x)
  return [
      (lambda: OP(q, k, v, alignment=jnp.eye(4)), "alignment"),
      (lambda: OP(q, k, v), "alignment"),
      (lambda: init(projections="merged"), "projections"),
      (lambda: init(projections="optimised", num_kv_heads=1), "num_kv_heads"),
      (lambda: init(projections="efficient", head_dim=3), "head_dim"),
  ]


@pytest.mark.parametrize("case", range(5))
def test_bad_arguments_raise_naming_them(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
