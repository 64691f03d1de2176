"""Pallas flash attention (GPU kernel, Triton lowering) in interpret mode on CPU.

Forward and gradients against the float64 references of `tests/reference.py`, on lengths that
are not multiples of the block size (16), q_len != kv_len, GQA, every mask feature and their
combinations, the sigmoid and signed (Cog) normalizers and bfloat16; block skipping outside
the causal/window band; linear compiled memory; every op's `implementation="pallas"` against its
XLA path, and the LM's `attention_impl`; validation.
"""
import functools

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers
from big_attn import models
from big_attn import ops
from pallas_kernels import BlockSizes, flash_attention, flash_attention_reference
from pallas_kernels import flash_block_backward, flash_block_forward
from pallas_kernels.flash_attention import gpu_triton
from tests import reference

BLOCKS = BlockSizes(16, 16, 16, 16, 16, 16)
INTERPRET = jax.default_backend() != "gpu"  # The comparisons run compiled on a GPU.


def _inputs(seed, b, t, s, n, k, d, dv, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, n, d))
  kk = rng.normal(size=(b, s, k, d))
  v = rng.normal(size=(b, s, k, dv))
  ct = rng.normal(size=(b, t, n, dv))
  return tuple(jnp.asarray(x, dtype) for x in (q, kk, v, ct))


def _segments(seed, b, t, s, num=3):
  """Packed-sequence ids (sorted, so segments are contiguous), as a (q, kv) pair."""
  rng = np.random.default_rng(seed + 1)
  return (jnp.asarray(np.sort(rng.integers(0, num, (b, t)), axis=1), jnp.int32),
          jnp.asarray(np.sort(rng.integers(0, num, (b, s)), axis=1), jnp.int32))


def _kernel_vjp(q, k, v, ct, blocks=BLOCKS, **kwargs):
  """Output and (dq, dk, dv) of the kernel in one compiled function: interpreted, or compiled
  on a GPU (`experiments/gpu_check.sh` runs these tests there)."""
  @jax.jit
  def run(q, k, v, ct):
    out, vjp = jax.vjp(
        lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks, interpret=INTERPRET,
                                        **kwargs),
        q, k, v)
    return out, vjp(ct.astype(out.dtype))
  return run(q, k, v, ct)


def _sigmoid_f64(q, k, v, *, mask, scale, soft_cap, bias):
  """Σ_j m_ij σ(cap·tanh(scale·q_i·k_j/cap) + b) v_j in float64 (Ramapuram et al., 2024)."""
  q, k, v = reference.f64(q, k, v)
  n = q.shape[2]
  k, v = reference.repeat_kv(k, n), reference.repeat_kv(v, n)
  s = jnp.einsum("btnd,bsnd->bnts", q, k) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  w = jnp.where(mask, 1.0 / (1.0 + jnp.exp(-(s + bias))), 0.0)
  return jnp.einsum("bnts,bsnd->btnd", w, v)


def _signed_f64(q, k, v, *, mask, scale, soft_cap):
  """Σ_j sign(s_ij) softmax_j(|s_ij|) v_j, s = cap·tanh(scale·q_i·k_j/cap), in float64 (Cog
  attention, Lv et al., 2024)."""
  q, k, v = reference.f64(q, k, v)
  n = q.shape[2]
  k, v = reference.repeat_kv(k, n), reference.repeat_kv(v, n)
  s = jnp.einsum("btnd,bsnd->bnts", q, k) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  w = jnp.sign(s) * reference.masked_softmax(jnp.abs(s), mask)
  return jnp.einsum("bnts,bsnd->btnd", w, v)


def _reference_vjp(q, k, v, ct, *, segment_ids=None, is_causal=False, local_window_size=None,
                   logits_soft_cap=None, normalizer="softmax", sigmoid_bias=None):
  b, t, n, d = q.shape
  s = k.shape[1]
  mask = reference.full_mask(b, n, t, s, is_causal=is_causal, segment_ids=segment_ids,
                             window=local_window_size)
  scale = 1.0 / np.sqrt(d)
  with reference.x64():
    if normalizer == "sigmoid":
      bias = -np.log(s) if sigmoid_bias is None else sigmoid_bias
      fn = lambda q, k, v: _sigmoid_f64(q, k, v, mask=mask, scale=scale,
                                        soft_cap=logits_soft_cap, bias=bias)
    elif normalizer == "signed":
      fn = lambda q, k, v: _signed_f64(q, k, v, mask=mask, scale=scale,
                                       soft_cap=logits_soft_cap)
    else:
      fn = lambda q, k, v: reference.softmax_attention(q, k, v, mask=mask, scale=scale,
                                                       soft_cap=logits_soft_cap)
    out, vjp = jax.vjp(fn, *reference.f64(q, k, v))
    grads = vjp(reference.f64(ct))
    return np.asarray(out), [np.asarray(g) for g in grads]


