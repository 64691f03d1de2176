"""The token mixers and CNN attention modules of `big_attn.models.metaformer` beyond PoolFormer's
(MLP-Mixer, ConvMixer's depthwise conv, HorNet, Sequencer, SpectFormer, NiNformer, Activator, Context Clusters, LKCA, ParCNetV2, triplet
attention, ELA, residual attention, GAAM, DANet's position and channel attention): each against a float64 plain-JAX reference written
from its paper's formula, forward and gradients w.r.t. the input and every parameter, then in a
tiny MetaFormer and (the attention modules) a tiny ConvNeXt."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn.models import convnext, metaformer
from tests import reference as ref

NEW = ("gnconv", "bilstm2d", "spectral_filter", "nin_gating", "glu_activator",
       "context_cluster", "large_kernel_conv", "oversized_conv", "triplet_attention", "ela",
       "residual_attention", "gaam", "position_attention", "channel_self_attention")
# Awkward map: odd, non-square (the 2x2 context-cluster centres overlap), 16 channels.
X = ref.normal(0, (2, 3, 5, 16))


def dense(x, p):
  return x @ p["kernel"] + p["bias"]


def conv(x, kernel, pad, bias=None):
  """Stride-1 cross-correlation of `[b, h, w, ci]` with `[kh, kw, ci / groups, co]`, zero padding
  `pad` ((top, bottom), (left, right)); a kernel `[kh, kw, 1, ci]` is depthwise."""
  groups = x.shape[-1] // kernel.shape[2]
  out = jax.lax.conv_general_dilated(x, kernel, (1, 1), pad, feature_group_count=groups,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out if bias is None else out + bias


def same(k):
  return ((k // 2, (k - 1) // 2),) * 2


def sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


def gelu(x):
  return 0.5 * x * (1.0 + jnp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def token_dense(x, p):
  """Dense over the positions of `[b, h, w, c]` flattened to `[b, c, n]`."""
  b, h, w, c = x.shape
  return jnp.swapaxes(x.reshape(b, h * w, c), 1, 2) @ p["kernel"] + p["bias"]


def untoken(y, shape):
  return jnp.swapaxes(y, 1, 2).reshape(shape)


def ref_gnconv(x, p, order=3):
  c = x.shape[-1]
  dims = [c // 2 ** (order - 1 - k) for k in range(order)]
  y = dense(x, p["proj_in"])
  q = conv(y[..., dims[0]:], p["dwconv"]["kernel"], same(7), p["dwconv"]["bias"]) / 3.0
  start, qs = 0, []
  for d in dims:
    qs.append(q[..., start:start + d])
    start += d
  out = y[..., :dims[0]] * qs[0]
  for k in range(order - 1):
    out = dense(out, p[f"pw_{k}"]) * qs[k + 1]
  return dense(out, p["proj_out"])


def ref_lstm(seq, p, name):
  """[n, length, c] -> [n, length, hidden], a Python loop over time."""
  w, u, b = p[f"{name}_w"], p[f"{name}_u"], p[f"{name}_b"]
  hidden = u.shape[0]
  h = cell = jnp.zeros((seq.shape[0], hidden), seq.dtype)
  outs = []
  for t in range(seq.shape[1]):
    z = seq[:, t] @ w + h @ u + b
    i, f, g, o = (z[:, k * hidden:(k + 1) * hidden] for k in range(4))
    cell = sigmoid(f) * cell + sigmoid(i) * jnp.tanh(g)
    h = sigmoid(o) * jnp.tanh(cell)
    outs.append(h)
  return jnp.stack(outs, axis=1)


def ref_bilstm2d(x, p):
  b, h, w, c = x.shape
  both = lambda seq, name: jnp.concatenate(
      [ref_lstm(seq, p, f"{name}_fwd"), ref_lstm(seq[:, ::-1], p, f"{name}_bwd")[:, ::-1]], -1)
  cols = jnp.transpose(x, (0, 2, 1, 3)).reshape(b * w, h, c)
  v = jnp.transpose(both(cols, "vertical").reshape(b, w, h, -1), (0, 2, 1, 3))
  hz = both(x.reshape(b * h, w, c), "horizontal").reshape(b, h, w, -1)
  return dense(jnp.concatenate([v, hz], -1), p["fc"])


def ref_spectral_filter(x, p):
  # The unitary 2-D DFT as matrices; W acts on the half spectrum and is extended Hermitian.
  _, h, w, c = x.shape
  fh = np.exp(-2j * np.pi * np.outer(np.arange(h), np.arange(h)) / h) / np.sqrt(h)
  fw = np.exp(-2j * np.pi * np.outer(np.arange(w), np.arange(w)) / w) / np.sqrt(w)
  spec = jnp.einsum("uh,vw,bhwc->buvc", fh, fw, x.astype(jnp.complex128))
  half = p["filter"][..., 0] + 1j * p["filter"][..., 1]
  full = []
  for v in range(w):
    if v <= w // 2:
      full.append(half[:, v])
    else:  # X[u, v] of a real signal is conj(X[-u, w - v]); irfft keeps the real-input part
      full.append(jnp.conj(half[(-np.arange(h)) % h, w - v]))
  filt = jnp.stack(full, axis=1)
  # irfft2 reads only the half spectrum, so use Hermitian symmetrisation of the product.
  prod = spec * filt
  out = jnp.einsum("uh,vw,buvc->bhwc", fh.conj(), fw.conj(), prod)
  return out.real


def ref_nin_gating(x, p):
  u = dense(x, p["proj_in"])
  hidden = gelu(token_dense(u, p["token_0"]))
  g = untoken(hidden @ p["token_1"]["kernel"] + p["token_1"]["bias"], u.shape)
  return dense(u * g, p["proj_out"])


def ref_glu_activator(x, p):
  a, g = token_dense(x, p["value"]), token_dense(x, p["gate"])
  return untoken((a * sigmoid(g)) @ p["out"]["kernel"] + p["out"]["bias"], x.shape)


def ref_context_cluster(x, p, heads=4, proposals=(2, 2)):
  b, h, w, c = x.shape
  d = c // heads
  f = dense(x, p["f"]).reshape(b, h * w, heads, d)
  v = dense(x, p["v"]).reshape(b, h * w, heads, d)
  ph, pw = proposals
  regions = []
  for i in range(ph):
    for j in range(pw):
      rows = range(int(np.floor(i * h / ph)), int(np.ceil((i + 1) * h / ph)))
      cols = range(int(np.floor(j * w / pw)), int(np.ceil((j + 1) * w / pw)))
      regions.append([r * w + q for r in rows for q in cols])
  fc = jnp.stack([f[:, r].mean(1) for r in regions], 1)  # [b, m, heads, d]
  vc = jnp.stack([v[:, r].mean(1) for r in regions], 1)
  unit = lambda y: y / jnp.linalg.norm(y, axis=-1, keepdims=True)
  s = sigmoid(p["alpha"] * jnp.einsum("bind,bjnd->bnij", unit(f), unit(fc)) + p["beta"])
  s = s * (s == s.max(-1, keepdims=True))
  agg = (jnp.swapaxes(vc, 1, 2) + jnp.einsum("bnij,bind->bnjd", s, v)) / (1 + s.sum(2))[..., None]
  out = jnp.einsum("bnij,bnjd->bind", s, agg)
  return dense(out.reshape(b, h, w, c), p["proj"])


def ref_large_kernel_conv(x, p):
  v = dense(x, p["value"])
  return dense(conv(v, p["dwconv"]["kernel"], same(7), p["dwconv"]["bias"]), p["proj"])


def ref_oversized_conv(x, p):
  _, h, w, c = x.shape
  a = dense(x, p["gate"])
  a = jnp.concatenate([
      conv(a[..., :c // 2], p["conv_v"]["kernel"], ((h - 1, h - 1), (0, 0)), p["conv_v"]["bias"]),
      conv(a[..., c // 2:], p["conv_h"]["kernel"], ((0, 0), (w - 1, w - 1)), p["conv_h"]["bias"])],
      -1)
  return dense(dense(x, p["value"]) * a, p["proj"])


def ref_triplet_attention(x, p):
  def gate(pooled_max, pooled_mean, q):
    z = jnp.stack([pooled_max, pooled_mean], -1)
    return sigmoid(conv(z, q["kernel"], same(7), q["bias"]))[..., 0]
  g_hc = gate(x.max(2), x.mean(2), p["conv_hc"])[:, :, None]
  g_wc = gate(x.max(1), x.mean(1), p["conv_wc"])[:, None]
  g_hw = gate(x.max(3), x.mean(3), p["conv_hw"])[..., None]
  return x * (g_hc + g_wc + g_hw) / 3


def ref_ela(x, p, groups=16):
  k = p["conv"]["kernel"][:, 0]  # [7, c]

  def branch(seq):  # [b, l, c]
    xp = jnp.pad(seq, ((0, 0), (3, 3), (0, 0)))
    y = sum(xp[:, i:i + seq.shape[1]] * k[i] for i in range(7))
    b, l, c = y.shape
    g = y.reshape(b, l, groups, c // groups)
    mu = g.mean((1, 3), keepdims=True)
    var = ((g - mu) ** 2).mean((1, 3), keepdims=True)
    y = ((g - mu) / jnp.sqrt(var + 1e-5)).reshape(b, l, c)
    return sigmoid(y * p["norm"]["scale"] + p["norm"]["bias"])
  return x * branch(x.mean(2))[:, :, None] * branch(x.mean(1))[:, None]


def ref_residual_attention(x, p):
  b, h, w, c = x.shape
  hh, ww = -(-h // 2), -(-w // 2)
  # 3x3 stride-2 max pool, SAME: total padding (hh - 1) * 2 + 3 - h, the smaller half first.
  ph, pw = max((hh - 1) * 2 + 3 - h, 0), max((ww - 1) * 2 + 3 - w, 0)
  xp = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
               constant_values=-np.inf)
  m = jnp.stack([jnp.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max((1, 2))
                            for j in range(ww)], 1) for i in range(hh)], 1)
  m = jnp.maximum(conv(m, p["dwconv"]["kernel"], same(3), p["dwconv"]["bias"]), 0)

  def interp(n_out, n_in):  # bilinear, half-pixel centres, clamped at the edges
    a = np.zeros((n_out, n_in))
    for o in range(n_out):
      src = min(max((o + 0.5) * n_in / n_out - 0.5, 0), n_in - 1)
      lo = int(np.floor(src))
      hi = min(lo + 1, n_in - 1)
      a[o, lo] += 1 - (src - lo)
      a[o, hi] += src - lo
    return a
  m = jnp.einsum("ip,jq,bpqc->bijc", interp(h, hh), interp(w, ww), m)
  m = sigmoid(dense(jnp.maximum(dense(m, p["mask_0"]), 0), p["mask_1"]))
  return (1 + m) * x


def ref_gaam(x, p, heads=4):
  c = x.shape[-1]
  mu = x.mean((1, 2), keepdims=True)
  var = ((x - mu) ** 2).mean((1, 2), keepdims=True) + 1e-5
  gate = 1.0
  for offset, scale in zip(p["mean_offset"], p["scale"]):
    per_channel = lambda a: jnp.repeat(a, c // heads)
    gate = gate * jnp.exp(-(x - mu - per_channel(offset)) ** 2
                          / (2 * per_channel(scale) ** 2 * var))
  return x * gate


def ref_position_attention(x, p, reduction=8):
  """DANet's position attention: x + γ·softmax_j(B_i·C_j) D_j over the h·w positions."""
  b, h, w, c = x.shape
  t = x.reshape(b, h * w, c)
  assert p["query"]["kernel"].shape == (c, c // reduction)
  logits = jnp.einsum("bid,bjd->bij", dense(t, p["query"]), dense(t, p["key"]))
  e = jnp.exp(logits - logits.max(-1, keepdims=True))
  s = e / e.sum(-1, keepdims=True)
  return x + p["gamma"] * jnp.einsum("bij,bjc->bic", s, dense(t, p["value"])).reshape(x.shape)


def ref_channel_self_attention(x, p):
  """DANet's channel attention: x_i + β Σ_j softmax_j(max_k E_ik − E_ij) x_j, E = XᵀX."""
  b, h, w, c = x.shape
  t = x.reshape(b, h * w, c)
  energy = jnp.einsum("bni,bnj->bij", t, t)
  e = jnp.exp(energy.max(-1, keepdims=True) - energy)
  a = e / e.sum(-1, keepdims=True)
  return x + p["beta"] * jnp.einsum("bij,bnj->bni", a, t).reshape(x.shape)


REFERENCES = {name: globals()[f"ref_{name}"] for name in NEW}


def random_params(module, x, seed=1, std=0.3):
  boxed = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype),
                      nn.unbox(boxed))


