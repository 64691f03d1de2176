"""big_attn.ops.spatial: extra tokens around 2-D ops, per-stage sizes, refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from big_attn.ops import spatial
from tests import reference as ref


def _extra_tokens_reference(q, k, v, n, mask):
  """Plain JAX (call under float64): the rule as one softmax per patch query over the extra
  keys and n_p copies of a key of logit 0 carrying the op's output (here: masked softmax over
  the patches)."""
  k, v = ref.repeat_kv(k, q.shape[2]), ref.repeat_kv(v, q.shape[2])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
  logits = jnp.where(mask, logits, -jnp.inf)
  out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)  # extra queries: all keys
  patch_out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits[:, :, n:, n:], -1), v[:, n:])
  n_p = k.shape[1] - n
  entries = jnp.concatenate([logits[:, :, n:, :n], jnp.zeros(logits[:, :, n:, :n_p].shape)], -1)
  w = jax.nn.softmax(entries, -1)
  merged = (jnp.einsum("bhqk,bkhd->bqhd", w[..., :n], v[:, :n])
            + w[..., n:].sum(-1).transpose(0, 2, 1)[..., None] * patch_out)
  return jnp.concatenate([out[:, :n], merged], axis=1)


@pytest.mark.parametrize("extra,kv_heads", [(1, 4), (3, 1)])
def test_extra_tokens_rule_matches_float64_reference(extra, kv_heads):
  q = ref.normal(0, (2, extra + 6, 4, 8))
  k, v = ref.normal(1, (2, extra + 6, kv_heads, 8)), ref.normal(2, (2, extra + 6, kv_heads, 8))
  mask = np.asarray(ref.normal(3, (2, 1, extra + 6, extra + 6))) > -1.0
  mask[..., 0] = True  # every row sees a key
  softmax = ops.get("softmax")
  attend = lambda q, k, v: spatial.attend(softmax, q, k, v, mask=jnp.asarray(mask),  # pylint: disable=unnecessary-lambda-assignment
                                          extra_tokens=extra)
  reference = lambda q, k, v: _extra_tokens_reference(q, k, v, extra, mask)  # pylint: disable=unnecessary-lambda-assignment
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # pylint: disable=unnecessary-lambda-assignment
  out_and_grads = lambda fn: jax.jit(lambda *a: (fn(*a), jax.grad(loss(fn), (0, 1, 2))(*a)))  # pylint: disable=unnecessary-lambda-assignment
  out, grads = out_and_grads(attend)(q, k, v)
  with ref.x64():
    out64, grads64 = out_and_grads(reference)(*ref.f64(q, k, v))
  np.testing.assert_allclose(out, out64, rtol=2e-5, atol=2e-6)
  for g, g64 in zip(grads, grads64):
    np.testing.assert_allclose(g, g64, rtol=1e-4, atol=1e-5)


def test_extra_tokens_with_a_2d_op_and_zero_logits_are_softmax_over_all_tokens():
  # Zero queries: every logit is 0, so the rule is plain (uniform) softmax over all tokens,
  # whatever 2-D op the patches use.
  k, v = ref.normal(1, (1, 17, 2, 4)), ref.normal(2, (1, 17, 2, 4))
  q = jnp.zeros((1, 17, 2, 4))
  out = jax.jit(lambda q, k, v: spatial.attend(ops.get("window"), q, k, v, extra_tokens=1,
                                               grid=(4, 4), window_size=4))(q, k, v)
  np.testing.assert_allclose(out, jnp.broadcast_to(v.mean(1, keepdims=True), out.shape),
                             rtol=1e-5, atol=1e-6)


def test_extra_tokens_bad_arguments():
  x = ref.normal(0, (1, 5, 2, 4))
  softmax = ops.get("softmax")
  with pytest.raises(ValueError, match="extra_tokens must be an int >= 0"):
    spatial.attend(softmax, x, x, x, extra_tokens=-1)
  with pytest.raises(ValueError, match="leaves no patch tokens"):
    spatial.attend(softmax, x, x, x, extra_tokens=5)
  with pytest.raises(ValueError, match="is_causal"):
    spatial.attend(softmax, x, x, x, extra_tokens=1, is_causal=True)


def test_stage_sizes_clip_to_the_map():
  assert spatial.stage_sizes("window", {}, (4, 6))["window_size"] == (4, 6)
  assert spatial.stage_sizes("window", {"window_size": 4}, (14, 6))["window_size"] == (2, 3)
  assert spatial.stage_sizes("grid", {"grid_size": 7}, (14, 14))["grid_size"] == (7, 7)
  args = spatial.stage_sizes("neighborhood", {"dilation": 3}, (4, 9))
  assert args["kernel_size"] == (3, 7) and args["dilation"] == (1, 1)
  args = spatial.stage_sizes("bilevel_routing", {"topk": 16}, (4, 4))
  assert args["num_regions"] == (4, 4) and args["topk"] == 16
  assert spatial.stage_sizes("bilevel_routing", {"topk": 16, "num_regions": 2},
                             (4, 4))["topk"] == 4
  assert spatial.stage_sizes("quadtree", {"levels": 4}, (4, 12))["levels"] == 3
  assert spatial.stage_sizes("spatial_reduction", {"reduction": 4}, (6, 8))["reduction"] == (
      3, 4)
  assert spatial.op_args("softmax", None, (4, 4), 1) is None
  assert spatial.op_args("gpsa", {"gating": None}, (4, 4), 2) == dict(
      gating=None, grid=(4, 4), extra_tokens=2)


def test_grid_lookup_and_refusals():
  assert spatial.GRID_ONLY_OPS <= {n for n in ops.names() if ops.spec(n).grid}
  assert spatial.needs_grid("window") and not spatial.needs_grid("neighborhood")
  assert spatial.takes_grid("neighborhood") and not spatial.takes_grid("softmax")
  with pytest.raises(spatial.OpRefused, match="LM: attention op 'gpsa' works on a 2-D grid"):
    spatial.check_op("gpsa", "LM", causal=True, grid=False)
  with pytest.raises(spatial.OpRefused, match="LM: attention op 'agent' has no causal form"):
    spatial.check_op("agent", "LM", causal=True, grid=False)
  with pytest.raises(spatial.OpRefused, match="'window' needs queries and keys on one"):
    spatial.check_op("window", "CvT", same_grid=False)
  with pytest.raises(spatial.OpRefused, match="'combiner' attends within one sequence"):
    spatial.check_op("combiner", "CvT", same_grid=False)
  spatial.check_op("spatial_reduction", "CvT", same_grid=False)
  spatial.check_op("combiner", "MaxViT")
  spatial.check_op("neighborhood", "LM", causal=True, grid=False)
  with pytest.raises(KeyError, match="no_such_op"):
    spatial.check_op("no_such_op", "LM")