def _check(q, k, v, ct, tol, blocks=BLOCKS, **kwargs):
  out, grads = _kernel_vjp(q, k, v, ct, blocks, **kwargs)
  assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == q.dtype
  want_out, want_grads = _reference_vjp(q, k, v, ct, **kwargs)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=tol, rtol=tol)
  for name, got, want, x in zip(("dq", "dk", "dv"), grads, want_grads, (q, k, v)):
    assert got.shape == x.shape and got.dtype == x.dtype, name
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol, rtol=tol,
                               err_msg=name)


# (batch, q_len, kv_len, heads, kv_heads, head_dim, value_dim), keyword arguments.
CASES = {
    # Head dims off the tile width (masked loads), one key head per query head.
    "plain_mha_head_dim12": ((1, 37, 53, 2, 2, 12, 12), {}),
    "causal_gqa4:2": ((2, 37, 53, 4, 2, 16, 32), dict(is_causal=True)),
    "causal_gqa4:1_q_longer": ((1, 53, 37, 4, 1, 32, 16), dict(is_causal=True)),
    "window_gqa4:1": ((1, 45, 45, 4, 1, 16, 16), dict(local_window_size=(5, 3))),
    "causal_window_softcap_mixed_blocks": (
        (1, 50, 50, 2, 1, 16, 16),
        dict(is_causal=True, local_window_size=20, logits_soft_cap=2.0,
             blocks=BlockSizes(32, 16, 16, 32, 32, 16))),
    "segments_causal_softcap_gqa": ((2, 37, 53, 4, 2, 16, 16),
                                    dict(segments=True, is_causal=True, logits_soft_cap=3.0)),
    "segments_window": ((1, 40, 40, 2, 2, 32, 32),
                        dict(segments=True, local_window_size=(7, 0))),
    "sigmoid_causal_gqa": ((1, 37, 53, 4, 2, 16, 16), dict(normalizer="sigmoid", is_causal=True)),
    # A head dim that is not a power of two (zero-padded inside to 128).
    "head_dim72_causal_gqa": ((1, 37, 53, 4, 2, 72, 72), dict(is_causal=True)),
    "sigmoid_segments_window_softcap_bias": (
        (2, 45, 45, 4, 1, 16, 32),
        dict(normalizer="sigmoid", segments=True, local_window_size=(6, 2), logits_soft_cap=2.0,
             sigmoid_bias=-1.5)),
    "signed_causal_segments_window_softcap_gqa": (
        (2, 37, 53, 4, 2, 16, 32),
        dict(normalizer="signed", is_causal=True, segments=True, local_window_size=(9, 0),
             logits_soft_cap=2.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case):
  shape, kwargs = CASES[case]
  kwargs = dict(kwargs)
  b, t, s, n, k, d, dv = shape
  q, kk, v, ct = _inputs(0, b, t, s, n, k, d, dv)
  if kwargs.pop("segments", False):
    kwargs["segment_ids"] = _segments(0, b, t, s)
  _check(q, kk, v, ct, 5e-5, **kwargs)


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_bfloat16(normalizer):
  q, k, v, ct = _inputs(1, 1, 37, 53, 4, 2, 32, 32, jnp.bfloat16)
  _check(q, k, v, ct, 3e-2, is_causal=True, normalizer=normalizer)


def test_self_attention_segment_ids_array():
  q, k, v, ct = _inputs(2, 2, 29, 29, 2, 1, 16, 16)
  seg = _segments(2, 2, 29, 29)[0]
  out, _ = _kernel_vjp(q, k, v, ct, segment_ids=seg)
  want, _ = _reference_vjp(q, k, v, ct, segment_ids=(seg, seg))
  np.testing.assert_allclose(out, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_fully_masked_rows_give_zeros(normalizer):
  q, k, v, ct = _inputs(3, 1, 21, 34, 2, 1, 16, 16)
  q_seg = jnp.asarray(np.r_[np.zeros(10), np.full(6, 7), np.ones(5)][None], jnp.int32)
  kv_seg = jnp.asarray(np.r_[np.zeros(20), np.ones(14)][None], jnp.int32)  # No segment 7.
  kwargs = dict(segment_ids=(q_seg, kv_seg), normalizer=normalizer)
  out, grads = _kernel_vjp(q, k, v, ct, **kwargs)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
  np.testing.assert_array_equal(np.asarray(out[0, 10:16]), 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0][0, 10:16]), 0.0)
  want_out, want_grads = _reference_vjp(q, k, v, ct, **kwargs)
  np.testing.assert_allclose(out, want_out, atol=5e-5, rtol=5e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(local_window_size=(16, 0))],
                         ids=["causal", "window"])
