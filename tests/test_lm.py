"""The decoder-only LM: sequence parallelism equals one device, packing isolates documents,
cached generation equals the full forward (through the `lean_decode` op, tested in
`tests/test_ops_decode.py`), configs, and a short `lm_bytes` run lowering held-out bits per byte
(8 simulated CPU devices)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_attn import main as main_lib
from big_attn.data import text
from big_attn.evaluators import lm as lm_eval
from big_attn.layers import apply_rope
from big_attn.models import lm
from big_attn.ops import registry
from big_attn.parallel import mesh as mesh_lib
from big_attn.train import step as step_lib
from tests import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(vocab_size=text.VOCAB_SIZE, width=32, depth=2, num_heads=4, num_kv_heads=2,
             mlp_dim=48, qk_norm=True)


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _packed_batch(batch, seq_len, seed=0):
  """Packed rows of random documents (several per row, with padding)."""
  rng = np.random.default_rng(seed)
  docs = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in rng.integers(1, 12, 40)]
  rows = text.PackedDocuments(docs, seq_len)
  picked = [rows[i] for i in range(batch)]
  return {k: jnp.asarray(np.stack([r[k] for r in picked])) for k in lm.BATCH_KEYS}


def _init(model, seq_len):
  return nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"])


def assert_sequence_parallel_equals_single_device(model, batch, strategy, mesh_config):
  """The loss of `model` on `batch` and its gradients equal those of the model split over the
  mesh of `mesh_config` with `strategy`; returns the split model."""
  params = _init(model, batch["inputs"].shape[1])
  loss_grad = lambda m: jax.jit(jax.value_and_grad(  # pylint: disable=g-long-lambda
      lambda p: lm.loss_fn(m, p, batch, jax.random.key(0))))(params)
  loss, grads = loss_grad(model)
  mesh = mesh_lib.make_mesh(mesh_config)
  sp_model = model.clone(mesh=mesh, seq_strategy=strategy)
  assert sp_model.seq_parallel().num_shards == mesh.shape["seq"]
  sp_loss, sp_grads = loss_grad(sp_model)
  np.testing.assert_allclose(sp_loss, loss, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    got = sp_grads
    for key in path:
      got = got[key.key]
    np.testing.assert_allclose(got, g, rtol=2e-4, atol=2e-6, err_msg=str(path))
  return sp_model


@pytest.mark.parametrize("strategy,mesh_config", [
    ("striped", [("data", 2), ("seq", 4)]),
    ("ring", [("seq", 8)]),
    ("all_gather", [("data", 2), ("seq", 4)]),
])
def test_sequence_parallel_loss_and_grads_equal_single_device(strategy, mesh_config):
  model = lm.Model(**SMALL, tie_embeddings=False)
  batch = _packed_batch(4, 16)
  sp_model = assert_sequence_parallel_equals_single_device(model, batch, strategy, mesh_config)
  if strategy == "striped":  # logits come out in striped order
    striped = lm.stripe_batch(sp_model, batch)
    np.testing.assert_array_equal(striped["positions"][:, :4],
                                  batch["positions"][:, ::4][:, :4])


def test_packing_never_lets_a_document_see_another():
  model = lm.Model(**SMALL)
  batch = _packed_batch(2, 24, seed=3)
  params = _init(model, 24)
  apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens,
                                             positions=batch["positions"],
                                             segment_ids=batch["segment_ids"]))
  seg = np.asarray(batch["segment_ids"])
  assert seg.max() >= 3
  logits = apply(batch["inputs"])
  changed = np.where(seg == 2, (np.asarray(batch["inputs"]) + 7) % 256, batch["inputs"])
  new_logits = apply(jnp.asarray(changed))
  others = seg != 2
  np.testing.assert_allclose(np.asarray(new_logits)[others], np.asarray(logits)[others],
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(new_logits)[seg == 2], np.asarray(logits)[seg == 2])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_generate_with_cache_equals_full_forward(scan_layers, monkeypatch):
  model = lm.Model(**SMALL, scan_layers=scan_layers, rope_base=500.)
  params = _init(model, 8)
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 5)), jnp.int32)
  calls = []
  lean = registry.spec("lean_decode")
  monkeypatch.setitem(registry._OPS, "lean_decode",  # pylint: disable=protected-access
                      dataclasses.replace(lean, fn=lambda *a, **k: calls.append(k["kv_length"])
                                          or lean.fn(*a, **k)))
  tokens, logits = lm.generate(model, params, prompt, 6, temperature=0.0, return_logits=True)
  assert calls, "generate must attend through the lean_decode op"
  assert tokens.shape == (2, 11)
  np.testing.assert_array_equal(tokens[:, :5], prompt)
  full = jax.jit(lambda t: model.apply({"params": params}, t))(tokens)
  np.testing.assert_allclose(logits, full[:, 4:-1], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(tokens[:, 5:], jnp.argmax(full[:, 4:-1], axis=-1))
  if scan_layers:  # top_k=1 sampling is greedy
    top1 = lm.generate(model, params, prompt, 6, temperature=1.0, top_k=1,
                       rng=jax.random.key(1))
    np.testing.assert_array_equal(top1, tokens)


def test_generate_and_model_argument_errors():
  model = lm.Model(**SMALL)
  params = _init(model, 4)
  prompt = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="needs rng"):
    lm.generate(model, params, prompt, 2, temperature=1.0)
  with pytest.raises(ValueError, match="top_k"):
    lm.generate(model, params, prompt, 2, temperature=1.0, top_k=0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="prompt must be integers"):
    lm.generate(model, params, jnp.zeros((3,), jnp.int32), 2, temperature=0.0)
  with pytest.raises(ValueError, match="seq_strategy"):
    lm.Model(**SMALL, seq_strategy="zigzag").seq_parallel()
  mesh = mesh_lib.make_mesh([("seq", 4)])
  with pytest.raises(ValueError, match="'combiner' runs sequence-parallel by splitting its "
                     "heads over the 8 devices of the sequence axis; its 4 heads"):
    lm.Model(**SMALL, attention="combiner", mesh=mesh_lib.make_mesh([("seq", 8)]),
             seq_strategy="ring").init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(ValueError, match="not divisible"):
    lm.Model(**SMALL, mesh=mesh, seq_strategy="ring").init(
        jax.random.key(0), jnp.zeros((1, 6), jnp.int32))
  with pytest.raises(ValueError, match="unknown LM variant"):
    lm.decode_variant("XXL")


def test_llama_family_options_are_checked():
  tokens = jnp.zeros((1, 8), jnp.int32)
  init = lambda **kw: jax.eval_shape(  # pylint: disable=unnecessary-lambda-assignment
      lm.Model(**dict(SMALL, **kw)).init, jax.random.key(0), tokens)
  with pytest.raises(ValueError, match="sliding_window needs attention='softmax'"):
    init(sliding_window=4, attention="sigmoid")
  with pytest.raises(ValueError, match="sliding_window must be None or a positive int"):
    init(sliding_window=0)
  with pytest.raises(ValueError, match="rope_scaling, qkv_bias need block='pre_norm'"):
    init(rope_scaling={"rope_type": "linear", "factor": 2.0}, qkv_bias=True, block="ngpt",
         attention="ngpt", qk_norm=False)
  with pytest.raises(ValueError, match="rope_type in .'linear', 'dynamic', 'llama3'"):
    init(rope_scaling={"rope_type": "yarn", "factor": 2.0})
  params = init(qkv_bias=True)["params"]["layers_0"]["attention"]
  assert "bias" in params["query"] and "bias" not in params["out"]
  # linear scaling by s is RoPE at positions p / s
  q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 2, 8)), jnp.float32)
  np.testing.assert_allclose(
      apply_rope(q, jnp.arange(3) * 2, 100., {"rope_type": "linear", "factor": 2.0}),
      apply_rope(q, jnp.arange(3), 100.), rtol=1e-5, atol=1e-6)


def test_rope_depends_only_on_relative_position():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32) for _ in range(2))
  dot = lambda i, j: jnp.sum(apply_rope(q, jnp.array([i]), 100.)  # pylint: disable=g-long-lambda
                             * apply_rope(k, jnp.array([j]), 100.), -1)
  np.testing.assert_allclose(dot(7, 3), dot(104, 100), rtol=1e-4)
  assert not np.allclose(dot(7, 3), dot(7, 4))
  np.testing.assert_allclose(apply_rope(q, jnp.array([0]), 100.), q)


def test_config_args_and_1b_size():
  lm_bytes = _config_module("lm_bytes")
  config = lm_bytes.get_config("seq_shards=4,strategy=ring,seq_len=128")
  assert config.mesh == [("data", -1), ("seq", 4)]
  assert config.model.seq_strategy == "ring" and config.input.seq_len == 128
  assert lm_bytes.get_config(None).model.seq_strategy is None
  with pytest.raises(ValueError, match="strategy must be one of"):
    lm_bytes.get_config("seq_shards=2,strategy=zigzag")
  with pytest.raises(ValueError, match="multiple of seq_shards"):
    lm_bytes.get_config("seq_shards=3,seq_len=128")
  with pytest.raises(ValueError, match="unknown config arg"):
    lm_bytes.get_config("seq_shard=2")
  big = _config_module("lm_1b_128k").get_config()
  assert big.input.seq_len == 131_072 and big.model.seq_strategy == "striped"
  model = lm.Model(vocab_size=text.VOCAB_SIZE, variant=big.model.variant,
                   tie_embeddings=big.model.tie_embeddings, qk_norm=big.model.qk_norm)
  assert 0.95e9 < lm.count_params(model) < 1.1e9


@pytest.mark.slow
def test_dry_run_of_the_long_context_config_compiles_sharded():
  config = _config_module("lm_1b_128k").get_config("variant=tiny,seq_len=4096")
  config.dry_run = True
  out = main_lib.train_and_evaluate(ml_collections.ConfigDict(config.to_dict()), None)
  assert out["parameters"] > 0 and out["flops"] > 0
  assert out["memory"]["argument"] > 0


@pytest.mark.slow
def test_short_lm_bytes_run_lowers_heldout_bits_per_byte(tmp_path, capsys):
  config = _config_module("lm_bytes").get_config("runlocal,seq_shards=2,strategy=striped,"
                                                 "seq_len=64")
  config.model.variant = None
  config.model.update(width=48, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=96)
  config.input.batch_size = 8
  config.lr = 1e-2
  config.total_steps = 30
  config.log_every = 10
  config.ckpt_every = 30
  config.evals.eval.update(every=30, batch_size=8, max_batches=3, sample_prompt="def ",
                           sample_tokens=12)
  config = ml_collections.ConfigDict(config.to_dict())
  workdir = str(tmp_path)
  assert main_lib.train_and_evaluate(config, workdir)["step"] == 30
  assert "sample after step 30: def " in capsys.readouterr().out

  # The same evaluator on a freshly initialised model gives the "before" number.
  mesh = mesh_lib.make_mesh(config.mesh)
  model = lm.Model(vocab_size=text.VOCAB_SIZE, mesh=mesh,
                   **dict(config.model.to_dict(), dtype=jnp.float32))
  params = jax.jit(lambda r: nn.unbox(step_lib.init_variables(model, r, (64,), jnp.int32)))(
      jax.random.key(0))
  input_config = {k: v for k, v in config.input.items() if k != "batch_size"}
  before = dict(lm_eval.Evaluator(model, input_config=input_config, batch_size=8, mesh=mesh,
                                  rules=config.sharding_rules, max_batches=3).run(
                                      {"params": params, "step": 0}))
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  after = [r for r in records if "eval/bits_per_byte" in r][-1]
  for r in records:  # throughput in tokens: 64 per row
    np.testing.assert_allclose(r["train/tokens_per_sec"], 64 * r["train/examples_per_sec"])
  assert 7.0 < before["bits_per_byte"] < 9.0  # about log2(259) = 8.02 at initialisation
  assert after["eval/bits_per_byte"] < before["bits_per_byte"] - 1.5


# ------------------------------------------------------------------------ TransNormerLLM block
def test_transnormer_decay_schedule_and_argument_checks():
  """λ_h^(l) = exp(−m_h(1 − l/(L−1) + 1e−5)) with ALiBi's m_h; the block refuses other ops and
  the options that lose the per-layer decay."""
  slopes = 2.0 ** (-2.0 * np.arange(1, 5))  # ALiBi's 2^(−8h/H), 4 heads
  np.testing.assert_allclose(lm.transnormer_decay(4, 0, 3), np.exp(-slopes * (1 + 1e-5)))
  np.testing.assert_allclose(lm.transnormer_decay(4, 2, 3), np.exp(-slopes * 1e-5))
  np.testing.assert_allclose(lm.transnormer_decay(4, 0, 1), np.exp(-slopes))
  tokens = jnp.zeros((1, 8), jnp.int32)
  base = dict(SMALL, qk_norm=False, block="transnormer", attention="lightning")
  for change, match in ((dict(attention="softmax"), "attention='lightning'"),
                        (dict(scan_layers=True), "scan_layers=False"),
                        (dict(qk_norm=True), "qk_norm=False")):
    with pytest.raises(ValueError, match=match):
      lm.Model(**dict(base, **change)).init(jax.random.key(0), tokens)


def test_transnormer_block_matches_its_formula():
  """One block against SRMSNorm, SiLU-gated lightning attention with the layer's decay and
  SGLU written out with the block's own weights (float64 reference of the attention)."""
  block = lm.TransNormerBlock(num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=24, layer=1,
                              depth=3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 32)), jnp.float32)
  params = nn.unbox(block.init(jax.random.key(0), x, None, None))["params"]
  out, _ = jax.jit(lambda p: block.apply({"params": p}, x, None, None))(params)
  with jax.enable_x64(True):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(x, np.float64)
    norm = lambda y, axes=-1: y / np.sqrt(np.mean(y * y, axis=axes, keepdims=True) + 1e-6)
    silu = lambda y: y / (1 + np.exp(-y))
    y = norm(h)
    q = silu(np.einsum("btd,dhk->bthk", y, p["query"]["kernel"]))
    k = np.repeat(silu(np.einsum("btd,dhk->bthk", y, p["key"]["kernel"])), 2, axis=2)
    v = np.repeat(np.einsum("btd,dhk->bthk", y, p["value"]["kernel"]), 2, axis=2)
    u = silu(np.einsum("btd,dhk->bthk", y, p["gate"]["kernel"]))
    lam = lm.transnormer_decay(4, 1, 3)
    dist = np.arange(7)[:, None] - np.arange(7)[None, :]
    weights = np.where(dist >= 0, lam[:, None, None] ** np.maximum(dist, 0), 0.0)  # [h, t, s]
    o = np.einsum("bthk,bshk,hts,bshj->bthj", q, k, weights, v)
    o = norm(o, (2, 3)) * u
    h = h + np.einsum("bthk,hkd->btd", o, p["out"]["kernel"])
    y = norm(h)
    mlp = (y @ p["wi_v"]["kernel"]) * (y @ p["wi_u"]["kernel"])
    want = h + mlp @ p["wo"]["kernel"]
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-4, atol=1e-4)


