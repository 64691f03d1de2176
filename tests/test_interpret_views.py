"""bertviz's head, model and neuron views (A Multiscale Visualization of Attention in the
Transformer Model) in `big_attn.interpret.plots`: the neuron view's numbers against float64
NumPy, the drawn lines' opacities against the weights, and the views of a tiny ViT's captured
attention."""
from __future__ import annotations


import flax.linen as nn
import jax
import matplotlib.colors
import numpy as np
import pytest

from big_attn import interpret
from big_attn.interpret import plots
from big_attn.models import vit
from tests import reference
from tests.plot_checks import assert_png, keep_figures


@pytest.fixture
def figures(monkeypatch):
  """`{file name: Figure}` of every plot saved during the test."""
  return keep_figures(monkeypatch)


def _softmax_rows(rng, shape):
  s = rng.normal(size=shape)
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _lines(fig):
  """`(segments, alphas, rgb)` of each `LineCollection` in the figure's axes, in drawing order."""
  return [(np.asarray(c.get_segments()), c.get_colors()[:, 3], c.get_colors()[:, :3])
          for ax in fig.axes for c in ax.collections]


def test_neuron_view_values_match_numpy():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
  values = plots.neuron_view_values(q.astype(np.float32), k.astype(np.float32), 2)
  products = np.array([[q[2, c] * k[j, c] for c in range(3)] for j in range(5)])
  scores = np.array([sum(q[2] * k[j]) for j in range(5)]) / np.sqrt(3)
  weights = np.exp(scores) / np.exp(scores).sum()
  for name, want in dict(query=q[2], keys=k, products=products, scores=scores,
                         weights=weights).items():
    assert values[name].dtype == np.float64
    np.testing.assert_allclose(values[name], want, atol=1e-6, rtol=1e-6)
  scaled = plots.neuron_view_values(q, k, -1, scale=0.5)
  np.testing.assert_allclose(scaled["scores"], 0.5 * k @ q[3], rtol=1e-12)
  np.testing.assert_allclose(scaled["weights"].sum(), 1.0, rtol=1e-12)
  with pytest.raises(ValueError, match="query and key must be"):
    plots.neuron_view_values(q, k[:, :2], 0)
  with pytest.raises(ValueError, match="token 4 is out of range"):
    plots.neuron_view_values(q, k, 4)


def test_head_and_model_views_draw_the_weights(tmp_path, figures):
  rng = np.random.default_rng(1)
  attention = _softmax_rows(rng, (2, 3, 4, 4))  # [layers, heads, q, k]
  labels = plots.token_labels(4, num_prefix=1)
  assert_png(plots.plot_head_view(attention, str(tmp_path / "head.png"), layer=1, heads=[0, 2],
                                  labels=labels))
  lines = _lines(figures["head.png"])
  assert len(lines) == 2
  for (segments, alphas, rgb), h in zip(lines, [0, 2]):
    np.testing.assert_allclose(alphas, attention[1, h].ravel(), rtol=1e-6)
    assert segments.shape == (16, 2, 2)
    np.testing.assert_array_equal(segments[6], [[0.0, -1.0], [1.0, -2.0]])  # query 1 -> key 2
    np.testing.assert_allclose(rgb, np.tile(matplotlib.colors.to_rgb(f"C{h}"), (16, 1)))
  texts = [t.get_text() for t in figures["head.png"].axes[0].texts]
  assert texts == labels + labels
  legend = figures["head.png"].axes[0].get_legend()
  assert [t.get_text() for t in legend.get_texts()] == ["head 0", "head 2"]

  plots.plot_head_view(list(attention), str(tmp_path / "one.png"), query=3)
  lines = _lines(figures["one.png"])
  assert len(lines) == 3
  for h, (segments, alphas, _) in enumerate(lines):
    np.testing.assert_allclose(alphas, attention[0, h, 3], rtol=1e-6)
    np.testing.assert_array_equal(segments[:, 0], [[0.0, -3.0]] * 4)

  ragged = [attention[0], attention[1, :2]]  # the second layer has 2 heads
  assert_png(plots.plot_model_view(ragged, str(tmp_path / "model.png"),
                                   layer_names=["block 0", "block 1"]))
  fig = figures["model.png"]
  assert len(fig.axes) == 2 * 3
  for index, ax in enumerate(fig.axes):
    layer, h = divmod(index, 3)
    if layer == 1 and h == 2:
      assert not ax.collections
      continue
    (lines,) = ax.collections
    np.testing.assert_allclose(lines.get_colors()[:, 3], attention[layer, h].ravel(), rtol=1e-6)
  assert [ax.get_title() for ax in fig.axes[:3]] == ["head 0", "head 1", "head 2"]