def test_blocks_outside_the_band_are_never_loaded(kwargs):
  """NaNs in keys/values/queries that no row of a block can see: a block that were loaded
  and masked would still spread them (0 · NaN = NaN in the matmuls), a skipped one cannot."""
  q, k, v, ct = _inputs(4, 1, 64, 64, 2, 1, 16, 16)
  nan = jnp.float32(jnp.nan)
  # Query block 0 (rows 0..15) sees only key block 0: keys/values 16.. never enter its loop.
  out, (dq, _, _) = _kernel_vjp(q, k.at[:, 16:].set(nan), v.at[:, 16:].set(nan), ct, **kwargs)
  want_out, (want_dq, _, _) = _reference_vjp(q, k, v, ct, **kwargs)
  np.testing.assert_allclose(out[:, :16], want_out[:, :16], atol=5e-5, rtol=5e-5)
  np.testing.assert_allclose(dq[:, :16], want_dq[:, :16], atol=5e-5, rtol=5e-5)
  assert bool(jnp.all(jnp.isnan(out[:, 32:])))  # The poison does reach the rows that load it.
  # Key block 3 (keys 48..63) is seen by query rows >= 48 only: queries 0..31 never load.
  _, (_, dk, dv) = _kernel_vjp(q.at[:, :32].set(nan), k, v, ct, **kwargs)
  _, (_, want_dk, want_dv) = _reference_vjp(q.at[:, :32].set(0.0), k, v, ct.at[:, :32].set(0.0),
                                            **kwargs)
  np.testing.assert_allclose(dk[:, 48:], want_dk[:, 48:], atol=5e-5, rtol=5e-5)
  np.testing.assert_allclose(dv[:, 48:], want_dv[:, 48:], atol=5e-5, rtol=5e-5)


def _temp_bytes(fn, seq_len):
  x = jax.ShapeDtypeStruct((1, seq_len, 2, 32), jnp.float32)
  step = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
  return step.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_compiled_memory_grows_linearly():
  """Forward + backward temporaries at 512 and 1024 tokens: 2x for the kernel (tiles and
  per-row statistics), 4x for the reference that builds the [q_len, kv_len] matrix. The
  interpreter lowers the kernels to XLA loops over the grid with block-sized buffers, so its
  temporaries are the ones a compiled kernel would hold per program, times nothing else."""
  blocks = BlockSizes(64, 64, 64, 64, 64, 64)
  kernel = lambda q, k, v: flash_attention(q, k, v, is_causal=True, block_sizes=blocks,
                                           interpret=True)
  ref = lambda q, k, v: flash_attention_reference(q, k, v, is_causal=True)
  kernel_growth = _temp_bytes(kernel, 1024) / _temp_bytes(kernel, 512)
  ref_growth = _temp_bytes(ref, 1024) / _temp_bytes(ref, 512)
  assert kernel_growth < 2.5, kernel_growth
  assert ref_growth > 3.5, ref_growth


def test_reference_matches_float64():
  q, k, v, ct = _inputs(5, 2, 23, 31, 4, 2, 8, 8)  # Any head dim: plain JAX.
  kwargs = dict(segment_ids=_segments(5, 2, 23, 31), is_causal=True, local_window_size=(9, 0),
                logits_soft_cap=2.5)
  out = flash_attention_reference(q, k, v, **kwargs)
  want, _ = _reference_vjp(q, k, v, ct, **kwargs)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_dot_product_attention_routes_to_the_kernel():
  q, k, v, _ = _inputs(6, 1, 24, 24, 2, 1, 16, 16)
  seg = _segments(6, 1, 24, 24)[0]
  pallas = lambda q, k, v: ops.dot_product_attention(
      q, k, v, is_causal=True, segment_ids=seg, implementation="pallas")
  assert "pallas_call" in str(jax.make_jaxpr(pallas)(q, k, v))
  # On CPU, implementation=None takes the XLA path.
  default = lambda q, k, v: ops.dot_product_attention(q, k, v, is_causal=True, segment_ids=seg)
  assert "pallas_call" not in str(jax.make_jaxpr(default)(q, k, v))
  np.testing.assert_allclose(pallas(q, k, v), default(q, k, v), atol=5e-5, rtol=5e-5)
  with pytest.raises(ValueError, match="mask"):
    ops.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 24, 24), bool),
                              implementation="pallas")
  with pytest.raises(ValueError, match="bias"):
    ops.dot_product_attention(q, k, v, bias=jnp.zeros((1, 1, 24, 24)), implementation="pallas")


