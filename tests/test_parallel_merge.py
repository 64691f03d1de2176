"""Sequence parallelism of the softmax-family ops (`big_attn.parallel.merge`) on simulated CPU
devices: sigmoid, cog, clipped softmax, gated and soft-capped softmax through the ring,
striped and all_gather strategies, forward and gradients (queries, keys, values, the gate)
against the float64 references of `tests/score_checks.py` on the whole sequence; the ops whose
block form maps the values and the output of softmax blocks, and those whose blocks read terms
of their global positions (urpe, mask_reweighted, neighborhood, kernelized_rpe), and those
whose blocks compute pairwise scores (gatv2, neural_attention), carry score moments
(normalized), map tokens at their global positions (gta_attention) or merge a Gumbel-max
sample (hard_attention), against the op on one device;
the layer and the LM reaching them by name; the up-front refusals.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers, ops, parallel
from big_attn.models import lm
from big_attn.parallel import mesh as mesh_lib
from tests import reference, score_checks
from tests.test_lm import SMALL, _init, _packed_batch

# Batch 2 over "data", 4 sequence shards of 5 tokens (not a multiple of the causal chunks of
# `blockwise.TRIANGLE_CHUNKS`), 4 query heads sharing 2 key/value heads.
B, SHARDS, LOCAL, N, K, D = 2, 4, 5, 4, 2, 8
S = SHARDS * LOCAL


def _segments():
  return np.sort(np.random.default_rng(3).integers(0, 3, size=(B, S)), axis=1).astype(np.int32)


# op -> (op arguments given the gate logits, float64 reference given mask and gate logits).
# Defaults that depend on the length (sigmoid's b = -log n, clipped softmax's γ = -α/n) are the
# references' whole-sequence ones.
CASES = {
    "sigmoid": (lambda g: {"logits_soft_cap": 3.0},
                lambda q, k, v, m, g: score_checks.ref_sigmoid(q, k, v, m, soft_cap=3.0)),
    "cog": (lambda g: {}, lambda q, k, v, m, g: score_checks.ref_cog(q, k, v, m)),
    "clipped_softmax": (lambda g: {},
                        lambda q, k, v, m, g: score_checks.ref_clipped(q, k, v, m)),
    "gated_attention": (lambda g: {"gate_logits": g},
                        lambda q, k, v, m, g: score_checks.ref_gated(q, k, v, m, gate_logits=g)),
    "softmax": (lambda g: {"logits_soft_cap": 2.0},
                lambda q, k, v, m, g: reference.softmax_attention(q, k, v, mask=m,
                                                                  soft_cap=2.0)),
}


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh([("data", 2), ("seq", SHARDS)])


# Each op causal in both schedules, ring and striped, in the default run (and all_gather and
# the non-causal case once); the rest of the product is marked `extended` (`-m extended`).
FAST = [(name, strategy, True) for name in CASES for strategy in ("ring", "striped")] + [
    ("sigmoid", "all_gather", True), ("softmax", "ring", False)]
MATRIX = [(name, strategy, is_causal) for name in CASES
          for strategy, is_causal in [("ring", True), ("striped", True), ("all_gather", True),
                                      ("ring", False)]]


@pytest.mark.parametrize("name,strategy,is_causal", FAST + [
    pytest.param(*case, marks=pytest.mark.extended) for case in MATRIX if case not in FAST])
def test_matches_reference(mesh, name, strategy, is_causal):
  op_args, ref = CASES[name]
  seg = _segments()
  q, k, v = reference.qkv(b=B, t=S, n=N, k=K, d=D, seed=len(name))
  gate = reference.normal(9, (B, S, N))
  m = reference.full_mask(B, N, S, S, is_causal=is_causal, segment_ids=seg)

  def op_fn(q, k, v, gate):
    return parallel.sequence_parallel_attention(
        q, k, v, mesh=mesh, strategy=strategy, is_causal=is_causal, segment_ids=seg, op=name,
        **op_args(gate))

  reference.assert_matches(op_fn, lambda q, k, v, gate: ref(q, k, v, m, gate), [q, k, v, gate])


# Ops whose block form is softmax blocks (of transformed queries and keys) with per-token value
# and output maps: op -> (static op arguments, the op's arrays as shapes, or as functions of
# a seeded normal sampler). Compared with the single-device op (its own tests compare it with
# float64 references) run in float64 on the whole sequence.
E, H, R, P = 3, 5, 2, 3
MAPPED = {
    "interpretable_mha": ({}, {}),
    "mixture_of_heads": ({"shared_heads": 1, "topk": 2},
                         {"router_logits": (B, S, N), "head_mix_logits": (B, S, 2)}),
    "single_head_attention": ({"partial_ratio": 0.5}, {}),
    "switchhead": ({"topk": 2}, {"value_experts": (B, S, K, E, D),
                                 "router_logits_v": (B, S, K, E),
                                 "router_logits_o": (B, S, N, E), "out_experts": (N, E, D, 6)}),
    "lean_decode": ({"block_size": 7}, {}),
    "gin_attention": ({}, {"gin_eps": (N,), "mlp_w1": (N, D, H), "mlp_b1": (N, H),
                           "mlp_w2": (N, H, D), "mlp_b2": (N, D)}),
    "relational_attention": ({}, {"rel_query": (B, S, R, P), "rel_key": (B, S, R, P),
                                  "rel_out": (N, R, D)}),
    "probabilistic_attention": ({}, {"sigma": lambda r: 1.5 + 0.2 * r((N,)),
                                     "log_prior": (B, S, K)}),
}
# Ops whose blocks read terms of the global query and key positions (`ops.PairTerms`): op ->
# (static op arguments, the op's arrays), as `MAPPED`.
POSITIONAL = {
    "urpe": ({}, {"rpe_multiplier": lambda r: 1.0 + 0.3 * r((N, 2 * S - 1)),
                  "rpe_bias": (N, 2 * S - 1)}),
    "mask_reweighted": ({}, {"gmm_amplitude": (N, 2), "gmm_sigma": lambda r: 2.0 + r((N, 2))}),
    "mask_reweighted_elm": ({"form": "elm"}, {"elm_mask": (N, S, S)}),
    "neighborhood": ({"kernel_size": 5, "dilation": 2}, {"rpb": (N, 9)}),
    "kernelized_rpe": ({}, {"rpe_bias": lambda r: 0.5 * r((N, 2 * S - 1))}),
}


def _sample(spec, seed):
  """A seeded standard-normal array of shape `spec`, or `spec(sampler)`."""
  sample = functools.partial(reference.normal, seed)
  return spec(sample) if callable(spec) else sample(spec)


def _assert_matches_op(mesh, op, strategy, is_causal, static, arrays, *, seed,
                       segment_ids=False, in_layer_order=False):
  """Output and gradients (queries, keys, values and the op's `arrays`, sampled by `_sample`)
  of op `op` sequence-parallel on packed segments with GQA equal those of the op on one device,
  given `is_causal` and the full mask (or, with `segment_ids`, the segment ids).
  `in_layer_order`: through `SeqParallel.attend_form` on inputs in the strategy's token order
  (striped once, as a model does), not `sequence_parallel_attention`."""
  seg = _segments()
  q, k, v = reference.qkv(b=B, t=S, n=N, k=K, d=D, seed=seed)
  extra = [_sample(spec, 20 + i) for i, spec in enumerate(arrays.values())]
  masking = {"segment_ids": seg} if segment_ids else {
      "mask": reference.full_mask(B, N, S, S, is_causal=is_causal, segment_ids=seg)}
  striped = strategy == "striped"
  order = (lambda a: parallel.stripe(a, SHARDS)) if striped else (lambda a: a)
  natural = (lambda a: parallel.unstripe(a, SHARDS)) if striped else (lambda a: a)

  def sp_fn(q, k, v, *extra):
    if in_layer_order:
      form = ops.spec(op).block_form(order(q), order(k), None, **static,
                                     **dict(zip(arrays, extra)))
      sp = parallel.SeqParallel(mesh, "seq", strategy)
      return natural(sp.attend_form(form, order(v), is_causal=is_causal,
                                    segment_ids=order(jnp.asarray(seg))))
    return parallel.sequence_parallel_attention(
        q, k, v, mesh=mesh, strategy=strategy, is_causal=is_causal, segment_ids=seg, op=op,
        **static, **dict(zip(arrays, extra)))

  def op_fn(q, k, v, *extra):
    return ops.get(op)(q, k, v, is_causal=is_causal, **masking, **static,
                       **dict(zip(arrays, extra)))

  reference.assert_matches(sp_fn, op_fn, [q, k, v, *extra])


# The default run: one op of each kind of map, ring and striped (values replaced, then an output
# map; the token's own value read in striped order; transformed queries and keys; values
# widened); the rest of the product is `extended`.
MAPPED_FAST = [("switchhead", "ring"), ("gin_attention", "striped"),
               ("probabilistic_attention", "ring"), ("relational_attention", "striped")]


@pytest.mark.parametrize("name,strategy", MAPPED_FAST + [
    pytest.param(name, strategy, marks=pytest.mark.extended) for name in MAPPED
    for strategy in ("ring", "striped") if (name, strategy) not in MAPPED_FAST])
def test_mapped_softmax_forms_match_op(mesh, name, strategy):
  """Causal, packed segments, GQA: output and gradients (queries, keys, values and the op's
  arrays) of the sequence-parallel op equal those of the op on one device."""
  _assert_matches_op(mesh, name, strategy, True, *MAPPED[name], seed=len(name))


# The default run: URPE (bias and multiplier) on the ring; the rest of the product is
# `extended`.
POSITIONAL_FAST = [("urpe", "ring")]


@pytest.mark.parametrize("name,strategy", POSITIONAL_FAST + [
    pytest.param(name, strategy, marks=pytest.mark.extended) for name in POSITIONAL
    for strategy in ("ring", "striped", "all_gather") if (name, strategy) not in POSITIONAL_FAST])
def test_positional_forms_match_op(mesh, name, strategy):
  """Causal, packed segments, GQA: output and gradients (queries, keys, values and the op's
  arrays) of the sequence-parallel op, whose blocks read their global positions, equal those
  of the op on one device."""
  op = name.removesuffix("_elm")
  # kernelized_rpe takes key-padding masks only: packed segments as segment ids.
  _assert_matches_op(mesh, op, strategy, True, *POSITIONAL[name], seed=len(name),
                     segment_ids=op == "kernelized_rpe")


# Ops whose blocks compute pairwise scores of their queries and keys (`ops.PairScores`), carry
# the sums of the "moments" rule, or take per-token maps at their global positions
# (`BlockForm.at_positions`): op -> (static op arguments, the op's arrays), as `MAPPED`.
HOOKED = {
    "gatv2": ({}, {"attn_vec": (N, D)}),
    "gatv2_tanh": ({"nonlinearity": "tanh"}, {"attn_vec": (N, D)}),
    "neural_attention": ({}, {"w1": (N, 2 * D, H), "b1": (N, H), "w2": (N, H)}),
    "normalized": ({}, {"gain": lambda r: 1.0 + 0.3 * r((N,)), "shift": (N,)}),
    "normalized_scale": ({"normalization": "scale"}, {"gain": (N,), "shift": (N,)}),
    "gta_attention": ({}, {}),
    "hard_attention": ({"rng": jax.random.key(5)}, {}),
    "hard_attention_none": ({"rng": jax.random.key(6), "baseline": "none"}, {}),
    "hard_attention_argmax": ({"eval_mode": "argmax"}, {}),
}
# The default run: one case per op, in the strategy's token order as a model runs it (GTA
# striped: its rotations read the tokens' positions in that order); the rest is `extended`.
HOOKED_FAST = [("gatv2", "ring"), ("neural_attention", "all_gather"), ("normalized", "ring"),
               ("gta_attention", "striped"), ("hard_attention", "striped")]


@pytest.mark.parametrize("name,strategy", HOOKED_FAST + [
    pytest.param(name, strategy, marks=pytest.mark.extended) for name in HOOKED
    for strategy in ("ring", "striped", "all_gather") if (name, strategy) not in HOOKED_FAST])
def test_hooked_forms_match_op(mesh, name, strategy):
  """Causal, packed segments, GQA, inputs in the strategy's token order: output and gradients
  (queries, keys, values and the op's arrays) of the sequence-parallel op equal those of the
  op on one device."""
  op = name.split("_tanh")[0].split("_scale")[0].split("_none")[0].split("_argmax")[0]
  _assert_matches_op(mesh, op, strategy, True, *HOOKED[name], seed=len(name),
                     in_layer_order=True)


def test_gta_cameras_striped_match_op(mesh):
  """GTA with per-token SE(3) cameras, tokens and cameras in the striped order as a model runs
  it: output and gradients (cameras included) equal the op's on one device."""
  seg = _segments()
  q, k, v = reference.qkv(b=B, t=S, n=N, k=K, d=D, seed=13)
  cameras = jnp.asarray(reference.rigid_transforms(14, (B, S)), jnp.float32)
  order = functools.partial(parallel.stripe, num_shards=SHARDS)
  natural = functools.partial(parallel.unstripe, num_shards=SHARDS)

  def sp_fn(q, k, v, cameras):
    form = ops.spec("gta_attention").block_form(order(q), order(k), None,
                                                cameras=order(cameras))
    sp = parallel.SeqParallel(mesh, "seq", "striped")
    return natural(sp.attend_form(form, order(v), is_causal=True,
                                  segment_ids=order(jnp.asarray(seg))))

  def op_fn(q, k, v, cameras):
    return ops.get("gta_attention")(q, k, v, is_causal=True, segment_ids=seg, cameras=cameras)

  reference.assert_matches(sp_fn, op_fn, [q, k, v, cameras])


@pytest.mark.extended  # the default hooked case compares the sampled values
def test_hard_attention_samples_the_same_keys(mesh):
  """Gumbel-max over key blocks with noise keyed by the pairs' global positions: the ring
  chooses bit-exactly the single-device op's keys (each key's value is its own index)."""
  q, k, _ = reference.qkv(b=B, t=S, n=N, k=K, d=D, seed=7)
  index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.float32)[None, :, None, None], (B, S, K, 1))
  seg, rng = _segments(), jax.random.key(8)
  got = parallel.sequence_parallel_attention(q, k, index, mesh=mesh, strategy="ring",
                                             segment_ids=seg, op="hard_attention", rng=rng)
  want = jax.jit(functools.partial(ops.get("hard_attention"), is_causal=True, segment_ids=seg,
                                   rng=rng))(q, k, index)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert len(np.unique(np.asarray(want))) > S // 2  # many different keys chosen


