"""`sage_int8`, `sparse_blocks`, `neural_attention` and `gatv2` against float64 references.

The references are written from the papers' formulas: SageAttention's smoothing and per-block
int8 rounding in NumPy, SpargeAttn's pooled TopCdf block selection by loops over blocks, the
Neural Attention MLP on explicitly concatenated [q_i; k_j] and GATv2's aᵀ LeakyReLU(q_i + k_j)
per pair. They never call `big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL


def _qkv(b=2, t=21, s=None, n=4, k=2, d=8, dtype=jnp.float32, seed=0, key_offset=0.0):
  s = t if s is None else s
  return (ref.normal(seed, (b, t, n, d), dtype),
          (ref.normal(seed + 1, (b, s, k, d)) + key_offset).astype(dtype),
          ref.normal(seed + 2, (b, s, k, d), dtype))


def _key_padding(b, s, seed=5):
  valid = np.random.default_rng(seed).random((b, s)) > 0.3
  valid[0, :] = False  # batch 0: every key masked -> zeros
  return valid[:, None, None, :]


def _rel_err_and_cosine(out, want):
  out, want = np.asarray(out, np.float64).ravel(), np.asarray(want, np.float64).ravel()
  cosine = out @ want / np.linalg.norm(out) / np.linalg.norm(want)
  return np.linalg.norm(out - want) / np.linalg.norm(want), cosine


# ----------------------------------------------------------------------------------------------
# SageAttention.
# ----------------------------------------------------------------------------------------------
def _sage_reference(q, k, v, block_q, block_k, mask, is_causal=False):
  """Smoothed K, symmetric int8 per (block, head), dequantised scores; float64 elsewhere.

  Causal: each token's scale is the max over its block up to itself; key block r is smoothed
  with μ_r = mean(k_0..k_{r·block_k}) and q·μ_r is added back to the scores.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, s = k.shape[:2]
  if is_causal:
    starts = np.arange(s) // block_k * block_k
    mean = np.stack([k[:, :p + 1].mean(axis=1) for p in starts], axis=1)
  else:
    mean = np.broadcast_to(k.mean(axis=1, keepdims=True), k.shape)

  def quantize(x, block):
    out = np.empty_like(x)
    for i in range(x.shape[1]):
      start = i // block * block
      end = i + 1 if is_causal else start + block
      scale = np.abs(x[:, start:end]).max(axis=(1, 3), keepdims=True) / 127.0
      scale = np.where(scale == 0.0, 1.0, scale)  # An all-zero block stays zero.
      out[:, i:i + 1] = np.clip(np.round(x[:, i:i + 1] / scale), -127, 127) * scale
    return out

  qd, kd = quantize(q, block_q), quantize(k - mean, block_k)
  # Scores qd·kd + q·μ_j as one dot product over concatenated features.
  with ref.x64():
    return np.asarray(ref.softmax_attention(
        np.concatenate([qd, q], -1), np.concatenate([kd, mean], -1), v, mask=mask,
        scale=1.0 / np.sqrt(q.shape[-1])))


@pytest.mark.parametrize("is_causal", [False, True])
def test_sage_int8_matches_int8_formula_and_is_close_to_softmax(is_causal):
  q, k, v = _qkv(t=45, s=45, d=32, key_offset=2.0)
  op = ops.get("sage_int8")
  full = ref.full_mask(2, 4, 45, 45, is_causal=is_causal)
  kw = dict(block_q=16, block_k=8, is_causal=is_causal)
  exact = _sage_reference(q, k, v, 16, 8, full, is_causal)
  out32 = op(q, k, v, pv_dtype=jnp.float32, **kw)
  np.testing.assert_allclose(np.asarray(out32, np.float64), exact, rtol=2e-3, atol=2e-3)
  with ref.x64():
    want = np.asarray(ref.softmax_attention(q, k, v, mask=full))
  for pv_dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    err, cosine = _rel_err_and_cosine(op(q, k, v, pv_dtype=pv_dtype, **kw), want)
    print(f"sage_int8 vs softmax, pv {jnp.dtype(pv_dtype).name}, causal {is_causal}: "
          f"relative L2 error {err:.2e}, cosine similarity {cosine:.6f}")
    assert err < 2e-2 and cosine > 0.9998, (pv_dtype, err, cosine)