def _op_kernel_args(seed, t, s, n):
  """Each op registered with `implementation=True` and the arguments its kernel path is checked
  with (`[b, t, n, 16]` queries, keys `[b, s, n/2, 16]`): every kernel option the op takes
  (causal, packed segments, a window, a soft cap) plus its own weights."""
  rng = np.random.default_rng(seed)
  logits = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  seg = _segments(seed, 2, t, s)
  masks = dict(is_causal=True, segment_ids=seg, local_window_size=(9, 0))
  return {
      "softmax": dict(masks, logits_soft_cap=2.0),
      "sigmoid": dict(masks, logits_soft_cap=2.0, logit_bias=-1.0),
      "gated_attention": dict(masks, logits_soft_cap=2.0, gate_logits=logits(2, t, n)),
      "mixture_of_heads": dict(masks, router_logits=logits(2, t, n), shared_heads=1,
                               head_mix_logits=logits(2, t, 2)),
      "cog": masks,
      "ngpt": dict(is_causal=True, segment_ids=seg, s_qk=1.0 + logits(n, 16) / 4,
                   s_k=1.0 + logits(n // 2, 16) / 4),
      "spatial_reduction": dict(grid=(4, s // 4), reduction=(2, 1)),
  }


OP_KERNEL_SHAPE = (21, 36, 4)  # q_len, kv_len (a 4 x 9 grid), heads: no length a block multiple


def test_every_op_with_an_implementation_has_a_kernel_case():
  declared = {name for name in ops.names() if ops.spec(name).implementation}
  assert declared == set(_op_kernel_args(0, *OP_KERNEL_SHAPE))


@pytest.mark.xdist_group("flash_ops")
@pytest.mark.parametrize("name", sorted(_op_kernel_args(0, *OP_KERNEL_SHAPE)))
def test_op_pallas_path_matches_its_xla_path(name):
  """`implementation="pallas"` of each op runs the kernel (a `pallas_call`, interpreted on CPU)
  and equals the op's XLA path (itself checked against float64 references in the op's tests),
  forward and gradient, with GQA 4:2, lengths that are not block multiples, and causal,
  segment, window and soft-cap options where the op takes them."""
  t, s, n = OP_KERNEL_SHAPE
  q, k, v, ct = _inputs(11, 2, t, s, n, n // 2, 16, 16)
  args = _op_kernel_args(11, t, s, n)[name]
  op = ops.get(name)

  def loss(impl, q, k, v):
    out = op(q, k, v, implementation=impl, **args)
    return jnp.sum(out * ct), out

  pallas = functools.partial(loss, "pallas")
  assert "pallas_call" in str(jax.make_jaxpr(pallas)(q, k, v))
  both = jax.jit(lambda q, k, v: [jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
                                  for f in (pallas, functools.partial(loss, "xla"))])
  ((_, got), got_grads), ((_, want), want_grads) = both(q, k, v)
  assert float(jnp.max(jnp.abs(want))) > 0
  np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
  for label, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5, err_msg=label)


def test_cog_pallas_refuses_a_mask_array():
  q, k, v, _ = _inputs(12, 1, 8, 8, 2, 1, 16, 16)
  with pytest.raises(ValueError, match="cog implementation='pallas' does not support a mask"):
    ops.get("cog")(q, k, v, mask=jnp.ones((1, 1, 8, 8), bool), implementation="pallas")
  with pytest.raises(ValueError, match="implementation must be one of"):
    ops.get("cog")(q, k, v, implementation="cudnn")


@pytest.mark.parametrize("attention", ["cog", "ngpt", "gated_attention"])
def test_lm_attention_impl_reaches_the_kernel(attention):
  """`attention_impl="pallas"` in the LM's config reaches the op's kernel path."""
  model = models.get("lm").Model(vocab_size=11, width=16, depth=1, num_heads=2, num_kv_heads=1,
                                 attention=attention, attention_impl="pallas")
  tokens = jnp.zeros((1, 12), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)
  assert "pallas_call" in str(jax.make_jaxpr(model.apply)(params, tokens))


def test_attention_layer_with_pallas_implementation():
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 21, 32)), jnp.float32)
  make = lambda impl: layers.Attention(num_heads=4, num_kv_heads=2, head_dim=16,
                                       implementation=impl)
  params = make("xla").init(jax.random.key(0), x, is_causal=True)
  pallas = lambda p, x: make("pallas").apply(p, x, is_causal=True)
  assert "pallas_call" in str(jax.make_jaxpr(pallas)(params, x))
  np.testing.assert_allclose(pallas(params, x), make("xla").apply(params, x, is_causal=True),
                             atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("head_dim,kv_heads,kwargs", [
    (64, 4, dict(is_causal=True)),
    (72, 2, dict(dtype=jnp.float32)),  # float32: IEEE matmuls (precision=HIGHEST)
    (128, 2, dict(segments=True, local_window_size=(256, 0), logits_soft_cap=30.0)),
    (256, 1, dict(normalizer="sigmoid", is_causal=True)),
])
def test_lowers_to_triton_for_cuda(head_dim, kv_heads, kwargs):
  """The forward, dQ and dK/dV kernels lower through Pallas's Triton backend (cross-platform
  export from CPU; the Triton-to-PTX step itself needs a GPU)."""
  kwargs = dict(kwargs)
  dtype = kwargs.pop("dtype", jnp.bfloat16)
  q = jax.ShapeDtypeStruct((2, 1000, 4, head_dim), dtype)
  k = jax.ShapeDtypeStruct((2, 1000, kv_heads, head_dim), dtype)
  seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32) if kwargs.pop("segments", False) else None

  def loss(q, k, v, seg):
    return flash_attention(q, k, v, segment_ids=seg, backend="gpu", **kwargs).sum()

  exported = export.export(
      jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(q, k, k, seg)
  assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 3


def test_invalid_arguments_raise():
  q, k, v, _ = _inputs(7, 1, 16, 16, 2, 1, 16, 16)
  with pytest.raises(ValueError, match="block_q"):
    BlockSizes(block_q=24)
  with pytest.raises(ValueError, match="block_kv_dq"):
    BlockSizes(block_kv_dq=0)
  with pytest.raises(ValueError, match="block_k"):
    BlockSizes(block_k=-16)
  with pytest.raises(TypeError, match="block_sizes"):
    flash_attention(q, k, v, block_sizes=(16, 16), interpret=True)
  q264, k264, v264, _ = _inputs(7, 1, 16, 16, 2, 1, 264, 264)
  with pytest.raises(ValueError, match="head_dim from 1 to 256"):
    flash_attention(q264, k264, v264, interpret=True)
  with pytest.raises(ValueError, match="return_residuals"):
    flash_attention(q, k, v, normalizer="sigmoid", return_residuals=True, interpret=True)
  with pytest.raises(ValueError, match="return_residuals"):
    flash_attention(q, k, v, return_residuals=True, backend="tpu", interpret=True)
  with pytest.raises(ValueError, match="return_residuals"):
    flash_attention(q, k, v, normalizer="signed", return_residuals=True, interpret=True)
  with pytest.raises(ValueError, match="normalizer='signed' is implemented by the GPU kernel"):
    flash_attention(q, k, v, normalizer="signed", backend="tpu", interpret=True)
  with pytest.raises(ValueError, match="value head_dim from 1 to 256"):
    flash_attention(q, k, jnp.zeros(v.shape[:3] + (300,)), interpret=True)
  with pytest.raises(ValueError, match="batch"):
    flash_attention(q, k[:0], v, interpret=True)
  with pytest.raises(ValueError, match="heads"):
    flash_attention(q[:, :, :1], k.repeat(2, axis=2), v.repeat(2, axis=2), interpret=True)
  with pytest.raises(ValueError, match="sequence length"):
    flash_attention(q, k, v[:, :8], interpret=True)
  with pytest.raises(ValueError, match="normalizer"):
    flash_attention(q, k, v, normalizer="relu", interpret=True)
  with pytest.raises(ValueError, match="sigmoid_bias"):
    flash_attention(q, k, v, sigmoid_bias=-1.0, interpret=True)
  with pytest.raises(ValueError, match="logits_soft_cap"):
    flash_attention(q, k, v, logits_soft_cap=0.0, interpret=True)
  with pytest.raises(ValueError, match="backend"):
    flash_attention(q, k, v, backend="cuda", interpret=True)
  with pytest.raises(ValueError, match="interpret=True"):
    flash_attention(q, k, v)  # CPU: no compiled kernel.


def test_backend_tpu_dispatches_to_the_tpu_kernel():
  q, k, v, _ = _inputs(8, 1, 40, 40, 2, 1, 16, 16)
  tpu = lambda q, k, v: flash_attention(q, k, v, is_causal=True, backend="tpu", interpret=True)
  gpu = lambda q, k, v: flash_attention(q, k, v, is_causal=True, backend="gpu", interpret=True)
  assert "flash_attention_triton_fwd" in str(jax.make_jaxpr(gpu)(q, k, v))
  tpu_jaxpr = str(jax.make_jaxpr(tpu)(q, k, v))
  assert "pallas_call" in tpu_jaxpr and "flash_attention_triton_fwd" not in tpu_jaxpr
  np.testing.assert_allclose(tpu(q, k, v), flash_attention_reference(q, k, v, is_causal=True),
                             atol=5e-5, rtol=5e-5)


@pytest.mark.gpu_only
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kwargs", [dict(), dict(is_causal=True, logits_soft_cap=30.0),
                                    dict(segments=True, local_window_size=(200, 0)),
                                    dict(normalizer="sigmoid", is_causal=True)],
                         ids=["plain", "causal_softcap", "segments_window", "sigmoid"])