# Non-causal position terms: NATTEN's shifted windows (1-D dilated, and on a 4×5 grid) and the
# GMM distance on a grid.
GRID = (4, 5)
POSITIONAL_NON_CAUSAL = {
    "neighborhood": ({"kernel_size": 3, "dilation": 3}, {"rpb": (N, 5)}),
    "neighborhood_grid": ({"kernel_size": 3, "dilation": (1, 1), "grid": GRID},
                          {"rpb": (N, 5, 5)}),
    "mask_reweighted_grid": ({"grid": GRID}, {"gmm_amplitude": (N, 2),
                                              "gmm_sigma": lambda r: 1.0 + r((N, 2))}),
}


@pytest.mark.extended
@pytest.mark.parametrize("name", POSITIONAL_NON_CAUSAL)
@pytest.mark.parametrize("strategy", ["ring", "striped"])
def test_positional_forms_non_causal(mesh, name, strategy):
  """Non-causal, packed segments, GQA: as `test_positional_forms_match_op`."""
  _assert_matches_op(mesh, name.removesuffix("_grid"), strategy, False,
                     *POSITIONAL_NON_CAUSAL[name], seed=len(name))


def _layer_grads(module, params, x, seg, unstripe=lambda a: a):
  def loss(p):
    out = unstripe(module.apply({"params": p}, x, is_causal=True, segment_ids=seg))
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out
  return jax.jit(jax.grad(loss, has_aux=True))(params)


