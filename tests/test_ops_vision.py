"""`window`, `grid`, `spatial_reduction`, `channel_attention`, `bilevel_routing` and
`mixture_of_heads` against float64 references.

The references are written from the papers' formulas on full `[q, kv]` matrices: window, shifted
window, grid and routing masks are built by explicit loops over token positions (routing's top-k
is chosen by the reference itself in NumPy), pooling and strided convolutions loop over patches,
MoH's head weights are computed per head. They never call `big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL
GRID = (6, 8)


def _qkv(b=2, t=48, s=None, n=4, k=2, d=8, dv=None, dtype=jnp.float32, seed=0):
  s = t if s is None else s
  dv = d if dv is None else dv
  return (ref.normal(seed, (b, t, n, d), dtype), ref.normal(seed + 1, (b, s, k, d), dtype),
          ref.normal(seed + 2, (b, s, k, dv), dtype))


def _key_padding(b, t, seed=5, empty=()):
  """`[b, 1, 1, t]` key-padding mask; tokens in `empty` are invalid in batch 0."""
  valid = np.random.default_rng(seed).random((b, t)) > 0.3
  valid[0, list(empty)] = False
  return valid[:, None, None, :]


def _tokens(h, w, where):
  return [y * w + x for y in range(h) for x in range(w) if where(y, x)]


# ----------------------------------------------------------------------------------------------
# Window (plain and shifted) and grid attention: masks and biases built by loops over positions.
# ----------------------------------------------------------------------------------------------
def _window_pattern(grid, size, shift=(0, 0)):
  """Allowed pairs `[t, t]` and relative offsets `[t, t, 2]` of (shifted) window attention.

  A token at (y, x) sits at ((y − sy) mod h, (x − sx) mod w) of the rolled image; two tokens
  interact when they share a window of the rolled image and are both wrapped around or both
  not, per axis (a row y < sy wraps to the bottom).
  """
  (h, w), (a, c), (sy, sx) = grid, size, shift
  t = h * w
  allowed = np.zeros((t, t), bool)
  offset = np.zeros((t, t, 2), int)
  for i in range(t):
    yi, xi = divmod(i, w)
    ryi, rxi = (yi - sy) % h, (xi - sx) % w
    for j in range(t):
      yj, xj = divmod(j, w)
      ryj, rxj = (yj - sy) % h, (xj - sx) % w
      same_window = ryi // a == ryj // a and rxi // c == rxj // c
      same_side = (yi < sy) == (yj < sy) and (xi < sx) == (xj < sx)
      allowed[i, j] = same_window and same_side
      offset[i, j] = (ryi % a - ryj % a, rxi % c - rxj % c)
  return allowed, offset


def _grid_pattern(grid, size):
  """Grid attention: tokens at the same offset in their `(h/a, w/c)` cells; offsets between
  the cells' indices."""
  (h, w), (a, c) = grid, size
  ch, cw = h // a, w // c
  t = h * w
  allowed = np.zeros((t, t), bool)
  offset = np.zeros((t, t, 2), int)
  for i in range(t):
    yi, xi = divmod(i, w)
    for j in range(t):
      yj, xj = divmod(j, w)
      allowed[i, j] = yi % ch == yj % ch and xi % cw == xj % cw
      offset[i, j] = (yi // ch - yj // ch, xi // cw - xj // cw)
  return allowed, offset


def _pattern_ref(q, k, v, allowed, offset, size, rpb=None, mask=None):
  bias = None
  if rpb is not None:
    a, c = size
    bias = rpb[:, offset[..., 0] + a - 1, offset[..., 1] + c - 1][None]  # [1, n, t, t]
  full = allowed[None, None] if mask is None else allowed[None, None] & np.asarray(mask)
  return ref.softmax_attention(q, k, v, bias=bias, mask=full)


@pytest.mark.parametrize("size,shift,kv_heads", [((3, 4), (0, 0), 2), ((3, 4), (1, 2), 1),
                                                 ((2, 2), (1, 1), 4), ((2, 2), (0, 1), 2)])
def test_window_matches_reference(size, shift, kv_heads):
  q, k, v = _qkv(k=kv_heads, dv=6)
  rpb = ref.normal(3, (4, 2 * size[0] - 1, 2 * size[1] - 1), std=0.5)
  allowed, offset = _window_pattern(GRID, size, shift)
  op = functools.partial(ops.get("window"), grid=GRID, window_size=size, shift=shift)
  ref.assert_matches(lambda q, k, v, r: op(q, k, v, rpb=r),
                  lambda q, k, v, r: _pattern_ref(q, k, v, allowed, offset, size, r),
                  (q, k, v, rpb))


def test_window_shift_mask_separates_wrapped_tokens():
  """With a shift, tokens wrapped around by the roll never see their new neighbours, and the
  output differs from unshifted windows."""
  q, k, v = _qkv()
  op = jax.jit(ops.get("window"), static_argnames=("grid", "window_size", "shift"))
  shifted = op(q, k, v, grid=GRID, window_size=(3, 4), shift=(1, 2))
  plain = op(q, k, v, grid=GRID, window_size=(3, 4), shift=(0, 0))
  assert not np.allclose(shifted, plain, atol=1e-3)
  allowed, _ = _window_pattern(GRID, (3, 4), (1, 2))
  # Token (0, 0) wraps to the bottom-right window: it sees only the 2 tokens wrapped with it
  # in both axes ((0, 0), (0, 1)), not the bottom-right tokens it now sits beside.
  assert set(np.flatnonzero(allowed[0])) == {0, 1}
  v_probe = jnp.zeros_like(v).at[:, 47].set(100.0)  # bottom-right token, same rolled window
  out = op(q, k, v_probe, grid=GRID, window_size=(3, 4), shift=(1, 2))
  assert np.all(np.asarray(out[:, 0]) == 0.0)


@pytest.mark.parametrize("size,kv_heads", [((2, 2), 2), ((3, 4), 1), ((6, 2), 4)])
def test_grid_matches_reference(size, kv_heads):
  q, k, v = _qkv(k=kv_heads)
  rpb = ref.normal(3, (4, 2 * size[0] - 1, 2 * size[1] - 1), std=0.5)
  allowed, offset = _grid_pattern(GRID, size)
  op = functools.partial(ops.get("grid"), grid=GRID, grid_size=size)
  ref.assert_matches(lambda q, k, v, r: op(q, k, v, rpb=r),
                  lambda q, k, v, r: _pattern_ref(q, k, v, allowed, offset, size, r),
                  (q, k, v, rpb))


@pytest.mark.parametrize("name", ["window", "grid"])
def test_window_grid_key_padding_and_empty_rows(name):
  """A key-padding mask; in batch 0 a whole 2x2 window (or grid group) has no valid key, so
  its queries return zeros."""
  q, k, v = _qkv()
  if name == "window":
    args, pattern = dict(window_size=(2, 2), shift=(1, 1)), _window_pattern(GRID, (2, 2), (1, 1))
    empty = _tokens(6, 8, lambda y, x: (y < 1 or y == 5) and (x < 1 or x == 7))
  else:
    empty = _tokens(6, 8, lambda y, x: y % 3 == 0 and x % 4 == 0)
    args, pattern = dict(grid_size=(2, 2)), _grid_pattern(GRID, (2, 2))
  mask = _key_padding(2, 48, empty=empty)
  op = functools.partial(ops.get(name), grid=GRID, mask=mask, **args)
  out = ref.assert_matches(op, lambda q, k, v: _pattern_ref(q, k, v, *pattern, (2, 2), mask=mask),
                        (q, k, v))
  assert np.all(out[0, empty] == 0.0)
  has_key = (pattern[0][None] & mask[:, 0]).any(-1)  # [b, t]
  assert np.all(out[~has_key] == 0.0) and np.all(np.abs(out[has_key]).sum(-1) > 0)


# ----------------------------------------------------------------------------------------------
# Spatial reduction and channel attention.
# ----------------------------------------------------------------------------------------------
def _reduce_ref(x, grid, size, kernel=None):
  """Patch-wise mean, or kernel-weighted sum, of `[b, h·w, k, c]`: the tokens of every patch
  listed by loops, then combined with the taps' weights."""
  (h, w), (rh, rw) = grid, size
  taps = np.array([[(py * rh + i) * w + px * rw + j for i in range(rh) for j in range(rw)]
                   for py in range(h // rh) for px in range(w // rw)])  # [patches, rh·rw]
  patches = x[:, taps]  # [b, P, rh·rw, k, c]
  if kernel is None:
    return patches.sum(2) / (rh * rw)
  weights = kernel.reshape(rh * rw, -1, kernel.shape[-1])  # [rh·rw, k|1, c]
  return jnp.einsum("bpokc,okc->bpkc", patches, weights)


@pytest.mark.parametrize("t,size,kv_heads,per_head", [(48, (2, 2), 2, False),
                                                      (13, (3, 4), 1, True),
                                                      (48, (2, 4), 4, False)])
def test_spatial_reduction_conv_matches_reference(t, size, kv_heads, per_head):
  """Strided depthwise reduction; q_len may differ from the key/value image (13 queries)."""
  q, k, v = _qkv(t=t, s=48, k=kv_heads, dv=6)
  head_shape = (kv_heads,) if per_head else ()
  wk = ref.normal(11, size + head_shape + (8,), std=0.5)
  wv = ref.normal(12, size + head_shape + (6,), std=0.5)
  op = functools.partial(ops.get("spatial_reduction"), grid=GRID, reduction=size,
                         method="conv")
  ref.assert_matches(
      lambda q, k, v, wk, wv: op(q, k, v, sr_key_kernel=wk, sr_value_kernel=wv),
      lambda q, k, v, wk, wv: ref.softmax_attention(
          q, _reduce_ref(k, GRID, size, wk), _reduce_ref(v, GRID, size, wv)),
      (q, k, v, wk, wv))


def test_spatial_reduction_avg_with_mask_matches_reference():
  """Average pooling (an int ratio); the mask acts on the 12 reduced keys, one query row of
  batch 0 has none left."""
  q, k, v = _qkv(t=10, s=48)
  kvalid = np.random.default_rng(3).random((2, 12)) > 0.3
  qvalid = np.ones((2, 10), bool)
  qvalid[0, 4] = False
  mask = qvalid[:, None, :, None] & kvalid[:, None, None, :]
  op = functools.partial(ops.get("spatial_reduction"), grid=GRID, reduction=2, mask=mask)
  out = ref.assert_matches(
      op, lambda q, k, v: ref.softmax_attention(
          q, _reduce_ref(k, GRID, (2, 2)), _reduce_ref(v, GRID, (2, 2)), mask=mask),
      (q, k, v))
  assert np.all(out[0, 4] == 0.0)


def _channel_ref(q, k, v, mask=None):
  """A = softmax_{c'}(s·Σ_t Q_{t,c} K_{t,c'}) per head; out = V Aᵀ; padded tokens dropped."""
  n = q.shape[2]
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  if mask is not None:
    used = np.broadcast_to(np.asarray(mask), (q.shape[0], n, q.shape[1], k.shape[1])).any(2)
    k = k * np.moveaxis(used, 1, 2)[..., None]
  attn = jax.nn.softmax(jnp.einsum("btnc,btne->bnce", q, k) / np.sqrt(q.shape[-1]), axis=-1)
  out = jnp.einsum("bnce,btne->btnc", attn, v)
  if mask is not None:
    rows = np.broadcast_to(np.asarray(mask), (q.shape[0], n, q.shape[1], k.shape[1])).any(-1)
    out = out * np.moveaxis(rows, 1, 2)[..., None]
  return out


@pytest.mark.parametrize("t,kv_heads,with_mask", [(17, 2, False), (48, 1, True),
                                                  (9, 4, True)])
def test_channel_attention_matches_reference(t, kv_heads, with_mask):
  q, k, v = _qkv(t=t, k=kv_heads)
  mask = None
  if with_mask:
    kvalid = np.random.default_rng(2).random((2, t)) > 0.3
    qvalid = np.ones((2, t), bool)
    qvalid[1, 3] = False
    mask = qvalid[:, None, :, None] & kvalid[:, None, None, :]
  op = functools.partial(ops.get("channel_attention"), mask=mask)
  out = ref.assert_matches(op, lambda q, k, v: _channel_ref(q, k, v, mask), (q, k, v))
  if with_mask:
    assert np.all(out[1, 3] == 0.0)


# ----------------------------------------------------------------------------------------------
# Bi-level routing and mixture of heads.
# ----------------------------------------------------------------------------------------------
def _routing_allowed(q, k, grid, regions, topk):
  """BiFormer's token mask `[b, t, t]`, routing chosen here in NumPy from float64 inputs."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  (h, w), (sh, sw) = grid, regions
  rh, rw = h // sh, w // sw
  region = np.array([(y // rh) * sw + x // rw for y in range(h) for x in range(w)])
  num = sh * sw
  n, kh = q.shape[2], k.shape[2]
  k_rep = np.repeat(k, n // kh, axis=2)
  allowed = np.zeros((q.shape[0], h * w, h * w), bool)
  for b in range(q.shape[0]):
    q_mean = np.stack([q[b, region == r].mean(0).ravel() for r in range(num)])
    k_mean = np.stack([k_rep[b, region == r].mean(0).ravel() for r in range(num)])
    affinity = q_mean @ k_mean.T
    for r in range(num):
      order = np.argsort(-affinity[r])
      gap = affinity[r, order[topk - 1]] - (affinity[r, order[topk]] if topk < num else -np.inf)
      assert gap > 1e-3, "routing test data too close to a tie"
      chosen = set(order[:topk].tolist())
      for i in np.flatnonzero(region == r):
        allowed[b, i] = [region[j] in chosen for j in range(h * w)]
  return allowed


@pytest.mark.parametrize("regions,topk,kv_heads,with_mask", [((3, 2), 2, 2, False),
                                                             ((2, 4), 3, 1, True),
                                                             ((3, 4), 1, 4, True),
                                                             ((1, 2), 2, 2, False)])
def test_bilevel_routing_matches_reference(regions, topk, kv_heads, with_mask):
  q, k, v = _qkv(k=kv_heads, dv=6, seed=4)
  allowed = _routing_allowed(q, k, GRID, regions, topk)[:, None]
  mask = _key_padding(2, 48, empty=range(48)[:24]) if with_mask else None
  full = allowed if mask is None else allowed & mask
  op = functools.partial(ops.get("bilevel_routing"), grid=GRID, num_regions=regions,
                         topk=topk, mask=mask)
  out = ref.assert_matches(op, lambda q, k, v: ref.softmax_attention(q, k, v, mask=full),
                        (q, k, v))
  rows_empty = ~full.any(-1)[:, 0]  # [b, t]
  assert np.all(out[rows_empty] == 0.0)


def _moh_choice(logits, shared, topk):
  """`[b, t, n − shared]` indicator of the top-k routed heads, chosen in NumPy per token."""
  raw = np.asarray(logits, np.float64)
  b, t, n = raw.shape
  chosen = np.zeros((b, t, n - shared))
  for bi in range(b):
    for ti in range(t):
      chosen[bi, ti, np.argsort(-raw[bi, ti, shared:])[:topk]] = 1.0
  return chosen


def _moh_weights(logits, mix, shared, topk, scaling, chosen):
  """Per-head MoH weights `[b, t, n]` (paper Eqs. 5-6, or the authors' code's scaling)."""
  routed = logits.shape[-1] - shared
  g_shared = jax.nn.softmax(logits[..., :shared], -1)
  g_routed = jax.nn.softmax(logits[..., shared:], -1) * chosen
  if scaling == "official":
    g_shared = g_shared * shared
    g_routed = g_routed / g_routed.sum(-1, keepdims=True) * topk
  if shared and routed:
    alpha = jax.nn.softmax(mix, -1) * (2.0 if scaling == "official" else 1.0)
    g_shared, g_routed = g_shared * alpha[..., :1], g_routed * alpha[..., 1:]
  return jnp.concatenate([g_shared, g_routed], -1)


@pytest.mark.parametrize("shared,topk,causal,scaling,kv_heads", [
    (1, 2, True, "paper", 2), (2, 1, False, "official", 1), (0, 3, True, "official", 4),
    (4, None, False, "paper", 2)])
def test_mixture_of_heads_matches_reference(shared, topk, causal, scaling, kv_heads):
  q, k, v = _qkv(t=11, s=11, k=kv_heads, dv=6)
  logits = ref.normal(8, (2, 11, 4))
  mix = ref.normal(9, (2, 11, 2)) if 0 < shared < 4 else None
  mask = _key_padding(2, 11)
  arrays = (q, k, v, logits) + (() if mix is None else (mix,))
  op = functools.partial(ops.get("mixture_of_heads"), shared_heads=shared, topk=topk,
                         is_causal=causal, mask=mask, gate_scaling=scaling)
  full = ref.full_mask(2, 4, 11, 11, mask=mask, is_causal=causal)

  chosen = _moh_choice(logits, shared, topk)

  def ref_fn(q, k, v, logits, mix=None):
    weights = _moh_weights(logits, mix, shared, topk, scaling, chosen)
    return weights[..., None] * ref.softmax_attention(q, k, v, mask=full)

  out = ref.assert_matches(lambda q, k, v, lg, *m: op(q, k, v, router_logits=lg,
                                                   head_mix_logits=m[0] if m else None),
                        ref_fn, arrays)
  if topk is not None:
    assert np.sum(out[..., shared:, :].any(-1), -1).max() <= topk  # unselected heads are 0


def test_mixture_of_heads_layer_runs_and_trains_the_router():
  model = layers.Attention(num_heads=4, num_kv_heads=2, op="mixture_of_heads",
                           op_args=dict(shared_heads=1, topk=2))
  x = ref.normal(0, (2, 9, 16))
  params = jax.jit(model.init)(jax.random.key(0), x)
  out = jax.jit(functools.partial(model.apply, is_causal=True))(params, x)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  shapes = jax.tree.map(jnp.shape, params["params"]["op_params"])
  assert shapes["router"].value == (16, 4) and shapes["head_mix"].value == (16, 2)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x, is_causal=True) ** 2)))(params)
  assert np.abs(np.asarray(grads["params"]["op_params"]["router"].value)).sum() > 0


@pytest.mark.parametrize("op,op_args", [
    ("window", dict(grid=(3, 4), window_size=(3, 2), shift=1)),
    ("grid", dict(grid=(3, 4), grid_size=(3, 2))),
    ("spatial_reduction", dict(grid=(3, 4), reduction=(1, 2), method="conv")),
    ("bilevel_routing", dict(grid=(3, 4), num_regions=(1, 2), topk=1)),
    ("channel_attention", None)])
def test_vision_layers_run(op, op_args):
  model = layers.Attention(num_heads=4, num_kv_heads=2, op=op, op_args=op_args)
  x = ref.normal(0, (2, 12, 16))
  params = jax.jit(model.init)(jax.random.key(0), x)
  out = jax.jit(model.apply)(params, x)
  assert out.shape == x.shape and np.all(np.isfinite(out))


def test_spatial_reduction_conv_params_start_as_average_pooling():
  x = ref.normal(0, (2, 12, 16))
  conv = layers.Attention(num_heads=4, op="spatial_reduction",
                          op_args=dict(grid=(3, 4), reduction=(1, 2), method="conv"))
  avg = layers.Attention(num_heads=4, op="spatial_reduction",
                         op_args=dict(grid=(3, 4), reduction=(1, 2)))
  params = conv.init(jax.random.key(0), x)
  plain = {"params": {k: v for k, v in params["params"].items() if k != "op_params"}}
  np.testing.assert_allclose(conv.apply(params, x), avg.apply(plain, x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# bfloat16, argument checks, registry size.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["window", "grid", "spatial_reduction", "channel_attention",
                                  "bilevel_routing", "mixture_of_heads"])
def test_bfloat16_inputs(name):
  q, k, v = _qkv(dtype=jnp.bfloat16, seed=4)
  logits = ref.normal(8, (2, 48, 4), jnp.bfloat16)
  routed = _routing_allowed(q, k, GRID, (3, 2), 2)[:, None]
  chosen = _moh_choice(logits, 0, 2)
  cases = {
      "window": (dict(grid=GRID, window_size=(3, 4), shift=(1, 2)),
                 lambda q, k, v: _pattern_ref(q, k, v, *_window_pattern(GRID, (3, 4), (1, 2)),
                                              (3, 4))),
      "grid": (dict(grid=GRID, grid_size=(2, 2)),
               lambda q, k, v: _pattern_ref(q, k, v, *_grid_pattern(GRID, (2, 2)), (2, 2))),
      "spatial_reduction": (dict(grid=GRID, reduction=2), lambda q, k, v: ref.softmax_attention(
          q, _reduce_ref(k, GRID, (2, 2)), _reduce_ref(v, GRID, (2, 2)))),
      "channel_attention": ({}, _channel_ref),
      "bilevel_routing": (dict(grid=GRID, num_regions=(3, 2), topk=2),
                          lambda q, k, v: ref.softmax_attention(q, k, v, mask=routed)),
      "mixture_of_heads": (dict(router_logits=logits, shared_heads=0, topk=2,
                                gate_scaling="official"),
                           lambda q, k, v: _moh_weights(logits.astype(q.dtype), None, 0, 2,
                                                        "official", chosen)[..., None]
                           * ref.softmax_attention(q, k, v)),
  }
  args, ref_fn = cases[name]
  ref.assert_matches(functools.partial(ops.get(name), **args), ref_fn, (q, k, v), tol=BF16_TOL)


def _bad_calls():
  q, k, v = _qkv(t=12, n=4, k=2)
  g = dict(grid=(3, 4))
  logits = jnp.zeros((2, 12, 4))
  window, grid_op = ops.get("window"), ops.get("grid")
  sr, ch = ops.get("spatial_reduction"), ops.get("channel_attention")
  routing, moh = ops.get("bilevel_routing"), ops.get("mixture_of_heads")
  return [
      (lambda: window(q, k, v, window_size=2), "grid"),
      (lambda: window(q, k, v, grid=(4, 4), window_size=2), "grid"),
      (lambda: window(q, k, v, window_size=0, **g), "window_size"),
      (lambda: window(q, k, v, window_size=(2, 3), **g), "window_size"),
      (lambda: window(q, k, v, window_size=(3, 2), shift=(0, 2), **g), "shift"),
      (lambda: window(q, k, v, window_size=(3, 2), shift=-1, **g), "shift"),
      (lambda: window(q, k, v, window_size=(3, 2), rpb=jnp.zeros((4, 3, 3)), **g), "rpb"),
      (lambda: window(q, k[:, :6], v[:, :6], window_size=(3, 2), **g), "q_len"),
      (lambda: grid_op(q, k, v, grid_size=(2, 2), **g), "grid_size"),
      (lambda: grid_op(q, k, v, grid_size=0, **g), "grid_size"),
      (lambda: sr(q, k, v, reduction=(2, 3), **g), "reduction"),
      (lambda: sr(q, k, v, reduction=1, method="max", **g), "method"),
      (lambda: sr(q, k, v, reduction=(1, 2), method="conv", **g), "sr_key_kernel"),
      (lambda: sr(q, k, v, reduction=(1, 2), method="conv", sr_key_kernel=jnp.zeros((1, 2, 8)),
                  sr_value_kernel=jnp.zeros((2, 1, 8)), **g), "sr_value_kernel"),
      (lambda: sr(q, k, v, reduction=2, sr_key_kernel=jnp.zeros((2, 2, 8)), grid=(2, 6)),
       "sr_key_kernel"),
      (lambda: ch(q, k[:, :6], v[:, :6]), "q_len"),
      (lambda: ch(q, k, v[..., :4]), "value head_dim"),
      (lambda: routing(q, k, v, num_regions=(1, 2), topk=3, **g), "topk"),
      (lambda: routing(q, k, v, num_regions=(2, 2), topk=1, **g), "num_regions"),
      (lambda: moh(q, k, v, topk=2), "router_logits"),
      (lambda: moh(q, k, v, router_logits=logits[:, :3], topk=2), "router_logits"),
      (lambda: moh(q, k, v, router_logits=logits, shared_heads=5, topk=1), "shared_heads"),
      (lambda: moh(q, k, v, router_logits=logits, shared_heads=1, topk=4), "topk"),
      (lambda: moh(q, k, v, router_logits=logits, shared_heads=1, topk=2), "head_mix_logits"),
      (lambda: moh(q, k, v, router_logits=logits, topk=2, head_mix_logits=logits[..., :2]),
       "head_mix_logits"),
      (lambda: moh(q, k, v, router_logits=logits, topk=2, gate_scaling="x"), "gate_scaling"),
  ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_args_raise_value_error_naming_them(case):
  call, name = _bad_calls()[case]
  with pytest.raises(ValueError, match=name):
    call()


@pytest.mark.parametrize("name,args", [
    ("window", dict(grid=(3, 4), window_size=1)), ("grid", dict(grid=(3, 4), grid_size=1)),
    ("spatial_reduction", dict(grid=(3, 4), reduction=1)), ("channel_attention", {}),
    ("bilevel_routing", dict(grid=(3, 4), num_regions=1, topk=1))])
def test_no_causal_form(name, args):
  q, k, v = _qkv(t=12)
  with pytest.raises(NotImplementedError, match=name):
    ops.get(name)(q, k, v, is_causal=True, **args)


def test_registry_has_at_least_20_ops():
  names = ops.names()
  assert len(names) >= 20
  for name in ("window", "grid", "spatial_reduction", "channel_attention", "bilevel_routing",
               "mixture_of_heads"):
    assert name in names