def test_compiled_gpu_kernel_matches_reference(head_dim, kwargs):
  """The kernels compiled by Triton on a GPU (default block sizes), bfloat16, GQA 8:2, ragged
  lengths; compared with the float32 reference on the same bf16 inputs."""
  kwargs = dict(kwargs)
  q, k, v, ct = _inputs(10, 2, 1000, 1111, 8, 2, head_dim, head_dim, jnp.bfloat16)
  if kwargs.pop("segments", False):
    kwargs["segment_ids"] = _segments(10, 2, 1000, 1111)

  def vjp(fn):  # The inputs are arguments: as closed-over constants they cost minutes to compile.
    @jax.jit
    def run(q, k, v, ct):
      out, pull = jax.vjp(fn, q, k, v)
      return (out, *pull(ct))
    return run(q, k, v, ct)

  got = vjp(lambda q, k, v: flash_attention(q, k, v, **kwargs))
  want = vjp(lambda q, k, v: flash_attention_reference(q, k, v, **kwargs))
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               atol=4e-2, rtol=4e-2, err_msg=name)


def _block_reference(q, k, v, ct, mask):
  """float64 output, natural-log lse (-inf: no visible key) and (dq, dk, dv) of masked
  softmax attention."""
  with reference.x64():
    out, vjp = jax.vjp(lambda q, k, v: reference.softmax_attention(q, k, v, mask=mask),
                       *reference.f64(q, k, v))
    grads = vjp(reference.f64(ct))
    qq, kk = reference.f64(q, reference.repeat_kv(k, q.shape[2]))
    s = jnp.einsum("btnd,bsnd->bnts", qq, kk) / np.sqrt(q.shape[-1])
    top = jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jnp.sum(jnp.where(mask, jnp.exp(s - top), 0.0), axis=-1)
    lse = jnp.where(total > 0, top[..., 0] + jnp.log(jnp.where(total > 0, total, 1.0)),
                    -jnp.inf)
    return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


