"""The LM's nGPT and MoEUT options: unit-norm hidden states and weights (nGPT) through the
training loop, σ-MoE and SwitchHead against references (MoEUT), shared layers, the router
entropy loss, cached generation, sequence parallelism, tiny runs through `big_attn.main`,
full-size parameter counts (`jax.eval_shape`) and the configs."""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_attn import main as main_lib
from big_attn import ops
from big_attn.data import text
from big_attn.models import lm
from big_attn.parallel import mesh as mesh_lib
from big_attn.train import config_lib
from big_attn.train import step as step_lib
from tests import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = text.VOCAB_SIZE
NGPT = dict(vocab_size=V, width=32, depth=2, num_heads=4, mlp_dim=48, block="ngpt",
            attention="ngpt", tie_embeddings=False)
MOE = dict(num_experts=8, expert_dim=8, topk=2, att_experts=3, att_topk=2)
MOEUT = dict(vocab_size=V, width=32, depth=4, num_heads=2, head_dim=8, block="moeut",
             attention="switchhead", moe=MOE, layer_group_size=2, tie_embeddings=False)


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tokens(b=2, t=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, t)), jnp.int32)


def _batch(b=2, t=12):
  tokens = _tokens(b, t + 1)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
          "segment_ids": jnp.ones((b, t), jnp.int32), "weights": jnp.ones((b, t))}


def _embed_axis_norms(boxed_params):
  """Norms of every matrix with an "embed" axis (rank >= 2 besides `layers`) along it, read from
  the logical axis names (independently of `normalize_params`'s path rules)."""
  norms = []
  for leaf in jax.tree.leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    names = leaf.names
    if "embed" in names and len(names) - ("layers" in names) >= 2:
      norms.append(np.linalg.norm(np.asarray(leaf.value), axis=names.index("embed")))
  return norms


def _reboxed(boxed, values):
  return jax.tree.map(lambda b, v: b.replace_boxed(v), boxed, values,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


# ------------------------------------------------------------------------------------- nGPT
def _init(model, tokens):
  return jax.jit(lambda: model.post_update(nn.unbox(model.init(jax.random.key(0),
                                                               tokens)["params"])))()


@functools.cache
def _moeut_params():
  """`MOEUT`'s parameters, compiled and initialised once: any depth of it has the same
  `layer_group_size` distinct layers, and no parameter depends on the sequence length."""
  return _init(lm.Model(**MOEUT), _tokens())


def _params(model, tokens):
  return _moeut_params() if model.block == "moeut" else _init(model, tokens)


def test_normalize_params_projects_matrices_and_keeps_scalings():
  """Scanned layers (a leading `layers` axis), tied embeddings, GQA (s_k)."""
  model = lm.Model(**dict(NGPT, scan_layers=True, tie_embeddings=True, num_kv_heads=2))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), _tokens()))["params"]
  values = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), _tokens())["params"]))()
  before = _embed_axis_norms(_reboxed(boxed, values))
  # q, k, v, out, wi_gate, wi_up, wo (stacked over the layers) and the tied embedding.
  assert len(before) == 7 + 1
  assert not all(np.allclose(n, 1.0) for n in before)
  normalized = lm.normalize_params(values)
  for norms in _embed_axis_norms(_reboxed(boxed, normalized)):
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  for path, x in jax.tree_util.tree_leaves_with_path(values):
    if x.ndim == 1 or "op_params" in str(path):   # α, s_qk, s_u, s_v, s_z are not projected
      got = normalized
      for key in path:
        got = got[key.key]
      np.testing.assert_array_equal(got, x)


def test_ngpt_train_step_keeps_weights_and_hidden_states_unit_norm():
  """Init and one update through `step.make_init_fn` / `make_train_step` (the loop's own
  functions): the model's `post_update` projects the weights after each; every block's output
  and the embedded tokens lie on the unit sphere."""
  model = lm.Model(**NGPT)
  tx = optax.adam(1e-1)
  init = step_lib.make_init_fn(model, tx, (12,), jnp.int32)
  state = jax.jit(init)(jax.random.key(0))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), _tokens()))["params"]
  for norms in _embed_axis_norms(_reboxed(boxed, state["params"])):
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  tokens = _tokens()
  _, captured = jax.jit(lambda p: model.apply({"params": p}, tokens,
                                              capture_intermediates=True))(state["params"])
  for i in range(2):
    hidden = captured["intermediates"][f"layers_{i}"]["__call__"][0][0]
    np.testing.assert_allclose(np.linalg.norm(hidden, axis=-1), 1.0, rtol=1e-5)
  embedded = state["params"]["embedding"]["embedding"][tokens]
  np.testing.assert_allclose(np.linalg.norm(embedded, axis=-1), 1.0, rtol=1e-5)
  step = jax.jit(step_lib.make_train_step(model, tx, lambda s: 1e-1, loss_fn=lm.loss_fn))
  new, metrics = step(state, _batch(), jax.random.key(1))
  assert np.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
  assert abs(float(metrics["train/loss"]) - math.log(V)) < 1.0
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state["params"],
                       new["params"])
  assert all(m > 0 for m in jax.tree.leaves(moved))
  for norms in _embed_axis_norms(_reboxed(boxed, new["params"])):
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  assert step_lib.post_update_fn(lm.Model(vocab_size=V, variant="tiny"))(moved) is moved
  assert step_lib.post_update_fn(nn.Dense(1))(moved) is moved   # no post_update: identity


