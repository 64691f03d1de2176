"""`sparse_blocks` and `sparge_attention` (SpargeAttn: Accurate Sparse Attention Accelerating
Any Model Inference) against float64 softmax attention under an independently predicted block
mask, the paper's online-softmax loop that skips PV products, and SageAttention's int8 scores.

The reference predicts SpargeAttn's pooled TopCdf block selection by loops over batches, heads
and blocks in NumPy; it never calls `big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref

F32_TOL = ref.F32_TOL
_qkv = functools.partial(ref.qkv, t=21)


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
  mask = ref.key_padding(2, s, invalid=0) if padding else None
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
  mask = ref.key_padding(2, s, seed=9, invalid=0) if padding else None
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


def _online_softmax_with_pv_skipping(q, k, v, mask, block_q, block_k, threshold, per_row):
  """SpargeAttn's second stage as the paper's kernel loop (float64, jnp): for each query block,
  the key blocks in order with running max m, normaliser l and output o; the product P̃V of a
  block is skipped when max over the block's rows (or per row) of rowmax(S) − m < threshold."""
  logits = ref.attention_logits(q, k)
  v = ref.repeat_kv(ref.f64(v), q.shape[2])
  t, s = logits.shape[2:]
  rows_out = []
  for i0 in range(0, t, block_q):
    scores = logits[:, :, i0:i0 + block_q]
    m = jnp.full(scores.shape[:3], -jnp.inf)
    l, o = jnp.zeros(scores.shape[:3]), 0.0
    for j0 in range(0, s, block_k):
      visible = mask[:, :, i0:i0 + block_q, j0:j0 + block_k]
      block = jnp.where(visible, scores[..., j0:j0 + block_k], -jnp.inf)
      local = block.max(-1)
      new_m = jnp.maximum(m, local)
      gap = jax.lax.stop_gradient(jnp.where(jnp.isneginf(local), -jnp.inf, local - new_m))
      skip = gap < threshold if per_row else (gap.max(-1, keepdims=True) < threshold)
      safe_m = jnp.where(jnp.isneginf(new_m), 0.0, new_m)
      p = jnp.where(visible, jnp.exp(block - safe_m[..., None]), 0.0)
      alpha = jnp.where(jnp.isneginf(m), 0.0, jnp.exp(m - safe_m))
      l = alpha * l + p.sum(-1)
      pv = jnp.einsum("bnij,bjnd->bnid", p, v[:, j0:j0 + block_k])
      o = alpha[..., None] * o + jnp.where(skip[..., None], 0.0, pv)
      m = new_m
    rows_out.append(jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0))
  return jnp.swapaxes(jnp.concatenate(rows_out, axis=2), 1, 2)


@pytest.mark.parametrize("is_causal", [False, True])
def test_second_stage_is_the_online_softmax_that_skips_pv_products(is_causal):
  """All blocks kept (τ = 1) and λ = −2: the op equals the paper's loop, forward and gradient,
  and really skips products (it differs from dense attention)."""
  t, bq, bk, threshold = 21, 5, 4, -2.0
  q, k, v = _qkv(t=t, seed=6, std=1.5)
  full = ref.full_mask(2, 4, t, t, is_causal=is_causal)
  op = functools.partial(ops.get("sparse_blocks"), is_causal=is_causal, block_q=bq, block_k=bk,
                         cdf_threshold=1.0, pv_threshold=threshold)
  out = ref.assert_matches(op, lambda q, k, v: _online_softmax_with_pv_skipping(
      q, k, v, full, bq, bk, threshold, per_row=is_causal), (q, k, v))
  with ref.x64():
    dense = np.asarray(ref.softmax_attention(q, k, v, mask=full))
  assert np.abs(out - dense).max() > 1e-3


@pytest.mark.parametrize("is_causal", [False, True])
def test_quantized_scores_are_sageattention_s(is_causal):
  """`quantized=True`, all blocks kept: SageAttention's int8 formula (tests/reference.py);
  gradients straight-through, those of float softmax attention."""
  t, bq, bk = 21, 8, 4
  q, k, v = _qkv(t=t, d=16, seed=7)
  k = k + 2.0
  full = ref.full_mask(2, 4, t, t, is_causal=is_causal)
  op = functools.partial(ops.get("sparse_blocks"), is_causal=is_causal, block_q=bq, block_k=bk,
                         cdf_threshold=1.0)
  out, grads = ref.out_and_grads(functools.partial(op, quantized=True), (q, k, v))
  np.testing.assert_allclose(np.asarray(out, np.float64),
                             ref.sage_attention(q, k, v, bq, bk, full, is_causal), rtol=1e-4,
                             atol=1e-4)
  with ref.x64():
    _, float_grads = ref.out_and_grads(
        lambda q, k, v: ref.softmax_attention(q, k, v, mask=full), ref.f64(q, k, v))
  for g, want in zip(grads, float_grads):
    np.testing.assert_allclose(g, np.asarray(want), **F32_TOL)


def test_sparge_attention_is_both_stages_on_quantized_scores():
  q, k, v = _qkv(t=21, seed=8)
  args = dict(block_q=5, block_k=4, cdf_threshold=0.7, is_causal=True)
  np.testing.assert_array_equal(
      ops.get("sparge_attention")(q, k, v, pv_threshold=-3.0, **args),
      ops.get("sparse_blocks")(q, k, v, pv_threshold=-3.0, quantized=True, **args))


OP_ARGS = dict(block_q=4, block_k=4, cdf_threshold=0.8)


def test_sparse_blocks_causal_ignores_future_keys():
  q, k, v = _qkv(t=17)
  op = jax.jit(functools.partial(ops.get("sparse_blocks"), is_causal=True, **OP_ARGS))
  op_checks.assert_causal_ignores_future_keys(op, q, k, v, cut=9)


def test_sparse_blocks_bfloat16_close_to_float32():
  op = functools.partial(ops.get("sparse_blocks"), **OP_ARGS)
  op_checks.assert_bfloat16_close_to_float32(op, *_qkv())


@pytest.mark.parametrize("name,op_args,param_shapes", [
    ("sparse_blocks", dict(block_q=4, block_k=4, topk_blocks=1), None),
    ("sparge_attention", dict(block_q=4, block_k=4, pv_threshold=-1.0), None)])
def test_layer_runs(name, op_args, param_shapes):
  op_checks.assert_layer_runs(name, op_args, param_shapes)


@pytest.mark.parametrize("name,kwargs,match", [
    ("sparse_blocks", dict(cdf_threshold=0.0), "cdf_threshold"),
    ("sparse_blocks", dict(cdf_threshold=1.5), "cdf_threshold"),
    ("sparse_blocks", dict(topk_blocks=0), "topk_blocks"),
    ("sparse_blocks", dict(block_k=-1), "block_k"),
    ("sparse_blocks", dict(similarity_threshold="0.1"), "similarity_threshold"),
    ("sparse_blocks", dict(pv_threshold=1.0), "pv_threshold"),
    ("sparse_blocks", dict(quantized=1), "quantized"),
    ("sparge_attention", dict(pv_threshold="-1"), "pv_threshold")])
def test_bad_arguments(name, kwargs, match):
  q, k, v = _qkv(t=8)
  args = {**OP_ARGS, **kwargs}
  with pytest.raises(ValueError, match=match):
    ops.get(name)(q, k, v, **args)
