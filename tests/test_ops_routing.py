"""`bilevel_routing` (BiFormer: Vision Transformer with Bi-Level Routing Attention) and
`mixture_of_heads` (MoH: Multi-Head Attention as Mixture-of-Head Attention) against float64
references.

The references choose BiFormer's routed regions and MoH's top-k heads in NumPy by loops over
regions and tokens, then evaluate masked softmax attention in float64; they never call
`big_attn`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops
from tests import op_checks
from tests import reference as ref

F32_TOL, BF16_TOL = ref.F32_TOL, ref.BF16_TOL
GRID = (6, 8)
_qkv = functools.partial(ref.qkv, t=48)


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
  mask = ref.key_padding(2, 48, invalid=(0, list(range(24)))) if with_mask else None
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
  mask = ref.key_padding(2, 11)
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
    ("bilevel_routing", dict(grid=(3, 4), num_regions=(1, 2), topk=1))])
def test_layers_run(op, op_args):
  op_checks.assert_layer_runs(op, op_args, length=12, is_causal=False)


@pytest.mark.parametrize("name", ["bilevel_routing", "mixture_of_heads"])
def test_bfloat16_inputs(name):
  q, k, v = _qkv(dtype=jnp.bfloat16, seed=4)
  logits = ref.normal(8, (2, 48, 4), jnp.bfloat16)
  routed = _routing_allowed(q, k, GRID, (3, 2), 2)[:, None]
  chosen = _moh_choice(logits, 0, 2)
  cases = {
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
  routing, moh = ops.get("bilevel_routing"), ops.get("mixture_of_heads")
  return [
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
  op_checks.assert_bad_call_raises(_bad_calls, case)


@pytest.mark.parametrize("name,args", [
    ("bilevel_routing", dict(grid=(3, 4), num_regions=1, topk=1))])
def test_no_causal_form(name, args):
  op_checks.assert_no_causal_form(name, *_qkv(t=12), **args)