@pytest.mark.parametrize("kwargs,strategy", [(dict(NGPT, num_kv_heads=2, depth=1), "striped"),
                                             (dict(MOEUT, depth=2), "ring")],
                         ids=["ngpt", "moeut"])
def test_sequence_parallel_equals_single_device(kwargs, strategy):
  """Loss and gradients (nGPT; the loss only for MoEUT, to keep the test short)."""
  model = lm.Model(**kwargs)
  params = _params(model, _tokens(t=16))
  batch = _batch(t=16)
  loss_fn = lambda m, p: lm.loss_fn(m, p, batch, jax.random.key(0))  # pylint: disable=g-long-lambda
  sp_model = model.clone(mesh=mesh_lib.make_mesh([("data", 2), ("seq", 4)]),
                         seq_strategy=strategy)
  if model.block == "moeut":
    np.testing.assert_allclose(jax.jit(functools.partial(loss_fn, sp_model))(params),
                               jax.jit(functools.partial(loss_fn, model))(params), rtol=1e-5)
    return
  loss, grads = jax.jit(jax.value_and_grad(functools.partial(loss_fn, model)))(params)
  sp_loss, sp_grads = jax.jit(jax.value_and_grad(functools.partial(loss_fn, sp_model)))(params)
  np.testing.assert_allclose(sp_loss, loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), sp_grads,
               grads)


@pytest.mark.parametrize("kwargs", [dict(NGPT, num_kv_heads=2, scan_layers=True), MOEUT],
                         ids=["ngpt", "moeut"])
