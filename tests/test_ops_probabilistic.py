"""`probabilistic_attention` (Probabilistic Attention for Interactive Segmentation) against a
float64 reference: the posterior of an isotropic Gaussian mixture with explicit squared
distances ‖q − k‖², and the EM key updates written per K/V head from the MAP formula. The
reference never calls `big_attn`.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref


def _posterior(q, keys, sigma, log_prior, full):
  """w[b, n, i, j] ∝ π_j exp(−‖q_i − k_j‖² / 2σ_n²), over the allowed keys."""
  keys = ref.repeat_kv(keys, q.shape[2])
  dist2 = jnp.sum((q[:, :, None] - keys[:, None]) ** 2, -1)         # [b, t, s, n]
  logits = (-dist2 / (2 * sigma ** 2)).transpose(0, 3, 1, 2)
  logits = logits + ref.repeat_kv(log_prior[..., None], q.shape[2])[..., 0].transpose(
      0, 2, 1)[:, :, None]
  return ref.masked_softmax(logits, full)


def _probabilistic_ref(q, k, v, sigma, log_prior, full, em_steps, tau):
  b, t, n, _ = q.shape
  kv_heads = k.shape[2]
  keys = k
  for _ in range(em_steps):
    w = _posterior(q, keys, sigma, log_prior, full)
    new = []
    for h in range(kv_heads):
      heads = range(h * n // kv_heads, (h + 1) * n // kv_heads)
      count = sum(w[:, g].sum(1) for g in heads)                    # Σ_i w_ij  [b, s]
      pulled = sum(jnp.einsum("bts,btd->bsd", w[:, g], q[:, :, g]) for g in heads)
      new.append((tau * k[:, :, h] + pulled) / (tau + count[..., None]))
    keys = jnp.stack(new, axis=2)
  w = _posterior(q, keys, sigma, log_prior, full)
  return jnp.einsum("bnts,bsnd->btnd", w, ref.repeat_kv(v, n))


@pytest.mark.parametrize("em_steps,is_causal,masked", [(0, True, False), (2, False, True)])
def test_matches_gaussian_mixture_posterior(em_steps, is_causal, masked):
  q, k, v = ref.qkv(t=9, s=9 if is_causal else 7, std=0.7)
  s = k.shape[1]
  sigma = 1.5 + 0.3 * ref.normal(3, (4,))
  log_prior = ref.normal(4, (2, s, 2))
  mask = ref.key_padding(2, s, first_valid=True, invalid=(1, slice(None))) if masked else None
  full = ref.full_mask(2, 4, 9, s, mask=mask, is_causal=is_causal)
  ref_fn = lambda q, k, v, sg, lp: _probabilistic_ref(q, k, v, sg, lp, full, em_steps, 0.7)
  op_fn = lambda q, k, v, sg, lp: ops.get("probabilistic_attention")(
      q, k, v, sigma=sg, log_prior=lp, em_steps=em_steps, key_prior_strength=0.7,
      is_causal=is_causal, mask=None if mask is None else jnp.asarray(mask))
  out = ref.assert_matches(op_fn, ref_fn, (q, k, v, sigma, log_prior))
  if masked:
    assert np.all(out[1] == 0.0)


def test_uniform_prior_and_unit_keys_is_softmax():
  """With keys of one norm and uniform priors, the posterior is softmax(QKᵀ/σ²)."""
  q, k, v = ref.qkv(t=8)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  out = ops.get("probabilistic_attention")(q, k, v, scale=0.4)
  with ref.x64():
    np.testing.assert_allclose(out, np.asarray(ref.softmax_attention(q, k, v, scale=0.4)),
                               **ref.F32_TOL)


def test_layer_runs():
  op_checks.assert_layer_runs("probabilistic_attention", dict(em_steps=1), dict(
      prior_weight=(2, 4), prior_bias=(2,), sigma=(4,)), is_causal=False)


def _bad_calls():
  q, k, v = ref.qkv(t=6)
  op = ops.get("probabilistic_attention")
  return [(lambda: op(q, k, v, em_steps=-1), "em_steps"),
          (lambda: op(q, k, v, em_steps=1, is_causal=True), "em_steps"),
          (lambda: op(q, k, v, key_prior_strength=0.0), "key_prior_strength"),
          (lambda: op(q, k, v, sigma=jnp.ones((2,))), "sigma"),
          (lambda: op(q, k, v, log_prior=jnp.ones((2, 6, 4))), "log_prior")]


@pytest.mark.parametrize("case", range(5))
def test_bad_arguments(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
