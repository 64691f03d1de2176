"""Softmax attention: the reference implementation and the dispatcher to faster backends."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import BlockForm, register
from pallas_kernels.flash_attention import api as flash_api

IMPLEMENTATIONS = (None, "xla", "pallas", "cudnn")


def _cudnn_attention(query, key, value, bias, mask, scale, is_causal, local_window_size,
                     logits_soft_cap, dims):
  if logits_soft_cap is not None:
    raise ValueError("implementation='cudnn' does not support logits_soft_cap")
  if jax.default_backend() != "gpu":
    raise ValueError(
        f"implementation='cudnn' needs a GPU, the default backend is {jax.default_backend()!r}")
  out = jax.nn.dot_product_attention(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      local_window_size=local_window_size, implementation="cudnn")
  return common.apply_row_mask(out, mask, dims)


# The dispatch table of `implementation=None`. The Pallas kernel serves a case only through a
# recorded hardware run that shows it correct and at least as fast as the alternative for the
# case (cuDNN on GPU, XLA on TPU): the entry is that run's table in experiments/results/, which
# names the device, JAX version and date. A case is (platform, dtype, head_dim, is_causal), e.g.
#   ("gpu", "bfloat16", 128, True): "experiments/results/gpu_<date>/flash_speed.md",
# No run is recorded yet, so None picks cuDNN on GPU where jax.nn supports the arguments, and
# XLA otherwise (TPU and CPU included). `implementation="pallas"` is always available.
KERNEL_RUNS: dict[tuple[str, str, int, bool], str] = {}

CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper with recent cuDNN; 128 holds on every GPU.


def _cudnn_supports(query, key, value, bias, mask, *, is_causal, window, logits_soft_cap,
                    has_segments) -> bool:
  """Whether `jax.nn.dot_product_attention(implementation="cudnn")` takes these arguments
  (its fused flash-attention conditions, decided from shapes and dtypes alone)."""
  dtypes = {str(x.dtype) for x in (query, key, value)}
  head_dim, q_len, kv_len = query.shape[-1], query.shape[1], key.shape[1]
  masked = bias is not None or mask is not None or has_segments
  return (len(dtypes) == 1 and dtypes.pop() in CUDNN_DTYPES
          and logits_soft_cap is None and value.shape[-1] == head_dim
          and head_dim <= CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0
          and q_len > 0 and kv_len > 0
          # A bias (masks become one) must be full [.., q_len, kv_len], lengths even.
          and not (masked and (q_len % 2 or kv_len % 2))
          and all(x is None or x.shape[-2:] == (q_len, kv_len) for x in (bias, mask))
          # Windows: left only, or any with the causal mask.
          and (window is None or window[1] == 0 or is_causal))


def default_implementation(query, key, value, bias=None, mask=None, *, is_causal=False,
                           segment_ids=None, local_window_size=None,
                           logits_soft_cap=None) -> str:
  """The implementation `dot_product_attention(implementation=None)` takes for these arguments
  on the default backend: "pallas" for a case of `KERNEL_RUNS` the kernel supports, else
  "cudnn" on GPU where jax.nn supports the arguments, else "xla"."""
  platform = jax.default_backend()
  if query.ndim != 4:  # The fused paths take [batch, seq, heads, head_dim] only.
    return "xla"
  if platform in ("gpu", "tpu"):
    case = (platform, str(query.dtype), query.shape[-1], bool(is_causal))
    if case in KERNEL_RUNS and flash_api.supports(query, key, value, bias=bias, mask=mask):
      return "pallas"
  if platform == "gpu" and _cudnn_supports(
      query, key, value, bias, mask, is_causal=is_causal,
      window=common.normalize_window(local_window_size), logits_soft_cap=logits_soft_cap,
      has_segments=segment_ids is not None):
    return "cudnn"
  return "xla"


def pallas_attention(query, key, value, *, bias=None, mask=None, caller="", **kernel_args):
  """`pallas_kernels.flash_attention(**kernel_args)` for an op's `implementation="pallas"`
  (on CPU in the Pallas interpreter: slow, for tests); a `bias` or `mask` array raises a
  ValueError naming `caller` (the kernel takes masks as is_causal, segment_ids and
  local_window_size)."""
  for name, x in (("bias", bias), ("mask", mask)):
    if x is not None:
      raise ValueError(
          f"{caller}implementation='pallas' does not support a {name} array; express the "
          "mask with is_causal, segment_ids or local_window_size, or use implementation='xla'")
  return flash_api.flash_attention(query, key, value, interpret=jax.default_backend() == "cpu",
                                   **kernel_args)


def _seq_length_mask(name: str, lengths, batch: int, length: int) -> jax.Array | None:
  """`[batch]` valid lengths -> `[batch, length]` validity, as `jax.nn.dot_product_attention`."""
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {lengths.dtype}")
  if lengths.shape != (batch,):
    raise ValueError(f"{name} must have shape [batch] = ({batch},), got {lengths.shape}")
  return jnp.arange(length)[None, :] < lengths[:, None]


def _as_4d(x):
  """A mask or bias of rank < 4 gets leading axes of size 1, as in `jax.nn`."""
  if x is None or getattr(x, "ndim", 4) >= 4:
    return x
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _log_sum_exp(logits: jax.Array, gmask: jax.Array | None, dims: common.Dims, dtype
                 ) -> jax.Array:
  """log Σ_j exp(logit_ij) over the attended keys, `[b, t, n]` without gradient; a row with
  nothing to attend to gives `common.MASKED_LOGIT` (finite, as `jax.nn`)."""
  if gmask is not None:
    logits = jnp.where(gmask, logits, common.MASKED_LOGIT)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [b, k, g, t]
  lse = jnp.moveaxis(lse, -1, 1).reshape(dims.batch, dims.q_len, dims.num_heads)
  return jax.lax.stop_gradient(lse.astype(dtype))


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, segment_ids=None, local_window_size=None,
                          logits_soft_cap=None, query_seq_lengths=None,
                          key_value_seq_lengths=None, return_residual=False,
                          implementation=None):
  """Scaled dot-product attention (Attention Is All You Need), `[batch, seq, heads, head_dim]`.

  out = softmax(cap·tanh(s·QKᵀ/cap) + B, masked) V, with the masks of `mask`, `is_causal`,
  `segment_ids`, `local_window_size` and the sequence lengths combined. Softmax statistics
  are float32 for any input dtype; a query row with nothing to attend to returns zeros (where
  `jax.nn.dot_product_attention` averages every value). Keys and values may have fewer heads
  than queries (GQA/MQA); they are never repeated in memory. Accepts what
  `jax.nn.dot_product_attention` accepts: unbatched `[seq, heads, head_dim]` inputs, masks and
  biases of any rank up to 4 (leading axes of size 1 added), sequence lengths and the residual.

  Args:
    query: `[batch, q_len, num_heads, head_dim]` (or `[q_len, num_heads, head_dim]`).
    key: `[batch, kv_len, num_kv_heads, head_dim]`, `num_heads % num_kv_heads == 0`.
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    bias: optional additive logit bias broadcastable to `[batch, num_heads, q_len, kv_len]`.
    mask: optional boolean mask (True = may attend), broadcastable like `bias`.
    scale: logit scale; `1/sqrt(head_dim)` when None.
    is_causal: query i attends to keys j <= i.
    segment_ids: `[batch, seq]` ints (self-attention) or a pair `(q_segment_ids,
      kv_segment_ids)`; tokens attend only within their segment (`[seq]` when unbatched).
    local_window_size: int or `(left, right)`: query i attends keys in `[i-left, i+right]`.
    logits_soft_cap: if set, logits become `cap * tanh(logits / cap)` (before the bias).
    query_seq_lengths: int `[batch]`: queries at and after it are padding (zero output).
    key_value_seq_lengths: int `[batch]`: keys at and after it are ignored.
    return_residual: also return the log-sum-exp of each row's logits, `[batch, q_len,
      num_heads]` in the key's dtype, without gradient (as `jax.nn.dot_product_attention`).
    implementation: None (`default_implementation`: the table `KERNEL_RUNS` of recorded
      hardware runs, else cuDNN on GPU where jax.nn supports the arguments, else XLA), "xla",
      "pallas" (`pallas_kernels.flash_attention`; no `bias`/`mask` arrays; on CPU it runs in
      the Pallas interpreter) or "cudnn".

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype (the query's rank), and with
    `return_residual` the pair `(out, log_sum_exp)`.
  """
  unbatched = all(getattr(x, "ndim", None) == 3 for x in (query, key, value))
  if unbatched:
    query, key, value = query[None], key[None], value[None]
    if segment_ids is not None:
      segment_ids = (tuple(s[None] for s in segment_ids)
                     if isinstance(segment_ids, (tuple, list)) else segment_ids[None])
  bias, mask = _as_4d(bias), _as_4d(mask)
  dims = common.check_qkv(query, key, value)
  q_valid = _seq_length_mask("query_seq_lengths", query_seq_lengths, dims.batch, dims.q_len)
  kv_valid = _seq_length_mask("key_value_seq_lengths", key_value_seq_lengths, dims.batch,
                              dims.kv_len)
  for valid, where in ((q_valid, (slice(None), None, slice(None), None)),
                       (kv_valid, (slice(None), None, None, slice(None)))):
    if valid is not None:
      common.make_mask(dims, mask=mask)  # Checks the user's mask before combining.
      mask = valid[where] if mask is None else jnp.logical_and(mask, valid[where])
  out = _attention(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                   segment_ids=segment_ids, local_window_size=local_window_size,
                   logits_soft_cap=logits_soft_cap, implementation=implementation)
  if return_residual:  # From the XLA logits (under jit XLA shares them with the XLA path).
    _, logits, gmask = common.scores(
        query, key, value, scale=scale, bias=bias, mask=mask, is_causal=is_causal,
        segment_ids=segment_ids, local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap)
    residual = _log_sum_exp(logits, gmask, dims, key.dtype)
    return (out[0], residual[0]) if unbatched else (out, residual)
  return out[0] if unbatched else out


def _attention(query, key, value, bias, mask, *, scale, is_causal, segment_ids,
               local_window_size, logits_soft_cap, implementation):
  """`dot_product_attention` on rank-4 arrays through the chosen backend."""
  dims = common.check_qkv(query, key, value)
  common.check_bias(bias, dims)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if logits_soft_cap is not None:
    logits_soft_cap = checks.positive_float("logits_soft_cap", logits_soft_cap)
  scale = common.default_scale(dims.head_dim, scale)
  if implementation is None:
    implementation = default_implementation(
        query, key, value, bias, mask, is_causal=is_causal, segment_ids=segment_ids,
        local_window_size=local_window_size, logits_soft_cap=logits_soft_cap)
  if implementation == "pallas":
    return pallas_attention(
        query, key, value, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
        segment_ids=segment_ids, local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap)
  if implementation == "cudnn":
    segment_mask = common.make_mask(dims, mask=mask, segment_ids=segment_ids)
    return _cudnn_attention(query, key, value, bias, segment_mask, scale, is_causal,
                            common.normalize_window(local_window_size), logits_soft_cap, dims)
  if dims.groups == 1:
    full_mask = common.make_mask(dims, mask=mask, is_causal=is_causal, segment_ids=segment_ids,
                                 local_window_size=local_window_size)
    return _per_head_xla(query, key, value, bias, full_mask, scale,
                         logits_soft_cap).astype(query.dtype)
  dims, logits, gmask = common.scores(
      query, key, value, scale=scale, bias=bias, mask=mask, is_causal=is_causal,
      segment_ids=segment_ids, local_window_size=local_window_size,
      logits_soft_cap=logits_soft_cap)
  probs = common.masked_softmax(logits, gmask)
  return common.weighted_values(probs, value, dims).astype(query.dtype)


def _per_head_xla(query, key, value, bias, mask, scale, logits_soft_cap):
  """The XLA path with one query head per key/value head, in `jax.nn`'s program: the
  `[b, t, n, d]` computation mapped (`vmap`) over a group axis of size 1. XLA:CPU compiles the
  logits matmul and the softmax of this layout into one faster fusion than of the grouped
  `[b, k, g, t, s]` logits (the unmasked forward at 1.0x jax.nn's time instead of 1.1-1.2x);
  with several query heads per key head the grouped layout is the faster one."""
  def attend(q):
    logits = jnp.einsum("btnd,bsnd->bnts", q, key, preferred_element_type=jnp.float32)
    logits = common.cap_and_bias(logits * jnp.float32(scale), logits_soft_cap, bias)
    probs = common.masked_softmax(logits, mask, as_rows=False)
    return jnp.einsum("bnts,bsnd->btnd", probs.astype(value.dtype), value,
                      preferred_element_type=jnp.float32)
  return jax.vmap(attend, in_axes=3, out_axes=3)(query[:, :, :, None])[:, :, :, 0]


def _softmax_form(query, key, scale, **op_args):
  """Softmax is its own softmax form: queries, keys and scale unchanged (no op arguments: the
  sequence-parallel and cached paths compute plain softmax attention)."""
  if op_args:
    raise ValueError(f"the sequence-parallel and cached forms of softmax attention take no op "
                     f"arguments, got {sorted(op_args)}")
  return query, key, scale


def _softmax_block_form(query, key, scale, *, logits_soft_cap=None, **op_args) -> BlockForm:
  """Softmax attention in blocks merged through the log-sum-exp; the soft cap
  cap·tanh(s/cap) is applied to each block's scores."""
  query, key, scale = _softmax_form(query, key, scale, **op_args)
  if logits_soft_cap is not None:
    logits_soft_cap = checks.positive_float("logits_soft_cap", logits_soft_cap)
  return BlockForm("softmax", query, key, scale, {"soft_cap": logits_soft_cap})


@register("softmax", segment_ids=True, implementation=True, bias=True,
          softmax_form=_softmax_form, block_form=_softmax_block_form)
def softmax_attention(query, key, value, *, mask=None, is_causal=False, scale=None, bias=None,
                      segment_ids=None, local_window_size=None, logits_soft_cap=None,
                      implementation=None):
  """Softmax attention (Attention Is All You Need): softmax(QKᵀ/√d + B) V.

  The registry entry for `dot_product_attention`; takes the same arguments.
  """
  return dot_product_attention(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal, segment_ids=segment_ids,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
      implementation=implementation)