def test_attention_layer_by_name(mesh):
  """`Attention(op="gated_attention", seq_parallel=...)` (striped: inputs striped once, the
  output unstriped) equals the plain layer, the gradient of the gate's weights included."""
  plain = layers.Attention(num_heads=N, num_kv_heads=K, op="gated_attention")
  sp = parallel.SeqParallel(mesh, "seq", "striped")
  x, seg = reference.normal(4, (B, S, 16)), jnp.asarray(_segments())
  params = nn.unbox(plain.init(jax.random.key(0), x)["params"])
  grads, out = _layer_grads(plain, params, x, seg)
  stripe = lambda a: parallel.stripe(a, SHARDS)  # pylint: disable=unnecessary-lambda-assignment
  sp_grads, sp_out = _layer_grads(plain.clone(seq_parallel=sp), params, stripe(x), stripe(seg),
                                  lambda a: parallel.unstripe(a, SHARDS))
  np.testing.assert_allclose(sp_out, out, rtol=1e-4, atol=1e-5)
  assert set(grads["op_params"]) == {"gate_kernel", "gate_bias"}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    got = sp_grads
    for key in path:
      got = got[key.key]
    np.testing.assert_allclose(got, g, rtol=2e-4, atol=2e-5, err_msg=str(path))


@pytest.mark.slow
def test_lm_by_name_equals_single_device():
  """The LM with `attention="cog"`, striped over 4 sequence shards: loss and gradients."""
  model = lm.Model(**SMALL, attention="cog", tie_embeddings=False)
  batch = _packed_batch(4, 16)
  params = _init(model, 16)
  loss_grad = lambda m: jax.jit(jax.value_and_grad(  # pylint: disable=g-long-lambda
      lambda p: lm.loss_fn(m, p, batch, jax.random.key(0))))(params)
  loss, grads = loss_grad(model)
  sp_loss, sp_grads = loss_grad(model.clone(mesh=mesh_lib.make_mesh([("data", 2), ("seq", 4)]),
                                            seq_strategy="striped"))
  np.testing.assert_allclose(sp_loss, loss, rtol=1e-5)
  for g, sp_g in zip(jax.tree.leaves(grads), jax.tree.leaves(sp_grads)):
    np.testing.assert_allclose(sp_g, g, rtol=2e-4, atol=2e-6)


