"""The Mosaic TPU flash-attention kernel, run in the Pallas TPU interpreter on CPU.

Forward and gradients are compared with float64 references written from the formulas
(`tests.reference` for softmax, σ(s + b) masked for sigmoid) on lengths that are not multiples of
the blocks, q_len != kv_len, GQA, every mask feature and their combinations, and bf16.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import compat
from pallas_kernels.flash_attention import api
from pallas_kernels.flash_attention import tpu
from tests import reference as ref

BLOCKS_128 = tpu.BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128,
                            block_q_dq=128, block_k_dq=128)


def _inputs(b, t, s, n, k, d, dv=None, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = ((b, t, n, d), (b, s, k, d), (b, s, k, dv or d), (b, t, n, dv or d))
  q, key, v, ct = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)
  return q.astype(dtype), key.astype(dtype), v.astype(dtype), ct


def _segments(b, length, num, seed):
  """Sorted random segment ids in [0, num) (packed sequences)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, num, size=(b, length)), axis=1), jnp.int32)


def sigmoid_reference(q, k, v, *, mask, bias, scale=None, soft_cap=None):
  """σ(scale·QKᵀ (soft-capped) + b) V in float64, masked weights zero."""
  q, k, v = ref.f64(q, k, v)
  n = q.shape[2]
  k, v = ref.repeat_kv(k, n), ref.repeat_kv(v, n)
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  s = jnp.einsum("btnd,bsnd->bnts", q, k) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  w = jnp.where(mask, 1.0 / (1.0 + jnp.exp(-(s + bias))), 0.0)
  return jnp.einsum("bnts,bsnd->btnd", w, v)


def _check(q, k, v, ct, *, mask, tol, reference=ref.softmax_attention, ref_kwargs=None,
           **kwargs):
  """Forward and d(out·ct)/d(q, k, v) of the kernel against the float64 reference."""
  kwargs.setdefault("block_sizes", BLOCKS_128)
  ref_kwargs = ref_kwargs or {}

  def kernel_loss(q, k, v):
    out = tpu.flash_attention_tpu(q, k, v, interpret=True, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * ct), out

  loss_and_grads = jax.jit(jax.value_and_grad(kernel_loss, argnums=(0, 1, 2), has_aux=True))
  # The interpreter's programs are large and run once: skip LLVM optimisation (2x faster).
  compiled = loss_and_grads.lower(q, k, v).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  (_, out), grads = compiled(q, k, v)
  assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == q.dtype
  with ref.x64():
    def ref_loss(q, k, v):
      return jnp.sum(reference(q, k, v, mask=mask, **ref_kwargs) * ref.f64(ct))
    expected = reference(*ref.f64(q, k, v), mask=mask, **ref_kwargs)
    expected_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(*ref.f64(q, k, v))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), **tol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
      got = np.asarray(got, np.float32)
      assert np.all(np.isfinite(got)), name
      np.testing.assert_allclose(got, np.asarray(want), err_msg=name, **tol)
  return out, grads


F32 = dict(rtol=2e-4, atol=2e-4)
BF16 = dict(rtol=5e-2, atol=5e-2)


def test_ragged_lengths_soft_cap():
  q, k, v, ct = _inputs(2, 200, 328, 2, 2, 32, seed=1)
  q = q * 3.0  # logits well past the cap
  _check(q, k, v, ct, mask=None, tol=F32, ref_kwargs=dict(soft_cap=2.0), logits_soft_cap=2.0)


def test_aligned_lengths_gqa_4_2_value_dim_and_compute_sub_blocks():
  q, k, v, ct = _inputs(1, 128, 256, 4, 2, 32, dv=16, seed=2)
  blocks = tpu.BlockSizes(block_q=128, block_k=256, block_k_compute=128, block_q_dkv=128,
                          block_k_dkv=128, block_q_dq=128, block_k_dq=256)
  _check(q, k, v, ct, mask=None, tol=F32, block_sizes=blocks)


def test_causal_gqa_4_2_lane_aligned_head_dim():
  q, k, v, ct = _inputs(1, 200, 328, 4, 2, 128, seed=3)
  mask = ref.full_mask(1, 4, 200, 328, is_causal=True)
  _check(q, k, v, ct, mask=mask, tol=F32, is_causal=True)


def test_causal_queries_longer_than_keys_gqa_4_1():
  q, k, v, ct = _inputs(1, 328, 200, 4, 1, 32, dv=16, seed=4)
  mask = ref.full_mask(1, 4, 328, 200, is_causal=True)
  _check(q, k, v, ct, mask=mask, tol=F32, is_causal=True)


