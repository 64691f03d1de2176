"""`interpretable_mha` (Temporal Fusion Transformers) against a float64 reference that averages
the per-head softmax matrices and applies them to the shared values; it never calls
`big_attn`."""
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref


@pytest.mark.parametrize("given_value,is_causal,masked", [(False, True, False),
                                                          (True, False, True)])
def test_matches_mean_of_head_attentions(given_value, is_causal, masked):
  q, k, v = ref.qkv(t=8, s=8 if is_causal else 11, dv=6)
  s = k.shape[1]
  shared = ref.normal(3, (2, s, 6))
  mask = ref.key_padding(2, s, first_valid=True, invalid=(1, slice(None))) if masked else None
  full = ref.full_mask(2, 4, 8, s, mask=mask, is_causal=is_causal)

  def ref_fn(q, k, v, shared):
    heads = ref.masked_softmax(ref.attention_logits(q, k), full)   # [b, n, t, s]
    values = shared if given_value else v.mean(axis=2)             # X W_V
    out = heads.mean(axis=1) @ values
    return jnp.repeat(out[:, :, None], 4, axis=2)

  def op_fn(q, k, v, shared):
    return ops.get("interpretable_mha")(q, k, v, shared_value=shared if given_value else None,
                                        is_causal=is_causal,
                                        mask=None if mask is None else jnp.asarray(mask))

  out = ref.assert_matches(op_fn, ref_fn, (q, k, v, shared))
  if masked:
    assert np.all(out[1] == 0.0)


def test_bad_shared_value():
  q, k, v = ref.qkv(t=6)
  with pytest.raises(ValueError, match="shared_value"):
    ops.get("interpretable_mha")(q, k, v, shared_value=jnp.ones((2, 6, 4)))
