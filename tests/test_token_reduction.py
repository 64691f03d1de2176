"""Token reduction (`big_attn.layers.token_reduction`: EViT, ToMe, MCTF, STViT, SiT, SPA,
DependencyViT-Lite, LookupViT, HVT) against float64 references written from the papers' formulas
(NumPy loops over tokens for the selections and merges; plain JAX in float64 for the learned
modules, forward and gradient), and inside tiny ViT and DeiT models with several attention ops:
token counts per block, gradients, the config checks."""
import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn.layers import token_reduction as tr
from big_attn.layers.attention import Attention
from big_attn.models import deit, vit
from big_attn.tasks import classification_loss
from big_attn.train import config_lib
from big_attn.train import regularizers
from tests import reference as ref
from tests.test_train import _config_module, losses, tiny_config

TOL = 1e-5
B, N, C = 2, 12, 5  # 12 tokens: the first `P` protected, 11 or 10 others (odd and even sets)


def _data(seed, n=N):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, n, C)).astype(np.float32)
  size = rng.integers(1, 4, size=(B, n)).astype(np.float32)
  attn = rng.uniform(0.01, 1.0, size=(B, n)).astype(np.float32)
  return x, size, attn


def _compiled(fn, *arrays, **static):
  """`fn(*arrays, **static)` jitted (one compile with XLA's optimisations off, far cheaper here
  than running it op by op)."""
  return jax.jit(functools.partial(fn, **static)).lower(*arrays).compile(
      compiler_options={"xla_backend_optimization_level": 0})(*arrays)


# ------------------------------------------------------------------------- NumPy references
def evit_ref(x, size, cls_attn, keep_rate, p, fuse):
  """Per row: the patches sorted by class attention (ties: lower index first), the first
  ⌈ρN⌉ kept, the rest summed with their attention as weights; nothing changes when all stay."""
  if math.ceil(keep_rate * (x.shape[1] - p)) == x.shape[1] - p:
    return x, size
  xs, ss = [], []
  for xb, sb, ab in zip(x.astype(np.float64), size, cls_attn.astype(np.float64)):
    patches = list(range(p, len(xb)))
    order = sorted(patches, key=lambda j: (-ab[j], j))
    keep = math.ceil(keep_rate * len(patches))
    rows, sizes = [xb[j] for j in range(p)] + [xb[j] for j in order[:keep]], list(sb[:p])
    sizes += [sb[j] for j in order[:keep]]
    if fuse and keep < len(patches):
      rows.append(sum(ab[j] * xb[j] for j in order[keep:]))
      sizes.append(sum(sb[j] for j in order[keep:]))
    xs.append(rows)
    ss.append(sizes)
  return np.array(xs), np.array(ss)


def _groups_of_matching(scores, r):
  """Bipartite soft matching on a score matrix (rows A, columns B): `(unmerged rows in index
  order, {row: column} for the r rows of largest best score)`."""
  best = [max(range(scores.shape[1]), key=lambda j: (scores[i, j], -j))
          for i in range(scores.shape[0])]
  order = sorted(range(scores.shape[0]), key=lambda i: (-scores[i, best[i]], i))
  return sorted(order[r:]), {i: best[i] for i in order[:r]}


def _fused(xb, sb, wb, groups):
  """Each group of token indices fused: `Σ w x / Σ w`, sizes summed."""
  return ([sum(wb[i] * xb[i] for i in g) / sum(wb[i] for i in g) for g in groups],
          [sum(sb[i] for i in g) for g in groups])


def _cos(m):
  m = m / np.linalg.norm(m, axis=-1, keepdims=True)
  return m @ m.T