def _shifted_causal(b, n, t, s, offset, segment_ids=None):
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  return reference.full_mask(b, n, t, s, mask=j <= i + offset, segment_ids=segment_ids)


@pytest.mark.parametrize("causal_offset", [-1, 3])
def test_block_api_causal_offset(causal_offset):
  """`flash_block_forward` with the causal diagonal shifted (query i sees keys j <= i + c):
  float32 out and lse against float64 (offset -1 leaves row 0 empty: zeros and lse -inf), then
  `flash_block_backward` from that lse: the gradients of the block as a whole attention."""
  b, t, n, k, d = 2, 21, 4, 2, 16
  q, kk, v, ct = _inputs(5, b, t, t, n, k, d, d)
  seg = _segments(5, b, t, t)

  @jax.jit
  def run(q, kk, v, ct):
    kwargs = dict(causal_offset=causal_offset, segment_ids=seg, block_sizes=BLOCKS,
                  interpret=INTERPRET)
    out, lse = flash_block_forward(q, kk, v, **kwargs)
    return out, lse, flash_block_backward(q, kk, v, out, lse, ct, **kwargs)

  out, lse, grads = run(q, kk, v, ct)
  want_out, want_lse, want_grads = _block_reference(
      q, kk, v, ct, _shifted_causal(b, n, t, t, causal_offset, seg))
  assert out.dtype == lse.dtype == jnp.float32 and lse.shape == (b, n, t)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
  if causal_offset < 0:
    assert np.isneginf(np.asarray(lse)[:, :, 0]).all()
    np.testing.assert_array_equal(np.asarray(out)[:, 0], 0.0)
  finite = np.isfinite(want_lse)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=5e-5, rtol=5e-5)
  np.testing.assert_allclose(out, want_out, atol=5e-5, rtol=5e-5)
  for name, got, want, x in zip(("dq", "dk", "dv"), grads, want_grads, (q, kk, v)):
    assert got.shape == x.shape and got.dtype == jnp.float32, name
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5, err_msg=name)