def _dot_operand_dtypes(jaxpr):
  """Operand dtypes of every dot_general in a jaxpr, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append((tuple(str(x.aval.dtype) for x in eqn.invars),
                    str(eqn.params.get("preferred_element_type"))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _dot_operand_dtypes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _dot_operand_dtypes(sub)
  return found


def test_sage_int8_scores_are_an_int8_matmul():
  q, k, v = _qkv()
  fn = lambda q, k, v: ops.get("sage_int8")(q, k, v, is_causal=True)
  for jaxpr in (jax.make_jaxpr(fn)(q, k, v),
                jax.make_jaxpr(jax.grad(lambda *a: fn(*a).sum()))(q, k, v)):
    dots = _dot_operand_dtypes(jaxpr.jaxpr)
    assert (("int8", "int8"), "int32") in dots, dots


def test_sage_int8_gradients_are_float_attention_gradients():
  q, k, v = _qkv(t=19, s=23)
  padding = _key_padding(2, 23)
  segments = (jnp.asarray(np.arange(19)[None].repeat(2, 0) // 10, jnp.int32),
              jnp.asarray(np.arange(23)[None].repeat(2, 0) // 12, jnp.int32))
  full = ref.full_mask(2, 4, 19, 23, mask=padding, segment_ids=segments)
  bias = ref.normal(8, (1, 4, 19, 23))
  op = lambda q, k, v, bias: ops.get("sage_int8")(
      q, k, v, bias=bias, mask=jnp.asarray(padding), segment_ids=segments, block_q=8,
      block_k=8)
  out, grads = ref.out_and_grads(op, (q, k, v, bias))
  with ref.x64():
    want, want_grads = ref.out_and_grads(
        lambda q, k, v, bias: ref.softmax_attention(q, k, v, bias=bias, mask=full),
        ref.f64(q, k, v, bias))
  assert np.all(np.asarray(out)[0] == 0.0)  # batch 0 has no keys: zeros, no NaN
  np.testing.assert_allclose(out, want, rtol=3e-2, atol=3e-2)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, **F32_TOL)


# ----------------------------------------------------------------------------------------------
# SpargeAttn block selection.
# ----------------------------------------------------------------------------------------------
def _self_similar(x, theta):
  """Mean pairwise cosine similarity of a block's tokens > theta (None: always True)."""
  unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return theta is None or (unit @ unit.T).mean() > theta