def test_neuron_view_draws_its_values(tmp_path, figures):
  rng = np.random.default_rng(2)
  q, k = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  assert_png(plots.plot_neuron_view(q, k, 1, str(tmp_path / "neuron.png"),
                                    labels=["CLS", "0", "1"]))
  values = plots.neuron_view_values(q, k, 1)
  shown = [np.asarray(ax.images[0].get_array()) for ax in figures["neuron.png"].axes
           if ax.images and ax.get_label() != "<colorbar>"]
  want = [values["query"][None], values["keys"], values["products"],
          values["scores"][:, None], values["weights"][:, None]]
  assert len(shown) == len(want)
  for got, expected in zip(shown, want):
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_views_reject_bad_inputs(tmp_path):
  attention = np.full((2, 2, 3, 3), 1 / 3)
  out = str(tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"attention must be \[layers\]\[heads, q, k\]"):
    plots.plot_head_view(attention[0], out)
  with pytest.raises(ValueError, match="attention must hold at least one layer"):
    plots.plot_model_view([], out)
  with pytest.raises(ValueError, match="labels must name the 3 tokens, got 2"):
    plots.plot_head_view(attention, out, labels=["a", "b"])
  with pytest.raises(ValueError, match="heads: head 2 is out of range for 2"):
    plots.plot_head_view(attention, out, heads=[2])
  with pytest.raises(ValueError, match="layer 2 is out of range"):
    plots.plot_head_view(attention, out, layer=2)
  with pytest.raises(ValueError, match="query 3 is out of range"):
    plots.plot_head_view(attention, out, query=3)
  with pytest.raises(ValueError, match="query_labels must name the 1 query tokens"):
    plots.plot_head_view([np.full((2, 1, 3), 1 / 3)], out, labels=["a", "b", "c"])
  with pytest.raises(ValueError, match="layer_names must name the 2 layers"):
    plots.plot_model_view(attention, out, layer_names=["a"])
  with pytest.raises(ValueError, match="labels must name the 3 tokens"):
    plots.plot_neuron_view(np.ones((3, 2)), np.ones((3, 2)), 0, out, labels=["a"])


def test_views_of_a_tiny_vits_captured_attention(tmp_path, figures):
  model = vit.Model(num_classes=3, width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(4, 4),
                    pool_type="cls")
  x = reference.normal(0, (1, 8, 8, 1))
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))
  vectors = interpret.query_key_vectors(model, variables, x)
  assert len(vectors) == 2
  maps = [np.asarray(v["map"][0], np.float64) for v in vectors.values()]  # [heads, 5, 5]
  labels = plots.token_labels(5, num_prefix=1)
  plots.plot_head_view(maps, str(tmp_path / "head.png"), layer=1, labels=labels, query=0)
  for h, (_, alphas, _) in enumerate(_lines(figures["head.png"])):
    np.testing.assert_allclose(alphas, maps[1][h, 0], rtol=1e-6)
  plots.plot_model_view(dict(zip(vectors, maps)), str(tmp_path / "model.png"))
  assert len(figures["model.png"].axes) == 2 * 2
  assert [t.get_text() for t in figures["model.png"].axes[2].texts] == [list(vectors)[1]]
  last = vectors[list(vectors)[-1]]
  q, k = (np.asarray(last[n][0, :, 1], np.float64) for n in ("query", "key"))  # head 1
  values = plots.neuron_view_values(q, k, 0)
  np.testing.assert_allclose(values["weights"], maps[1][1, 0], atol=2e-6)  # the captured row
  assert_png(plots.plot_neuron_view(q, k, 0, str(tmp_path / "neuron.png"), labels=labels))