def test_generate_with_cache_equals_full_forward(kwargs):
  model = lm.Model(**kwargs)
  params = _params(model, _tokens())
  prompt = _tokens(2, 4, seed=3)
  tokens, logits = lm.generate(model, params, prompt, 5, temperature=0.0, return_logits=True)
  full = jax.jit(lambda t: model.apply({"params": params}, t))(tokens)
  np.testing.assert_allclose(logits, full[:, 3:-1], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(tokens[:, 4:], jnp.argmax(full[:, 3:-1], axis=-1))


# ------------------------------------------------------------------------------------ MoEUT
def _sigma_moe_ref(x, logits, w_in, w_out, topk):
  """Σ_{e ∈ topk σ(s)} σ(s_e) ReLU(x W_1^e) W_2^e, every expert computed densely (float64)."""
  x, logits, w_in, w_out = ref.f64(x, logits, w_in, w_out)
  gate = jax.nn.sigmoid(logits)
  kth = jnp.sort(logits, axis=-1)[..., -topk][..., None]
  gate = jnp.where(logits >= kth, gate, 0.0)
  hidden = jax.nn.relu(jnp.einsum("...d,edh->...eh", x, w_in))
  return jnp.einsum("...e,...eh,ehd->...d", gate, hidden, w_out)


def test_sigma_moe_matches_dense_reference_of_selected_experts():
  x = ref.normal(0, (2, 5, 6))
  logits = ref.normal(1, (2, 5, 7))
  w_in, w_out = ref.normal(2, (7, 6, 4), std=0.5), ref.normal(3, (7, 4, 3), std=0.5)
  ref.assert_matches(functools.partial(lm.sigma_moe, topk=3),
                     functools.partial(_sigma_moe_ref, topk=3), (x, logits, w_in, w_out))
  with pytest.raises(ValueError, match="topk"):
    lm.sigma_moe(x, logits, w_in, w_out, topk=8)
  with pytest.raises(ValueError, match="router_logits"):
    lm.sigma_moe(x, logits[..., :3], w_in, w_out, topk=2)


def test_switchhead_attention_equals_the_switchhead_op():
  """MoEUT's attention module (values mixed before attention) equals the registered
  `switchhead` op given the same weights (positions 0: RoPE is the identity)."""
  layer = lm.SwitchHeadAttention(num_heads=2, head_dim=4, num_experts=3, topk=2)
  x_norm, x = ref.normal(0, (2, 6, 8)), ref.normal(1, (2, 6, 8))
  positions = jnp.zeros((2, 6), jnp.int32)
  params = nn.unbox(jax.jit(lambda: layer.init(jax.random.key(0), x_norm, x, positions,
                                               None))())["params"]
  got, (logits_v, logits_o) = jax.jit(lambda p: layer.apply({"params": p}, x_norm, x,
                                                            positions, None))(params)
  q = jnp.einsum("btd,dhk->bthk", x_norm, params["query"])
  k = jnp.einsum("btd,dhk->bthk", x_norm, params["key"])
  want = ops.get("switchhead")(
      q, k, k, is_causal=True, topk=2, scale=0.5,
      value_experts=jnp.einsum("btd,dhek->bthek", x, params["value_experts"]),
      router_logits_v=logits_v, router_logits_o=logits_o, out_experts=params["out_experts"])
  np.testing.assert_allclose(got, want.sum(axis=2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits_o, jnp.einsum("btd,dhe->bthe", x_norm, params["router_o"]),
                             rtol=1e-6)


def test_layer_groups_share_parameters():
  counts = {g: lm.count_params(lm.Model(**dict(MOEUT, layer_group_size=g))) for g in (1, 2, 4)}
  outside = 2 * V * 32 + V + 2 * 32                     # embeddings, output bias, final norm
  per_layer = counts[1] - outside
  assert counts[2] - outside == 2 * per_layer and counts[4] - outside == 4 * per_layer
  assert lm.count_params(lm.Model(**dict(MOEUT, layer_group_size=None))) == counts[4]
  shapes = jax.eval_shape(lambda: lm.Model(**MOEUT).init(jax.random.key(0), _tokens()))
  assert sorted(shapes["params"]["layers"]) == ["layers_0", "layers_1"]


def test_router_entropy_loss_is_minus_the_entropy_of_the_mean():
  moe = dict(lm.MOE_DEFAULTS, entropy_reg=0.5, att_entropy_reg=0.25)
  uniform = {"ffn": jnp.full((3, 2, 4), 0.25), "att_v": jnp.full((3, 2, 2, 4), 0.25),
             "att_o": jnp.full((3, 2, 2, 4), 0.25)}
  np.testing.assert_allclose(lm.router_entropy_loss([uniform, uniform], moe),
                             2 * (0.5 + 2 * 0.25) * -math.log(4), rtol=1e-6)
  # Repeats that each pick one expert average to uniform: maximal entropy, minimal loss.
  onehot = jnp.eye(4)[:, None, :].repeat(2, axis=1)       # [repeats=4, batch=2, E=4]
  peaked = dict(uniform, ffn=onehot)
  np.testing.assert_allclose(lm.router_entropy_loss([peaked], moe),
                             lm.router_entropy_loss([uniform], moe), rtol=1e-6)


def test_moeut_train_step_adds_the_router_loss_and_moves_every_weight():
  model = lm.Model(**MOEUT)
  tx = optax.adam(1e-2)
  state = jax.jit(step_lib.make_init_fn(model, tx, (12,), jnp.int32))(jax.random.key(0))
  batch = _batch()

  def ce_and_router_loss(params):
    logits, sown = model.apply({"params": params}, batch["inputs"], mutable=["losses"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    return ce, sown["losses"]["router_entropy"][0]

  ce, router = jax.jit(ce_and_router_loss)(state["params"])
  step = jax.jit(step_lib.make_train_step(model, tx, lambda s: 1e-2, loss_fn=lm.loss_fn))
  new, metrics = step(state, batch, jax.random.key(1))
  assert np.isfinite(metrics["train/loss"])
  np.testing.assert_allclose(metrics["train/loss"], ce + router, rtol=1e-5)
  # −H ≥ −log E per router and distinct layer (2 layers; FF E = 8, attention E = 3).
  assert -2 * (0.01 * math.log(8) + 2 * 0.001 * math.log(3)) - 1e-6 <= router < 0
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state["params"],
                       new["params"])
  assert all(m > 0 for m in jax.tree.leaves(moved)), moved


@pytest.mark.parametrize("kwargs,match", [
    (dict(MOEUT, attention="softmax"), "attention='switchhead'"),
    (dict(NGPT, decode=True, cache_len=0), "cache_len >= 1"),
    (dict(MOEUT, moe=dict(MOE, experts=3)), "unknown moe keys"),
    (dict(MOEUT, moe=dict(MOE, topk=9)), "topk must not exceed"),
    (dict(MOEUT, moe=dict(MOE, att_experts=None)), "att_experts"),
    (dict(MOEUT, layer_group_size=3), "divisor of depth"),
    (dict(MOEUT, num_kv_heads=1), "one key/value head"),
    (dict(NGPT, qk_norm=True), "qk_norm=False"),
    (dict(NGPT, block="post_norm"), "block must be one of"),
])
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lm.count_params(lm.Model(**kwargs))


# ---------------------------------------------------------------------- configs and main runs
@pytest.mark.slow
@pytest.mark.parametrize("name", ["lm_ngpt_bytes", "lm_moeut_bytes"])
def test_tiny_config_trains_through_main(name, tmp_path):
  config = _config_module(name).get_config("runlocal,seq_len=32")
  if name == "lm_ngpt_bytes":
    config.model.variant = None
    config.model.update(width=32, depth=2, num_heads=4, mlp_dim=64)
  else:
    config.model.update(width=32, depth=4, head_dim=8,
                        moe=dict(num_experts=8, expert_dim=8, topk=2, att_experts=3))
  config.input.batch_size = 8
  config.evals = {}   # the lm evaluator's path (token_losses) is tested above
  config = ml_collections.ConfigDict(config.to_dict())
  assert main_lib.train_and_evaluate(config, str(tmp_path))["step"] == 10
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    metrics = [json.loads(line) for line in f]
  losses = [m["train/loss"] for m in metrics if "train/loss" in m]
  assert len(losses) == 2 and all(np.isfinite(losses)) and losses[-1] < losses[0]


def _paper_model(name, variant):
  module = _config_module(name)
  kwargs = module.get_config(f"variant={variant}").model.to_dict()
  kwargs.update(dtype=jnp.float32, param_dtype=jnp.float32)
  return lm.Model(vocab_size=module.PAPER_VOCAB_SIZE, **kwargs), module.PAPER_VOCAB_SIZE


@pytest.mark.parametrize("variant", ["0.5B", "1B"])
def test_ngpt_full_size_parameter_count(variant):
  """nGPT Section 3: "models containing 0.5B and 1B parameters, including the embeddings";
  Appendix: 0.5B = 24 layers, 16 heads, d_model 1024; 1B = 36 layers, 20 heads, d_model 1280;
  LLaMA-2 vocabulary of 32,000. The paper gives only the rounded sizes: the count must equal
  the architecture's (16·d² per layer + α_A, α_M, s_qk, s_u, s_ν; untied embeddings and s_z);
  it is 468.5M (0.5B) and 1.026B (1B)."""
  model, vocab = _paper_model("ngpt_1b", variant)
  d, layers = model.width, model.depth
  want = layers * (16 * d * d + 3 * d + 8 * d) + 2 * vocab * d + vocab
  assert lm.count_params(model) == want
  assert abs(want / {"0.5B": 0.5e9, "1B": 1e9}[variant] - 1) < 0.07


@pytest.mark.parametrize("variant,paper", [("244M", 244e6), ("126M", 126e6), ("44M", 44e6),
                                           ("318M", 318e6)])
def test_moeut_full_size_parameter_count(variant, paper):
  """MoEUT (Csordás et al. 2024), its models' hyper-parameters (the authors' profiles.py)
  with the 8,000-token vocabulary: the counts are within 2% of the model names."""
  model, vocab = _paper_model("moeut_244m", variant)
  d, h, hd, moe = model.width, model.num_heads, model.head_dim, model.moe
  att = 2 * d * h * hd + 2 * h * moe["att_experts"] * (d * hd + d)
  ffn = moe["num_experts"] * (2 * moe["expert_dim"] * d + d)
  want = model.layer_group_size * (att + ffn + 4 * d) + 2 * vocab * d + vocab + 2 * d
  count = lm.count_params(model)
  assert count == want
  assert abs(count / paper - 1) < 0.02, count


def test_every_config_builds():
  for name, arg in (("lm_ngpt_bytes", None), ("lm_ngpt_bytes", "seq_shards=2,runlocal"),
                    ("lm_moeut_bytes", None), ("ngpt_1b", "variant=0.5B"), ("ngpt_1b", None),
                    ("moeut_244m", None), ("moeut_244m", "variant=1B")):
    config = _config_module(name).get_config(arg)
    main_lib.check_config(config)
    assert config_lib.base_config().keys() == config.keys()
    assert f"configs/{name}.py" in _config_module(name).__doc__
  with pytest.raises(ValueError, match="variant"):
    _config_module("ngpt_1b").get_config("variant=2B")
