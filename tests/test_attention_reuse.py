"""Attention reuse (`big_attn.layers.attention_reuse`). Across DiT sampling steps: Pyramid
Attention Broadcast and DiTFastAttn plans by hand, and `dit.sample` with each strategy against a
sampler written here from the papers' rules (float64 attention, outputs kept in a dict). Across
LM and ViT layers: EchoAtt's shared attention weights and attention-free blocks against the
unshared model with the attention replaced by references written here (or zeros)."""
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn.layers import Attention
from big_attn.layers import attention_reuse as reuse
from big_attn.models import dit
from big_attn.models import lm
from big_attn.models import vit
from big_attn.train import config_lib
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 6
SHAPE = (8, 8, 1)  # 16 tokens of 2x2 patches
LABELS = jnp.array([0, 2])


def _plan(config, num_steps=50, depth=2):
  return reuse.resolve(config, timesteps=dit.ddim_timesteps(1000, num_steps)[::-1],
                       num_timesteps=1000, depth=depth)


def test_pab_plan_by_hand():
  # 50 steps visit t = 980, 960, ..., 0: step i has t = 980 - 20 i, inside (450, 930) for
  # i = 3..26; self-attention is reused at the odd ones, cross-attention off multiples of 6.
  plan = _plan({"method": "pab"})
  self_reused = [i for i in range(3, 27) if i % 2]
  cross_reused = [i for i in range(3, 27) if i % 6]
  assert plan.plans["self"].shape == (50, 2)
  for kind, reused in (("self", self_reused), ("cross", cross_reused)):
    want = np.where(np.isin(np.arange(50), reused), reuse.SHARE, reuse.FULL)
    np.testing.assert_array_equal(plan.plans[kind], np.stack([want, want], 1))
  assert len(self_reused) == 12 and len(cross_reused) == 20
  for config in ({"method": "pab", "self_range": 1, "cross_range": 1},
                 {"method": "pab", "timesteps": (0, 10)}):
    assert np.all(_plan(config).plans["self"] == reuse.FULL)


def test_ditfastattn_plan_residuals_and_checks():
  rows = [["full", "asc"], ["wars", "ast"], ["ast", "wars+asc"], ["full", "full"],
          ["wars", "ast"], ["full", "ast"]]
  plan = _plan({"method": "ditfastattn", "plan": rows}, num_steps=6)
  f, w, s, c, r = reuse.FULL, reuse.WINDOW, reuse.SHARE, reuse.CFG, reuse.RESIDUAL
  # A full step caches the residual when a window step follows before the next full step.
  want = [[f | r, f | c | r], [w, s], [s, w | c], [f | r, f], [w, s], [f, s]]
  np.testing.assert_array_equal(plan.plans["self"], want)
  assert np.all(plan.plans["cross"] == f) and plan.uses_cfg
  assert plan.branches("self", 1) == (f | c | r, s, w | c, f)
  np.testing.assert_array_equal(plan.branch_index("self", 1), [0, 1, 2, 3, 1, 1])
  uniform = _plan({"method": "ditfastattn", "plan": "ast", "full_every": 3}, num_steps=6)
  np.testing.assert_array_equal(uniform.plans["self"][:, 0], [f, s, s, f, s, s])
  uniform = _plan({"method": "ditfastattn", "plan": "asc"}, num_steps=6)
  np.testing.assert_array_equal(uniform.plans["self"][:, 1], [f] + [f | c] * 5)
  bad = [({"method": "tome"}, ValueError, "method"),
         ({"method": "pab", "range": 2}, ValueError, "unknown key"),
         ({"method": "pab", "self_range": 0}, ValueError, "self_range"),
         ({"method": "pab", "timesteps": (900, 100)}, ValueError, "timesteps"),
         ({"method": "ditfastattn"}, ValueError, "plan"),
         ({"method": "ditfastattn", "plan": "window"}, ValueError, "plan"),
         ({"method": "ditfastattn", "plan": [["full"]] * 6}, ValueError, "depth=2"),
         ({"method": "ditfastattn", "plan": [["ast", "full"]] + [["full"] * 2] * 5},
          ValueError, "block 0 at step 0"),
         ({"method": "ditfastattn", "plan": [["ast"] * 2] * 6, "full_every": 0}, ValueError,
          "full_every"),
         ({"method": "ditfastattn", "plan": "wars", "window_fraction": 0.0}, ValueError,
          "window_fraction"),
         (["pab"], TypeError, "dict")]
  for config, error, match in bad:
    with pytest.raises(error, match=match):
      _plan(config, num_steps=6)
  with pytest.raises(ValueError, match="block 1 at step 0 reuses a residual"):
    _plan({"method": "ditfastattn", "plan": [["full", "wars"]] + [["full"] * 2] * 5},
          num_steps=6)


