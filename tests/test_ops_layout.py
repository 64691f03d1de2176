"""`skim_attention` (Skim-Attention: Learning to Focus via Document Layout) against float64
references: layout-only softmax weights on the text values ("skim"), and text attention
restricted to each query's top-k keys by layout attention, found by sorting ("mask"). The
references never call `big_attn`.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from tests import op_checks
from tests import reference as ref


def _layout(t, s, n=4, k=2, dim=6):
  return ref.normal(3, (2, t, n, dim)), ref.normal(4, (2, s, k, dim))


@pytest.mark.parametrize("is_causal,masked", [(True, False), (False, True)])
def test_skim_form_is_layout_attention_on_text_values(is_causal, masked):
  t, s = (9, 9) if is_causal else (7, 10)
  q, k, v = ref.qkv(t=t, s=s, dv=5)
  lq, lk = _layout(t, s)
  mask = ref.key_padding(2, s, first_valid=True, invalid=(1, slice(None))) if masked else None
  full = ref.full_mask(2, 4, t, s, mask=mask, is_causal=is_causal)

  def ref_fn(q, k, v, lq, lk):
    del q, k  # Skim-Attention reads the layout only.
    weights = ref.masked_softmax(ref.attention_logits(lq, lk), full)
    return jnp.einsum("bnts,bsnd->btnd", weights, ref.repeat_kv(v, 4))

  def op_fn(q, k, v, lq, lk):
    return ops.get("skim_attention")(q, k, v, layout_query=lq, layout_key=lk, form="skim",
                                     is_causal=is_causal,
                                     mask=None if mask is None else jnp.asarray(mask))

  out = ref.assert_matches(op_fn, ref_fn, (q, k, v, lq, lk))
  if masked:
    assert np.all(out[1] == 0.0)


@pytest.mark.parametrize("top_k,is_causal", [(3, True), (4, False)])
def test_mask_form_keeps_top_k_keys_by_layout(top_k, is_causal):
  q, k, v = ref.qkv(t=10)
  lq, lk = _layout(10, 10)
  mask = ref.key_padding(2, 10, first_valid=True)
  full = ref.full_mask(2, 4, 10, 10, mask=mask, is_causal=is_causal)
  with ref.x64():
    layout_logits = np.asarray(ref.attention_logits(lq, lk))
  kept = np.zeros_like(full)
  for index in np.ndindex(full.shape[:3]):
    allowed = np.flatnonzero(full[index])
    best = allowed[np.argsort(-layout_logits[index][allowed])[:top_k]]
    kept[index + (best,)] = True

  op_fn = lambda q, k, v: ops.get("skim_attention")(
      q, k, v, layout_query=lq, layout_key=lk, top_k=top_k, is_causal=is_causal,
      mask=jnp.asarray(mask))
  ref_fn = lambda q, k, v: jnp.einsum(
      "bnts,bsnd->btnd", ref.masked_softmax(ref.attention_logits(q, k), kept),
      ref.repeat_kv(v, 4))
  ref.assert_matches(op_fn, ref_fn, (q, k, v))


def test_layer_runs_and_trains_the_layout():
  """The "skim" form on a 3x3 grid: the layout tables and projections all get gradient."""
  op_checks.assert_layer_runs("skim_attention", dict(grid=(3, 3), form="skim", layout_dim=5),
                              dict(layout_y=(3, 5), layout_x=(3, 5), layout_wq=(5, 4, 5),
                                   layout_wk=(5, 2, 5)), is_causal=False)


def _bad_calls():
  q, k, v = ref.qkv(t=6)
  lq, lk = _layout(6, 6)
  op = ops.get("skim_attention")
  return [(lambda: op(q, k, v, layout_key=lk), "layout_query"),
          (lambda: op(q, k, v, layout_query=lq, layout_key=lk[:, :5]), "layout_key"),
          (lambda: op(q, k, v, layout_query=lq, layout_key=lk, form="read"), "form"),
          (lambda: op(q, k, v, layout_query=lq, layout_key=lk, top_k=0), "top_k"),
          (lambda: op(q, k, v, layout_query=lq, layout_key=lk, grid=(2, 2)), "grid"),
          (lambda: op(q, k, v, layout_query=lq, layout_key=lk, layout_dim=4), "layout_dim")]


@pytest.mark.parametrize("case", range(6))
def test_bad_arguments(case):
  op_checks.assert_bad_call_raises(_bad_calls, case)