def test_blocks_merge_through_lse_and_take_the_global_lse():
  """Causal attention over keys split in two blocks (offsets 0 and -h: the second block's key
  j' is key j' + h): the blocks' (out, lse) merged through the log-sum-exp, and each block's
  gradients from the *global* lse and delta, summed, give causal attention (float64)."""
  b, t, n, k, d, h = 1, 27, 4, 1, 16, 10
  q, kk, v, ct = _inputs(6, b, t, t, n, k, d, d)
  parts = ((0, slice(0, h)), (-h, slice(h, t)))

  @jax.jit
  def run(q, kk, v, ct):
    blocks = [flash_block_forward(q, kk[:, keys], v[:, keys], causal_offset=offset,
                                  block_sizes=BLOCKS, interpret=INTERPRET)
              for offset, keys in parts]
    lse = jnp.logaddexp(blocks[0][1], blocks[1][1])
    out = sum(o * jnp.exp(l - lse).transpose(0, 2, 1)[..., None] for o, l in blocks)
    delta = jnp.einsum("btnd,btnd->bnt", out, ct)
    grads = [flash_block_backward(q, kk[:, keys], v[:, keys], None, lse, ct, delta=delta,
                                  causal_offset=offset, block_sizes=BLOCKS, interpret=INTERPRET)
             for offset, keys in parts]
    dq = grads[0][0] + grads[1][0]
    return out, (dq, *(jnp.concatenate([g[i] for g in grads], axis=1) for i in (1, 2)))

  out, grads = run(q, kk, v, ct)
  want_out, _, want_grads = _block_reference(q, kk, v, ct, reference.full_mask(
      b, n, t, t, is_causal=True))
  np.testing.assert_allclose(out, want_out, atol=5e-5, rtol=5e-5)
  for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5, err_msg=name)


def test_block_api_invalid_arguments_raise():
  q, k, v, _ = _inputs(7, 1, 16, 16, 2, 1, 16, 16)
  with pytest.raises(TypeError, match="causal_offset"):
    flash_block_forward(q, k, v, causal_offset=0.5, interpret=True)
  out, lse = flash_block_forward(q, k, v, interpret=True)
  with pytest.raises(ValueError, match="lse must have shape"):
    flash_block_backward(q, k, v, out, lse[:, :, :8], out, interpret=True)
  with pytest.raises(ValueError, match="needs the global `out` or `delta"):
    flash_block_backward(q, k, v, None, lse, out, interpret=True)


def test_return_residuals_is_the_log_sum_exp():
  """`(out, lse)`: lse = log Σ_j exp(S_ij) over visible keys in float64 terms, -inf for a row
  with none; head dim 24, value dim 20 (padded inside to 32); the gradient of `out` is
  unchanged by asking."""
  q, k, v, ct = _inputs(12, 1, 21, 34, 2, 1, 24, 20)
  q_seg = jnp.asarray(np.r_[np.zeros(10), np.full(6, 7), np.ones(5)][None], jnp.int32)
  kv_seg = jnp.asarray(np.r_[np.zeros(20), np.ones(14)][None], jnp.int32)  # No segment 7.
  kwargs = dict(segment_ids=(q_seg, kv_seg), is_causal=True)

  @jax.jit
  def run(q, k, v):
    (out, lse), vjp = jax.vjp(lambda q, k, v: flash_attention(
        q, k, v, block_sizes=BLOCKS, interpret=INTERPRET, return_residuals=True, **kwargs),
        q, k, v)
    return out, lse, vjp((ct, jnp.ones_like(lse)))

  out, lse, grads = run(q, k, v)
  mask = reference.full_mask(1, 2, 21, 34, is_causal=True, segment_ids=(q_seg, kv_seg))
  want_out, want_lse, want_grads = _block_reference(q, k, v, ct, mask)
  assert lse.shape == (1, 21, 2) and lse.dtype == jnp.float32
  np.testing.assert_allclose(out, want_out, atol=5e-5, rtol=5e-5)
  np.testing.assert_allclose(lse, want_lse.transpose(0, 2, 1), atol=5e-5, rtol=5e-5)
  assert np.all(np.isneginf(np.asarray(lse)[0, 10:16]))
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
  ref_out, ref_lse = flash_attention_reference(q, k, v, return_residuals=True, **kwargs)
  np.testing.assert_allclose(ref_out, want_out, atol=5e-5, rtol=5e-5)
  np.testing.assert_allclose(ref_lse, want_lse.transpose(0, 2, 1), atol=5e-5, rtol=5e-5)


