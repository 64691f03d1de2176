"""The dispatch table of `ops.dot_product_attention(implementation=None)` and of the ring's
`block_impl=None`, with the platform mocked (no GPU/TPU needed): cuDNN where jax.nn supports
the arguments on GPU, XLA otherwise, the Pallas kernel only for a case with a recorded run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import ops
from big_attn.ops import softmax
from big_attn.parallel import blockwise


def _qkv(dtype=jnp.bfloat16, length=64, head_dim=64, value_dim=None):
  q = jnp.zeros((2, length, 4, head_dim), dtype)
  k = jnp.zeros((2, length, 2, head_dim), dtype)
  v = jnp.zeros((2, length, 2, value_dim or head_dim), dtype)
  return q, k, v


@pytest.fixture(name="platform")
def _platform(monkeypatch):
  """Sets the platform `jax.default_backend()` reports."""
  return lambda name: monkeypatch.setattr(jax, "default_backend", lambda: name)


# (inputs, keyword arguments, implementation picked on a GPU with no recorded kernel run).
GPU_CASES = {
    "bf16_causal": (_qkv(), dict(is_causal=True), "cudnn"),
    "fp16_d128": (_qkv(jnp.float16, head_dim=128), {}, "cudnn"),
    "float32": (_qkv(jnp.float32), dict(is_causal=True), "xla"),
    "head_dim_256": (_qkv(head_dim=256), {}, "xla"),
    "head_dim_not_multiple_of_8": (_qkv(head_dim=60), {}, "xla"),
    "value_dim_differs": (_qkv(value_dim=32), {}, "xla"),
    "soft_cap": (_qkv(), dict(logits_soft_cap=30.0), "xla"),
    "left_window": (_qkv(), dict(local_window_size=(8, 0)), "cudnn"),
    "two_sided_window": (_qkv(), dict(local_window_size=(8, 2)), "xla"),
    "two_sided_window_causal": (_qkv(), dict(local_window_size=(8, 2), is_causal=True), "cudnn"),
    "segments": (_qkv(), dict(segment_ids=jnp.zeros((2, 64), jnp.int32)), "cudnn"),
    "segments_odd_length": (_qkv(length=63), dict(segment_ids=jnp.zeros((2, 63), jnp.int32)),
                            "xla"),
    "odd_length_no_mask": (_qkv(length=63), dict(is_causal=True), "cudnn"),
    "full_mask": (_qkv(), dict(mask=jnp.ones((2, 1, 64, 64), bool)), "cudnn"),
    "broadcast_bias": (_qkv(), dict(bias=jnp.zeros((1, 1, 1, 64))), "xla"),
    "empty_keys": ((_qkv()[0], *_qkv(length=0)[1:]), {}, "xla"),
    "rank3": (tuple(x[0] for x in _qkv()), {}, "xla"),
}


@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_default_is_cudnn_where_supported_else_xla(case, platform):
  (q, k, v), kwargs, want = GPU_CASES[case]
  platform("gpu")
  assert softmax.default_implementation(q, k, v, **kwargs) == want


@pytest.mark.parametrize("name", ["cpu", "tpu"])
def test_other_platforms_default_to_xla(name, platform):
  platform(name)
  assert softmax.default_implementation(*_qkv(), is_causal=True) == "xla"


def test_a_recorded_run_flips_one_case_to_the_kernel(platform, monkeypatch):
  """An entry of `KERNEL_RUNS` turns exactly its case over to Pallas, where the kernel takes
  the arguments (not with a mask array), on the platform it was recorded on."""
  monkeypatch.setattr(softmax, "KERNEL_RUNS", {
      ("gpu", "bfloat16", 64, True): "experiments/results/gpu_test/flash_speed.md",
      ("tpu", "bfloat16", 128, False): "experiments/results/tpu_test/flash_speed.md"})
  q, k, v = _qkv()
  platform("gpu")
  assert softmax.default_implementation(q, k, v, is_causal=True) == "pallas"
  assert softmax.default_implementation(q, k, v, is_causal=False) == "cudnn"
  assert softmax.default_implementation(q.astype(jnp.float32), k.astype(jnp.float32),
                                        v.astype(jnp.float32), is_causal=True) == "xla"
  mask = jnp.ones((2, 1, 64, 64), bool)
  assert softmax.default_implementation(q, k, v, mask=mask, is_causal=True) == "cudnn"
  assert blockwise.get_block_impl(None, q, k, v, is_causal=True) is blockwise.PALLAS
  assert blockwise.get_block_impl(None, q, k, v, is_causal=False) is blockwise.XLA
  platform("tpu")
  assert softmax.default_implementation(*_qkv(head_dim=128)) == "pallas"
  assert softmax.default_implementation(*_qkv(head_dim=128), is_causal=True) == "xla"


def test_no_recorded_run_means_no_kernel_by_default():
  """The table ships empty until a hardware run is recorded in experiments/results/."""
  assert not softmax.KERNEL_RUNS


def test_dot_product_attention_routes_by_the_table(platform, monkeypatch):
  """`implementation=None` on a (mocked) GPU calls the cuDNN path for a supported case and
  computes with XLA otherwise; `"pallas"` stays available explicitly."""
  calls = []

  def fake_cudnn(query, *args):
    del args
    calls.append(query.shape)
    return jnp.zeros_like(query)

  monkeypatch.setattr(softmax, "_cudnn_attention", fake_cudnn)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in _qkv(length=8,
                                                                              head_dim=16))
  platform("gpu")
  ops.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                            v.astype(jnp.bfloat16), is_causal=True)
  assert calls == [(2, 8, 4, 16)]
  xla = ops.dot_product_attention(q, k, v, is_causal=True)  # float32: not cuDNN's
  assert calls == [(2, 8, 4, 16)]
  platform("cpu")
  want = ops.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(xla, want, rtol=1e-6, atol=1e-6)
  pallas = ops.dot_product_attention(q, k, v, is_causal=True, implementation="pallas")
  np.testing.assert_allclose(pallas, want, rtol=5e-5, atol=5e-5)
