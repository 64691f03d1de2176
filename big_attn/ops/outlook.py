"""Outlook attention: VOLO's dense local aggregation whose weights come from each token alone
(no query-key products).

- `outlook_attention`: VOLO: Vision Outlooker for Visual Recognition (Yuan et al., 2022).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops import windowed
from big_attn.ops.registry import OpParams, register, register_params

# VOLO's outlooker: 3 x 3 windows; the brief's (and VOLO-D1's first-stage attention map)
# stride 1 is the default here.
VOLO_KERNEL = 3
VOLO_STRIDE = 1


def windows(grid: tuple[int, int], kernel: int, stride: int
            ) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
  """The `(h', w')` centres (`ceil(h/stride)`, `ceil(w/stride)`), the row-major token of every
  window slot `[h'·w', kernel²]` and whether it lies in the image (unfold with zero padding
  `kernel // 2`, as `torch.nn.Unfold`)."""
  (h, w), pad = grid, kernel // 2
  rows, cols = -(-h // stride), -(-w // stride)
  cy = np.arange(rows)[:, None, None, None] * stride - pad + np.arange(kernel)[:, None]
  cx = np.arange(cols)[None, :, None, None] * stride - pad + np.arange(kernel)[None, :]
  cy, cx = np.broadcast_arrays(cy, cx)  # [h', w', K, K]
  inside = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
  tokens = np.where(inside, np.clip(cy, 0, h - 1) * w + np.clip(cx, 0, w - 1), 0)
  return (rows, cols), tokens.reshape(rows * cols, -1), inside.reshape(rows * cols, -1)


def _pool(query, grid, stride):
  """Average pooling of `[b, h·w, n, d]` over `stride x stride` cells (the last cells partial,
  as `ceil_mode=True`) -> `[b, h'·w', n, d]` float32."""
  (h, w), b = grid, query.shape[0]
  rows, cols = -(-h // stride), -(-w // stride)
  x = query.astype(jnp.float32).reshape(b, h, w, *query.shape[2:])
  x = jnp.pad(x, ((0, 0), (0, rows * stride - h), (0, cols * stride - w), (0, 0), (0, 0)))
  count = np.zeros((rows * stride, cols * stride))
  count[:h, :w] = 1
  count = count.reshape(rows, stride, cols, stride).sum((1, 3))
  x = x.reshape(b, rows, stride, cols, stride, *query.shape[2:]).sum((2, 4))
  return (x / count[None, :, :, None, None]).reshape(b, rows * cols, *query.shape[2:])


@register("outlook_attention", causal=False, grid=True)
def outlook_attention(query, key, value, *, mask=None, is_causal=False, scale=None, grid=None,
                      outlook_kernel=None, outlook_bias=None, kernel_size=VOLO_KERNEL,
                      stride=VOLO_STRIDE):
  """Outlook attention: VOLO: Vision Outlooker for Visual Recognition (Yuan et al., 2022).

  Each window centre c (every `stride`-th token of the `grid=(h, w)` image) predicts from its
  own features a K²×K² weight matrix per head and mixes the K×K window of values around it;
  the windows' outputs are folded (summed) back onto the tokens:

      A_c = softmax_row(s·reshape_{K²×K²}(x̄_c W_A + b_A)),   Y_c = A_c · V_{Ω(c)},
      out_i = Σ_{c, m : Ω(c)_m = i} (Y_c)_m,

  with Ω(c) the K² tokens of the window (zero values outside the image, kept in the
  softmax as VOLO's zero-padded unfold) and x̄_c the `stride` x `stride` average of the inputs
  (VOLO's pooling; x̄ = x for stride 1).

  Outlook attention is not a function of queries and keys: its weights are a linear map of
  each token. The op is registered as an attention op with the weights computed from the
  `query` argument, x W_A = (x W_Q) W_O per head (`outlook_kernel` W_O), so in
  `big_attn.layers.Attention` VOLO's map factors through the layer's query projection (rank
  head_dim per head instead of the model width); `key` only fixes the layout and is unused.
  No keys means no key mask: `mask` must be None. No causal form (windows see both sides).

  Args:
    query: `[batch, h·w, num_heads, head_dim]`, row-major tokens (the features x W_Q).
    key: `[batch, h·w, num_kv_heads, head_dim]`, layout only.
    value: `[batch, h·w, num_kv_heads, value_dim]`.
    mask: must be None.
    is_causal: must be False.
    scale: logit scale s; `1/sqrt(head_dim)` when None (VOLO's head_dim^−0.5).
    grid: required `(h, w)`, `h·w == seq`.
    outlook_kernel: W_O `[num_heads, head_dim, K⁴]`.
    outlook_bias: optional b_A `[num_heads, K⁴]`.
    kernel_size: K, odd (VOLO: 3).
    stride: window centres every `stride` tokens per axis (VOLO's outlooker: 2 in its first
      stage; 1 here by default).

  Returns:
    `[batch, h·w, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("outlook_attention", is_causal)
  dims = common.check_qkv(query, key, value)
  if mask is not None:
    raise ValueError("outlook_attention has no keys to mask: mask must be None")
  if dims.q_len != dims.kv_len:
    raise ValueError("outlook_attention mixes each token's own window: q_len must equal "
                     f"kv_len, got {dims.q_len} and {dims.kv_len}")
  grid = windowed.check_grid(grid, dims.q_len)
  k = checks.positive_int("kernel_size", kernel_size)
  if k % 2 == 0:
    raise ValueError(f"kernel_size must be odd (a window centred on its token), got {k}")
  stride = checks.positive_int("stride", stride)
  n, d = dims.num_heads, dims.head_dim
  common.check_weight("outlook_kernel", outlook_kernel, (n, d, k ** 4),
                      "[num_heads, head_dim, kernel_size⁴]")
  if outlook_bias is not None:
    common.check_weight("outlook_bias", outlook_bias, (n, k ** 4), "[num_heads, kernel_size⁴]")
  return _outlook(query, value, outlook_kernel, outlook_bias, common.default_scale(d, scale),
                  grid=grid, kernel_size=k, stride=stride)


@functools.partial(jax.jit, static_argnames=("grid", "kernel_size", "stride"))
def _outlook(query, value, outlook_kernel, outlook_bias, scale, *, grid, kernel_size, stride):
  """The body of `outlook_attention` after its checks, compiled once per configuration."""
  k, (b, t, n, _), dv = kernel_size, query.shape, value.shape[-1]
  _, tokens, inside = windows(grid, k, stride)
  pooled = query.astype(jnp.float32) if stride == 1 else _pool(query, grid, stride)
  logits = jnp.einsum("bcnd,nde->bcne", pooled, outlook_kernel.astype(jnp.float32))
  if outlook_bias is not None:
    logits = logits + outlook_bias.astype(jnp.float32)
  weights = jax.nn.softmax(jnp.float32(scale) * logits.reshape(*logits.shape[:3], k * k, k * k),
                           axis=-1)
  values = jnp.repeat(value, n // value.shape[2], axis=2).astype(jnp.float32)
  unfolded = jnp.where(inside[None, :, :, None, None], values[:, tokens], 0.0)  # [b,c,m,n,e]
  mixed = jnp.einsum("bcnml,bclne->bcmne", weights, unfolded)
  mixed = jnp.where(inside[None, :, :, None, None], mixed, 0.0)
  out = jnp.zeros((b, t, n, dv), jnp.float32)
  out = out.at[:, tokens.reshape(-1)].add(mixed.reshape(b, -1, n, dv))
  return out.astype(query.dtype)


@register_params("outlook_attention")
class OutlookParams(OpParams):
  """VOLO's attention map of outlook attention, factored through the query projection:
  `outlook_kernel [num_heads, head_dim, K⁴]` (fan-in scaled normal) and `outlook_bias
  [num_heads, K⁴]` (zeros), K = `op_args.get("kernel_size", 3)`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    k = checks.positive_int("op_args['kernel_size']",
                            (self.op_args or {}).get("kernel_size", VOLO_KERNEL))
    kernel = self.param("outlook_kernel", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=self.head_dim ** -0.5), ("heads", "head_dim", None)),
                        (self.num_heads, self.head_dim, k ** 4), self.param_dtype)
    bias = self.param("outlook_bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("heads", None)), (self.num_heads, k ** 4),
                      self.param_dtype)
    kernel, bias = nn.dtypes.promote_dtype(kernel, bias, dtype=self.dtype)
    return {"outlook_kernel": kernel, "outlook_bias": bias}
