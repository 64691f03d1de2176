"""`wavelet_attention` (WavSpA: Wavelet Space Attention) against a float64 reference that
writes the Haar transform as an explicit orthonormal basis and attends band by band."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref

OP = ops.get("wavelet_attention")


def haar_bands(n, levels):
  """The Haar basis of R^n (n a multiple of 2^levels) by band, coarsest first: the averages
  over blocks of 2^L tokens, then for l = L..1 the differences of the halves of blocks of 2^l
  tokens, all scaled by 2^(−l/2)."""
  def blocks(width, sign_of_half):
    basis = np.zeros((n // width, n))
    for p in range(n // width):
      basis[p, p * width:p * width + width // 2] = 1.0
      basis[p, p * width + width // 2:(p + 1) * width] = sign_of_half
    return basis / np.sqrt(width)
  return [blocks(2 ** levels, 1.0)] + [blocks(2 ** l, -1.0) for l in range(levels, 0, -1)]


def wavelet_reference(q, k, v, levels, attend):
  """Zero-pad to a multiple of 2^levels, project on each band, `attend` per band, sum the
  bands' syntheses, crop."""
  def pad(x):
    return jnp.pad(x, [(0, 0), (0, -x.shape[1] % 2 ** levels), (0, 0), (0, 0)])
  t = q.shape[1]
  q, k, v = pad(q), pad(k), pad(v)
  out = 0.0
  for wq, wk in zip(haar_bands(q.shape[1], levels), haar_bands(k.shape[1], levels)):
    band = attend(*(jnp.einsum("pn,bnhd->bphd", w, x) for w, x in ((wq, q), (wk, k), (wk, v))))
    out = out + jnp.einsum("pn,bphd->bnhd", wq, band)
  return out[:, :t]


def test_haar_basis_is_orthonormal():
  basis = np.concatenate(haar_bands(12, 2))
  np.testing.assert_allclose(basis @ basis.T, np.eye(12), atol=1e-12)


@pytest.mark.parametrize("t,s,levels", [(11, 11, 2), (6, 9, 1)])
def test_softmax_in_wavelet_space_matches_reference(t, s, levels):
  """Self-attention of 11 tokens (padded to 12, 2 levels) and cross-attention 6 -> 9, GQA."""
  q, k, v = ref.qkv(t=t, s=s, n=4, k=2, d=4)
  ref.assert_matches(functools.partial(OP, levels=levels),
                     lambda q, k, v: wavelet_reference(q, k, v, levels, ref.softmax_attention),
                     (q, k, v))


def test_inner_op_and_its_arguments():
  """An inner op by name with its own arguments (a 0.5 scale for all bands)."""
  q, k, v = ref.qkv(t=8, n=2, k=2, d=4, seed=4)
  op = functools.partial(OP, levels=3, inner="sigmoid", inner_args=dict(logit_bias=-1.0), scale=0.5)
  sigmoid = lambda q, k, v: jnp.einsum(
      "bnts,bsnd->btnd", 1 / (1 + jnp.exp(1.0 - ref.attention_logits(q, k, 0.5))), v)
  ref.assert_matches(op, lambda q, k, v: wavelet_reference(q, k, v, 3, sigmoid), (q, k, v))


def _bad_calls():
  q, k, v = ref.qkv(b=1, t=4, n=2, k=2, d=4)
  return [(lambda: OP(q, k, v, levels=0), "levels"),
          (lambda: OP(q, k, v, wavelet="db2"), "wavelet"),
          (lambda: OP(q, k, v, inner="nope"), "inner"),
          (lambda: OP(q, k, v, inner="window"), "inner"),
          (lambda: OP(q, k, v, inner_args=[1]), "inner_args"),
          (lambda: OP(q, k, v, mask=jnp.ones((1, 1, 1, 4), bool)), "mask")]


@pytest.mark.parametrize("case", range(6))
def test_bad_arguments_raise(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)


def test_no_causal_form():
  op_checks.assert_no_causal_form("wavelet_attention", *ref.qkv(b=1, t=4, n=2, k=2, d=4))