def _random_params(model, *inputs, std=0.15):
  """Parameters of `model` for `inputs`, drawn by NumPy from N(0, std²) (no compile)."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, std, x.shape), x.dtype),
                      nn.meta.unbox(abstract["params"]))


@pytest.fixture(scope="module")
def tiny():
  """A two-block DiT with class adaLN and cross-attention, random parameters (no zero gates)."""
  model = dit.Model(num_classes=3, width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=2,
                    learn_sigma=False, cross_attention="softmax")
  params = _random_params(model, jnp.zeros((2, *SHAPE)))
  full = dit.sample(model, params, LABELS, jax.random.key(3), STEPS, 2.0, image_shape=SHAPE)
  return model, params, np.asarray(full)


def _reference(model, params, guidance, rule, window):
  """DDIM with attention reuse written from the rules: `rule(step, kind, layer)` names the
  strategy; attention in float64 from the projected q, k, v; outputs and residuals in a dict."""
  b = LABELS.shape[0]
  store, step = {}, [0]

  def interceptor(next_fun, args, kwargs, context):
    path = context.module.path
    if context.method_name != "attend" or path[-1] not in ("attn", "cross_attn"):
      return next_fun(*args, **kwargs)
    kind, layer = ("self" if path[-1] == "attn" else "cross"), int(path[-2].split("_")[1])
    q, k, v = args[:3]
    strategy = rule(step[0], kind, layer)
    key = (kind, layer)
    with reference.x64():
      full = np.asarray(reference.softmax_attention(q, k, v))
      t = q.shape[1]
      band = reference.full_mask(q.shape[0], q.shape[2], t, t, window=window)
      win = np.asarray(reference.softmax_attention(q, k, v, mask=band)) if kind == "self" \
          else None
    if strategy == "ast":
      out = store[key]["out"]
    elif strategy.startswith("wars"):
      out = win + store[key]["res"]
    else:  # a full step caches the residual (of the conditional half, shared, with asc)
      out = full
      if kind == "self":
        res = full - win
        store.setdefault(key, {})["res"] = np.concatenate([res[:b]] * 2) \
            if strategy.endswith("asc") else res
    if strategy.endswith("asc"):
      out = np.concatenate([out[:b], out[:b]])
    store.setdefault(key, {})["out"] = out
    return jnp.asarray(out, jnp.float32)

  def eps(x, t):
    drop = jnp.arange(2 * b) >= b
    with nn.intercept_methods(interceptor):
      out = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.full((2 * b,), t),
                        jnp.concatenate([LABELS, LABELS]), force_drop=drop)[..., :1]
    step[0] += 1
    return out[b:] + guidance * (out[:b] - out[b:])

  x_t = jax.random.normal(jax.random.split(jax.random.key(3))[1], (b, *SHAPE))
  return reference.ddim(eps, x_t, STEPS)


def _flops(pairs, rows=4, heads=2, dim=8):
  return 4.0 * rows * heads * dim * pairs


@pytest.mark.xdist_group("attention_reuse_dit")
def test_pab_sampling(tiny):
  model, params, full = tiny
  same = dit.sample(model, params, LABELS, jax.random.key(3), STEPS, 2.0, image_shape=SHAPE,
                    attention_reuse={"method": "pab", "self_range": 1, "cross_range": 1})
  np.testing.assert_array_equal(same, full)
  config = {"method": "pab", "self_range": 2, "cross_range": 3, "timesteps": (0, 1000)}
  out, stats = dit.sample(model, params, LABELS, jax.random.key(3), STEPS, 2.0,
                          image_shape=SHAPE, attention_reuse=config, return_stats=True)
  # 6 steps, t = 833, 666, 500, 333, 166, 0: inside (0, 1000) except t = 0; the self-attention
  # computes at steps 0, 2, 4, 5, the cross-attention at 0, 3, 5, in each of the 2 blocks.
  assert int(stats["self"]["calls"]) == 4 * 2 and int(stats["cross"]["calls"]) == 3 * 2
  np.testing.assert_allclose(stats["self"]["flops"], 8 * _flops(16 * 16), rtol=1e-6)
  np.testing.assert_allclose(stats["cross"]["flops"], 6 * _flops(16 * 1), rtol=1e-6)
  want = _reference(model, params, 2.0,
                    lambda i, kind, layer: "ast" if i < 5 and i % (2 if kind == "self" else 3)
                    else "full", 2)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  error = np.abs(np.asarray(out) - full).max() / np.abs(full).max()
  assert np.isfinite(error) and 1e-5 < error < 0.2, error


@pytest.mark.xdist_group("attention_reuse_dit")
def test_ditfastattn_sampling(tiny):
  model, params, full = tiny
  rows = [["full", "asc"], ["wars", "ast"], ["ast", "wars+asc"], ["full", "full"],
          ["wars", "wars+asc"], ["asc", "ast"]]
  out, stats = dit.sample(model, params, LABELS, jax.random.key(3), STEPS, 2.0,
                          image_shape=SHAPE, attention_reuse={"method": "ditfastattn",
                                                              "plan": rows},
                          return_stats=True)
  # window_fraction 1/8 of 16 tokens: |i - j| <= 2, 16·5 - 2·(2 + 1) = 74 attended pairs.
  want = _reference(model, params, 2.0, lambda i, kind, layer: rows[i][layer] if kind == "self"
                    else "full", 2)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  band, whole = 74, 256
  # Computed self-attention calls: all but the 3 "ast" steps; FLOPs (rows 4, or 2 with asc):
  # full steps with the residual (0, 3 of block 0; 0, 3 of block 1) add a window pass.
  assert int(stats["self"]["calls"]) == 12 - 3 and int(stats["cross"]["calls"]) == 12
  flops = (_flops(whole + band) + _flops(whole + band, rows=2)         # step 0
           + _flops(band)                                              # step 1
           + _flops(band, rows=2)                                      # step 2
           + 2 * _flops(whole + band)                                  # step 3
           + _flops(band) + _flops(band, rows=2)                       # step 4
           + _flops(whole, rows=2))                                    # step 5
  np.testing.assert_allclose(stats["self"]["flops"], flops, rtol=1e-6)
  error = np.abs(np.asarray(out) - full).max() / np.abs(full).max()
  assert np.isfinite(error) and 1e-5 < error < 0.2, error
  with pytest.raises(ValueError, match="guidance_scale"):
    dit.sample(model, params, LABELS, jax.random.key(3), STEPS, 1.0, image_shape=SHAPE,
               attention_reuse={"method": "ditfastattn", "plan": "asc"})


# ------------------------------------------------------------------------------ LM, across layers
LM = dict(vocab_size=50, width=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
QK_PARAMS = 32 * 4 * 8 + 32 * 2 * 8          # query [width, heads, 8] and key [width, kv, 8]
ATTENTION_PARAMS = QK_PARAMS + 32 * 2 * 8 + 4 * 8 * 32 + 32  # + value, out, attention_norm


@pytest.fixture(scope="module")
def lm_base():
  tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, 50)
  segment_ids = jnp.array([[1] * 6 + [2] * 5, [1] * 11])
  model = lm.Model(**LM)
  return model, _random_params(model, tokens, std=0.2), tokens, segment_ids


def _without(params, drop):
  """`params` less the entries whose path (joined by '/') ends with one of `drop`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not any(k.endswith(d) for d in drop)}, sep="/")