@pytest.mark.parametrize("name", NEW)
def test_mixer_matches_its_formula_forward_and_gradient(name):
  module = metaformer.get_mixer(name)()
  params = random_params(module, X)
  if name == "gaam":  # scales away from 0 so the gate is not vanishingly narrow
    params["scale"] = params["scale"] + 1.0
  leaves, tree = jax.tree.flatten(params)
  ref_fn = REFERENCES[name]
  ref.assert_matches(
      lambda x, *leaves: module.apply({"params": jax.tree.unflatten(tree, leaves)}, x),
      lambda x, *leaves: ref_fn(x, jax.tree.unflatten(tree, leaves)), [X, *leaves],
      tol=dict(rtol=2e-4, atol=2e-4))


def ref_mlp_mixer(x, p):
  """MLP-Mixer's token mixing: per channel, W2 GELU(W1 x) over the positions."""
  return untoken(dense(gelu(token_dense(x, p["token_0"])), p["token_1"]), x.shape)


def ref_conv_unseparated(x, p):
  """ConvMixer's spatial mixing: GELU(DepthwiseConv_k(x)) with bias (exact GELU)."""
  y = conv(x, p["dwconv"]["kernel"], same(7), p["dwconv"]["bias"])
  return 0.5 * y * (1.0 + jax.scipy.special.erf(y / np.sqrt(2.0)))