def test_segment_ids_self_attention_unaligned_wide_head_dim():
  q, k, v, ct = _inputs(2, 200, 200, 2, 1, 136, seed=5)
  seg = _segments(2, 200, 3, seed=5)
  mask = ref.full_mask(2, 2, 200, 200, segment_ids=seg)
  _check(q, k, v, ct, mask=mask, tol=F32, segment_ids=seg)


def test_local_window_shrinks_the_grid():
  q, k, v, ct = _inputs(1, 520, 520, 1, 1, 32, seed=6)
  mask = ref.full_mask(1, 1, 520, 520, window=40)
  _check(q, k, v, ct, mask=mask, tol=F32, local_window_size=40)


def test_combination_causal_window_segments_soft_cap_scale_gqa_mixed_blocks():
  # Different tiles per kernel: the keys pad to 512, so whole key blocks of the dK/dV kernel
  # are padding; the forward's key block is computed in two sub-blocks.
  q, k, v, ct = _inputs(1, 200, 328, 4, 1, 32, seed=8)
  segs = (_segments(1, 200, 2, seed=8), _segments(1, 328, 2, seed=9))
  mask = ref.full_mask(1, 4, 200, 328, is_causal=True, window=(100, 20), segment_ids=segs)
  blocks = tpu.BlockSizes(block_q=64, block_k=256, block_k_compute=128, block_q_dkv=128,
                          block_k_dkv=64, block_q_dq=64, block_k_dq=128)
  _check(q, k, v, ct, mask=mask, tol=F32, ref_kwargs=dict(soft_cap=5.0, scale=0.3),
         is_causal=True, local_window_size=(100, 20), segment_ids=segs, logits_soft_cap=5.0,
         scale=0.3, block_sizes=blocks)


def test_sigmoid_causal_gqa_default_bias():
  q, k, v, ct = _inputs(1, 200, 328, 4, 2, 32, seed=10)
  mask = ref.full_mask(1, 4, 200, 328, is_causal=True)
  _check(q, k, v, ct, mask=mask, tol=F32, reference=sigmoid_reference,
         ref_kwargs=dict(bias=-math.log(328)), is_causal=True, normalizer="sigmoid")


def test_sigmoid_window_segments_soft_cap_bias():
  q, k, v, ct = _inputs(1, 200, 200, 2, 1, 32, seed=11)
  seg = _segments(1, 200, 2, seed=11)
  mask = ref.full_mask(1, 2, 200, 200, window=(30, 50), segment_ids=seg)
  _check(q, k, v, ct, mask=mask, tol=F32, reference=sigmoid_reference,
         ref_kwargs=dict(bias=-1.5, soft_cap=4.0), normalizer="sigmoid", sigmoid_bias=-1.5,
         local_window_size=(30, 50), segment_ids=seg, logits_soft_cap=4.0)


def test_bfloat16_causal_gqa():
  q, k, v, ct = _inputs(1, 200, 328, 4, 2, 128, dtype=jnp.bfloat16, seed=12)
  mask = ref.full_mask(1, 4, 200, 328, is_causal=True)
  _check(q, k, v, ct, mask=mask, tol=BF16, is_causal=True)


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_fully_masked_rows_give_zeros(normalizer):
  # Queries past the keys see nothing through a (0, 0) window (a whole query block has an empty
  # band), and queries of segment 7 find no key of their segment.
  t, s = 328, 200
  q, k, v, ct = _inputs(1, t, s, 2, 1, 32, seed=13)
  q_seg = jnp.where(jnp.arange(t) % 5 == 0, 7, 0)[None].astype(jnp.int32)
  kv_seg = jnp.zeros((1, s), jnp.int32)
  mask = ref.full_mask(1, 2, t, s, window=(0, 0), segment_ids=(q_seg, kv_seg))
  extra = {}
  if normalizer == "sigmoid":  # also with the default tiles (one 384-query block here)
    extra = dict(reference=sigmoid_reference, ref_kwargs=dict(bias=-math.log(s)),
                 block_sizes=None)
  out, grads = _check(q, k, v, ct, mask=mask, tol=F32, local_window_size=(0, 0),
                      segment_ids=(q_seg, kv_seg), normalizer=normalizer, **extra)
  empty_rows = ~mask[0, 0].any(-1)
  assert empty_rows[s:].all() and empty_rows.sum() > t - s
  assert np.all(np.asarray(out)[:, empty_rows] == 0.0)
  assert np.all(np.asarray(grads[0])[:, empty_rows] == 0.0)