def test_parallel_block_matches_the_paf_formula_forward_and_gradient():
  """PAF in the LM: x + Attn(RMSNorm(x)) + SwiGLU(RMSNorm(x)), one norm, causal GQA attention
  (no RoPE here: `apply_rope` is tested above), against float64 plain JAX."""
  block = lm.DecoderBlock(num_heads=4, num_kv_heads=2, head_dim=4, mlp_dim=24, rope_base=None,
                          parallel=True)
  x = ref.normal(0, (2, 6, 16))
  boxed = jax.eval_shape(block.init, jax.random.key(0), x, None, None)["params"]
  assert set(boxed) == {"attention_norm", "attention", "mlp"}
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype),
                        nn.unbox(boxed))
  leaves, tree = jax.tree.flatten(params)

  def formula(x, *leaves):
    p = jax.tree.unflatten(tree, leaves)
    y = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["attention_norm"]["scale"]
    a = p["attention"]
    proj = lambda name: jnp.einsum("btd,dhk->bthk", y, a[name]["kernel"])
    causal = jnp.tril(jnp.ones((6, 6), bool))
    o = ref.softmax_attention(proj("query"), proj("key"), proj("value"), mask=causal)
    m = p["mlp"]
    gate = y @ m["wi_gate"]["kernel"]
    mlp = (gate / (1 + jnp.exp(-gate)) * (y @ m["wi_up"]["kernel"])) @ m["wo"]["kernel"]
    return x + jnp.einsum("bthk,hkd->btd", o, a["out"]["kernel"]) + mlp
  ref.assert_matches(
      lambda x, *l: block.apply({"params": jax.tree.unflatten(tree, l)}, x, None, None)[0],
      formula, [x, *leaves], tol=dict(rtol=2e-4, atol=2e-4))
  assert _config_module("lm_bytes").get_config("block=parallel").model.parallel_block
  model = lm.Model(**SMALL, parallel_block=True)
  tokens = jnp.zeros((2, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  assert "mlp_norm" not in shapes["layers_0"]
  with pytest.raises(ValueError, match="parallel_block is a form of the pre_norm block"):
    lm.Model(**dict(SMALL, qk_norm=False), parallel_block=True, block="ngpt",
             attention="ngpt").init(jax.random.key(0), tokens)


@pytest.mark.slow
def test_transnormer_lm_bytes_config_trains(tmp_path):
  """`configs/lm_bytes.py:block=transnormer` trains 10 steps through `big_attn.main` with a
  finite, decreasing loss."""
  config = _config_module("lm_bytes").get_config("runlocal,seq_len=32,block=transnormer")
  assert config.model.block == "transnormer" and config.model.attention == "lightning"
  config.model.variant = None
  config.model.update(width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  config.input.batch_size = 8
  config.lr = 1e-2
  config.evals = {}
  config = ml_collections.ConfigDict(config.to_dict())
  assert main_lib.train_and_evaluate(config, str(tmp_path))["step"] == 10
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses)) and losses[-1] < losses[0]
