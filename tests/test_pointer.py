"""Pointer Networks' output layer (`big_attn.layers.PointerHead`,
`big_attn.ops.pointer_log_probs`) against a float64 reference of
log softmax_j(vᵀ tanh(W_1 e_j + W_2 d_i)) over the valid positions, forward and gradient."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from big_attn.layers import PointerHead
from tests import reference as ref

DECODER = ref.normal(0, (2, 3, 6))
ENCODER = ref.normal(1, (2, 5, 6))
# Batch 0 may not point at input 3; batch 1 not at inputs 0 and 4 (`[batch, 1, inputs]`).
MASK = jnp.array([[True, True, True, False, True], [False, True, True, True, False]])[:, None]


def ref_pointer(decoder, encoder, w1, w2, v, mask):
  """log softmax_j(u_ij) over the valid j, u_ij = vᵀ tanh(W_1 e_j + W_2 d_i)."""
  u = jnp.einsum("bijh,h->bij", jnp.tanh((encoder @ w1)[:, None] + (decoder @ w2)[:, :, None]),
                 v)
  u = jnp.where(mask, u, -jnp.inf)
  return u - jax.scipy.special.logsumexp(u, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def head_and_params():
  head = PointerHead(hidden_dim=4)
  boxed = jax.eval_shape(head.init, jax.random.key(0), DECODER, ENCODER)["params"]
  rng = np.random.default_rng(2)
  return head, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.7, s.shape), s.dtype),
                            nn.unbox(boxed))


def test_pointer_head_matches_its_formula_forward_and_gradient(head_and_params):
  head, params = head_and_params
  assert params["encoder_proj"]["kernel"].shape == (6, 1, 4) and params["v"].shape == (1, 4)

  def layer(decoder, encoder, w1, w2, v):
    p = {"encoder_proj": {"kernel": w1}, "decoder_proj": {"kernel": w2}, "v": v}
    return jnp.where(MASK, head.apply({"params": p}, decoder, encoder, mask=MASK), 0.0)

  def formula(decoder, encoder, w1, w2, v):
    out = ref_pointer(decoder, encoder, w1[:, 0], w2[:, 0], v[0], MASK)
    return jnp.where(MASK, out, 0.0)
  ref.assert_matches(layer, formula, [DECODER, ENCODER, params["encoder_proj"]["kernel"],
                                      params["decoder_proj"]["kernel"], params["v"]],
                     tol=dict(rtol=1e-4, atol=1e-5))
  log_probs = head.apply({"params": params}, DECODER, ENCODER, mask=MASK)
  np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.isneginf(log_probs[0, :, 3])) and np.all(np.isneginf(log_probs[1, :, 0]))


def test_pointer_training_signal_and_edge_rows(head_and_params):
  """The negative log-likelihood of target positions has finite gradients even with a step
  that has no valid input (all −inf), and causal steps point only backwards."""
  head, params = head_and_params
  mask = MASK.at[1].set(False)  # batch 1: no valid input at all
  targets = jnp.array([[0, 4, 2], [1, 1, 1]])

  def nll(p):
    lp = head.apply({"params": p}, DECODER, ENCODER, mask=mask)
    picked = jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
    return -jnp.where(jnp.isfinite(picked), picked, 0.0).sum()
  grads = jax.grad(nll)(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  lp = head.apply({"params": params}, DECODER, ENCODER, mask=mask)
  assert np.all(np.isneginf(lp[1]))
  causal = head.apply({"params": params}, DECODER, ENCODER[:, :3], is_causal=True)
  assert np.all(np.isneginf(np.asarray(causal)[:, 0, 1:])) and np.isfinite(causal[:, 2]).all()
  # The function is the same on projected inputs: gatv2's tanh scores normalised over keys.
  q = jnp.einsum("btd,dhk->bthk", DECODER, params["decoder_proj"]["kernel"])
  k = jnp.einsum("btd,dhk->bthk", ENCODER, params["encoder_proj"]["kernel"])
  np.testing.assert_allclose(ops.pointer_log_probs(q, k, attn_vec=params["v"])[:, 0],
                             head.apply({"params": params}, DECODER, ENCODER), rtol=1e-5,
                             atol=1e-6)


def test_bad_arguments(head_and_params):
  head, params = head_and_params
  with pytest.raises(ValueError, match="hidden_dim must be a positive int"):
    PointerHead(hidden_dim=0).init(jax.random.key(0), DECODER, ENCODER)
  with pytest.raises(ValueError, match="encoder must be .batch, length, features."):
    head.apply({"params": params}, DECODER, ENCODER[0])
  with pytest.raises(ValueError, match="batch sizes differ"):
    head.apply({"params": params}, DECODER, ENCODER[:1])
  with pytest.raises(TypeError, match="mask must be boolean"):
    head.apply({"params": params}, DECODER, ENCODER, mask=MASK.astype(jnp.int32))
  with pytest.raises(ValueError, match="attn_vec"):
    ops.pointer_log_probs(DECODER[:, :, None], ENCODER[:, :, None], attn_vec=jnp.ones((1, 5)))