@pytest.mark.parametrize("is_causal,window,t,s,bq,bk", [
    (True, None, 200, 328, 128, 128),
    (True, None, 328, 200, 8, 128),
    (False, 40, 520, 520, 128, 128),
    (True, (300, 7), 1000, 700, 64, 256),
    (False, (0, 0), 328, 200, 128, 128),
    (False, (10**6, -1), 328, 328, 8, 128),  # causal_offset=-1 (the strict diagonal)
    (False, (10**6, 130), 200, 328, 128, 128),  # causal_offset=130
])
def test_block_visits_cover_exactly_the_band(is_causal, window, t, s, bq, bk):
  """Each block visits exactly the blocks of the other axis that meet the mask band, and steps
  that compute nothing keep the block index of a neighbour (no new DMA)."""
  left, right = (None, None) if window is None else (
      (window, window) if isinstance(window, int) else window)
  if is_causal:
    right = 0 if right is None else min(right, 0)
  spec = tpu._Spec(batch=1, num_heads=1, num_kv_heads=1, head_dim=32, value_dim=32, q_len=t,
                   kv_len=s, q_padded_len=-(-t // bq) * bq, kv_padded_len=-(-s // bk) * bk,
                   scale=1.0, left=left, right=right, soft_cap=None, normalizer="softmax",
                   sigmoid_bias=None, block_sizes=BLOCKS_128)
  band = ref.full_mask(1, 1, t, s, is_causal=is_causal, window=window)[0, 0]
  directions = (  # (mask rows = outer positions, outer block, inner block, steps, visit)
      (band, bq, bk, tpu._num_steps(-(-t // bq), bq, bk, s, left, right),
       lambda i, step: tpu._kv_visit(spec, i, step, bq, bk)),
      (band.T, bk, bq, tpu._num_steps(-(-s // bk), bk, bq, t, right, left),
       lambda j, step: tpu._q_visit(spec, j, step, bk, bq)))
  for rows_mask, outer, inner, steps, visit in directions:
    num_inner = -(-rows_mask.shape[1] // inner)
    for i in range(-(-rows_mask.shape[0] // outer)):
      rows = rows_mask[i * outer:(i + 1) * outer]
      wanted = {int(c) // inner for c in np.flatnonzero(rows.any(0))}
      visited, previous = set(), None
      for step in range(steps):
        block, run = (int(x) for x in visit(jnp.int32(i), jnp.int32(step)))
        assert 0 <= block < num_inner
        if run:
          visited.add(block)
        elif previous is not None:
          assert block == previous
        previous = block
      assert visited == wanted, (i, visited, wanted)
    if isinstance(window, int):
      assert steps < num_inner


@pytest.mark.parametrize("dtype,head_dim,segments,kwargs", [
    (jnp.bfloat16, 128, True, dict(is_causal=True)),
    (jnp.float32, 64, False, dict(local_window_size=(100, 20), logits_soft_cap=30.0)),
    (jnp.bfloat16, 256, False, dict(is_causal=True, normalizer="sigmoid")),
])
def test_lowers_to_mosaic_tpu(dtype, head_dim, segments, kwargs):
  """Forward and backward lower through Pallas' Mosaic TPU rules (no TPU needed for this)."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this JAX cannot describe a TPU device abstractly")
  b, t, s, n, k = 2, 1000, 1500, 4, 2
  q = jax.ShapeDtypeStruct((b, t, n, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((b, s, k, head_dim), dtype)
  seg = None
  if segments:
    seg = (jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32))

  def loss(q, k, v, seg):
    out = tpu.flash_attention_tpu(q, k, v, segment_ids=seg, **kwargs)
    return jnp.sum(out.astype(jnp.float32))

  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
        lowering_platforms=("tpu",))
  text = lowered.as_text()
  assert text.count("tpu_custom_call") == 3
  for name in ("flash_attention_fwd", "flash_attention_bwd_dkv", "flash_attention_bwd_dq"):
    assert name in text


def test_default_block_sizes_fit_short_sequences():
  blocks = tpu.BlockSizes.get_default(200, 1000)
  assert (blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq) == (256, 256, 256)
  assert (blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq) == (512, 512, 512)
  assert tpu.BlockSizes.get_default() == tpu.BlockSizes()


def test_interpret_true_picks_the_tpu_interpreter():
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  assert isinstance(compat.tpu_interpret_mode(True), pltpu.InterpretParams)
  assert compat.tpu_interpret_mode(False) is False


@pytest.mark.parametrize("field,size,needle", [
    ("block_q", 100, "block_q must be a positive multiple of 8"),
    ("block_k", 64, "block_k must be a positive multiple of 128"),
    ("block_q_dkv", 64, "block_q_dkv must be a positive multiple of 128"),
    ("block_k_dkv", 12, "block_k_dkv must be a positive multiple of 8"),
    ("block_k_dq", 0, "block_k_dq must be a positive multiple of 128"),
    ("block_k_compute", 384, "block_k_compute=384 must divide block_k=512"),
])
def test_bad_block_sizes_raise(field, size, needle):
  with pytest.raises(ValueError, match=needle):
    tpu.BlockSizes(**{field: size})


@pytest.mark.parametrize("d,dv,needle", [(12, 12, "head_dim"), (512, 512, "head_dim"),
                                         (32, 260, "value head_dim")])
def test_bad_head_dims_raise(d, dv, needle):
  q, k, v, _ = _inputs(1, 8, 8, 1, 1, d, dv=dv)
  with pytest.raises(ValueError, match=needle):
    tpu.flash_attention_tpu(q, k, v, interpret=True)


def test_bad_arguments_raise():
  q, k, v, _ = _inputs(1, 16, 24, 4, 2, 32)
  with pytest.raises(ValueError, match="sequence length"):
    tpu.flash_attention_tpu(q, k, v[:, :8], interpret=True)
  with pytest.raises(ValueError, match="divisible"):
    tpu.flash_attention_tpu(q[:, :, :3], k, v, interpret=True)
  with pytest.raises(ValueError, match="normalizer"):
    tpu.flash_attention_tpu(q, k, v, normalizer="relu", interpret=True)
  with pytest.raises(ValueError, match="kv_segment_ids"):
    tpu.flash_attention_tpu(q, k, v, segment_ids=(jnp.zeros((1, 16), jnp.int32),
                                                  jnp.zeros((1, 16), jnp.int32)))
  with pytest.raises(ValueError, match="local_window_size"):
    tpu.flash_attention_tpu(q, k, v, local_window_size=-1)
  with pytest.raises(ValueError, match="logits_soft_cap"):
    tpu.flash_attention_tpu(q, k, v, logits_soft_cap=0.0)
  with pytest.raises(ValueError, match="non-empty"):
    tpu.flash_attention_tpu(q[:, :0], k, v)
  with pytest.raises(ValueError, match="sigmoid_bias"):
    tpu.flash_attention_tpu(q, k, v, sigmoid_bias=-1.0)
  with pytest.raises(TypeError, match="block_sizes"):
    tpu.flash_attention_tpu(q, k, v, block_sizes=(128, 128))


@pytest.mark.parametrize("causal_offset", [-1, 2])
def test_block_api_causal_offset(causal_offset):
  """`flash_block_forward(backend="tpu")` with the causal diagonal shifted (query i sees keys
  j <= i + c), segments and GQA: float32 out and natural-log lse (-inf for an empty row)
  against float64, and `flash_block_backward` from that lse against the float64 gradients."""
  b, t, n, k, d = 1, 21, 4, 2, 8
  q, kk, v, ct = _inputs(b, t, t, n, k, d, seed=17)
  seg = _segments(b, t, 3, seed=17)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  mask = ref.full_mask(b, n, t, t, mask=j <= i + causal_offset, segment_ids=seg)
  blocks = tpu.BlockSizes(block_q=8, block_k=128, block_q_dkv=128, block_k_dkv=8,
                          block_q_dq=8, block_k_dq=128)
  kwargs = dict(causal_offset=causal_offset, segment_ids=seg, backend="tpu",
                block_sizes=blocks, interpret=True)

  def run(q, kk, v, ct):
    out, lse = api.flash_block_forward(q, kk, v, **kwargs)
    return out, lse, api.flash_block_backward(q, kk, v, out, lse, ct, **kwargs)

  out, lse, grads = jax.jit(run).lower(q, kk, v, ct).compile(
      compiler_options={"xla_backend_optimization_level": 0})(q, kk, v, ct)
  with ref.x64():
    want_out, vjp = jax.vjp(lambda q, k, v: ref.softmax_attention(q, k, v, mask=mask),
                            *ref.f64(q, kk, v))
    want_grads = vjp(ref.f64(ct))
    s = jnp.einsum("btnd,bsnd->bnts", *ref.f64(q, ref.repeat_kv(kk, n))) / np.sqrt(d)
    want_lse = np.asarray(jax.nn.logsumexp(jnp.where(mask, s, -jnp.inf), axis=-1))
  assert out.dtype == lse.dtype == jnp.float32 and lse.shape == (b, n, t)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  if causal_offset < 0:
    assert np.isneginf(np.asarray(lse)[:, :, 0]).all()
  finite = np.isfinite(want_lse)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], **F32)
  np.testing.assert_allclose(out, np.asarray(want_out), **F32)
  for name, got, want, x in zip(("dq", "dk", "dv"), grads, want_grads, (q, kk, v)):
    assert got.shape == x.shape and got.dtype == jnp.float32, name
    np.testing.assert_allclose(got, np.asarray(want), err_msg=name, **F32)