def test_declarations_and_refusals(mesh):
  with_form = {n for n in ops.names() if ops.spec(n).block_form is not None}
  assert with_form == {"softmax", "ngpt", "sigmoid", "cog", "clipped_softmax",
                       "gated_attention", *MAPPED, "urpe", "mask_reweighted", "neighborhood",
                       "kernelized_rpe", "gatv2", "neural_attention", "normalized",
                       "gta_attention", "hard_attention"}
  assert ops.sequence_parallel_form("lightning") == "state"
  q, k, v = reference.qkv(b=B, t=S, n=N, k=K, d=D)
  call = lambda op, **kw: parallel.sequence_parallel_attention(  # pylint: disable=g-long-lambda
      q, k, v, mesh=mesh, op=op, **kw)
  # Every causal op without a form states its own reason; the others the general one.
  assert all(ops.spec(n).block_refusal for n in ops.names()
             if ops.spec(n).causal and ops.sequence_parallel_form(n) is None)
  with pytest.raises(ValueError, match="'cascaded_group_attention' runs sequence-parallel by "
                     "running its heads in turn, each over the ring: call SeqParallel.cascade"):
    call("cascaded_group_attention")
  with pytest.raises(ValueError, match="learned pairwise scores takes no local_window_size"):
    call("gatv2", attn_vec=jnp.ones((N, D)), local_window_size=3)
  with pytest.raises(ValueError, match="normalized attention takes no local_window_size"):
    call("normalized", local_window_size=3)
  with pytest.raises(ValueError, match="'reversed_attention' has no sequence-parallel form: "
                     "splitting the keys into blocks needs every weight to be a function of one"):
    call("reversed_attention")
  for bad in (dict(block_refusal=3), dict(block_refusal="why", causal=False)):
    with pytest.raises(TypeError, match="block_refusal must be a string, for a causal op"):
      ops.register("unregistered", **bad)
  with pytest.raises(ValueError, match="em_steps=1 adapts every key to all queries"):
    call("probabilistic_attention", em_steps=1)
  with pytest.raises(ValueError, match="kv_length must be None"):
    call("lean_decode", kv_length=3)
  with pytest.raises(ValueError, match="router_logits"):
    call("mixture_of_heads")
  with pytest.raises(ValueError, match="'window' has no sequence-parallel form"):
    layers.Attention(num_heads=N, op="window",
                     seq_parallel=parallel.SeqParallel(mesh)).init(
                         jax.random.key(0), jnp.ones((B, S, 16)))
  with pytest.raises(ValueError, match="'lightning' runs sequence-parallel by passing its "
                     "recurrent state"):
    call("lightning")
  with pytest.raises(TypeError, match="logit_bias as a Python number"):
    call("sigmoid", logit_bias=jnp.float32(-1.0))
  with pytest.raises(ValueError, match="gate_logits of shape"):
    call("gated_attention")
  with pytest.raises(ValueError, match="gamma must be <= 0"):
    call("clipped_softmax", gamma=0.5)
  with pytest.raises(ValueError, match="logits_soft_cap"):
    call("softmax", logits_soft_cap=-1.0)
  with pytest.raises(ValueError, match="rule 'cog' takes parameters"):
    parallel.make_rule("cog", {"soft_cap": 1.0})
  with pytest.raises(ValueError, match="merge must be one of"):
    parallel.make_rule("relu")
  terms = ops.PairTerms(lambda arrays, q_pos, k_pos, *, is_causal: (None, None, None))
  with pytest.raises(ValueError, match=r"position terms \(pair\) need a rule of"):
    parallel.make_rule("cog", pair=terms)
  with pytest.raises(ValueError, match=r"position terms \(pair\) need a rule of"):
    parallel.make_rule("softmax", {"soft_cap": 2.0}, pair=terms)
  scores = ops.PairScores(lambda arrays, q, k: None)
  with pytest.raises(ValueError, match=r"pairwise scores \(score\) need a rule of"):
    parallel.make_rule("moments", score=scores)
  with pytest.raises(NotImplementedError, match="'neighborhood' has no causal form on a 2-D"):
    call("neighborhood", kernel_size=3, grid=(4, 5), is_causal=True)
  with pytest.raises(ValueError, match=r"rpe_multiplier \[num_heads, q_len \+ kv_len − 1\]"):
    call("urpe")