@pytest.mark.parametrize("name, args, ref_fn", [
    ("mlp_mixer", {}, ref_mlp_mixer),
    ("conv", dict(separable=False), ref_conv_unseparated)])
def test_mlp_mixer_and_convmixer_mixers_match_their_formulas(name, args, ref_fn):
  module = metaformer.get_mixer(name)(**args)
  params = random_params(module, X)
  leaves, tree = jax.tree.flatten(params)
  ref.assert_matches(
      lambda x, *leaves: module.apply({"params": jax.tree.unflatten(tree, leaves)}, x),
      lambda x, *leaves: ref_fn(x, jax.tree.unflatten(tree, leaves)), [X, *leaves],
      tol=dict(rtol=2e-4, atol=2e-4))


def test_mixer_layer_of_mlp_mixer():
  """MetaFormerBlock(mlp_mixer, LayerNorm, no layer scale) is MLP-Mixer's layer:
  U = X + W2 GELU(W1 LN(X)ᵀ)ᵀ (over the patches), Y = U + W4 GELU(W3 LN(U)) (per patch)."""
  block = metaformer.MetaFormerBlock(mixer="mlp_mixer", mixer_args=dict(token_mlp_ratio=2.0),
                                     norm="layer", layer_scale_init=0.0)
  params = random_params(block, X)
  leaves, tree = jax.tree.flatten(params)

  def ref_fn(x, *leaves):
    p = jax.tree.unflatten(tree, leaves)
    def ln(y, q):
      mu = y.mean(-1, keepdims=True)
      return (y - mu) / jnp.sqrt(((y - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * q[
          "scale"] + q["bias"]
    u = x + ref_mlp_mixer(ln(x, p["norm1"]), p["mixer"])
    return u + dense(gelu(dense(ln(u, p["norm2"]), p["mlp"]["Dense_0"])), p["mlp"]["Dense_1"])
  ref.assert_matches(lambda x, *leaves: block.apply({"params": jax.tree.unflatten(tree, leaves)},
                                                    x),
                     ref_fn, [X, *leaves], tol=dict(rtol=2e-4, atol=2e-4))


def test_registered_and_in_a_tiny_metaformer():
  assert set(NEW) <= set(metaformer.mixer_names())
  # A stage per mixer (one compile); 32x32 images give 8x8 tokens, then 4x4, 2x2 and 1x1.
  order = ("context_cluster", "bilstm2d", "oversized_conv", "residual_attention", "gnconv",
           "triplet_attention", "spectral_filter", "nin_gating", "glu_activator",
           "large_kernel_conv", "ela", "gaam", "position_attention", "channel_self_attention")
  assert sorted(order) == sorted(NEW)
  x = ref.normal(0, (2, 32, 32, 3))
  model = metaformer.Model(num_classes=3, depths=(1,) * 14, dims=(16,) * 14, mixers=order,
                           layer_scale_init=1.0, head_zeroinit=False)
  params = random_params(model, x, std=0.1)
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
  assert np.abs(np.asarray(logits[0] - logits[1])).max() > 1e-6


def test_convnext_attention_modules():
  x = ref.normal(0, (2, 8, 8, 3))
  model = convnext.Model(num_classes=3, depths=(1, 1, 1, 1), dims=(16,) * 4, stem_size=1,
                         layer_scale_init=1.0,
                         attention_module=("triplet_attention", "ela", "residual_attention",
                                           "gaam"))
  params = random_params(model, x, std=0.1)
  assert set(params["stage_0_block_0"]["attention"]) == {"conv_hc", "conv_wc", "conv_hw"}
  assert set(params["stage_3_block_0"]["attention"]) == {"mean_offset", "scale"}
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
  # One name for every stage, with options; None per stage leaves the block as the paper's.
  model = convnext.Model(num_classes=3, depths=(1, 1), dims=(16, 16), stem_size=1,
                         attention_module=("ela", None), attention_module_args=dict(num_groups=4))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
  assert shapes["stage_0_block_0"]["attention"]["norm"]["scale"].shape == (16,)
  assert "attention" not in shapes["stage_1_block_0"]
  model = convnext.Model(num_classes=3, depths=(1,), dims=(16,), stem_size=1,
                         attention_module="position_attention",
                         attention_module_args=dict(reduction=4))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
  assert shapes["stage_0_block_0"]["attention"]["query"]["kernel"].shape == (16, 4)
  model = convnext.Model(num_classes=3, depths=(1,), dims=(16,), stem_size=1,
                         attention_module="channel_self_attention")
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
  assert shapes["stage_0_block_0"]["attention"]["beta"].shape == ()


def test_configs_reach_the_mixers_by_name():
  from tests.test_train import _config_module  # pylint: disable=g-import-not-at-top
  from big_attn import main as main_lib  # pylint: disable=g-import-not-at-top
  count = lambda model, size: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 1)))))
  config = _config_module("metaformer_digits").get_config("mixer=gnconv+bilstm2d+ela+gaam")
  assert count(metaformer.Model(num_classes=10, **config.model.to_dict()), 32) > 0
  config = _config_module("convnext_digits").get_config("module=triplet_attention")
  main_lib.check_config(config)
  assert config.model.attention_module == "triplet_attention"
  assert count(convnext.Model(num_classes=10, **config.model.to_dict()), 16) > 0