def _sparge_block_mask(q, k, full, block_q, block_k, tau, topk, theta=None, is_causal=False):
  """Kept `[b, n, q_blocks, kv_blocks]` blocks, by loops over batches, heads and blocks.

  Causal: predicted from the block's first query and the key blocks it sees entirely.
  """
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, n, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  nq, nk = -(-t // block_q), -(-s // block_k)
  keep = np.zeros((b, n, nq, nk), bool)
  for bi in range(b):
    for h in range(n):
      kh = h // (n // kv_heads)
      for i in range(nq):
        rows = slice(i * block_q, (i + 1) * block_q)
        first = i * block_q
        q_mean = q[bi, first, h] if is_causal else q[bi, rows, h].mean(0)
        allowed = np.zeros(nk, bool)
        dense = np.full(nk, not is_causal and not _self_similar(q[bi, rows, h], theta))
        score = np.full(nk, -np.inf)
        for j in range(nk):
          cols = slice(j * block_k, (j + 1) * block_k)
          allowed[j] = full[bi, h, rows, cols].any()
          dense[j] |= not _self_similar(k[bi, cols, kh], theta)
          seen_by_first = not is_causal or (j + 1) * block_k - 1 <= first
          if allowed[j] and seen_by_first and _self_similar(k[bi, cols, kh], theta):
            score[j] = q_mean @ k[bi, cols, kh].mean(0) / np.sqrt(d)
        if np.isfinite(score).any():
          p = np.exp(score - score.max())
          p /= p.sum()
          mass = 0.0
          for rank, j in enumerate(np.argsort(-p, kind="stable")):
            if (tau >= 1.0 or mass < tau) and (topk is None or rank < topk) and p[j] > 0:
              keep[bi, h, i, j] = True
            mass += p[j]
        for j in range(nk):
          first_or_diagonal = j == 0 or (j * block_k < (i + 1) * block_q
                                         and i * block_q < (j + 1) * block_k)
          keep[bi, h, i, j] = (keep[bi, h, i, j] or first_or_diagonal or dense[j]) and allowed[j]
  return keep


def _expand_blocks(keep, t, s, block_q, block_k):
  return keep.repeat(block_q, 2).repeat(block_k, 3)[:, :, :t, :s]


@pytest.mark.parametrize("t,s,is_causal,padding", [(37, 29, False, False), (40, 40, True, False),
                                                   (37, 29, False, True)])
def test_sparse_blocks_keep_all_is_softmax(t, s, is_causal, padding):
  q, k, v = _qkv(t=t, s=s)
  mask = _key_padding(2, s) if padding else None
  full = ref.full_mask(2, 4, t, s, mask=mask, is_causal=is_causal)
  op = functools.partial(ops.get("sparse_blocks"), mask=None if mask is None else jnp.asarray(mask),
                         is_causal=is_causal, block_q=8, block_k=6, cdf_threshold=1.0)
  ref.assert_matches(op, lambda q, k, v: ref.softmax_attention(q, k, v, mask=full), (q, k, v))


@pytest.mark.parametrize("is_causal,tau,topk,padding", [
    (False, 0.6, None, False), (True, 0.5, None, False), (False, 0.9, 2, True),
    (True, 1.0, 1, False)])
def test_sparse_blocks_match_independent_block_mask(is_causal, tau, topk, padding):
  t, s, bq, bk = 40, 40, 8, 5
  q, k, v = _qkv(t=t, s=s, seed=3)
  mask = _key_padding(2, s, seed=9) if padding else None
  full = ref.full_mask(2, 4, t, s, mask=mask, is_causal=is_causal)
  keep = _sparge_block_mask(q, k, full, bq, bk, tau, topk, is_causal=is_causal)
  sparse = full & _expand_blocks(keep, t, s, bq, bk)
  assert sparse.sum() < 0.95 * full.sum()  # the prediction really drops blocks
  op = functools.partial(ops.get("sparse_blocks"), mask=None if mask is None else jnp.asarray(mask),
                         is_causal=is_causal, block_q=bq, block_k=bk, cdf_threshold=tau,
                         topk_blocks=topk)
  ref.assert_matches(op, lambda q, k, v: ref.softmax_attention(q, k, v, mask=sparse), (q, k, v))


def test_sparse_blocks_self_similarity_rule():
  """Even blocks of q and k share a direction (self-similar); odd blocks are noise."""
  t, bq, bk, theta = 40, 8, 5, 0.5
  q, k, v = _qkv(t=t, seed=4)
  shared = ref.normal(30, (2, 1, 4, 8), std=3.0)
  q = q + shared * ((np.arange(t) // bq) % 2 == 0)[None, :, None, None]
  k = k + shared[:, :, ::2] * ((np.arange(t) // bk) % 2 == 0)[None, :, None, None]
  full = ref.full_mask(2, 4, t, t, is_causal=True)
  keep = _sparge_block_mask(q, k, full, bq, bk, 0.3, None, theta, is_causal=True)
  plain = _sparge_block_mask(q, k, full, bq, bk, 0.3, None, is_causal=True)
  assert (keep & ~plain).any()  # the rule adds dense rows and columns
  sparse = full & _expand_blocks(keep, t, t, bq, bk)
  assert sparse.sum() < full.sum()
  op = functools.partial(ops.get("sparse_blocks"), is_causal=True, block_q=bq, block_k=bk,
                         cdf_threshold=0.3, similarity_threshold=theta)
  ref.assert_matches(op, lambda q, k, v: ref.softmax_attention(q, k, v, mask=sparse), (q, k, v))


# ----------------------------------------------------------------------------------------------
# Neural Attention and GATv2 / additive scoring.
# ----------------------------------------------------------------------------------------------
def _scored_attention(q, k, v, score_fn, full, scale=1.0):
  """softmax_j(scale·score_fn(q_i, k_j, head), masked) V; `score_fn` on one pair."""
  q, k, v = ref.f64(q, k, v)
  n = q.shape[2]
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  pair = jax.vmap(jax.vmap(score_fn, (0, None, None)), (None, 0, None))  # -> [s, t]
  heads = jax.vmap(lambda qh, kh, h: pair(qh, kh, h).T, (1, 1, 0))      # -> [n, t, s]
  s = jax.vmap(lambda qb, kb: heads(qb, kb, jnp.arange(n)))(q, k) * scale
  s = jnp.where(full, s, -1e300)
  e = jnp.where(full, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
  p = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-300)
  return jnp.einsum("bnts,bsnd->btnd", p, v)


def _mlp_weights(n, d, hidden, dtype=jnp.float32):
  return (ref.normal(11, (n, 2 * d, hidden), dtype, 0.3), ref.normal(12, (n, hidden), dtype, 0.3),
          ref.normal(13, (n, hidden), dtype, 0.5))


@pytest.mark.parametrize("activation,is_causal,padding", [("relu", False, True),
                                                          ("gelu", True, False),
                                                          ("tanh", False, False)])
def test_neural_attention_matches_mlp_on_concatenation(activation, is_causal, padding):
  q, k, v = _qkv(t=11, s=11 if is_causal else 9)
  s = k.shape[1]
  mask = _key_padding(2, s) if padding else None
  full = ref.full_mask(2, 4, 11, s, mask=mask, is_causal=is_causal)
  act = {"relu": jax.nn.relu, "gelu": functools.partial(jax.nn.gelu, approximate=True),
         "tanh": jnp.tanh}[activation]

  def ref_fn(q, k, v, w1, b1, w2):
    score = lambda qi, kj, h: act(jnp.concatenate([qi, kj]) @ w1[h] + b1[h]) @ w2[h]
    return _scored_attention(q, k, v, score, full, scale=0.5)

  def op_fn(q, k, v, w1, b1, w2):
    return ops.get("neural_attention")(
        q, k, v, w1=w1, b1=b1, w2=w2, activation=activation, scale=0.5, is_causal=is_causal,
        mask=None if mask is None else jnp.asarray(mask))

  out = ref.assert_matches(op_fn, ref_fn, (q, k, v, *_mlp_weights(4, 8, 6)))
  if padding:
    assert np.all(out[0] == 0.0)


@pytest.mark.parametrize("nonlinearity,is_causal", [("leaky_relu", False), ("leaky_relu", True),
                                                    ("tanh", True)])
def test_gatv2_and_additive_scores(nonlinearity, is_causal):
  q, k, v = _qkv(t=13, s=13 if is_causal else 10, n=6, k=3)
  full = ref.full_mask(2, 6, 13, k.shape[1], is_causal=is_causal)
  attn_vec = ref.normal(21, (6, 8))
  phi = (jnp.tanh if nonlinearity == "tanh"
         else lambda x: jnp.where(x > 0, x, 0.2 * x))

  def ref_fn(q, k, v, a):
    return _scored_attention(q, k, v, lambda qi, kj, h: a[h] @ phi(qi + kj), full)

  op_fn = lambda q, k, v, a: ops.get("gatv2")(q, k, v, attn_vec=a, nonlinearity=nonlinearity,
                                              is_causal=is_causal)
  ref.assert_matches(op_fn, ref_fn, (q, k, v, attn_vec))


# ----------------------------------------------------------------------------------------------
# Shared properties: causal ignores the future, bfloat16, layers, argument checks.
# ----------------------------------------------------------------------------------------------
def _op_args(name, n=4, d=8):
  if name == "neural_attention":
    w1, b1, w2 = _mlp_weights(n, d, 5)
    return dict(w1=w1, b1=b1, w2=w2)
  if name == "gatv2":
    return dict(attn_vec=ref.normal(21, (n, d)))
  if name == "sparse_blocks":
    return dict(block_q=4, block_k=4, cdf_threshold=0.8)
  return dict(block_q=8, block_k=4)


NAMES = ("sage_int8", "sparse_blocks", "neural_attention", "gatv2")


@pytest.mark.parametrize("name", NAMES)
def test_causal_ignores_future_keys(name):
  q, k, v = _qkv(t=17)
  op = jax.jit(functools.partial(ops.get(name), is_causal=True, **_op_args(name)))
  k2 = k.at[:, 9:].add(5.0)
  v2 = v.at[:, 9:].add(-3.0)
  np.testing.assert_allclose(op(q, k, v)[:, :9], op(q, k2, v2)[:, :9], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_close_to_float32(name):
  q, k, v = _qkv()
  args = _op_args(name)
  out = ops.get(name)(*(x.astype(jnp.bfloat16) for x in (q, k, v)), **args)
  assert out.dtype == jnp.bfloat16
  want = ops.get(name)(q, k, v, **args)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, **BF16_TOL)


@pytest.mark.parametrize("name,op_args,param_shapes", [
    ("neural_attention", dict(hidden_dim=6), dict(w1=(4, 8, 6), b1=(4, 6), w2=(4, 6))),
    ("gatv2", dict(nonlinearity="tanh"), dict(attn_vec=(4, 4))),
    ("sage_int8", dict(block_q=4, block_k=4), None),
    ("sparse_blocks", dict(block_q=4, block_k=4, topk_blocks=1), None)])
def test_layer_runs(name, op_args, param_shapes):
  model = layers.Attention(num_heads=4, num_kv_heads=2, op=name, op_args=op_args)
  x = ref.normal(0, (2, 9, 16))
  params = jax.jit(model.init)(jax.random.key(0), x)
  out = jax.jit(functools.partial(model.apply, is_causal=True))(params, x)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  if param_shapes is not None:
    shapes = jax.tree.map(jnp.shape, params["params"]["op_params"])
    assert {n: s.value for n, s in shapes.items()} == param_shapes
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x, is_causal=True) ** 2)))(params)
    for g in jax.tree.leaves(grads["params"]["op_params"]):
      assert np.abs(np.asarray(g)).sum() > 0


@pytest.mark.parametrize("name,kwargs,match", [
    ("sage_int8", dict(block_q=0), "block_q"),
    ("sage_int8", dict(block_k=2.5), "block_k"),
    ("sage_int8", dict(pv_dtype=jnp.int8), "pv_dtype"),
    ("sage_int8", dict(pv_dtype="half-ish"), "pv_dtype"),
    ("sparse_blocks", dict(cdf_threshold=0.0), "cdf_threshold"),
    ("sparse_blocks", dict(cdf_threshold=1.5), "cdf_threshold"),
    ("sparse_blocks", dict(topk_blocks=0), "topk_blocks"),
    ("sparse_blocks", dict(block_k=-1), "block_k"),
    ("sparse_blocks", dict(similarity_threshold="0.1"), "similarity_threshold"),
    ("neural_attention", dict(w1=None), "w1"),
    ("neural_attention", dict(b1=jnp.zeros((4, 7))), "b1"),
    ("neural_attention", dict(w2=jnp.zeros((3, 5))), "w2"),
    ("neural_attention", dict(hidden_dim=7), "hidden_dim"),
    ("neural_attention", dict(activation="swish"), "activation"),
    ("gatv2", dict(attn_vec=jnp.zeros((4, 3))), "attn_vec"),
    ("gatv2", dict(nonlinearity="relu"), "nonlinearity"),
    ("gatv2", dict(negative_slope=-1.0), "negative_slope")])
def test_bad_arguments(name, kwargs, match):
  q, k, v = _qkv(t=8)
  args = {**_op_args(name), **kwargs}
  with pytest.raises(ValueError, match=match):
    ops.get(name)(q, k, v, **args)


def test_registered():
  assert set(NAMES) <= set(ops.names())
