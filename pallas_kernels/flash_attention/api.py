"""`flash_attention`: the public entry point, dispatching to the GPU (Triton) or TPU kernel;
`flash_block_forward` / `flash_block_backward`: the same kernels as blocks of a blockwise
schedule (`big_attn.parallel` ring and striped attention)."""
from __future__ import annotations

import jax

from pallas_kernels.flash_attention import gpu_triton

BACKENDS = (None, "gpu", "triton", "tpu")
_TPU_HEAD_DIMS = (64, 128, 256)


def _resolve_backend(backend: str | None, interpret: bool) -> str:
  """"triton" or "tpu" for `backend` (None: by platform; the GPU kernel interprets on CPU)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend is not None:
    return "tpu" if backend == "tpu" else "triton"
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform == "gpu" or interpret:
    return "triton"
  raise ValueError(
      f"flash_attention has no compiled kernel for platform {platform!r}: pass interpret=True "
      "to run a kernel in the Pallas interpreter, or use flash_attention_reference")


def flash_attention(query, key, value, *, segment_ids=None, is_causal=False, scale=None,
                    local_window_size=None, logits_soft_cap=None, normalizer="softmax",
                    sigmoid_bias=None, block_sizes=None, backend=None, interpret=False,
                    return_residuals=False):
  """Memory-efficient exact attention (FlashAttention-2, Dao 2023) in Pallas; differentiable.

  out = softmax(S) V, σ(S + b) V for `normalizer="sigmoid"` (FlashSigmoid, Ramapuram et al.
  2024), or (sign(S) ∘ softmax(|S|)) V for `normalizer="signed"` (Cog attention, Lv et al.
  2024; GPU kernel only), with S = cap·tanh(scale·QKᵀ/cap) (cap optional) restricted to the
  visible pairs. The
  `[q_len, kv_len]` matrix is never stored: forward and backward work tile by tile and keep
  only a float32 log-sum-exp per query row. Same semantics as
  `big_attn.ops.dot_product_attention`; a query row with nothing to attend to returns zeros.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`, float32 or bfloat16; the GPU kernel takes
      any head_dim from 1 to 256 (zero-padded inside to a power of two >= 16), the TPU kernel
      multiples of 8 up to 256. An empty query or key sequence gives the empty output or zeros
      on GPU and a ValueError on TPU.
    key: `[batch, kv_len, num_kv_heads, head_dim]`, `num_heads % num_kv_heads == 0` (GQA: K/V
      are shared by query-head groups, never repeated).
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    segment_ids: `[batch, seq]` ints (self-attention) or a pair `(q_segment_ids,
      kv_segment_ids)`; tokens attend only within their segment.
    is_causal: query i attends to keys j <= i (top-left aligned, as `jax.nn`).
    scale: logit scale (a Python number); `1/sqrt(head_dim)` when None.
    local_window_size: int or `(left, right)`: query i attends keys in `[i-left, i+right]`.
    logits_soft_cap: if set, logits become `cap * tanh(logits / cap)`.
    normalizer: "softmax", "sigmoid" or "signed".
    sigmoid_bias: the constant b of the sigmoid normalizer (a Python number); `-log(kv_len)`
      when None.
    block_sizes: the backend's tile sizes (`pallas_kernels.BlockSizes` for the GPU kernel,
      `pallas_kernels.flash_attention.tpu.BlockSizes` for TPU); its defaults if None.
    backend: None (by platform: GPU -> Triton kernel, TPU -> Mosaic TPU kernel; on CPU the GPU
      kernel in interpret mode when `interpret=True`), "gpu"/"triton" or "tpu".
    interpret: run the kernel in the Pallas interpreter (on any platform, CPU included).
    return_residuals: also return the log-sum-exp of each query row (as `jax.nn`'s
      `return_residual`; softmax only, GPU kernel only).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype; with `return_residuals`, the
    pair `(out, lse)`, lse float32 `[batch, q_len, num_heads]` = log Σ_j exp(S_ij) over the
    visible keys (natural log, -inf for a row with nothing to attend to, not differentiated).
  """
  kwargs = dict(segment_ids=segment_ids, is_causal=is_causal, scale=scale,
                local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
                normalizer=normalizer, sigmoid_bias=sigmoid_bias, block_sizes=block_sizes,
                interpret=interpret)
  if _resolve_backend(backend, interpret) == "triton":
    return gpu_triton.flash_attention_triton(query, key, value,
                                             return_residuals=return_residuals, **kwargs)
  for name, unsupported in (("return_residuals=True", return_residuals),
                           ("normalizer='signed'", normalizer == "signed")):
    if unsupported:
      raise ValueError(f"{name} is implemented by the GPU kernel only (backend 'gpu'), not by "
                       "the TPU kernel")
  return _tpu().flash_attention_tpu(query, key, value, **kwargs)


def _tpu():
  from pallas_kernels.flash_attention import tpu  # pylint: disable=g-import-not-at-top
  return tpu


def flash_block_forward(query, key, value, *, causal_offset=None, segment_ids=None, scale=None,
                        backend=None, block_sizes=None, interpret=False):
  """One block of a blockwise schedule (ring / striped attention): `(out, lse)`.

  out = softmax(s·QKᵀ, masked) V normalised *within the block*, lse = log Σ_j exp(s·q·k_j)
  over the block's visible keys, so blocks merge exactly through the log-sum-exp
  (FlashAttention's online softmax, one block at a time). No custom_vjp: the ring's own
  backward pass calls `flash_block_backward` with the global statistics.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key: `[batch, kv_len, num_kv_heads, head_dim]` (GQA: K/V are never repeated).
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    causal_offset: None (no causal rule) or a Python int c: query i sees key j iff j <= i + c
      (0: the usual causal diagonal, -1: the strict one of striped attention). The kernels skip
      the key blocks the shifted band leaves out.
    segment_ids: `[batch, seq]` or a `(q_segment_ids, kv_segment_ids)` pair.
    scale: logit scale (a Python number); `1/sqrt(head_dim)` when None.
    backend, block_sizes, interpret: as `flash_attention`.

  Returns:
    `out` float32 `[batch, q_len, num_heads, value_dim]` (zeros for a row with no visible key)
    and `lse` float32 `[batch, num_heads, q_len]` (natural log; -inf for such a row), the
    layout of `big_attn.parallel.blockwise.xla_block_forward`.
  """
  kwargs = dict(causal_offset=gpu_triton.check_causal_offset(causal_offset),
                segment_ids=segment_ids, scale=scale, block_sizes=block_sizes,
                interpret=interpret)
  if _resolve_backend(backend, interpret) == "triton":
    return gpu_triton.flash_block_forward_triton(query, key, value, **kwargs)
  return _tpu().flash_block_forward_tpu(query, key, value, **kwargs)


def _check_block_grad_args(query, value, out, lse, delta, dout):
  batch, q_len, num_heads, _ = query.shape
  rows = (batch, num_heads, q_len)
  want = (batch, q_len, num_heads, value.shape[-1])
  for name, x, shape in (("dout", dout, want), ("out", out, want), ("lse", lse, rows),
                         ("delta", delta, rows)):
    if x is not None and tuple(x.shape) != shape:
      raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
  if out is None and delta is None:
    raise ValueError("flash_block_backward needs the global `out` or `delta = rowsum(dout*out)`")


def flash_block_backward(query, key, value, out, lse, dout, *, delta=None, causal_offset=None,
                         segment_ids=None, scale=None, backend=None, block_sizes=None,
                         interpret=False):
  """Gradients of one block given the *global* forward statistics: float32 `(dq, dk, dv)`.

  With P = exp(s·QKᵀ - lse) restricted to the block's visible pairs (FlashAttention-2):
  dV = PᵀdO, dS = P ∘ (dO Vᵀ - delta), dQ = s·dS K, dK = s·dSᵀ Q, where `lse` and
  `delta = rowsum(dO ∘ O)` come from the finished forward pass over all blocks, so each block's
  gradient is exact on its own and the blocks' contributions add up.

  Args:
    query, key, value, causal_offset, segment_ids, scale, backend, block_sizes, interpret: as
      `flash_block_forward`.
    out: the global output `[batch, q_len, num_heads, value_dim]`; only used for `delta` (may
      be None when `delta` is given).
    lse: the global log-sum-exp `[batch, num_heads, q_len]` (natural log, -inf: no key).
    dout: the output cotangent, shaped as `out`.
    delta: `rowsum(dout ∘ out)` `[batch, num_heads, q_len]`, if already computed.

  Returns:
    float32 `(dq, dk, dv)` in the shapes of query, key and value.
  """
  _check_block_grad_args(query, value, out, lse, delta, dout)
  if delta is None:
    delta = gpu_triton.row_delta(out, dout)
  kwargs = dict(causal_offset=gpu_triton.check_causal_offset(causal_offset),
                segment_ids=segment_ids, scale=scale, block_sizes=block_sizes,
                interpret=interpret)
  if _resolve_backend(backend, interpret) == "triton":
    return gpu_triton.flash_block_backward_triton(query, key, value, lse, delta, dout, **kwargs)
  return _tpu().flash_block_backward_tpu(query, key, value, lse, delta, dout, **kwargs)


def supports(query, key, value, *, bias=None, mask=None) -> bool:
  """Whether this platform has a compiled kernel for these arguments (no bias or mask arrays,
  non-empty sequences, the backend's head dims); the dispatch table of
  `big_attn.ops.softmax` asks this before it asks for a recorded hardware run."""
  platform = jax.default_backend()
  if platform not in ("gpu", "tpu") or bias is not None or mask is not None:
    return False
  if not query.shape[1] or not key.shape[1] or key.shape[-1] != query.shape[-1]:
    return False
  head_ok = {"gpu": lambda d: 1 <= d <= gpu_triton.MAX_HEAD_DIM,
             "tpu": lambda d: d in _TPU_HEAD_DIMS}[platform]
  return head_ok(query.shape[-1]) and head_ok(value.shape[-1])