def tome_ref(x, size, metric, r, p):
  xs, ss = [], []
  for xb, sb, mb in zip(x.astype(np.float64), size.astype(np.float64),
                        metric.astype(np.float64)):
    body = list(range(p, len(xb)))
    a, b = body[0::2], body[1::2]
    r_ = min(r, len(body) // 2)
    cos = _cos(mb)
    unm, dst = _groups_of_matching(cos[np.ix_(a, b)], r_)
    groups = [[a[i]] for i in unm] + [[b[j]] + [a[i] for i in dst if dst[i] == j]
                                      for j in range(len(b))]
    fx, fs = _fused(xb, sb, sb, groups)
    xs.append([xb[i] for i in range(p)] + fx)
    ss.append(list(sb[:p]) + fs)
  return np.array(xs), np.array(ss)


def mctf_ref(x, size, attn, r, p, tau_sim, tau_info, tau_size, bidirectional):
  xs, ss = [], []
  for xb, sb, ab in zip(x.astype(np.float64), size.astype(np.float64),
                        attn.astype(np.float64)):
    body = list(range(p, len(xb)))
    a, b = body[0::2], body[1::2]
    r_ = min(r, len(body) // 2)
    inv_a = (1 / ab[p:]) / np.max(1 / ab[p:])
    inv_s = (1 / sb[p:]) / np.max(1 / sb[p:])
    w = np.zeros((len(a), len(b)))
    for i, ti in enumerate(a):
      for j, tj in enumerate(b):
        sim = (_cos(xb)[ti, tj] + 1) / 2
        w[i, j] = (sim ** (1 / tau_sim) * (inv_a[ti - p] * inv_a[tj - p]) ** (1 / tau_info)
                   * (inv_s[ti - p] * inv_s[tj - p]) ** (1 / tau_size))
    r1 = r_ // 2 if bidirectional else r_
    unm, dst = _groups_of_matching(w, r1)
    groups_a = [[a[i]] for i in unm]
    groups_b = [[b[j]] + [a[i] for i in dst if dst[i] == j] for j in range(len(b))]
    if r_ - r1:
      unm2, dst2 = _groups_of_matching(w[unm].T, r_ - r1)
      for j, k in dst2.items():
        groups_a[k] += groups_b[j]
      groups_b = [groups_b[j] for j in unm2]
    fx, fs = _fused(xb, sb, ab * sb, groups_a + groups_b)
    xs.append([xb[i] for i in range(p)] + fx)
    ss.append(list(sb[:p]) + fs)
  return np.array(xs), np.array(ss)


# ------------------------------------------------------------------------------ the functions
@pytest.mark.parametrize("p,keep_rate,fuse", [(1, 0.7, True), (1, 1.0, True), (2, 0.5, False)])
def test_evit_matches_reference(p, keep_rate, fuse):
  x, size, attn = _data(0)
  attn[:, 0] = 0.0  # the class token's own weight is lowest: it stays anyway
  attn[0, 5] = attn[0, 7]  # a tie: the lower index first
  out, out_size = _compiled(tr.evit, x, size, attn, keep_rate=keep_rate, num_protected=p,
                            fuse_token=fuse)
  want, want_size = evit_ref(x, size, attn, keep_rate, p, fuse)
  np.testing.assert_allclose(out, want, rtol=TOL, atol=TOL)
  np.testing.assert_array_equal(out_size, want_size)
  np.testing.assert_array_equal(out[:, :p], x[:, :p])
  # One-hot tokens: the kept indices themselves.
  if keep_rate == 1:
    return
  ids, _ = _compiled(tr.evit, np.eye(N, dtype=np.float32)[None].repeat(B, 0), size, attn,
                     keep_rate=keep_rate, num_protected=p, fuse_token=False)
  want_ids = [[p_ for p_ in range(p)] + sorted(range(p, N), key=lambda j, b=b: (-attn[b, j], j))
              [:math.ceil(keep_rate * (N - p))] for b in range(B)]
  np.testing.assert_array_equal(np.argmax(ids, -1), want_ids)


@pytest.mark.parametrize("p,r", [(1, 3), (0, 100)])
def test_tome_matches_reference(p, r):
  x, size, _ = _data(1)
  metric = np.array(ref.normal(2, (B, N, 3)))
  metric[:, :p] = metric[:, p:p + 1]  # protected tokens identical to a patch: never merged
  out, out_size = _compiled(tr.tome, x, size, metric, r=r, num_protected=p)
  want, want_size = tome_ref(x, size, metric, r, p)
  assert out.shape == (B, N - min(r, (N - p) // 2), C)
  np.testing.assert_allclose(out, want, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(out_size, want_size)
  np.testing.assert_array_equal(out[:, :p], x[:, :p])
  np.testing.assert_allclose(out_size.sum(1), size.sum(1))  # sizes add up


@pytest.mark.parametrize("p,r,taus,bidirectional", [
    (1, 4, (1.0, 20.0, 40.0), True), (2, 5, (2.0, 0.0, 1.0), False)])
def test_mctf_matches_reference(p, r, taus, bidirectional):
  x, size, attn = _data(3)
  x[:, :p] = x[:, p:p + 1]  # protected tokens identical to a patch: never merged
  out, out_size = _compiled(tr.mctf, x, size, attn, r=r, tau_sim=taus[0], tau_info=taus[1],
                            tau_size=taus[2], bidirectional=bidirectional, num_protected=p)
  want, want_size = mctf_ref(x, size, attn, r, p, *[t if t else np.inf for t in taus],
                             bidirectional)
  assert out.shape == (B, N - r, C)
  np.testing.assert_allclose(out, want, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(out_size, want_size)
  np.testing.assert_array_equal(out[:, :p], x[:, :p])


def test_attention_maps_match_softmax_reference():
  q, k, _ = ref.qkv(b=B, t=7, n=4, k=2, d=8)  # GQA: 4 query heads, 2 key heads
  size = np.asarray(_data(4, n=7)[1])
  qf, kf = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", qf, kf) * 0.3 + np.log(size)[:, None, None, :]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want_cls, want_recv = probs[:, :, 0].mean(1), probs.mean((1, 2))
  maps = lambda q, k, size: (tr.class_attention(q, k, scale=0.3, size=size),  # noqa: E731
                             tr.received_attention(q, k, scale=0.3, size=size))
  got_cls, got_recv = _compiled(maps, q, k, size)
  np.testing.assert_allclose(got_cls, want_cls, rtol=TOL, atol=1e-6)
  np.testing.assert_allclose(got_recv, want_recv, rtol=TOL, atol=1e-6)


def prune_ref(x, size, score, keep_rate, p):
  """The protected tokens, then the ⌈ρN⌉ others of largest score (ties: lower index) in their
  order."""
  keep = math.ceil(keep_rate * (x.shape[1] - p))
  idx = [list(range(p)) + sorted(sorted(range(p, x.shape[1]), key=lambda j, b=b: (-score[b, j], j))
                                 [:keep]) for b in range(x.shape[0])]
  return np.stack([x[b, i] for b, i in enumerate(idx)]), np.stack(
      [size[b, i] for b, i in enumerate(idx)])


def dependency_ref(q, k, scale, message):
  """d_i = mean_h Σ_j m_jh softmax_i(scale q_jh·k_ih), float64, kv heads repeated."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  out = np.zeros(q.shape[:2])
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      for j in range(q.shape[1]):
        logits = scale * k[b, :, h] @ q[b, j, h]
        probs = np.exp(logits - logits.max())
        out[b] += message[b, j, h] * probs / probs.sum() / q.shape[2]
  return out


def test_dependency_pruning_matches_reference():
  q, k, _ = ref.qkv(b=B, t=N, n=4, k=2, d=8, seed=8)  # GQA
  message = np.random.default_rng(9).uniform(0.1, 1.0, size=(B, N, 4)).astype(np.float32)
  x, size, _ = _data(10)
  keep_rate, p = 0.6, 1

  def run(q, k, message, x, size):
    score = tr.dependency_scores(q, k, scale=0.4, message=message)
    return score, tr.dependency_scores(q, k), tr.prune(x, size, score, keep_rate,
                                                        num_protected=p)

  score, plain, (out, out_size) = _compiled(run, q, k, message, x, size)
  want = dependency_ref(q, k, 0.4, message)
  np.testing.assert_allclose(score, want, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(plain, dependency_ref(q, k, 1 / math.sqrt(8), np.ones((B, N, 4))),
                             rtol=TOL, atol=TOL)
  np.testing.assert_allclose(np.sum(plain, 1), N, rtol=TOL)  # each child sends one unit
  want_x, want_size = prune_ref(x, size, np.asarray(score), keep_rate, p)
  assert out.shape == (B, p + math.ceil(keep_rate * (N - p)), C)
  np.testing.assert_array_equal(out, want_x)
  np.testing.assert_array_equal(out_size, want_size)


def test_select_and_pack_matches_reference():
  x, size, gate = _data(12)
  gate[1, 4] = gate[1, 9]  # a tie: the lower index first
  keep_rate, p = 0.5, 2
  keep = math.ceil(keep_rate * (N - p))
  idx = [sorted(range(p, N), key=lambda j, b=b: (-gate[b, j], j))[:keep] for b in range(B)]

  def reference(x, gate):  # g_j x_j for the selected j, in decreasing gate order
    return np.concatenate([x[:, :p], np.stack(
        [x[b, i] * gate[b, i][:, None] for b, i in enumerate(idx)])], 1)

  def out_and_grads(x, gate, cot):
    out, vjp = jax.vjp(lambda x, g: tr.select_and_pack(x, size, g, keep_rate,
                                                       num_protected=p)[0], x, gate)
    return out, vjp(cot)

  cot = np.asarray(ref.normal(13, (B, p + keep, C)))
  out, grads = _compiled(out_and_grads, x, gate, cot)
  args = (np.asarray(x, np.float64), np.asarray(gate, np.float64))
  np.testing.assert_allclose(out, reference(*args), rtol=TOL, atol=TOL)
  for g, w in zip(grads, numerical_grads(reference, args, cot)):
    np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL)
  _, out_size = tr.select_and_pack(x, size, gate, keep_rate, num_protected=p)
  np.testing.assert_array_equal(out_size[:, p:], [size[b, i] for b, i in enumerate(idx)])


def test_spa_labels_scores_and_loss_match_reference():
  # Labels: the ⌈ρ·n_valid⌉ valid tokens of largest score (ties: lower index); the scores: the
  # attention the valid tokens give the valid keys; the loss: BCE over the valid tokens, and
  # its gradient d/dg = (g − y) / (g (1 − g)) / n_valid.
  q, k, _ = ref.qkv(b=B, t=7, n=4, k=2, d=8, seed=30)
  valid = np.ones((B, 7), bool)
  valid[0, [2, 5]] = valid[1, 6] = False
  score = np.asarray(_data(31, n=7)[2])
  score[1, 3] = score[1, 1]  # a tie
  gate = np.random.default_rng(32).uniform(0.05, 0.95, size=(B, 7)).astype(np.float32)
  rate = 0.5

  def run(q, k, valid, score, gate):
    labels = tr.selection_labels(score, valid, rate)
    loss, grad = jax.value_and_grad(tr.selection_loss)(gate, labels, valid)
    return tr.received_by_valid(q, k, valid, scale=0.3), labels, loss, grad

  got_score, labels, loss, grad = _compiled(run, q, k, valid, score, gate)
  want_labels = np.zeros((B, 7))
  for b in range(B):
    idx = [j for j in range(7) if valid[b, j]]
    top = sorted(idx, key=lambda j, b=b: (-score[b, j], j))[:math.ceil(rate * len(idx))]
    want_labels[b, top] = 1
  np.testing.assert_array_equal(labels, want_labels)
  qf, kf = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
  want_score = np.zeros((B, 7))
  for b in range(B):
    idx = np.flatnonzero(valid[b])
    logits = np.einsum("qhd,khd->hqk", qf[b][idx], kf[b][idx]) * 0.3
    want_score[b, idx] = _softmax(logits, -1).mean((0, 1))
  np.testing.assert_allclose(got_score, want_score, rtol=TOL, atol=1e-6)
  g, y, n = np.asarray(gate, np.float64), want_labels, valid.sum()
  bce = -(y * np.log(g) + (1 - y) * np.log(1 - g))
  np.testing.assert_allclose(loss, bce[valid].sum() / n, rtol=1e-6)
  np.testing.assert_allclose(grad, np.where(valid, (g - y) / (g * (1 - g)) / n, 0),
                             rtol=1e-5, atol=1e-7)


def test_spa_pack_matches_reference():
  # The valid tokens with gate above τ first (decreasing gate, ties lower index), scaled by it;
  # then zeros of size 0. Forward and gradient (x, gate) against float64 NumPy.
  x, size, gate = _data(33)
  size[0, 4] = 0  # a padding token from an earlier packing: never kept
  gate[0, 4] = 0.99
  gate[1, 5] = gate[1, 8]  # a tie
  p, tau = 1, 0.4
  kept = [sorted([j for j in range(p, N) if size[b, j] > 0 and gate[b, j] > tau],
                 key=lambda j, b=b: (-gate[b, j], j)) for b in range(B)]
  assert len(kept[0]) != len(kept[1])  # a variable number per image

  def reference(x, gate):
    out = np.zeros(x.shape)
    out[:, :p] = x[:, :p]
    for b, idx in enumerate(kept):
      out[b, p:p + len(idx)] = x[b, idx] * gate[b, idx][:, None]
    return out

  def out_and_grads(x, gate, cot):
    (out, out_size), vjp = jax.vjp(lambda x, g: tr.pack(x, size, g, tau, num_protected=p),
                                   x, gate)
    return out, out_size, vjp((cot, jnp.zeros_like(out_size)))

  cot = np.asarray(ref.normal(34, (B, N, C)))
  out, out_size, grads = _compiled(out_and_grads, x, gate, cot)
  args = (np.asarray(x, np.float64), np.asarray(gate, np.float64))
  np.testing.assert_allclose(out, reference(*args), rtol=TOL, atol=TOL)
  for b, idx in enumerate(kept):
    np.testing.assert_array_equal(out_size[b], np.r_[size[b, :p], size[b, idx],
                                                     np.zeros(N - p - len(idx))])
  for g, w in zip(grads, numerical_grads(reference, args, cot)):
    np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL)


def test_mstm_multi_scale_fusion_matches_reference():
  # mean over scales of each token's s×s block average (the block holding it) on the 4x4 grid.
  x = np.asarray(ref.normal(40, (B, 17, C)))
  out = _compiled(tr.multi_scale_fuse, x, scales=(1, 2, 4), num_protected=1)
  grid = np.asarray(x[:, 1:], np.float64).reshape(B, 4, 4, C)
  want = np.zeros_like(grid)
  for r in range(4):
    for c in range(4):
      for s in (1, 2, 4):
        r0, c0 = r // s * s, c // s * s
        want[:, r, c] += grid[:, r0:r0 + s, c0:c0 + s].mean((1, 2)) / 3
  np.testing.assert_allclose(out[:, 1:], want.reshape(B, 16, C), rtol=TOL, atol=TOL)
  np.testing.assert_array_equal(out[:, 0], x[:, 0])
  with pytest.raises(ValueError, match="grid side must be divisible by each scale"):
    tr.multi_scale_fuse(x, (3,), num_protected=1)


def test_mstm_mergence_matches_reference():
  # The ⌈ρN⌉ most important tokens stay (decreasing importance); each other joins the kept
  # token of most cosine-similar metric: Σ s_i x_i / Σ s_i, sizes add. Forward and gradient.
  x, size, importance = _data(41)
  metric = np.asarray(ref.normal(42, (B, N, 4)))
  keep_rate, p = 0.4, 1
  keep = math.ceil(keep_rate * (N - p))
  groups = []
  for b in range(B):
    order = sorted(range(p, N), key=lambda j, b=b: (-importance[b, j], j))
    kept, rest = order[:keep], order[keep:]
    unit = metric[b] / np.linalg.norm(metric[b], axis=-1, keepdims=True)
    groups.append([[k] + [j for j in rest if np.argmax([unit[j] @ unit[i] for i in kept])
                          == kept.index(k)] for k in kept])

  def reference(x):
    out = np.zeros((B, p + keep, C))
    out[:, :p] = x[:, :p]
    for b, bgroups in enumerate(groups):
      for o, g in enumerate(bgroups):
        out[b, p + o] = (size[b, g, None] * x[b, g]).sum(0) / size[b, g].sum()
    return out

  def out_and_grad(x, cot):
    (out, out_size), vjp = jax.vjp(lambda x: tr.merge_into_crucial(
        x, size, importance, metric, keep_rate, num_protected=p), x)
    return out, out_size, vjp((cot, jnp.zeros_like(out_size)))[0]

  cot = np.asarray(ref.normal(43, (B, p + keep, C)))
  out, out_size, grad = _compiled(out_and_grad, x, cot)
  np.testing.assert_allclose(out, reference(np.asarray(x, np.float64)), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(out_size[:, p:], [[size[b, g].sum() for g in bg]
                                               for b, bg in enumerate(groups)])
  np.testing.assert_allclose(out_size.sum(1), size.sum(1))
  want_grad, = numerical_grads(reference, (np.asarray(x, np.float64),), cot)
  np.testing.assert_allclose(grad, want_grad, rtol=TOL, atol=TOL)


def hvt_ref(x, size, k, s, p):
  """The protected tokens, then out_i = max_{j < k} x_{p + s·i + j} per channel for each whole
  window; size: the window's mean size times s."""
  n = (x.shape[1] - p - k) // s + 1
  body = np.stack([x[:, p + s * i:p + s * i + k].max(1) for i in range(n)], 1)
  body_size = np.stack([size[:, p + s * i:p + s * i + k].mean(1) * s for i in range(n)], 1)
  return np.concatenate([x[:, :p], body], 1), np.concatenate([size[:, :p], body_size], 1)


@pytest.mark.parametrize("p, k, s", [(1, 3, 2), (0, 2, 2), (2, 3, 3)])
def test_hvt_max_pooling_matches_reference(p, k, s):
  x, size, _ = _data(14)
  cot = np.asarray(ref.normal(15, (B, p + (N - p - k) // s + 1, C)))

  def out_and_grads(x, cot):
    (out, out_size), vjp = jax.vjp(
        lambda x: tr.max_pool_tokens(x, size, k, s, num_protected=p), x)
    return out, out_size, vjp((cot, jnp.zeros_like(out_size)))[0]

  out, out_size, grad = _compiled(out_and_grads, x, cot)
  want_x, want_size = hvt_ref(np.asarray(x, np.float64), size, k, s, p)
  np.testing.assert_allclose(out, want_x, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(out_size, want_size, rtol=TOL)
  want_grad, = numerical_grads(lambda x: hvt_ref(x, size, k, s, p)[0],
                               (np.asarray(x, np.float64),), cot)
  np.testing.assert_allclose(grad, want_grad, rtol=TOL, atol=TOL)


def pool_ref(num_in, num_out):
  """Adaptive average pooling (as PyTorch's `adaptive_avg_pool2d`) of an s×s grid into o×o:
  output (r, c) averages the grid rows and columns overlapping [r·s/o, (r+1)·s/o)."""
  s, o = math.isqrt(num_in), math.isqrt(num_out)
  pool = np.zeros((num_out, num_in))
  for r in range(o):
    for c in range(o):
      cells = [(i, j) for i in range(s) for j in range(s)
               if r * s / o - 1 < i < (r + 1) * s / o and c * s / o - 1 < j < (c + 1) * s / o]
      for i, j in cells:
        pool[r * o + c, i * s + j] = 1 / len(cells)
  return pool


def test_grid_pool():
  # 3x3 into 2x2: overlapping bins {0, 1} and {1, 2} in each direction.
  np.testing.assert_allclose(tr.grid_pool(9, 4)[0], [.25, .25, 0, .25, .25, 0, 0, 0, 0])
  np.testing.assert_allclose(tr.grid_pool(9, 4)[3], [0, 0, 0, 0, .25, .25, 0, .25, .25])
  for num_in, num_out in ((16, 4), (25, 9), (16, 16), (49, 4)):
    np.testing.assert_allclose(tr.grid_pool(num_in, num_out), pool_ref(num_in, num_out))
  for num_in, num_out in ((12, 4), (16, 25), (16, 5)):
    with pytest.raises(ValueError, match="square grid of patch tokens"):
      tr.grid_pool(num_in, num_out)


# The learned modules against float64 NumPy written from the papers' formulas, with the
# modules' parameters; gradients against central differences of the reference. 3x3 = 9 tokens
# of width 8, 2 heads.
HEADS, WIDTH = 2, 8


def _ln(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _softmax(x, axis):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _proj(x, p):
  return np.einsum("bnc,chd->bnhd", x, p["kernel"]) + p["bias"]


def _heads_out(y, p):
  return np.einsum("bnhd,hdc->bnc", y, p["kernel"]) + p["bias"]


def stvit_ref(params, x):
  """S₀ = P x; S = S₀ + MHA(LN(S₀), LN([S₀; x])), softmax over all tokens."""
  s0 = np.einsum("mn,bnc->bmc", pool_ref(9, 4), x)
  ln = params["LayerNorm"]
  mha = params["MultiHeadAttention"]
  q = _proj(_ln(s0, ln), mha["query"])
  context = _ln(np.concatenate([s0, x], 1), ln)
  k, v = _proj(context, mha["key"]), _proj(context, mha["value"])
  probs = _softmax(np.einsum("bmhd,bnhd->bhmn", q, k) / np.sqrt(q.shape[-1]), -1)
  return s0 + _heads_out(np.einsum("bhmn,bnhd->bmhd", probs, v), mha["out"])


def sit_ref(params, x, tau):
  """x̂ = softmax_N(Wᵀ / τ) x, W = MLP(LN(x)) with exact GELU."""
  h = _ln(x, params["LayerNorm"]) @ params["hidden"]["kernel"] + params["hidden"]["bias"]
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
  w = h @ params["weights"]["kernel"] + params["weights"]["bias"]  # [b, n, m]
  return np.einsum("bmn,bnc->bmc", _softmax(np.swapaxes(w, 1, 2) / tau, -1), x)


def gate_ref(params, x):
  """g = sigmoid(w·LN(x) + b)."""
  return 1 / (1 + np.exp(-(_ln(x, params["LayerNorm"]) @ params["gate"]["kernel"]
                           + params["gate"]["bias"])))


def lookup_ref(params, z, x):
  """One shared L = Q_z K_xᵀ/√d: z' = z + softmax_n(L) V_x W_o;
  x' = x + softmax_m(L)ᵀ V'_z' W'_o, then x' + MLP(LN(x')) (tanh GELU). Returns [z'; x'']."""
  q = _proj(_ln(z, params["norm_compressed"]), params["query"])
  lookup = _ln(x, params["norm_lookup"])
  k, v = _proj(lookup, params["key"]), _proj(lookup, params["value"])
  logits = np.einsum("bmhd,bnhd->bhmn", q, k) / np.sqrt(q.shape[-1])
  z = z + _heads_out(np.einsum("bhmn,bnhd->bmhd", _softmax(logits, -1), v), params["out"])
  back = _proj(_ln(z, params["norm_back"]), params["value_back"])
  x = x + _heads_out(np.einsum("bhmn,bmhd->bnhd", _softmax(logits, -2), back),
                     params["out_back"])
  mlp = params["mlp"]
  h = _ln(x, params["norm_mlp"]) @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"]
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  return np.concatenate([z, x + h @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]], 1)


def _exchange(module, z, x):
  gathered, logits = module.gather(z, x)
  return jnp.concatenate([gathered, module.propagate(x, gathered, logits)], 1)


MODULES = {  # name: (module, its output from (z, x), reference)
    "stvit": (tr.SemanticTokens(4, HEADS), lambda m, z, x: m(x, jnp.ones(x.shape[:2]))[0],
              lambda p, z, x: stvit_ref(p, x)),
    "sit": (tr.TokenSlimming(5, tau=0.7), lambda m, z, x: m(x, jnp.ones(x.shape[:2]))[0],
            lambda p, z, x: sit_ref(p, x, 0.7)),
    "spa_gate": (tr.TokenGate(),
                 lambda m, z, x: m(x, jnp.sum(x, -1), jnp.ones(x.shape[:2], bool))[0],
                 lambda p, z, x: gate_ref(p, x)),
    "lookupvit": (tr.LookupExchange(WIDTH, HEADS, 6), _exchange, lookup_ref),
}


def numerical_grads(fn, args, cot, eps=1e-6):
  """Central differences of `Σ fn(*args)·cot` in float64 with respect to every entry of the
  pytree `args`."""
  leaves, tree = jax.tree.flatten(args)
  leaves = [np.array(a, np.float64) for a in leaves]
  loss = lambda: np.sum(fn(*jax.tree.unflatten(tree, leaves)) * cot)
  grads = []
  for leaf in leaves:
    grad = np.zeros_like(leaf)
    for i in np.ndindex(leaf.shape):
      leaf[i] += eps
      up = loss()
      leaf[i] -= 2 * eps
      grad[i] = (up - loss()) / (2 * eps)
      leaf[i] += eps
    grads.append(grad)
  return grads


@pytest.fixture(scope="module")
def module_runs():
  """Per learned module: random parameters, inputs, a cotangent, and the module's output and
  gradients of Σ output·cotangent with respect to (params, z, x) (one compile for all)."""
  z, x = ref.normal(14, (B, 4, WIDTH)), ref.normal(15, (B, 9, WIDTH))
  rng = np.random.default_rng(16)
  cases = {}
  for name, (module, call, _) in MODULES.items():
    abstract = jax.eval_shape(lambda k, m=module, c=call: m.init(k, z, x, method=c),
                              jax.random.key(0))["params"]
    params = jax.tree.map(lambda a: (0.5 * rng.normal(size=a.shape)).astype(np.float32),
                          nn.unbox(abstract))
    shape = jax.eval_shape(lambda p, m=module, c=call: m.apply({"params": p}, z, x, method=c),
                           params).shape
    cases[name] = dict(params=params, cot=rng.normal(size=shape).astype(np.float32))

  def run(cases, z, x):
    out = {}
    for name, (module, call, _) in MODULES.items():
      fn = lambda p, z, x, m=module, c=call: m.apply({"params": p}, z, x, method=c)
      value, vjp = jax.vjp(fn, cases[name]["params"], z, x)
      out[name] = (value, vjp(cases[name]["cot"]))
    return out

  results = _compiled(run, cases, z, x)
  return {name: dict(cases[name], z=np.asarray(z), x=np.asarray(x), out=results[name][0],
                     grads=results[name][1]) for name in MODULES}


@pytest.mark.parametrize("name", MODULES)
def test_learned_module_matches_reference(module_runs, name):
  run = module_runs[name]
  args = jax.tree.map(lambda a: np.asarray(a, np.float64), (run["params"], run["z"], run["x"]))
  reference = MODULES[name][2]
  assert run["out"].dtype == np.float32
  np.testing.assert_allclose(run["out"], reference(*args), rtol=1e-4, atol=1e-4)
  want_grads = numerical_grads(reference, args, np.asarray(run["cot"], np.float64))
  got_grads = jax.tree.leaves(run["grads"])
  assert len(got_grads) == len(want_grads)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- in the models
IMAGES = np.asarray(ref.normal(0, (2, 16, 16, 3)))  # 4x4 patches: 16 patch tokens


@contextlib.contextmanager
def attend_calls():
  """Within the context, the `(query, key, value, mask, output)` of every `Attention.attend`
  call, in the yielded list."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, Attention) and context.method_name == "attend":
      calls.append((*args[:3], kwargs.get("mask"), out))
    return out

  with nn.intercept_methods(interceptor):
    yield calls


def _random_params(model, seed):
  """N(0, 0.5²) values of `model`'s parameter shapes on `IMAGES` (no init to compile)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), IMAGES)["params"]
  return jax.tree.map(lambda a: (0.5 * rng.normal(size=a.shape)).astype(a.dtype),
                      nn.unbox(abstract))
TINY = dict(num_classes=3, width=8, depth=2, num_heads=2, mlp_dim=8, patch_size=4,
            head_zeroinit=False)
CASES = {  # name: (model, token counts seen by the blocks' attention)
    "evit_softmax": (vit.Model(**TINY, pool_type="cls", remat_policy="nothing_saveable",
                               token_reduction=dict(method="evit", keep_rate=0.5,
                                                    layers=(0, 1))), [17, 10]),
    "mctf_performer_registers": (vit.Model(**TINY, attention="performer", num_registers=1,
                                           token_reduction=dict(method="mctf", r=3)), [17, 14]),
    # Block 0's one-step-ahead attention: block 1's queries and keys of its 18 tokens.
    "deit_mctf_one_step_ahead": (deit.Model(**TINY, token_reduction=dict(
        method="mctf", r=3, one_step_ahead=True)), [18, 18, 15]),
    "deit_tome_sigmoid": (deit.Model(**TINY, attention="sigmoid",
                                     token_reduction=dict(method="tome", r=4)), [18, 14]),
    "stvit_softmax_registers": (vit.Model(**TINY, pool_type="cls", num_registers=1,
                                          token_reduction=dict(method="stvit", num_tokens=4,
                                                               layers=(0,))),
                                # 4: the semantic tokens' cross-attention
                                [18, 4, 6]),
    "deit_sit_performer": (deit.Model(**TINY, attention="performer",
                                      token_reduction=dict(method="sit", keep_rate=0.5,
                                                           layers=(0, 1))), [18, 10]),
    "spa_gap": (vit.Model(**TINY, token_reduction=dict(method="spa", keep_rate=0.5,
                                                       layers=(0,))), [16, 8]),
    "dependencyvit_reversed": (vit.Model(**TINY, attention="reversed_attention",
                                         pool_type="cls",
                                         token_reduction=dict(method="dependencyvit",
                                                              keep_rate=0.5, layers=(0,))),
                               [17, 9]),
    # The attention sees the class, distillation and 4 compressed tokens from block 1 on.
    "deit_lookupvit": (deit.Model(**TINY, token_reduction=dict(method="lookupvit",
                                                               num_tokens=4, layers=(1,))),
                       [18, 6]),
    # 16 multi-scale fused patch tokens, 7 of them merged into the 9 crucial ones in block 0.
    "mstm_cls": (vit.Model(**TINY, pool_type="cls", token_reduction=dict(
        method="mstm", keep_rate=0.5, layers=(0,), scales=(1, 2, 4))), [17, 9]),
    # 16 patch tokens max-pooled (window 3, stride 2) into 7 before block 1.
    "hvt_gap": (vit.Model(**TINY, token_reduction=dict(method="hvt", layers=(1,))), [16, 7]),
    "deit_hvt_performer": (deit.Model(**TINY, attention="performer",
                                      token_reduction=dict(method="hvt", layers=(1,))),
                           [18, 9]),
}


# One block, reduced between its attention and MLP (HVT: before it): the gradient through each
# op and method.
GRADIENT_CASES = {
    "mstm_cls": vit.Model(**dict(TINY, depth=1), pool_type="cls",
                          token_reduction=dict(method="mstm", layers=(0,))),
    "evit_softmax": vit.Model(**dict(TINY, depth=1), pool_type="cls",
                              token_reduction=dict(method="evit", layers=(0,))),
    "mctf_performer_registers": vit.Model(**dict(TINY, depth=1), attention="performer",
                                          num_registers=1,
                                          token_reduction=dict(method="mctf", r=3)),
    "hvt_gap": vit.Model(**dict(TINY, depth=1), token_reduction=dict(method="hvt", layers=(0,))),
}


@pytest.fixture(scope="module")
def runs():
  """Per case: the token counts each block's op sees (recorded while tracing); for
  `GRADIENT_CASES`, the loss and gradient at random parameters (one compile for all)."""
  out = {}
  for name, (model, _) in CASES.items():
    seen = []

    def interceptor(next_fun, args, kwargs, context, seen=seen):
      if isinstance(context.module, Attention) and context.method_name == "attend":
        seen.append(args[0].shape[1])
      return next_fun(*args, **kwargs)

    params = jax.eval_shape(model.init, jax.random.key(0), IMAGES)
    with nn.intercept_methods(interceptor):
      jax.eval_shape(model.apply, params, IMAGES)
    out[name] = dict(seen=seen)

  def losses_and_grads(params):
    return {name: jax.value_and_grad(
        lambda p, m=model: jnp.sum(m.apply({"params": p}, IMAGES) ** 2))(params[name])
            for name, model in GRADIENT_CASES.items()}

  params = {name: _random_params(model, 0) for name, model in GRADIENT_CASES.items()}
  compiled = jax.jit(losses_and_grads).lower(params).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  for name, (loss, grads) in compiled(params).items():
    out[name].update(loss=loss, grads=grads)
  return out


@pytest.mark.parametrize("name", list(CASES))
def test_model_reduces_tokens(runs, name):
  assert runs[name]["seen"] == CASES[name][1]


@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_model_trains_through_the_reduction(runs, name):
  run = runs[name]
  assert np.isfinite(run["loss"]) and run["loss"] > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(run["grads"]))
  # The queries and keys reach the loss through the op, and for EViT through the fused token's
  # weights too.
  block = run["grads"]["Transformer"]["encoderblock_0"]
  assert np.abs(block["MultiHeadAttention"]["query"]["kernel"]).sum() > 0



@pytest.mark.extended
def test_lookupvit_model_trains():
  # Compressed before block 0, then two LookupViT blocks: the lookup tokens reach the loss
  # through the compressed tokens' gathering, and block 0's lookup update through block 1's.
  model = deit.Model(**TINY, token_reduction=dict(method="lookupvit", num_tokens=4))
  params = _random_params(model, 0)
  loss, grads = _compiled(jax.value_and_grad(
      lambda p: jnp.sum(model.apply({"params": p}, IMAGES) ** 2)), params)
  assert np.isfinite(loss) and loss > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  blocks = grads["Transformer"]
  assert np.abs(blocks["encoderblock_0"]["lookup_exchange"]["mlp"]["Dense_0"]["kernel"]).sum() > 0
  assert np.abs(blocks["encoderblock_1"]["lookup_exchange"]["key"]["kernel"]).sum() > 0


def test_mctf_one_step_ahead_is_the_next_blocks_attention(monkeypatch):
  # Block 0 fuses with the attention block 1 would compute on the fused tokens: block 1's
  # LayerNorm and query/key projections on them, log sizes added (proportional attention).
  model = vit.Model(**TINY, pool_type="cls", token_reduction=dict(
      method="mctf", r=3, layers=(0,), one_step_ahead=True))
  params = _random_params(model, 3)
  seen, fuse = {}, tr.mctf

  def spy(x, size, attn, r, **kwargs):
    seen.update(x=x, size=size, attn=attn)
    return fuse(x, size, attn, r, **kwargs)

  monkeypatch.setattr(tr, "mctf", spy)

  def run(params, images):
    model.apply({"params": params}, images)
    return seen["x"], seen["size"], seen["attn"]

  x, size, attn = _compiled(run, params, IMAGES)
  nxt = jax.tree.map(lambda a: np.asarray(a, np.float64),
                     params["Transformer"]["encoderblock_1"])
  normed = _ln(np.asarray(x, np.float64), nxt["LayerNorm_0"])
  q, k = (_proj(normed, nxt["MultiHeadAttention"][name]) for name in ("query", "key"))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  want = _softmax(logits + np.log(np.asarray(size, np.float64))[:, None, None, :], -1)
  np.testing.assert_allclose(attn, want.mean((1, 2)), rtol=1e-4, atol=1e-6)
  assert x.shape == (2, 17, TINY["width"])  # before block 0's MLP, 16 patches + class token


def test_spa_packing_masks_the_padding_in_later_blocks():
  # After block 0 packs each image's tokens with gate > 0.5, block 1's attention masks the
  # padding keys: its output equals softmax attention over the valid keys alone (float64).
  model = vit.Model(**TINY, pool_type="cls", token_reduction=dict(
      method="spa", keep_rate=0.5, threshold=0.5, layers=(0,)))
  params = _random_params(model, 35)
  gate = params["Transformer"]["encoderblock_0"]["token_reduction"]
  for layer in ("LayerNorm", "gate"):  # gates centred on 1/2
    gate[layer]["bias"] = np.zeros_like(gate[layer]["bias"])
  def run(params, images):
    with attend_calls() as calls:
      model.apply({"params": params}, images)
    return calls[-1]

  q, k, v, mask, out = _compiled(run, params, IMAGES)
  valid = np.asarray(mask)[:, 0, 0]
  counts = valid.sum(1)
  assert valid[:, 0].all() and 1 < counts.min() and counts.max() < 17
  assert counts[0] != counts[1]  # a variable number of tokens per image
  for b in range(2):
    assert valid[b, :counts[b]].all()  # kept tokens first
    qf, kf, vf = (np.asarray(a[b], np.float64) for a in (q, k, v))
    logits = np.einsum("qhd,khd->hqk", qf, kf[:counts[b]]) / np.sqrt(qf.shape[-1])
    want = np.einsum("hqk,khd->qhd", _softmax(logits, -1), vf[:counts[b]])
    np.testing.assert_allclose(out[b], want, rtol=1e-4, atol=1e-5)


def test_proportional_attention_is_the_ops_bias():
  # Under `observe_attention`, the op gets `bias = log size` (ToMe's proportional attention)
  # where it takes a bias (softmax); performer takes none, and none is passed.
  x = np.asarray(ref.normal(1, (2, 6, 8)))
  size = np.array(_data(6, n=6)[1])
  layer = Attention(num_heads=2)
  spec = tr.resolve(dict(method="tome"), 2)
  assert spec.bias_for("softmax") and not spec.bias_for("performer")
  shapes = []

  def outputs(rng, x, size):
    params = layer.init(rng, x)
    with tr.observe_attention("softmax", spec, size) as seen:
      got = layer.apply(params, x)
    shapes.extend([seen["query"].shape, seen["key"].shape])
    biased = Attention(num_heads=2, op_args={"bias": jnp.log(size)[:, None, None, :]})
    return got, biased.apply(params, x), layer.apply(params, x)

  got, want, plain = _compiled(outputs, jax.random.key(0), x, size)
  assert shapes == [(2, 6, 2, 4)] * 2
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
  assert np.abs(got - plain).max() > 1e-3


@pytest.mark.parametrize("config,kwargs,match", [
    (dict(method="dynamicvit"), {}, r"token_reduction\['method'\] must be one of"),
    (dict(method="tome", keep_rate=0.5), {}, r"unknown key\(s\) \['keep_rate'\]"),
    (dict(method="evit", keep_rate=1.5), dict(pool_type="cls"),
     r"token_reduction\['keep_rate'\] must be in \(0, 1\]"),
    (dict(method="tome", r=-1), {}, r"token_reduction\['r'\] must be an int >= 0"),
    (dict(method="mctf", layers=(0, 3)), {}, r"token_reduction\['layers'\] must hold block"),
    (dict(method="mctf", tau_info=-1), {}, r"token_reduction\['tau_info'\]"),
    (dict(method="mctf", bidirectional=1), {}, r"token_reduction\['bidirectional'\] must be"),
    (dict(method="mctf", one_step_ahead=1), {}, r"token_reduction\['one_step_ahead'\] must be"),
    (dict(method="mctf", one_step_ahead=True), dict(remat_policy="nothing_saveable"),
     "needs remat_policy='none'"),
    (dict(method="evit"), {}, "needs a class token"),
    (dict(method="tome"), dict(attention="window"), "needs the patch grid"),
    (dict(method="tome"), dict(scan_layers=True), "scan_layers=False"),
    (["tome"], {}, "token_reduction must be a dict"),
    (dict(method="stvit", num_tokens=5), {}, r"token_reduction\['num_tokens'\] must be a square"),
    (dict(method="lookupvit", num_tokens=25), {}, "square grid of patch tokens"),
    (dict(method="stvit", layers=(0, 1)), {}, "must hold one block index"),
    (dict(method="sit", tau=0), {}, r"token_reduction\['tau'\] must be a positive number"),
    (dict(method="lookupvit", mlp_reduction=0), {},
     r"token_reduction\['mlp_reduction'\] must be a positive int"),
    (dict(method="spa", r=2), {}, r"unknown key\(s\) \['r'\] for method 'spa'"),
    (dict(method="spa", threshold=1.0), dict(pool_type="cls"),
     r"token_reduction\['threshold'\] must be in \(0, 1\)"),
    (dict(method="spa", threshold=0.5), {}, "with a threshold pads each image's tokens"),
    (dict(method="mstm"), {}, "method 'mstm' ranks the patches by the class token's"),
    (dict(method="mstm", scales=()), dict(pool_type="cls"),
     r"token_reduction\['scales'\] must be a non-empty sequence"),
    (dict(method="mstm", scales=(3,), layers=(0,)), dict(pool_type="cls"),
     "grid side must be divisible"),
    (dict(method="hvt", kernel_size=0), {},
     r"token_reduction\['kernel_size'\] must be a positive int"),
    (dict(method="hvt", kernel_size=17, layers=(1,)), {}, "got 16 patch tokens"),
])
def test_bad_config_raises(config, kwargs, match):
  model = vit.Model(**dict(TINY, **kwargs), token_reduction=config)
  error = TypeError if isinstance(config, list) else ValueError
  with pytest.raises(error, match=match):
    jax.eval_shape(model.init, jax.random.key(0), IMAGES)


def test_defaults_and_config_override():
  spec = tr.resolve(dict(method="evit"), 12)
  assert (spec.layers, spec.keep_rate, spec.fuse_token) == ((3, 6, 9), 0.7, True)
  assert tr.resolve(dict(method="evit"), 4).layers == (1, 2, 3)
  spec = tr.resolve(dict(method="mctf"), 4)
  assert (spec.layers, spec.r, spec.tau_sim, spec.tau_info, spec.tau_size) == (
      (0, 1, 2, 3), 16, 1.0, 20.0, 40.0)
  assert tr.resolve(dict(method="stvit"), 12).layers == (4,)
  assert tr.resolve(dict(method="stvit"), 12).num_tokens == 16
  assert tr.resolve(dict(method="lookupvit"), 12).layers == (0,)
  spec = tr.resolve(dict(method="sit"), 12)
  assert (spec.layers, spec.keep_rate, spec.tau) == ((3, 6, 9), 0.5, 1.0)
  assert tr.resolve(dict(method="dependencyvit"), 4).layers == (1, 2, 3)
  spec = tr.resolve(dict(method="hvt"), 12)
  assert (spec.layers, spec.kernel_size, spec.stride) == ((3, 6, 9), 3, 2)
  # Settable from the command line: `--config.model.token_reduction="{'method': 'tome'}"`.
  config = config_lib.declare_model_settings(_config_module("vit_digits").get_config("runlocal"))
  assert "token_reduction" in config.model
  assert config_lib.read_override("model.token_reduction", "{'method': 'tome', 'r': 2}",
                                  None) == {"method": "tome", "r": 2}


# --------------------------------------------------- MCTF's token reduction consistency loss
def _encoder_class_token(model, params, images, rng):
  """The class token the model's encoder outputs, read with Flax's `capture_intermediates`."""
  _, state = model.apply({"params": params}, images, train=True, rngs={"dropout": rng},
                         capture_intermediates=lambda m, _: isinstance(m, vit.Encoder),
                         mutable=["intermediates"])
  return state["intermediates"]["Transformer"]["__call__"][0][:, 0]


def _mse64(a, b):
  return np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)


def test_token_reduction_consistency_matches_reference():
  # The loss at r = 8, plus the loss at r' = 0, plus λ·mean((x_cls − x'_cls)²) of the encoder's
  # class tokens (read with Flax's own capture), in float64.
  model = vit.Model(**TINY, pool_type="cls", token_reduction=dict(method="mctf", r=8))
  c = dict(model=model, other=model.clone(token_reduction=dict(method="mctf", r=0)),
           batch={"image": IMAGES, "labels": jax.nn.one_hot(jnp.array([0, 2]), 3)},
           rng=jax.random.key(1), weight=0.7)
  regularized = regularizers.with_token_reduction_consistency(classification_loss,
                                                               c["weight"], r=0)

  def run(params):
    return regularized(c["model"], params, c["batch"], c["rng"]), [
        (classification_loss(m, params, c["batch"], c["rng"]),
         _encoder_class_token(m, params, IMAGES, c["rng"])) for m in (c["model"], c["other"])]

  loss, ((loss_r, cls_r), (loss_other, cls_other)) = _compiled(run, _random_params(model, 5))
  assert _mse64(cls_r, cls_other) > 1e-4  # the two reductions differ
  np.testing.assert_allclose(loss, np.float64(loss_r) + np.float64(loss_other)
                             + c["weight"] * _mse64(cls_r, cls_other), rtol=1e-5)


def test_token_reduction_consistency_loss_value_and_gradient():
  # mean((a − b)²) over batch and channels; gradient 2(a − b)/(batch·width) and its negative.
  a, b = np.asarray(ref.normal(20, (3, 5))), np.asarray(ref.normal(21, (3, 5)))
  value, grads = _compiled(jax.value_and_grad(regularizers.token_reduction_consistency_loss,
                                              argnums=(0, 1)), a, b)
  diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  np.testing.assert_allclose(value, np.mean(diff ** 2), rtol=1e-6)
  np.testing.assert_allclose(grads[0], 2 * diff / diff.size, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads[1], -2 * diff / diff.size, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match=r"class tokens must both be \[batch, width\]"):
    regularizers.token_reduction_consistency_loss(a, b[:, :4])


def test_token_reduction_consistency_refuses_other_models():
  loss = regularizers.with_token_reduction_consistency(classification_loss, 1.0)
  batch = {"image": IMAGES, "labels": jnp.zeros((2, 3))}
  for model, match in ((vit.Model(**TINY, pool_type="cls"), "needs token_reduction"),
                       (vit.Model(**TINY, token_reduction=dict(method="mctf")),
                        "needs pool_type 'cls'")):
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda p, m=model: loss(m, p, batch, jax.random.key(0)),
                     jax.eval_shape(model.init, jax.random.key(0), IMAGES)["params"])
  with pytest.raises(ValueError, match="weight must be > 0"):
    regularizers.with_token_reduction_consistency(classification_loss, 0.0)
  with pytest.raises(ValueError, match="r must be None or an int >= 0"):
    regularizers.with_token_reduction_consistency(classification_loss, 1.0, r=-1)


@pytest.mark.extended
def test_token_reduction_consistency_trains_through_main(tmp_path):
  overrides = {"model.pool_type": "cls", "model.token_reduction": {"method": "mctf", "r": 1},
               "total_steps": 1, "ckpt_every": 100}
  plain = tiny_config(**overrides)
  config = tiny_config(**overrides, **{"loss.token_reduction_consistency": 1.0,
                                       "loss.token_reduction_consistency_r": 0})
  for run, cfg in (("plain", plain), ("trc", config)):
    assert main_lib.train_and_evaluate(cfg, str(tmp_path / run))["step"] == 1
  (plain_loss,), (trc_loss,) = (list(losses(str(tmp_path / r)).values()) for r in ("plain", "trc"))
  assert trc_loss > 1.5 * plain_loss  # two cross-entropies and the consistency term


# --------------------------------------------------------------- SPA's selection-label loss
def test_spa_selection_loss_in_a_vits_loss():
  # The task's loss plus λ·BCE(gate, labels) of the one gating layer (its gates and labels read
  # with Flax's `capture_intermediates`; all its tokens valid), the BCE in float64; the labels
  # mark the 8 patches the class token attends to most (NumPy from the block's queries, keys).
  model = vit.Model(**TINY, pool_type="cls", token_reduction=dict(
      method="spa", keep_rate=0.5, threshold=0.5, layers=(0,)))
  params = _random_params(model, 36)
  batch = {"image": IMAGES, "labels": jax.nn.one_hot(jnp.array([1, 2]), 3)}
  rng, weight = jax.random.key(2), 0.3
  regularized = regularizers.with_spa_selection(classification_loss, weight)

  def run(params):
    with attend_calls() as calls:
      _, state = model.apply({"params": params}, IMAGES, train=True, rngs={"dropout": rng},
                             capture_intermediates=lambda m, _: isinstance(m, tr.TokenGate),
                             mutable=["intermediates"])
    gate_out = state["intermediates"]["Transformer"]["encoderblock_0"]["token_reduction"]
    return (regularized(model, params, batch, rng),
            classification_loss(model, params, batch, rng), gate_out["__call__"][0],
            calls[0][:2])

  loss, plain, (gate, labels), (q, k) = _compiled(run, params)
  g, y = np.asarray(gate, np.float64), np.asarray(labels, np.float64)
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  cls_attn = _softmax(np.einsum("bhd,bkhd->bhk", q[:, 0], k) / np.sqrt(q.shape[-1]),
                      -1).mean(1)[:, 1:]
  want = np.zeros((2, 16))
  for b in range(2):
    want[b, np.argsort(-cls_attn[b], kind="stable")[:8]] = 1  # ⌈0.5·16⌉ per image
  np.testing.assert_array_equal(y, want)
  bce = -np.mean(y * np.log(g) + (1 - y) * np.log(1 - g))
  np.testing.assert_allclose(loss, np.float64(plain) + weight * bce, rtol=1e-5)
  with pytest.raises(ValueError, match="ran no SPA gating layer"):
    jax.eval_shape(lambda p: regularized(vit.Model(**TINY), p, batch, rng),
                   jax.eval_shape(vit.Model(**TINY).init, jax.random.key(0), IMAGES)["params"])
  with pytest.raises(ValueError, match="weight must be > 0"):
    regularizers.with_spa_selection(classification_loss, -1.0)


@pytest.mark.extended
def test_spa_packing_and_selection_train_through_main(tmp_path):
  overrides = {"model.pool_type": "cls", "total_steps": 1, "ckpt_every": 100,
               "model.token_reduction": {"method": "spa", "keep_rate": 0.5, "threshold": 0.5,
                                         "layers": (0,)}}
  plain = tiny_config(**overrides)
  config = tiny_config(**overrides, **{"loss.spa_selection": 1.0})
  for run, cfg in (("plain", plain), ("spa", config)):
    assert main_lib.train_and_evaluate(cfg, str(tmp_path / run))["step"] == 1
  (plain_loss,), (spa_loss,) = (list(losses(str(tmp_path / r)).values()) for r in ("plain", "spa"))
  assert spa_loss > plain_loss + 0.1  # the BCE of gates near 1/2 is near log 2
