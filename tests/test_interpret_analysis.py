"""big_attn.interpret.analysis against float64 NumPy computations written from the papers'
formulas: head importance (Michel et al.), AttentionViz's normalisation and joint PCA, TokenTM,
ConceptAttention on a DiT, the cross-layer / cross-step similarity of attention maps, offset local
heads, and the spatial attention profiles and head-pattern autoencoder of How Does Attention Work
in Vision Transformers? A Visual Analytics Attempt."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import interpret
from big_attn.models import dit, vit
from tests import reference

LAYERS = [f"Transformer/encoderblock_{i}/MultiHeadAttention" for i in range(2)]


def _softmax(s, axis=-1):
  e = np.exp(s - s.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _layer_norm(x, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _params_dict(variables, path):
  tree = variables["params"]
  for name in path.split("/"):
    tree = tree[name]
  return tree


def _params(variables, path):
  tree = nn.unbox(variables)["params"]
  for name in filter(None, path.split("/")):
    tree = tree[name]
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _random_variables(model, *args, std=0.3):
  """Every parameter drawn from N(0, std²) (no compiled init; DiT's zero inits made non-zero)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(std * rng.standard_normal(s.shape), s.dtype), shapes)


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _vit(variables, images, labels, gates=None):
  """The tiny ViT in float64 NumPy: `(per-example cross-entropy, {layer path: its input})`;
  `gates[path]` `[heads]` multiplies each head's attention output."""
  p = _params(variables, "")
  b = images.shape[0]
  patches = np.asarray(images, np.float64).reshape(b, 4, 4, 4, 4).transpose(0, 1, 3, 2, 4)
  x = (patches.reshape(b, 16, 16) @ p["embedding"]["kernel"].reshape(16, 32)
       + p["embedding"]["bias"] + p["posemb"]["pos_embedding"])
  x = np.concatenate([np.broadcast_to(p["cls"][None], (b, 1, 32)), x], 1)
  inputs = {}
  for path in LAYERS:
    block = _params(variables, path.rsplit("/", 1)[0])
    norm = lambda y, name: _layer_norm(y) * block[name]["scale"] + block[name]["bias"]
    y = inputs[path] = norm(x, "LayerNorm_0")
    a = block["MultiHeadAttention"]
    q, k, v = (np.einsum("bnf,fhd->bnhd", y, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
    k, v = np.repeat(k, 2, 2), np.repeat(v, 2, 2)  # 2 query heads per key/value head
    o = np.einsum("bhts,bshd->bthd", _softmax(np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)),
                  v)
    if gates is not None and path in gates:
      o = o * gates[path][:, None]
    x = x + np.einsum("bthd,hdf->btf", o, a["out"]["kernel"]) + a["out"]["bias"]
    mlp = block["MlpBlock"]
    hidden = _gelu(norm(x, "LayerNorm_1") @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    x = x + hidden @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
  final = p["Transformer"]["encoder_norm"]
  logits = ((_layer_norm(x[:, 0]) * final["scale"] + final["bias"]) @ p["head"]["kernel"]
            + p["head"]["bias"])
  logits = logits - logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -log_probs[np.arange(b), np.asarray(labels)], inputs


@pytest.fixture(scope="module")
def tiny_vit():
  """README's 2-layer width-32 ViT on 16x16 inputs, with GQA (4 query, 2 key/value heads)."""
  model = vit.Model(num_classes=10, width=32, depth=2, num_heads=4, num_kv_heads=2,
                    patch_size=(4, 4), pool_type="cls")
  x = reference.normal(0, (2, 16, 16, 1))
  return model, _random_variables(model, x), x


def _cross_entropy(labels):
  return lambda logits: -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]


def test_head_importance_is_the_gate_gradient(tiny_vit):
  model, variables, x = tiny_vit
  labels = jnp.array([3, 7])
  loss_fn = _cross_entropy(labels)
  got = interpret.head_importance(model, variables, loss_fn, x)
  assert list(got) == LAYERS and all(v.shape == (4,) for v in got.values())

  # ∂L/∂ξ_h of the NumPy model with gated heads, by central differences in float64.
  eps = 1e-5
  for path in LAYERS:
    want = []
    for h in range(4):
      losses = [_vit(variables, x, labels, {path: 1 + sign * eps * np.eye(4)[h]})[0]
                for sign in (1, -1)]
      want.append(np.abs((losses[0] - losses[1]) / (2 * eps)).mean())
    np.testing.assert_allclose(got[path], want, rtol=1e-3, atol=1e-6)
    assert np.all(got[path] > 1e-3)

  zeroed = jax.tree.map(lambda a: a, variables)
  out = _params_dict(zeroed, LAYERS[0])["out"]
  out["kernel"] = out["kernel"].at[1].set(0.0)
  pruned = interpret.head_importance(model, zeroed, loss_fn, x, normalize=True)
  assert pruned[LAYERS[0]][1] == 0.0 and np.all(np.delete(pruned[LAYERS[0]], 1) > 0)
  for scores in pruned.values():
    np.testing.assert_allclose(np.linalg.norm(scores), 1.0, rtol=1e-12)
  with pytest.raises(ValueError, match="one loss per example"):
    interpret.head_importance(model, variables, jnp.sum, x)


def test_attentionviz_keeps_softmax_and_matches_numpy_pca(tiny_vit):
  model, variables, x = tiny_vit
  vectors = interpret.query_key_vectors(model, variables, x)
  inputs = _vit(variables, x, [0, 0])[1]
  assert list(vectors) == LAYERS
  for path in LAYERS:
    q, k, m = (np.asarray(vectors[path][n], np.float64) for n in ("query", "key", "map"))
    assert q.shape == k.shape == (2, 17, 4, 8)
    p = _params(variables, path)
    proj = lambda name: (np.einsum("bnf,fhd->bnhd", inputs[path], p[name]["kernel"])
                         + p[name]["bias"])
    np.testing.assert_allclose(q, proj("query"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k, np.repeat(proj("key"), 2, 2), rtol=1e-5, atol=1e-5)  # GQA
    scores = lambda q, k: _softmax(np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8))
    np.testing.assert_allclose(m, scores(q, k), atol=2e-6)
    qn, kn = interpret.normalize_queries_keys(q, k)
    np.testing.assert_allclose(scores(qn, kn), scores(q, k), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(qn, axis=-1).mean((0, 1)),
                               np.linalg.norm(kn, axis=-1).mean((0, 1)), rtol=1e-12)

  q, k = (np.asarray(vectors[LAYERS[1]][n], np.float64) for n in ("query", "key"))
  qn, kn = interpret.normalize_queries_keys(q, k)
  q2, k2 = interpret.joint_query_key_embedding(q, k)
  assert q2.shape == (2, 17, 4, 2) and k2.shape == (2, 17, 4, 2)
  for h in range(4):
    qh, kh = q[:, :, h].reshape(-1, 8), k[:, :, h].reshape(-1, 8)
    kh = kh - kh.mean(0) + qh.mean(0)
    c = np.sqrt(np.linalg.norm(kh, axis=1).mean() / np.linalg.norm(qh, axis=1).mean())
    # keys translated to the queries' centroid, then q·c and k/c: equal mean norms
    np.testing.assert_allclose(qn[:, :, h].reshape(-1, 8), qh * c, rtol=1e-12)
    np.testing.assert_allclose(kn[:, :, h].reshape(-1, 8), kh / c, rtol=1e-12, atol=1e-15)
    points = np.concatenate([qh * c, kh / c])
    points -= points.mean(0)
    u, s, _ = np.linalg.svd(points, full_matrices=False)
    want = u[:, :2] * s[:2]
    got = np.concatenate([q2[:, :, h].reshape(-1, 2), k2[:, :, h].reshape(-1, 2)])
    sign = np.sign((got * want).sum(0))
    np.testing.assert_allclose(got * sign, want, atol=1e-10)
  with pytest.raises(ValueError, match="dims"):
    interpret.joint_query_key_embedding(q, k, dims=9)


def test_tokentm_matches_numpy(tiny_vit):
  model, variables, x = tiny_vit
  got = interpret.tokentm(model, variables, x)
  effects = interpret.transformation_effects(model, variables, x)
  inputs = _vit(variables, x, [0, 0])[1]
  rollout = np.broadcast_to(np.eye(17), (2, 17, 17))
  for path in LAYERS:
    p = _params(variables, path)
    h = inputs[path]  # [b, n, f] the layer's input (after LayerNorm_0)
    proj = lambda name: np.einsum("bnf,fhd->bnhd", h, p[name]["kernel"]) + p[name]["bias"]
    q, k, v = proj("query"), np.repeat(proj("key"), 2, 2), np.repeat(proj("value"), 2, 2)
    a = _softmax(np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8))
    t = np.einsum("bshd,hdf->bhsf", v, p["out"]["kernel"])  # T_h(x_j)
    cos = np.einsum("bsf,bhsf->bhs", h, t) / (
        np.linalg.norm(h, axis=-1)[:, None] * np.linalg.norm(t, axis=-1))
    e = (np.linalg.norm(t, axis=-1) / np.linalg.norm(h, axis=-1)[:, None]
         * (np.exp(cos) - np.exp(-1)) / (np.e - np.exp(-1)))
    np.testing.assert_allclose(effects[path], e, rtol=1e-5)
    w = (a * e[:, :, None, :]).mean(1)
    w = 0.5 * w / w.sum(-1, keepdims=True) + 0.5 * np.eye(17)
    rollout = w @ rollout
  assert got.shape == (2, 17, 17)
  np.testing.assert_allclose(got, rollout, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-9)


@pytest.fixture(scope="module")
def tiny_dit():
  """A 2-block width-16 DiT on 8x8x1 images (a 4x4 patch grid) with random non-zero weights."""
  model = dit.Model(num_classes=3, width=16, depth=2, num_heads=2, patch_size=(2, 2),
                    learn_sigma=False)
  x = reference.normal(0, (2, 8, 8, 1))
  variables = _random_variables(model, x, std=0.2)
  return model, variables, x, jnp.array([5, 600]), jnp.array([0, 2])


def _silu(x):
  return x / (1 + np.exp(-x))


def _dit(variables, images, t, labels, concepts):
  """The tiny DiT in float64 NumPy with concept tokens riding along (ConceptAttention):
  `(output, [per block: attention map of the image tokens, o_c·o_xᵀ])`."""
  p = _params(variables, "")
  b, (ph, pw), width = images.shape[0], (2, 2), 16
  images = np.asarray(images, np.float64)
  patches = images.reshape(b, 4, ph, 4, pw, 1).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, -1)
  x = patches @ p["x_embedder"]["kernel"].reshape(-1, width) + p["x_embedder"]["bias"]
  omega = 1.0 / 10_000 ** (np.arange(4) / 3)
  rows, cols = (g.reshape(-1, 1) * omega for g in np.mgrid[:4, :4])
  x = x + np.concatenate([np.sin(cols), np.cos(cols), np.sin(rows), np.cos(rows)], 1)
  dense = lambda y, name: y @ p[name]["kernel"] + p[name]["bias"]
  freqs = np.exp(-np.log(10_000) * np.arange(128) / 128)
  angles = np.asarray(t, np.float64)[:, None] * freqs
  c = dense(_silu(dense(np.concatenate([np.cos(angles), np.sin(angles)], 1), "t_embedder_0")),
            "t_embedder_1") + p["y_embedder"][np.asarray(labels)]
  tokens = np.concatenate([x, np.broadcast_to(concepts, (b, *concepts.shape))], 1)
  blocks = []
  for i in range(2):
    a, mod = p[f"block_{i}"]["attn"], dense(_silu(c), f"adaLN_{i}").reshape(b, 6, width)
    modulate = lambda y, j: _layer_norm(y) * (1 + mod[:, j + 1, None]) + mod[:, j, None]
    y = modulate(tokens, 0)
    q, k, v = (np.einsum("bnf,fhd->bnhd", y, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
    s[:, :, :16, 16:] = -np.inf  # image queries do not read the concepts
    weights = _softmax(s)
    o = np.einsum("bthd,hdf->btf", np.einsum("bhts,bshd->bthd", weights, v),
                  a["out"]["kernel"]) + a["out"]["bias"]
    blocks.append((weights[:, :, :16, :16], np.einsum("bcf,bnf->bcn", o[:, 16:], o[:, :16])))
    tokens = tokens + mod[:, 2, None] * o
    mlp = p[f"block_{i}"]["mlp"]
    hidden = _gelu(modulate(tokens, 3) @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    tokens = tokens + mod[:, 5, None] * (hidden @ mlp["Dense_1"]["kernel"]
                                         + mlp["Dense_1"]["bias"])
  shift, scale = dense(_silu(c), "final_adaLN").reshape(b, 2, width).swapaxes(0, 1)
  out = dense(_layer_norm(tokens[:, :16]) * (1 + scale[:, None]) + shift[:, None],
              "final_linear")
  out = out.reshape(b, 4, 4, ph, pw, 1).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)
  return out, blocks


def test_concept_attention_matches_numpy(tiny_dit):
  model, variables, x, t, labels = tiny_dit
  concepts = variables["params"]["y_embedder"][:3]  # the class embeddings as concepts
  out, saliency = interpret.concept_attention(model, variables, concepts, x, t, labels)
  want_out, blocks = _dit(variables, x, t, labels, np.asarray(concepts, np.float64))
  np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
  # with no concepts the NumPy model gives the same image output
  np.testing.assert_allclose(_dit(variables, x, t, labels, np.zeros((0, 16)))[0], want_out,
                             rtol=1e-12)
  assert saliency.shape == (2, 3, 4, 4)
  want = _softmax((blocks[0][1] + blocks[1][1]) / 2, axis=1).reshape(2, 3, 4, 4)
  np.testing.assert_allclose(saliency, want, rtol=1e-3, atol=2e-5)
  with pytest.raises(ValueError, match="concepts must be"):
    interpret.concept_attention(model, variables, concepts[:, :8], x, t, labels)
  with pytest.raises(TypeError, match="dit.Model"):
    interpret.concept_attention(vit.Model(num_classes=3, variant="Ti/16"), variables, concepts,
                                x, t, labels)


def test_attention_similarity_across_layers_and_steps(tiny_dit):
  rng = np.random.default_rng(0)
  maps = [_softmax(rng.normal(size=(2, 3, 5, 6)) * 2) for _ in range(3)]
  maps[1][0, 2, 4] = 0.0  # a fully masked row: cosine 0 against any row
  got = interpret.attention_similarity(maps)
  assert got["cosine"].shape == got["mean_abs_diff"].shape == (3, 3, 3)
  for h in range(3):
    for i in range(3):
      for j in range(3):
        a, b = maps[i][:, h], maps[j][:, h]
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        cos = np.where(norms > 0, (a * b).sum(-1) / np.maximum(norms, 1e-300), 0.0)
        np.testing.assert_allclose(got["cosine"][h, i, j], cos.mean(), rtol=1e-12)
        np.testing.assert_allclose(got["mean_abs_diff"][h, i, j], np.abs(a - b).mean(),
                                   rtol=1e-12)
  assert got["cosine"][2, 1, 1] < 1.0 and got["cosine"][0, 1, 1] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="one shape"):
    interpret.attention_similarity([maps[0], maps[1][:, :2]])

  model, variables, images, _, labels = tiny_dit
  noise = reference.normal(3, images.shape)
  steps = interpret.dit_timestep_maps(model, variables, images, [999, 500, 0], labels,
                                      noise=noise)
  assert list(steps) == [f"block_{i}/attn" for i in range(2)]
  assert steps["block_0/attn"].shape == (3, 2, 2, 16, 16)
  alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[[999, 500, 0], None, None, None]
  x_t = (np.sqrt(alpha_bar) * np.asarray(images)[:, None]
         + np.sqrt(1 - alpha_bar) * np.asarray(noise)[:, None])  # [b, steps, ...]
  _, blocks = _dit(variables, x_t.swapaxes(0, 1).reshape(6, 8, 8, 1),
                   np.repeat([999, 500, 0], 2), np.tile(labels, 3), np.zeros((0, 16)))
  for i, (want, _) in enumerate(blocks):
    np.testing.assert_allclose(steps[f"block_{i}/attn"], want.reshape(3, 2, 2, 16, 16),
                               atol=2e-5)
  sim = interpret.attention_similarity(list(steps["block_1/attn"]))
  assert sim["cosine"].shape == (2, 3, 3) and np.all(sim["cosine"] <= 1 + 1e-12)


def _offset_maps(grid, num_prefix, rng):
  """[2, 4, n, n] rows: head 0 0.8 on the token at (0, +1), head 1 uniform, head 2 0.9 on itself,
  head 3 0.7 on (-1, +1); the rest spread at random over the patches (queries without that
  neighbour: all of it)."""
  gh, gw = grid
  n = num_prefix + gh * gw
  maps = rng.uniform(size=(2, 4, n, n))
  maps[:, 1] = 1.0
  maps[..., :num_prefix] = 0.0  # no attention to the prefix: the patch weights sum to 1
  for h, (dy, dx), weight in ((0, (0, 1), 0.8), (2, (0, 0), 0.9), (3, (-1, 1), 0.7)):
    for p in range(gh * gw):
      y, x = divmod(p, gw)
      row = maps[:, h, num_prefix + p]
      if 0 <= y + dy < gh and 0 <= x + dx < gw:
        target = num_prefix + (y + dy) * gw + x + dx
        row[:] = row / (row.sum(-1, keepdims=True) - row[:, target:target + 1]) * (1 - weight)
        row[:, target] = weight
  return maps / maps.sum(-1, keepdims=True)


def test_offset_local_heads_on_constructed_maps():
  grid, num_prefix, radius = (3, 4), 1, 2
  maps = _offset_maps(grid, num_prefix, np.random.default_rng(0))
  got = interpret.offset_local_heads(maps, grid, num_prefix=num_prefix, radius=radius)

  gh, gw = grid
  patches = maps[:, :, num_prefix:, num_prefix:]
  patches = patches / patches.sum(-1, keepdims=True)
  want = np.zeros((4, 5, 5))
  for h in range(4):
    for dy in range(-radius, radius + 1):
      for dx in range(-radius, radius + 1):
        values = [patches[b, h, y * gw + x, (y + dy) * gw + x + dx] for b in range(2)
                  for y in range(gh) for x in range(gw) if 0 <= y + dy < gh and 0 <= x + dx < gw]
        want[h, dy + radius, dx + radius] = np.mean(values)
  np.testing.assert_allclose(got["offset_mass"], want, rtol=1e-12)
  np.testing.assert_allclose(got["mass"][[0, 2, 3]], [0.8, 0.9, 0.7], rtol=1e-12)
  np.testing.assert_array_equal(got["offset"][[0, 2, 3]], [[0, 1], [0, 0], [-1, 1]])
  np.testing.assert_array_equal(got["is_offset_local"], [True, False, False, True])
  assert not interpret.offset_local_heads(maps, grid, num_prefix=1, threshold=0.75)[
      "is_offset_local"][3]
  with pytest.raises(ValueError, match="radius"):
    interpret.offset_local_heads(maps, grid, num_prefix=1, radius=4)
  with pytest.raises(ValueError, match="num_prefix"):
    interpret.offset_local_heads(maps, (4, 4), num_prefix=1)


def test_offset_local_heads_of_a_vit(tiny_vit):
  model, variables, x = tiny_vit
  maps = interpret.capture_attention(model, variables, x)
  for path in LAYERS:
    got = interpret.offset_local_heads(maps[path], (4, 4), num_prefix=1)
    assert got["offset_mass"].shape == (4, 3, 3) and got["offset"].shape == (4, 2)
    assert np.all(got["offset_mass"] >= 0) and np.all(got["offset_mass"] <= 1)
    assert np.all(np.abs(got["offset"]) <= 1)
    np.testing.assert_allclose(got["mass"], got["offset_mass"].max((1, 2)), rtol=1e-12)


def test_spatial_attention_profile_matches_a_loop():
  grid, num_prefix = (3, 5), 1
  rng = np.random.default_rng(1)
  maps = _softmax(rng.normal(size=(2, 3, 16, 16)) * 2)
  maps[:, 2] = 1 / 16  # uniform head: 1/15 on every patch after renormalisation
  got = interpret.spatial_attention_profile(maps, grid, num_prefix=num_prefix)

  gh, gw = grid
  patches = maps[:, :, 1:, 1:] / maps[:, :, 1:, 1:].sum(-1, keepdims=True)
  bins = {}
  for p in range(gh * gw):
    for q in range(gh * gw):
      (py, px), (qy, qx) = divmod(p, gw), divmod(q, gw)
      bins.setdefault(int(round(np.sqrt((py - qy) ** 2 + (px - qx) ** 2))), []).append((p, q))
  assert sorted(bins) == list(range(5))  # round(√(2² + 4²)) = 4
  want = np.array([[np.mean([patches[b, h, p, q] for b in range(2) for p, q in bins[d]])
                    for d in range(5)] for h in range(3)])
  np.testing.assert_allclose(got["profile"], want, rtol=1e-12)
  np.testing.assert_array_equal(got["distance"], np.arange(5))
  np.testing.assert_array_equal(got["pairs"], [len(bins[d]) for d in range(5)])
  np.testing.assert_allclose(got["profile"][2], 1 / 15, rtol=1e-12)
  with pytest.raises(ValueError, match="attn must be"):
    interpret.spatial_attention_profile(maps, (4, 4), num_prefix=1)


def _pattern_families(gh=4, gw=4):
  """[6, gh·gw, gh, gw] per-query maps: heads 0-2 Gaussians around the query (σ 0.6, 0.8, 1.0),
  heads 3-5 uniform with 10% noise."""
  ys, xs = np.divmod(np.arange(gh * gw), gw)
  dist2 = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2
  rng = np.random.default_rng(0)
  heads = [np.exp(-dist2 / (2 * sigma ** 2)) for sigma in (0.6, 0.8, 1.0)]
  heads += [1 + 0.1 * rng.uniform(size=dist2.shape) for _ in range(3)]
  a = np.stack(heads)
  return (a / a.sum(-1, keepdims=True)).reshape(6, gh * gw, gh, gw)


def test_attention_pattern_autoencoder_separates_local_from_uniform_heads():
  patterns = _pattern_families()
  got = interpret.attention_pattern_autoencoder(patterns, latent_dims=2, hidden=32, steps=200)
  assert got["codes"].shape == (6, 16, 2) and got["head_codes"].shape == (6, 2)
  assert got["losses"].shape == (200,) and got["losses"][-1] < 0.1 * got["losses"][0]

  x = patterns.reshape(6, 16, 16)
  x = x / x.max(-1, keepdims=True)  # each pattern divided by its maximum
  mean_pattern_error = ((x - x.reshape(-1, 16).mean(0)) ** 2).mean((1, 2))
  assert np.all(got["error"] < 0.25 * mean_pattern_error)
  recon = _decode(got["params"], got["codes"])
  np.testing.assert_allclose(got["error"], ((recon - x) ** 2).mean((1, 2)), rtol=1e-4)

  # the heads' codes fall to their family's centroid; per pattern, the uniform codes are a
  # tight cluster and every local pattern (each query position) lies well outside it
  family = np.repeat([0, 1], 3)
  centroids = np.stack([got["head_codes"][family == f].mean(0) for f in (0, 1)])
  nearest = np.linalg.norm(got["head_codes"][:, None] - centroids[None], axis=-1).argmin(1)
  np.testing.assert_array_equal(nearest, family)
  uniform = got["codes"][3:].reshape(-1, 2)
  radius = np.linalg.norm(got["codes"] - uniform.mean(0), axis=-1)  # [heads, 16]
  assert radius[:3].min() > 3 * radius[3:].max()
  np.testing.assert_allclose(got["head_codes"], got["codes"].mean(1), rtol=1e-12)
  np.testing.assert_allclose(interpret.embed_attention_patterns(got["params"], patterns),
                             got["codes"], rtol=1e-5, atol=1e-6)


def _decode(params, codes):
  """The autoencoder's decoder in float64 NumPy (GELU tanh form, sigmoid output)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  hidden = _gelu(codes @ p["decoder_hidden"]["kernel"] + p["decoder_hidden"]["bias"])
  return 1 / (1 + np.exp(-(hidden @ p["decoder_out"]["kernel"] + p["decoder_out"]["bias"])))


def test_attention_pattern_autoencoder_is_deterministic_and_checks_inputs():
  patterns = _pattern_families(3, 3)
  run = lambda seed: interpret.attention_pattern_autoencoder(patterns, hidden=8, steps=20,
                                                             seed=seed)
  first, again, other = run(0), run(0), run(1)
  np.testing.assert_array_equal(first["codes"], again["codes"])
  np.testing.assert_array_equal(first["losses"], again["losses"])
  assert not np.allclose(first["codes"], other["codes"])
  for kwargs, name in ((dict(latent_dims=0), "latent_dims"), (dict(steps=1.5), "steps"),
                       (dict(hidden=-1), "hidden"), (dict(learning_rate=0.0), "learning_rate")):
    with pytest.raises(ValueError, match=name):
      interpret.attention_pattern_autoencoder(patterns, **kwargs)
  with pytest.raises(ValueError, match="patterns must be"):
    interpret.attention_pattern_autoencoder(patterns[0, 0])
  with pytest.raises(ValueError, match="patterns must be"):
    interpret.attention_pattern_autoencoder(-patterns)
  with pytest.raises(ValueError, match="9 values each"):
    interpret.embed_attention_patterns(first["params"], _pattern_families())


def test_attention_patterns_of_a_vit(tiny_vit):
  model, variables, x = tiny_vit
  maps = interpret.capture_attention(model, variables, x)
  patterns = interpret.attention_patterns(maps[LAYERS[0]], (4, 4), num_prefix=1)
  assert patterns.shape == (4, 32, 4, 4)  # heads, batch·queries, grid
  m = np.asarray(maps[LAYERS[0]], np.float64)[:, :, 1:, 1:]
  np.testing.assert_allclose(patterns[1, 16 + 5].ravel(), m[1, 1, 5] / m[1, 1, 5].sum(),
                             rtol=1e-12)
  got = interpret.attention_pattern_autoencoder(patterns, hidden=16, steps=50)
  assert got["head_codes"].shape == (4, 2) and np.all(np.isfinite(got["codes"]))
  assert got["losses"][-1] < got["losses"][0]
  profile = interpret.spatial_attention_profile(maps[LAYERS[0]], (4, 4), num_prefix=1)
  assert profile["profile"].shape == (4, 5)  # bins 0 .. round(√18) = 4
  # the profile weighted by its pairs is each query's total, 1, over the 16 queries
  np.testing.assert_allclose(profile["profile"] @ profile["pairs"], 16.0, rtol=1e-9)
