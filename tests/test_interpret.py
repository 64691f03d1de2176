"""big_attn.interpret: captured maps and their gradients against float64 references, rollout,
flow, gradient rollout, AtMan, distances and norms against hand-computed cases, plots, and the
CLI on a checkpoint of a 4-step tiny ViT run."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import interpret
from big_attn import main as main_lib
from big_attn.interpret import __main__ as cli
from big_attn.interpret import plots
from big_attn.layers import Attention
from big_attn.models import lm, vit
from big_attn.ops import registry
from tests import reference
from tests.plot_checks import assert_png, keep_figures
from tests.test_train import tiny_config


class _OneLayer(nn.Module):
  """One `Attention` layer; its output is the model output."""
  num_heads: int = 2
  num_kv_heads: int | None = None
  op: str = "softmax"
  is_causal: bool = False

  @nn.compact
  def __call__(self, x):
    return Attention(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, op=self.op,
                     name="attn")(x, is_causal=self.is_causal)


def _init(model, x):
  return nn.unbox(jax.jit(model.init)(jax.random.key(1), x))


def _projections(params, x):
  """q, k, v `[b, s, heads, d]` and the out kernel of `_OneLayer` in float64."""
  p = params["attn"]
  q, k, v = (jnp.einsum("bsf,fhd->bshd", reference.f64(x), reference.f64(p[n]["kernel"]))
             for n in ("query", "key", "value"))
  return q, k, v, reference.f64(p["out"]["kernel"])


def _reference_map(q, k, *, is_causal):
  """softmax(QKᵀ/√d) with K heads repeated, causal rows masked: `[b, h, t, s]` float64."""
  k = reference.repeat_kv(k, q.shape[2])
  s = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  t = q.shape[1]
  if is_causal:
    s = jnp.where(np.tril(np.ones((t, t), bool)), s, -jnp.inf)
  return jax.nn.softmax(s, axis=-1)


@pytest.mark.parametrize("num_kv_heads,is_causal", [(None, False), (1, True)])
def test_capture_and_gradients_match_reference(num_kv_heads, is_causal):
  model = _OneLayer(num_heads=2, num_kv_heads=num_kv_heads, is_causal=is_causal)
  x = reference.normal(0, (2, 5, 8))
  variables = _init(model, x)
  c = reference.normal(1, (2, 5, 8))  # target = Σ out ⊙ c
  maps, grads = interpret.attention_gradients(model, variables, lambda y: jnp.sum(y * c), x)
  assert list(maps) == ["attn"] == list(grads)
  with reference.x64():
    q, k, v, wo = _projections(variables["params"], x)
    want = _reference_map(q, k, is_causal=is_causal)
    # out[b,i,h] = Σ_j A[b,h,i,j] v[b,j,h], y = Σ (out·Wo) ⊙ c, so ∂y/∂A = (c Woᵀ) vᵀ.
    dout = jnp.einsum("btf,hdf->bthd", reference.f64(c), wo)
    want_grad = jnp.einsum("bthd,bshd->bhts", dout, reference.repeat_kv(v, 2))
  np.testing.assert_allclose(maps["attn"], want, atol=2e-6)
  np.testing.assert_allclose(grads["attn"], want_grad, rtol=1e-4, atol=1e-5)
  assert maps["attn"].shape == (2, 2, 5, 5)


@pytest.fixture(scope="module")
def small_vit():
  """A 2-block ViT with a register token and a MAP head (cross-attention from a probe)."""
  model = vit.Model(num_classes=3, width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(4, 4),
                    pool_type="map", num_registers=1, head_zeroinit=False)
  x = reference.normal(0, (2, 8, 8, 1))
  return model, _init(model, x), x


def test_capture_leaves_the_output_and_registry_unchanged(small_vit):
  model, variables, x = small_vit
  before = registry.get("softmax")

  def hooked(variables, x):
    with interpret.hook_ops(lambda path, fn, q, k, v, kw: fn(q, k, v, **kw)):
      return model.apply(variables, x)

  out = jax.jit(hooked)(variables, x)
  assert registry.get("softmax") is before
  np.testing.assert_array_equal(out, jax.jit(model.apply)(variables, x))
  maps = interpret.capture_attention(model, variables, x)
  blocks = [f"Transformer/encoderblock_{i}/MultiHeadAttention" for i in range(2)]
  assert list(maps) == blocks + ["MAPHead/MultiHeadAttention"]
  for path in blocks:  # 4 patches and a register
    assert maps[path].shape == (2, 2, 5, 5)
  assert maps["MAPHead/MultiHeadAttention"].shape == (2, 2, 1, 4)
  for m in maps.values():
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
  assert [m.shape for m in interpret.self_attention_maps(maps)] == [(2, 2, 5, 5)] * 2


def test_capture_causal_lm_and_scanned_layers():
  model = lm.Model(vocab_size=11, width=16, depth=2, num_heads=2, num_kv_heads=1, qk_norm=True)
  tokens = jnp.arange(12).reshape(2, 6) % 11
  maps = interpret.capture_attention(model, _init(model, tokens), tokens)
  assert list(maps) == ["layers_0/attention", "layers_1/attention"]
  for m in maps.values():  # causal (RoPE, qk-norm and GQA inside), rows sum to 1
    assert m.shape == (2, 2, 6, 6)
    np.testing.assert_array_equal(np.triu(m, 1), 0.0)
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
  scanned = vit.Model(num_classes=3, width=16, depth=2, mlp_dim=32, num_heads=2,
                      patch_size=(4, 4), scan_layers=True)
  x = jnp.ones((1, 8, 8, 1))
  shapes = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), x))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # it fails when tracing
  with pytest.raises(ValueError, match="ran twice"):
    interpret.capture_attention(scanned, zeros, x)


def test_capture_rejects_ops_not_linear_in_values():
  model = _OneLayer(num_heads=2, op="channel_attention")
  x = reference.normal(0, (1, 4, 8))
  variables = _init(model, x)
  with pytest.raises(ValueError, match="not linear in the values"):
    interpret.capture_attention(model, variables, x)


def test_sigmoid_map_is_the_unnormalised_weights():
  model = _OneLayer(num_heads=2, op="sigmoid")
  x = reference.normal(0, (1, 4, 8))
  variables = _init(model, x)
  m = interpret.capture_attention(model, variables, x)["attn"]
  with reference.x64():
    q, k, _, _ = _projections(variables["params"], x)
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(8 // 2)
    # sigmoid attention's default bias is -log(n) (Theory, Analysis, and Best Practices for
    # Sigmoid Self-Attention): A = σ(QKᵀ/√d - log n).
    want = jax.nn.sigmoid(logits - np.log(4))
  np.testing.assert_allclose(m, want, atol=2e-6)


def test_rollout_two_layers_three_tokens_by_hand():
  a1 = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
  a2 = np.array([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8]])
  maps = [a1[None, None], np.stack([a2, a2])[None]]  # layer 2 has two equal heads
  # Ã = 0.5·A + 0.5·I (rows already sum to 1): Ã1 row 1 = [.25, .75, 0], Ã2 row 0 =
  # [.8, .2, 0]; rollout[0] = .8·Ã1[0] + .2·Ã1[1] = [.8 + .05, .15, 0].
  out = interpret.attention_rollout(maps)
  np.testing.assert_allclose(out[0, 0], [0.85, 0.15, 0.0])
  t1, t2 = 0.5 * a1 + 0.5 * np.eye(3), 0.5 * a2 + 0.5 * np.eye(3)
  np.testing.assert_allclose(out[0], t2 @ t1)
  np.testing.assert_allclose(out.sum(-1), 1.0)
  # residual=0 is the plain product of the maps
  np.testing.assert_allclose(interpret.attention_rollout(maps, residual=0.0)[0], a2 @ a1)


def test_flow_two_layers_three_tokens_by_hand():
  a1 = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
  a2 = np.array([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8]])
  maps = [a1[None, None], a2[None, None]]
  flow = interpret.attention_flow(maps, residual=0.0)
  # input 0 -> output 0: via middle token m the path carries min(A1[m,0], A2[0,m]):
  # min(1, .6) + min(.5, .4) + min(.2, 0) = 1.0 (rollout gives .6 + .2 = .8).
  assert flow[0, 0, 0] == pytest.approx(1.0)
  # input 2 -> output 2: min(0, .1) + min(0, .1) + min(.5, .8) = .5
  assert flow[0, 2, 2] == pytest.approx(0.5)
  # In two layers the only paths are j -> m -> i, so flow[i, j] = Σ_m min(A1[m, j], A2[i, m]).
  want = np.minimum(a1[None, :, :], a2[:, :, None]).sum(1)
  np.testing.assert_allclose(flow[0], want, atol=1e-12)
  # outputs= picks rows; residual 0.5 uses Ã
  t1, t2 = 0.5 * a1 + 0.5 * np.eye(3), 0.5 * a2 + 0.5 * np.eye(3)
  np.testing.assert_allclose(interpret.attention_flow(maps, outputs=[1])[0, 0],
                             np.minimum(t1, t2[1][:, None]).sum(0), atol=1e-12)


def test_max_flow_against_a_known_network():
  # CLRS figure 26.1: the maximum flow from s (0) to t (5) is 23.
  c = np.zeros((6, 6))
  for u, w, cap in [(0, 1, 16), (0, 2, 13), (1, 3, 12), (2, 1, 4), (2, 4, 14), (3, 2, 9),
                    (3, 5, 20), (4, 3, 7), (4, 5, 4)]:
    c[u, w] = cap
  assert interpret.max_flow(c, 0, 5) == pytest.approx(23.0)
  assert interpret.max_flow(c, 5, 0) == 0.0
  with pytest.raises(ValueError, match="non-negative"):
    interpret.max_flow(-c, 0, 5)


def test_flow_matches_networkx_on_three_layers():
  nx = pytest.importorskip("networkx")
  rng = np.random.default_rng(0)
  maps = [rng.dirichlet(np.ones(4), size=(1, 2, 4)) for _ in range(3)]
  flow = interpret.attention_flow(maps, outputs=[0, 3])
  graph = nx.DiGraph()
  for l, a in enumerate(maps):
    t = 0.5 * a[0].mean(0) + 0.5 * np.eye(4)
    for i in range(4):
      for j in range(4):
        graph.add_edge((l, j), (l + 1, i), capacity=t[i, j])
  want = [[nx.maximum_flow_value(graph, (0, j), (3, i)) for j in range(4)] for i in (0, 3)]
  np.testing.assert_allclose(flow[0], want, atol=1e-12)


def test_gradient_rollout_by_hand():
  a = np.array([[0.75, 0.25], [0.5, 0.5]])
  g = np.array([[1.0, -2.0], [-1.0, 3.0]])
  # (G ⊙ A)⁺ = [[.75, 0], [0, 1.5]]; R = I + Ā = [[1.75, 0], [0, 2.5]]
  r1 = interpret.gradient_rollout([a[None, None]], [g[None, None]])
  np.testing.assert_allclose(r1[0], [[1.75, 0.0], [0.0, 2.5]])
  # two heads are averaged; a second layer: R ← R + Ā2·R
  a2, g2 = np.array([[0.5, 0.5], [0.0, 1.0]]), np.ones((2, 2))
  r2 = interpret.gradient_rollout(
      [np.stack([a, a])[None], a2[None, None]], [np.stack([g, -g])[None], g2[None, None]])
  bar1 = (np.maximum(g * a, 0) + np.maximum(-g * a, 0)) / 2  # [[.375, .25], [.25, .75]]
  want1 = np.eye(2) + bar1
  np.testing.assert_allclose(r2[0], want1 + a2 @ want1)


class _HandModel(nn.Module):
  """One softmax head with identity projections: out = softmax(x xᵀ/√2) x, summed to a loss."""

  @nn.compact
  def __call__(self, x):
    y = Attention(num_heads=1, name="attn", kernel_init=nn.initializers.zeros_init())(x)
    return y[:, :, 0].sum(-1)  # [batch]: the loss


def _hand_variables():
  eye = np.eye(2, dtype=np.float32)
  p = {n: {"kernel": jnp.asarray(eye[:, None, :])} for n in ("query", "key", "value")}
  p["out"] = {"kernel": jnp.asarray(eye[None])}
  return {"params": {"attn": p}}


@pytest.mark.parametrize("mode", ["scores", "weights"])
def test_atman_by_hand(mode):
  x = np.array([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]], np.float32)
  f = 0.9

  def loss_by_hand(suppressed):
    s = x[0] @ x[0].T / np.sqrt(2.0)
    if suppressed is not None:
      if mode == "scores":
        s[:, suppressed] *= 1.0 - f  # AtMan: the pre-softmax score times (1 - f)
      else:
        s[:, suppressed] += np.log(1.0 - f)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return (a @ x[0])[:, 0].sum()

  model, variables = _HandModel(), _hand_variables()
  assert model.apply(variables, x)[0] == pytest.approx(loss_by_hand(None), rel=1e-6)
  got = interpret.atman(model, variables, lambda out: out, x, num_tokens=3, factor=f, mode=mode)
  want = [loss_by_hand(j) - loss_by_hand(None) for j in range(3)]
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(want) > 1e-3)
  none = interpret.atman(model, variables, lambda out: out, x, num_tokens=3, factor=0.0,
                         mode=mode)
  np.testing.assert_array_equal(none, 0.0)
  # a layer of another key length is left alone
  hook = interpret.suppression_hook(0, f, num_tokens=4)
  np.testing.assert_array_equal(interpret.apply_with_hook(model, variables, hook, x),
                                model.apply(variables, x))


def test_suppression_needs_a_bias_argument_and_valid_factor():
  model = _OneLayer(num_heads=2, op="lightning")
  x = reference.normal(0, (1, 4, 8))
  variables = _init(model, x)
  with pytest.raises(ValueError, match="takes no `bias`"):
    interpret.atman(model, variables, lambda out: out.sum((1, 2)), x, num_tokens=4)
  with pytest.raises(ValueError, match="factor"):
    interpret.suppression_hook(0, 1.0, num_tokens=4, mode="weights")
  with pytest.raises(ValueError, match="mode"):
    interpret.suppression_hook(0, 0.5, num_tokens=4, mode="logits")


def test_attention_distance_by_hand():
  # a class token (ignored) then a 1x2 grid of 4x4 patches, centres 4 pixels apart
  a = np.zeros((1, 1, 3, 3))
  a[0, 0, 0] = [1.0, 0.0, 0.0]
  a[0, 0, 1] = [0.5, 0.25, 0.25]
  a[0, 0, 2] = [0.0, 0.25, 0.75]
  # Σ A·d / Σ A over the patch block: (.25·4 + .25·4) / (.5 + 1) = 4/3
  d = interpret.attention_distance(a, (1, 2), patch_size=(4, 4), num_prefix=1)
  np.testing.assert_allclose(d, [4.0 / 3.0])
  # diagonal 2x2-grid map at distance 0; uniform: mean of {0, 1, 1, √2}·patch
  eye = np.eye(4)[None, None]
  uniform = np.full((1, 1, 4, 4), 0.25)
  d2 = interpret.attention_distance(np.concatenate([eye, uniform], 1), (2, 2), patch_size=(2, 2))
  np.testing.assert_allclose(d2, [0.0, 2.0 * (2 + np.sqrt(2)) / 4])


def test_high_norm_tokens_and_block_outputs(small_vit):
  norms = np.array([[1.0, 1.1, 0.9, 1.0, 10.0, 1.05]])
  np.testing.assert_array_equal(interpret.high_norm_tokens(norms),
                                [[False, False, False, False, True, False]])
  np.testing.assert_array_equal(interpret.high_norm_tokens(norms, threshold=1.02),
                                [[False, True, False, False, True, True]])
  model, variables, x = small_vit
  outputs = interpret.block_outputs(model, variables, x)
  # the MAP head holds an Attention layer too, but its output is [b, d]: left out
  assert list(outputs) == ["Transformer/encoderblock_0", "Transformer/encoderblock_1"]
  _, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                              mutable=["intermediates"]))(variables, x)
  for i in range(2):
    want = state["intermediates"]["Transformer"][f"encoderblock_{i}"]["__call__"][0][0]
    np.testing.assert_allclose(outputs[f"Transformer/encoderblock_{i}"], want, atol=1e-6)
  norms = interpret.token_norms(outputs)
  np.testing.assert_allclose(norms["Transformer/encoderblock_0"],
                             np.linalg.norm(outputs["Transformer/encoderblock_0"], axis=-1),
                             rtol=1e-6)


def test_plots(tmp_path):
  rows = [dict(op=op, seq=s, ms=s * (i + 1) / 100) for i, op in enumerate(["a", "b"])
          for s in (128, 512, 2048)] + [dict(op="c", seq="n/a", ms=1.0)]
  csv_path = tmp_path / "bench.csv"
  csv_path.write_text("op,seq,ms\n" + "".join(f"{r['op']},{r['seq']},{r['ms']}\n" for r in rows))
  json_path = tmp_path / "bench.json"
  json_path.write_text(json.dumps({"rows": rows}))
  loaded = plots.load_rows(str(csv_path))
  assert loaded[0] == dict(op="a", seq=128.0, ms=1.28)
  assert plots.load_rows(str(json_path)) == rows
  assert_png(plots.plot_curves(loaded, x="seq", y="ms", by="op", logx=True,
                               path=str(tmp_path / "curves.png")))
  with pytest.raises(ValueError, match="no row"):
    plots.plot_curves(rows, x="seq", y="missing", path=str(tmp_path / "x.png"))
  image = np.linspace(-1, 1, 64).reshape(8, 8, 1)
  maps = {"layer0": np.full((2, 4, 4), 0.25)}
  assert_png(plots.plot_attention_maps(image, maps, (2, 2), str(tmp_path / "maps.png")))
  assert_png(plots.plot_heatmaps(image, {"rollout": np.eye(2)}, str(tmp_path / "heat.png")))
  assert_png(plots.plot_distances([np.array([1.0, 2.0]), np.array([3.0, 1.0])],
                                  str(tmp_path / "dist.png")))
  assert_png(plots.plot_token_norms({"block0": np.abs(reference.normal(0, (2, 5)))},
                                    str(tmp_path / "norms.png")))


def test_plots_show_scales_heads_tokens_and_titles(tmp_path, monkeypatch):
  figures = keep_figures(monkeypatch)
  image = np.linspace(-1, 1, 64).reshape(8, 8, 1)
  maps = {"layer0": np.full((2, 5, 5), 0.2), "layer1": np.full((3, 5, 5), 0.2)}
  plots.plot_attention_maps(image, maps, (2, 2), str(tmp_path / "maps.png"), num_prefix=1,
                            query=0, title="label 3, predicted 5")
  plots.plot_heatmaps(image, {"rollout": np.eye(2), "AtMan": -np.eye(2)},
                      str(tmp_path / "heat.png"), title="label 3, predicted 5")
  plots.plot_distances([np.array([1.0, 2.0]), np.array([3.0, 1.0, 2.0])],
                       str(tmp_path / "dist.png"))
  norms = {"block0": np.array([[1.0, 1.0, 9.0, 1.0, 1.0, 1.0]])}
  labels = plots.token_labels(6, num_prefix=1, num_registers=1)
  assert labels == ["CLS", "0", "1", "2", "3", "reg 0"]
  plots.plot_token_norms(norms, str(tmp_path / "norms.png"), labels=labels,
                         high_norm={"block0": [False, False, True, False, False, False]})
  colorbars = lambda fig: sum(ax.get_label() == "<colorbar>" for ax in fig.axes)
  assert colorbars(figures["maps.png"]) == 5  # one per head of each layer
  assert colorbars(figures["heat.png"]) == 2
  assert "predicted 5" in figures["maps.png"].get_suptitle()
  assert "predicted 5" in figures["heat.png"].get_suptitle()
  legend = figures["dist.png"].axes[0].get_legend()
  assert [t.get_text() for t in legend.get_texts()] == ["head 0", "head 1", "head 2"]
  (bars,) = figures["norms.png"].axes
  assert [t.get_text() for t in bars.get_xticklabels()] == labels
  assert bars.get_yscale() == "linear" and bars.get_ylabel() == "L2 norm"
  assert [p.get_height() for p in bars.patches] == [1.0, 1.0, 9.0, 1.0, 1.0, 1.0]
  assert bars.patches[2].get_facecolor() != bars.patches[0].get_facecolor()  # high-norm token
  with pytest.warns(DeprecationWarning, match="bins"):
    plots.plot_token_norms(norms, str(tmp_path / "norms.png"), bins=30)
  with pytest.raises(ValueError, match="labels must name the 6 tokens"):
    plots.plot_token_norms(norms, str(tmp_path / "x.png"), labels=labels[:5])
  with pytest.raises(ValueError, match="num_tokens 2"):
    plots.token_labels(2, num_prefix=1, num_registers=2)


@pytest.mark.slow
def test_cli_explains_a_checkpointed_run(tmp_path):
  workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
  config = tiny_config(total_steps=4, ckpt_every=4, **{"model.depth": 2, "model.pool_type": "cls"})
  assert main_lib.train_and_evaluate(config, workdir)["step"] == 4
  summary = cli.explain(None, workdir, 3, out)  # the config saved in the workdir
  for name in ("attention_maps", "relevance", "distances", "token_norms"):
    assert_png(os.path.join(out, f"{name}.png"))
  with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(summary))
  assert written["step"] == 4 and written["image"] == 3 and written["grid"] == [2, 2]
  assert len(written["layers"]) == 2 and written["num_prefix"] == 1
  assert set(written["relevance"]) == {"rollout", "gradient rollout", "flow", "AtMan", "LRP"}
  numbers = [written["logits"], list(written["attention_distance"].values()),
             list(written["relevance"].values()),
             [[v["mean"], v["max"], v["median"]] for v in written["token_norms"].values()]]
  values = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in numbers])
  assert values.size > 20 and np.all(np.isfinite(values))
  assert cli.explain(config, workdir, 3, out)["logits"] == summary["logits"]
  with pytest.raises(FileNotFoundError, match="config.json"):
    cli.explain(None, str(tmp_path), 3, out)
  with pytest.raises(ValueError, match="--image"):
    cli.explain(config, workdir, 10**6, out)
  with pytest.raises(ValueError, match="--target"):
    cli.explain(config, workdir, 0, out, target=10)