def test_zero_length_sequences():
  """An empty query gives an empty output; an empty key sequence zeros (nothing to attend to)
  with lse -inf and zero gradients; the block API refuses both with a ValueError."""
  q, k, v, _ = _inputs(13, 2, 8, 8, 2, 1, 16, 8)
  out = flash_attention(q[:, :0], k, v, interpret=True)
  assert out.shape == (2, 0, 2, 8) and out.dtype == q.dtype
  loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v, interpret=True) ** 2)
  empty_k, empty_v = k[:, :0], v[:, :0]
  out, lse = flash_attention(q, empty_k, empty_v, interpret=True, return_residuals=True)
  np.testing.assert_array_equal(out, np.zeros((2, 8, 2, 8)))
  assert np.all(np.isneginf(np.asarray(lse))) and lse.shape == (2, 8, 2)
  for grad in jax.grad(loss, argnums=(0, 1, 2))(q, empty_k, empty_v):
    assert not np.any(np.asarray(grad))
  with pytest.raises(ValueError, match="non-empty"):
    flash_block_forward(q, empty_k, empty_v, interpret=True)


@pytest.mark.parametrize("head_dim", [16, 64, 72, 128, 256])
def test_default_tiles_fit_shared_memory(head_dim):
  """For every head dim and bf16/float32, the default tiles of all three kernels fit Hopper's
  227 KiB with a pipeline of >= 2 stages, and bf16 tensor-core matmuls have >= 64 rows."""
  for itemsize in (2, 4):
    blocks = BlockSizes.get_default(head_dim, itemsize)
    for kernel in gpu_triton.KERNELS:
      stages = gpu_triton.compiler_params(kernel, blocks, head_dim, head_dim, itemsize).num_stages
      assert stages >= 2, (kernel, itemsize)
      used = gpu_triton.shared_memory_bytes(kernel, blocks, head_dim, head_dim, itemsize, stages)
      assert used <= gpu_triton.SHARED_MEMORY_BYTES, (kernel, itemsize, used)
    if itemsize == 2:
      assert min(blocks.block_q, blocks.block_q_dkv, blocks.block_kv_dkv, blocks.block_q_dq) >= 64


def test_shared_memory_estimate():
  """The estimate counted tile by tile (forward, head dim 128 bf16: Q [128, 128] resident,
  K and V [64, 128] per stage, P [128, 64]); the old 3-stage forward overflows in float32, and
  tiles no stage fits raise a ValueError naming the kernel."""
  blocks = BlockSizes(128, 64, 32, 128, 128, 32)
  want = (128 * 128 + 3 * (64 * 128 + 64 * 128) + 128 * 64) * 2
  assert gpu_triton.shared_memory_bytes("forward", blocks, 128, 128, 2, 3) == want
  assert gpu_triton.shared_memory_bytes("forward", blocks, 72, 72, 2, 3) == want  # padded
  assert gpu_triton.shared_memory_bytes("forward", blocks, 128, 128, 4, 3) > 227 * 1024
  assert gpu_triton.compiler_params("forward", blocks, 128, 128, 4).num_stages == 2
  dkv = (128 * 256 + 2 * 32 * 256 + 2 * 128 * 32) * 4  # K, V resident; Q, dO streamed
  assert gpu_triton.shared_memory_bytes("dkv", blocks, 128, 128, 4, 2) == dkv
  with pytest.raises(ValueError, match="dkv kernel"):
    gpu_triton.compiler_params("dkv", BlockSizes(*(256,) * 6), 256, 256, 4)
  with pytest.raises(ValueError, match="kernel must be"):
    gpu_triton.shared_memory_bytes("fwd", blocks, 128, 128, 2, 1)


def test_float32_matmuls_are_not_tf32():
  """float32 inputs: every matmul of the kernels asks for HIGHEST precision (IEEE float32 in
  Triton, not TF32); bf16 inputs keep the default."""
  def jaxpr(dtype):
    q = jax.ShapeDtypeStruct((1, 32, 2, 16), dtype)
    fn = lambda q, k, v: flash_attention(q, k, v, interpret=True).sum()
    return str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(q, q, q))
  f32, bf16 = jaxpr(jnp.float32), jaxpr(jnp.bfloat16)
  assert f32.count("dot_general") >= 7  # QKᵀ, PV; QKᵀ, dO Vᵀ, dS K; QKᵀ, dO Vᵀ, PᵀdO, dSᵀQ
  assert f32.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == f32.count(
      "dot_general")
  assert "Precision.HIGHEST" not in bf16