@pytest.mark.parametrize("name, args, error, match", [
    ("gnconv", dict(order=6), ValueError, "divisible by 2"),
    ("bilstm2d", dict(hidden_ratio=0.0), ValueError, "hidden_ratio"),
    ("nin_gating", dict(token_mlp_ratio=0.0), ValueError, "nin_gating: token_mlp_ratio"),
    ("glu_activator", dict(token_mlp_ratio=-1.0), ValueError, "token_mlp_ratio"),
    ("context_cluster", dict(num_heads=3), ValueError, "num_heads"),
    ("context_cluster", dict(proposals=(0, 2)), ValueError, "proposals"),
    ("large_kernel_conv", dict(kernel_size=0), ValueError, "kernel_size"),
    ("ela", dict(num_groups=5), ValueError, "num_groups"),
    ("gaam", dict(num_heads=6), ValueError, "num_heads"),
    ("gaam", dict(num_gaussians=0), ValueError, "num_gaussians"),
    ("position_attention", dict(reduction=3), ValueError, "position_attention mixer: reduction"),
])
def test_bad_mixer_arguments(name, args, error, match):
  with pytest.raises(error, match=match):
    jax.eval_shape(metaformer.get_mixer(name)(**args).init, jax.random.key(0), X)


def test_bad_convnext_attention_module():
  x = jnp.zeros((1, 8, 8, 3))
  build = lambda **kw: jax.eval_shape(convnext.Model(num_classes=2, depths=(1, 1), dims=(16, 16),
                                                     stem_size=1, **kw).init,
                                      jax.random.key(0), x)
  with pytest.raises(ValueError, match="attention_module must be None, one of "
                     "channel_self_attention, ela, gaam"):
    build(attention_module="pool")
  with pytest.raises(ValueError, match=r"per stage \(2\)"):
    build(attention_module=("ela",))
  with pytest.raises(TypeError, match="attention_module_args must be a dict"):
    build(attention_module="ela", attention_module_args=3)