def _replace_attention(model, params, tokens, segment_ids, replace):
  """The base model's logits with `replace(layer, q, k, v, seen)` as the attention op of the
  layers it returns an array for (`seen` maps layer -> (q, k) of the layers already run)."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "attend" or not isinstance(context.module, Attention):
      return next_fun(*args, **kwargs)
    layer = int(context.module.path[-2].split("_")[1])
    q, k, v = args[:3]
    seen[layer] = (q, k)
    out = replace(layer, q, k, v, seen)
    return next_fun(*args, **kwargs) if out is None else out

  def forward(params):
    with nn.intercept_methods(interceptor):
      return model.apply({"params": params}, tokens, segment_ids=segment_ids)

  return jax.jit(forward)(params)


def _logits_and_grads(model, params, *args, **kwargs):
  """`((loss, output), d loss / d params)` of loss = mean(output²), in one compiled call."""
  def loss(p):
    out = model.apply({"params": p}, *args, **kwargs)
    return jnp.mean(out ** 2), out
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.xdist_group("attention_reuse_lm")
def test_echoatt_shares_weights(lm_base):
  model, params, tokens, segment_ids = lm_base
  shared = model.clone(shared_attention_layers=(2, 3))
  assert lm.count_params(shared) == lm.count_params(model) - 2 * QK_PARAMS
  off = model.clone(shared_attention_layers=())
  assert lm.count_params(off) == lm.count_params(model)
  # The same program: the same computation, bit for bit.
  assert len({str(jax.make_jaxpr(m.apply)({"params": params}, tokens, segment_ids=segment_ids))
              for m in (off, model)}) == 1
  shared_params = _without(params, [f"layers_{i}/attention/{n}/kernel" for i in (2, 3)
                                    for n in ("query", "key")])
  assert jax.tree.structure(shared_params) == jax.tree.structure(nn.meta.unbox(
      jax.eval_shape(lambda: shared.init(jax.random.key(1), tokens))["params"]))
  (_, got), grads = _logits_and_grads(shared, shared_params, tokens,
                                        segment_ids=segment_ids)
  b, t = tokens.shape
  mask = reference.full_mask(b, 4, t, t, is_causal=True, segment_ids=segment_ids)

  def echo(layer, q, k, v, seen):  # layers 2 and 3: layer 1's softmax weights times their V
    del q, k
    if layer < 2:
      return None
    q1, k1 = seen[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q1, jnp.repeat(k1, 2, axis=2)) / np.sqrt(8)
    weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, jnp.repeat(v, 2, axis=2))

  want = _replace_attention(model, params, tokens, segment_ids, echo)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for path in (("layers_1", "attention", "query"), ("layers_2", "attention", "value"),
               ("layers_3", "attention", "out")):
    assert np.abs(grads[path[0]][path[1]][path[2]]["kernel"]).max() > 0, path


@pytest.mark.xdist_group("attention_reuse_lm")
def test_attention_free_layers(lm_base):
  model, params, tokens, segment_ids = lm_base
  free = model.clone(attention_free_layers=(1, 2))
  assert lm.count_params(free) == lm.count_params(model) - 2 * ATTENTION_PARAMS
  free_params = _without(params, [f"layers_{i}/{n}" for i in (1, 2)
                                  for n in ("attention/query/kernel", "attention/key/kernel",
                                            "attention/value/kernel", "attention/out/kernel",
                                            "attention_norm/scale")])
  (_, got), grads = _logits_and_grads(free, free_params, tokens, segment_ids=segment_ids)
  # The block without attention is the block whose attention outputs zeros.
  def zero(layer, q, k, v, seen):
    del k, v, seen
    return jnp.zeros_like(q) if layer in (1, 2) else None

  np.testing.assert_allclose(got, _replace_attention(model, params, tokens, segment_ids, zero),
                             rtol=1e-5, atol=1e-5)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["layers_1"]["mlp"]["wo"]["kernel"]).max() > 0
  both = model.clone(attention_free_layers=(1,), shared_attention_layers=(3,))
  assert lm.count_params(both) == lm.count_params(model) - ATTENTION_PARAMS - QK_PARAMS


@pytest.mark.xdist_group("attention_reuse_lm")
def test_lm_reuse_bad_arguments(lm_base):
  model, _, tokens, _ = lm_base
  bad = [(dict(shared_attention_layers=(0,)), "block 0"),
         (dict(shared_attention_layers=(2,), attention_free_layers=(1,)), "before"),
         (dict(shared_attention_layers=(4,)), r"\[0, 4\)"),
         (dict(attention_free_layers=1), "sequence of block indices"),
         (dict(shared_attention_layers=(1,), scan_layers=True), "unrolled"),
         (dict(attention_free_layers=(1,), layer_group_size=2), "unrolled"),
         (dict(shared_attention_layers=(1,), attention="sigmoid"), "softmax")]
  for fields, match in bad:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda m=model.clone(**fields): m.init(jax.random.key(0), tokens))


def test_vit_attention_free_layers():
  model = vit.Model(num_classes=3, width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=(4, 4),
                    head_zeroinit=False)
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  params = _random_params(model, images, std=0.2)
  free = model.clone(attention_free_layers=(1,))
  free_params = _without(params, ["encoderblock_1/MultiHeadAttention/" + n for n in (
      "query/kernel", "query/bias", "key/kernel", "key/bias", "value/kernel", "value/bias",
      "out/kernel", "out/bias")] + ["encoderblock_1/LayerNorm_0/scale",
                                     "encoderblock_1/LayerNorm_0/bias"])
  # 4 projections of 16·2·8 weights + 16 biases, and the LayerNorm's scale and bias.
  sizes = [sum(x.size for x in jax.tree.leaves(p)) for p in (params, free_params)]
  assert sizes[0] - sizes[1] == 4 * (256 + 16) + 32
  (_, got), grads = _logits_and_grads(free, free_params, images)

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.path[-2:] == (
        "encoderblock_1", "MultiHeadAttention"):
      return jnp.zeros_like(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    want = jax.jit(model.apply)({"params": params}, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(grads["Transformer"]["encoderblock_1"]["MlpBlock"]["Dense_0"]["kernel"]).max() > 0
  for fields, match in ((dict(attention_free_layers=(3,)), r"\[0, 3\)"),
                        (dict(attention_free_layers=(1,), scan_layers=True), "scan_layers"),
                        (dict(attention_free_layers=(1,), pool_type="cls",
                              token_reduction={"method": "tome", "r": 1}), "reduce tokens")):
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda m=model.clone(**fields): m.init(jax.random.key(0), images))


def test_configs_take_the_settings():
  """The locked configs take the fields as overrides (declared as None)."""
  for name, fields in (("lm_bytes", ("shared_attention_layers", "attention_free_layers")),
                       ("vit_digits", ("attention_free_layers",))):
    config = config_lib.load_config_module(os.path.join(ROOT, "configs", f"{name}.py")
                                           ).get_config()
    for field in fields:
      assert config.model[field] is None, (name, field)
  config = config_lib.load_config_module(os.path.join(ROOT, "configs", "dit_digits.py")
                                         ).get_config()
  assert config.evals.eval.attention_reuse is None
