"""COMCAT's head-level low-rank compression of attention (`big_attn.layers.compression`) against a
float64 NumPy reference: each head's query-key and value-output products replaced by their best
rank-r approximations (Eckart-Young, from NumPy's SVD), and exact at r = d_h."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn.layers import Attention, comcat, comcat_attention
from big_attn.models import vit

D, HEADS, HEAD_DIM = 8, 2, 4


def random_params(module, x, seed=0):
  shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: np.asarray(rng.normal(0, 0.5, s.shape), np.float32), shapes)


def reference(params, x, rank):
  """float64: per head x̃ (M_h)_r x̃ᵀ / √d_h logits, softmax, times x̃ (N_h)_r, plus b_o."""
  x = np.asarray(x, np.float64)
  xt = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], -1)
  aug = lambda p: np.concatenate([np.asarray(p["kernel"], np.float64),  # pylint: disable=unnecessary-lambda-assignment
                                  np.asarray(p["bias"], np.float64)[None]], 0)
  q, k, v = aug(params["query"]), aug(params["key"]), aug(params["value"])
  wo = np.asarray(params["out"]["kernel"], np.float64)

  def truncated(m):
    u, s, vt = np.linalg.svd(m)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]

  out = np.asarray(params["out"]["bias"], np.float64)
  for h in range(HEADS):
    logits = xt @ truncated(q[:, h] @ k[:, h].T) @ np.swapaxes(xt, -1, -2) / np.sqrt(HEAD_DIM)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out = out + a @ xt @ truncated(v[:, h] @ wo[h])
  return out


@pytest.fixture(scope="module")
def layer():
  x = jax.random.normal(jax.random.key(1), (2, 6, D))
  module = Attention(num_heads=HEADS, use_bias=True)
  return x, random_params(module, x)


@pytest.mark.parametrize("rank", [1, 2, HEAD_DIM])
def test_compressed_layer_matches_reference(layer, rank):
  x, params = layer
  compressed = comcat_attention(params, rank)
  assert compressed["query"]["kernel"].shape == (D, HEADS, rank)
  assert compressed["out"]["kernel"].shape == (HEADS, rank, D)
  out = Attention(num_heads=HEADS, head_dim=rank, use_bias=True).apply(
      {"params": compressed}, x)
  np.testing.assert_allclose(out, reference(params, x, rank), rtol=1e-4, atol=1e-5)
  if rank == HEAD_DIM:  # exact: the products have rank <= d_h
    original = Attention(num_heads=HEADS, use_bias=True).apply({"params": params}, x)
    np.testing.assert_allclose(out, original, rtol=1e-4, atol=1e-5)


def test_bias_free_layer_and_errors(layer):
  x, params = layer
  plain = Attention(num_heads=HEADS)
  plain_params = random_params(plain, x, seed=3)
  out = Attention(num_heads=HEADS, head_dim=HEAD_DIM).apply(
      {"params": comcat_attention(plain_params, HEAD_DIM)}, x)
  np.testing.assert_allclose(out, plain.apply({"params": plain_params}, x), rtol=1e-4,
                             atol=1e-5)
  with pytest.raises(ValueError, match=r"rank must be an int in \[1, head_dim=4\]"):
    comcat_attention(params, 5)
  with pytest.raises(ValueError, match="missing"):
    comcat_attention({"query": params["query"]}, 2)
  with pytest.raises(ValueError, match="qk-norm or op parameters"):
    comcat_attention(dict(params, query_norm={"scale": np.ones(HEAD_DIM)}), 2)
  gqa = random_params(Attention(num_heads=HEADS, num_kv_heads=1, use_bias=True), x)
  with pytest.raises(ValueError, match="as many key/value heads"):
    comcat_attention(gqa, 2)
  with pytest.raises(ValueError, match="no attention layer"):
    comcat({"head": {"kernel": np.ones((2, 2))}}, 2)


def test_vit_compressed_to_head_size_r():
  tiny = dict(num_classes=5, width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(4, 4),
              head_zeroinit=False)
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  model = vit.Model(**tiny)
  params = random_params(model, images)
  logits = model.apply({"params": params}, images)
  full = comcat(params, 8)
  np.testing.assert_allclose(vit.Model(**tiny, head_dim=8).apply({"params": full}, images),
                             logits, rtol=1e-4, atol=1e-5)
  count = lambda t: sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(t))  # pylint: disable=unnecessary-lambda-assignment
  small = comcat(params, 2)
  # Each of the 2 layers: 4 projections of 16·2·(8 - 2) weights and 3 biases of 2·(8 - 2) fewer.
  assert count(params) - count(small) == 2 * (4 * 16 * 2 * 6 + 3 * 2 * 6)
  compressed_logits = vit.Model(**tiny, head_dim=2).apply({"params": small}, images)
  assert compressed_logits.shape == logits.shape
  assert bool(jnp.all(jnp.isfinite(compressed_logits)))
