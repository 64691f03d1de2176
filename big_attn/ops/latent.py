"""Attention through a few latent or agent tokens: linear in the sequence length.

- `agent`: Agent Attention (Han et al., 2023), softmax(QAᵀ)·softmax(AKᵀ)·V.
- `latte`: Latte, Latent Attention for Linear Time Transformers (Dolga et al., 2024).

Neither mechanism forms the `[q_len, kv_len]` score matrix, so only masks that act on keys can
be honoured: a mask broadcastable to `[batch, heads, 1, kv_len]` (key padding), or a padding
mask of outer-product form `[batch, heads, q_len, kv_len]` (query validity × key validity). A key
is used when any query may attend to it; query rows with no key give zeros. Other masks (causal
or local patterns) cannot be expressed by these mechanisms: pass `is_causal` where supported.
A concrete mask of another form raises `ValueError`; a traced one (inside `jit`) cannot be
inspected and is reduced as above.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import OpParams, register, register_params

Array = jax.Array

LATTE_CHUNK_SIZE = 16  # latte's causal chunk length (shared with its recurrent state form)


def _key_mask(mask: Array | None, dims: common.Dims, name: str,
              is_causal: bool = False) -> Array | None:
  """The validated mask reduced to keys: `[b|1, n|1, kv]`, True where some query may attend.

  A concrete (not traced) mask is checked to lose nothing in the reduction: it must equal
  (query validity × key validity), within the causal pattern when `is_causal`.
  """
  full = common.make_mask(dims, mask=mask)
  if full is None:
    return None
  try:
    concrete = np.asarray(full)
  except jax.errors.TracerArrayConversionError:
    concrete = None
  if concrete is not None and concrete.shape[2] > 1:
    causal = (np.arange(dims.kv_len)[None, :] <= np.arange(dims.q_len)[:, None]
              if is_causal else True)
    wanted = concrete & causal
    rows = wanted.any(-1, keepdims=True)
    if not np.array_equal(wanted, rows & concrete.any(2, keepdims=True) & causal):
      raise ValueError(
          f"op {name!r} supports only key-padding masks (query validity x key validity), "
          "not general [q_len, kv_len] patterns"
          + ("; use is_causal=True for causal masking" if name == "latte" else ""))
  return jnp.any(full, axis=2)


def _grouped_key_mask(key_mask: Array | None, dims: common.Dims) -> Array | None:
  """`[b|1, n|1, s]` -> `[b|1, k|1, g|1, s]`."""
  if key_mask is None:
    return None
  if key_mask.shape[1] == 1:
    return key_mask[:, :, None]
  return key_mask.reshape(key_mask.shape[0], dims.num_kv_heads, dims.groups, dims.kv_len)


def _check_bias(name: str, bias: Array | None, target: tuple[int, ...]) -> None:
  if bias is None:
    return
  if not hasattr(bias, "shape") or not jnp.issubdtype(bias.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating array")
  if bias.ndim != len(target) or any(s not in (1, w) for s, w in zip(bias.shape, target)):
    raise ValueError(
        f"{name} must be broadcastable to [batch, heads, ...] = {target}, got shape {bias.shape}")


def _grouped_bias(bias: Array | None, dims: common.Dims) -> Array | None:
  """`[b|1, n|1, x, y]` -> `[b|1, k|1, g|1, x, y]` in float32."""
  if bias is None:
    return None
  bias = bias.astype(jnp.float32)
  if bias.shape[1] == 1:
    return bias[:, :, None]
  return bias.reshape(bias.shape[0], dims.num_kv_heads, dims.groups, *bias.shape[2:])


def adaptive_pool_matrix(length: int, size: int) -> np.ndarray:
  """`[size, length]` averaging matrix of adaptive average pooling (PyTorch's bins).

  Bin i covers `[floor(i·length/size), ceil((i+1)·length/size))`.
  """
  out = np.zeros((size, length), np.float32)
  for i in range(size):
    start, end = (i * length) // size, -((-(i + 1) * length) // size)
    out[i, start:end] = 1.0 / (end - start)
  return out


# Agent Attention's n = 49 agents: a 7 x 7 pool of the query image.
AGENT_SIDE = 7


def _agent_pool(query: Array, num_agents, grid) -> Array:
  """Adaptive average pooling of `[b, t, n, d]` queries to `[b, num_agents, n, d]` agents."""
  t = query.shape[1]
  if grid is None:
    if num_agents is None:
      num_agents = min(AGENT_SIDE * AGENT_SIDE, t)
    pool = adaptive_pool_matrix(t, checks.int_in_range("num_agents", num_agents, 1, t))
  else:
    h, w = grid
    if num_agents is None:
      num_agents = (min(AGENT_SIDE, h), min(AGENT_SIDE, w))
    if isinstance(num_agents, (int, np.integer)):
      side = math.isqrt(int(num_agents))
      if side * side != num_agents:
        raise ValueError(
            "with grid, num_agents must be a perfect square (a pool_size x pool_size grid of "
            f"agents) or a pair (rows, cols), got {num_agents!r}")
      ph = pw = side
    else:
      ph, pw = checks.int_tuple("num_agents", num_agents, allow_int=False)
    if not (1 <= ph <= h and 1 <= pw <= w):
      raise ValueError(f"num_agents grid {(ph, pw)} must fit in grid {(h, w)}")
    pool = np.kron(adaptive_pool_matrix(h, ph), adaptive_pool_matrix(w, pw))
  agents = jnp.einsum("at,btnd->band", jnp.asarray(pool), query,
                      preferred_element_type=jnp.float32)
  return agents.astype(query.dtype)


def _check_dwc(kernel: Array | None, bias: Array | None, dims: common.Dims, grid) -> None:
  if kernel is None:
    if bias is not None:
      raise ValueError("dwc_bias given without dwc_kernel")
    return
  if dims.kv_len != dims.q_len:
    raise ValueError(f"dwc_kernel needs kv_len == q_len, got {dims.kv_len} and {dims.q_len}")
  common.check_float("dwc_kernel", kernel)
  spatial_rank = 1 if grid is None else 2
  tail = (dims.num_kv_heads, dims.value_dim)
  if kernel.ndim != spatial_rank + 2 or kernel.shape[spatial_rank:] != tail:
    want = "[kernel, " if grid is None else "[kh, kw, "
    raise ValueError(
        f"dwc_kernel must have shape {want}num_kv_heads={tail[0]}, value_dim={tail[1]}], "
        f"got {kernel.shape}")
  if bias is not None and bias.shape != tail:
    raise ValueError(f"dwc_bias must have shape {tail}, got {bias.shape}")


def _depthwise_conv(value: Array, kernel: Array, bias: Array | None, grid) -> Array:
  """Depthwise convolution of `[b, s, k, dv]` values over the sequence (or the grid), 'same'."""
  b, s, k, dv = value.shape
  channels = k * dv
  if grid is None:
    spatial = (s,)
  else:
    spatial = tuple(grid)
  lhs = value.reshape(b, *spatial, channels)
  rhs = kernel.reshape(*kernel.shape[:-2], 1, channels)
  dn = ("NWC", "WIO", "NWC") if grid is None else ("NHWC", "HWIO", "NHWC")
  out = jax.lax.conv_general_dilated(
      lhs.astype(jnp.float32), rhs.astype(jnp.float32), window_strides=(1,) * len(spatial),
      padding="SAME", dimension_numbers=dn, feature_group_count=channels)
  if bias is not None:
    out = out + bias.reshape(channels).astype(jnp.float32)
  return out.reshape(b, s, k, dv)


@register("agent", causal=False, grid=True)
def agent_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                    num_agents=None, agent_tokens=None, grid=None, query_agent_bias=None,
                    agent_key_bias=None, dwc_kernel=None, dwc_bias=None):
  """Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., 2023).

  A few agent tokens A aggregate the values for all queries, then broadcast them back:

      O = softmax(s·QAᵀ + B₁) · softmax(s·AKᵀ + B₂) · V  [+ DWC(V)]

  with A the adaptive average pooling of Q to `num_agents` tokens (over the sequence, or over
  the `grid` image as in the paper) unless `agent_tokens` are given. Cost O((q_len + kv_len)·a).
  Key masks apply to the agent-aggregation softmax (module docstring); no causal form, since
  pooled agents see the whole sequence.

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key: `[batch, kv_len, num_kv_heads, head_dim]`.
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    mask: boolean key-padding mask (see the module docstring).
    is_causal: must be False.
    scale: logit scale `s`; `1/sqrt(head_dim)` when None.
    num_agents: number of pooled agents (int; with `grid` a perfect square p² for a p×p pool or
      a pair `(rows, cols)`); with `agent_tokens` it is optional and checked against them.
      Default the paper's n = 49: a 7×7 pool with `grid` (each side at most the grid's), else
      min(49, q_len).
    agent_tokens: `[batch, num_agents, num_heads, head_dim]` agents used instead of pooling.
    grid: `(height, width)` of the token grid (row-major tokens) for 2-D pooling and DWC.
    query_agent_bias: B₁, broadcastable to `[batch, num_heads, q_len, num_agents]`.
    agent_key_bias: B₂, broadcastable to `[batch, num_heads, num_agents, kv_len]`.
    dwc_kernel: depthwise-convolution kernel over the values, `[kernel, num_kv_heads,
      value_dim]` (1-D) or `[kh, kw, num_kv_heads, value_dim]` (with `grid`); 'same' zero
      padding; needs `kv_len == q_len`. Its output is added to every query head of the group.
    dwc_bias: `[num_kv_heads, value_dim]` bias of the depthwise convolution.

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  common.check_no_causal("agent", is_causal)
  dims = common.check_qkv(query, key, value)
  scale = common.default_scale(dims.head_dim, scale)
  if grid is not None:
    grid = checks.int_tuple("grid", grid, allow_int=False)
    if grid[0] * grid[1] != dims.q_len:
      raise ValueError(f"grid {grid} must have q_len = {dims.q_len} cells")

  _check_dwc(dwc_kernel, dwc_bias, dims, grid)
  if agent_tokens is None:
    agents = _agent_pool(query, num_agents, grid)
  else:
    common.check_float("agent_tokens", agent_tokens)
    if (agent_tokens.ndim != 4 or agent_tokens.shape[0] != dims.batch
        or agent_tokens.shape[2:] != (dims.num_heads, dims.head_dim)):
      raise ValueError(
          "agent_tokens must have shape [batch, num_agents, num_heads, head_dim] = "
          f"[{dims.batch}, a, {dims.num_heads}, {dims.head_dim}], got {agent_tokens.shape}")
    if num_agents is not None and num_agents != agent_tokens.shape[1]:
      raise ValueError(
          f"num_agents={num_agents!r} disagrees with agent_tokens of shape {agent_tokens.shape}")
    agents = agent_tokens
  a = agents.shape[1]
  _check_bias("query_agent_bias", query_agent_bias, (dims.batch, dims.num_heads, dims.q_len, a))
  _check_bias("agent_key_bias", agent_key_bias, (dims.batch, dims.num_heads, a, dims.kv_len))

  agents_g = common.group_query(agents, dims.num_kv_heads)  # [b, a, k, g, d]
  # Agent aggregation: each agent attends over the (unmasked) keys.
  agent_logits = jnp.einsum("bakgd,bskd->bkgas", agents_g, key,
                            preferred_element_type=jnp.float32) * jnp.float32(scale)
  if agent_key_bias is not None:
    agent_logits = agent_logits + _grouped_bias(agent_key_bias, dims)
  key_mask = _grouped_key_mask(_key_mask(mask, dims, "agent"), dims)
  agent_probs = common.masked_softmax(
      agent_logits, None if key_mask is None else key_mask[..., None, :])
  agent_values = jnp.einsum("bkgas,bskd->bkgad", agent_probs, value,
                            preferred_element_type=jnp.float32)
  # Agent broadcast: each query attends over the agents.
  query_logits = jnp.einsum("btkgd,bakgd->bkgta", common.group_query(query, dims.num_kv_heads),
                            agents_g, preferred_element_type=jnp.float32) * jnp.float32(scale)
  if query_agent_bias is not None:
    query_logits = query_logits + _grouped_bias(query_agent_bias, dims)
  query_probs = jax.nn.softmax(query_logits, axis=-1)
  out = jnp.einsum("bkgta,bkgad->btkgd", query_probs, agent_values)

  if dwc_kernel is not None:
    out = out + _depthwise_conv(value, dwc_kernel, dwc_bias, grid)[:, :, :, None]

  out = out.reshape(dims.batch, dims.q_len, dims.num_heads, dims.value_dim)
  return common.apply_row_mask(out, common.make_mask(dims, mask=mask), dims).astype(query.dtype)


def _latte_causal(probs_l, logits, valid, value, chunk_size, initial=None, segment_ids=None):
  """Chunked causal Latte in grouped layout, linear in the sequence length.

  probs_l: `[b, t, k, g, L]` softmax over latents of the queries; logits: `[b, t, k, g, L]`
  key-latent logits; valid: `[b|1, t, k|1, g|1, 1]` usable keys; value: `[b, t, k, dv]`.
  The carry holds, per latent, the running max m, Σ exp(z_s − m) v_s and Σ exp(z_s − m).
  Inside a chunk every (t, l) gets its own running max, so nothing under- or overflows.
  `initial` is that carry after earlier tokens (empty when None); returns the output
  `[b, t, k, g, dv]` and the carry after the last token.

  `segment_ids` `[b, t]` (packed rows, each segment a run of equal ids): a token attends to the
  earlier tokens of its run only; the carry holds the run of the chunk's last token, and a
  token of another run starts from an empty state.
  """
  b, t, k, g, num_latents = logits.shape
  dv = value.shape[-1]
  c = min(chunk_size, t)
  pad = -t % c
  if pad:
    padding = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    probs_l, logits, value = padding(probs_l), padding(logits), padding(value)
    valid = jnp.pad(jnp.broadcast_to(valid, (valid.shape[0], t) + valid.shape[2:]),
                    [(0, 0), (0, pad), (0, 0), (0, 0), (0, 0)])
    if segment_ids is not None:  # padding continues the last run: the carry stays its state
      segment_ids = jnp.pad(segment_ids, [(0, 0), (0, pad)], mode="edge")
  n_chunks = (t + pad) // c
  logits = jnp.where(valid, logits, common.MASKED_LOGIT)

  def chunks(x):
    return jnp.moveaxis(x.reshape(x.shape[0], n_chunks, c, *x.shape[2:]), 1, 0)

  tri = jnp.tril(jnp.ones((c, c), bool))[None, :, :, None, None, None]  # [1, t, s, 1, 1, 1]

  @jax.checkpoint
  def step(carry, xs):
    m_old, s_old, d_old, seg_old = carry  # [b,k,g,L], [b,k,g,L,dv], [b,k,g,L], [b]
    p_c, z_c, v_c, seg_c = xs  # [b,c,k,g,L], [b,c,k,g,L], [b,c,k,dv], [b,c]
    if segment_ids is None:
      m_prev = m_old[:, None]  # [b,1,k,g,L]
      allowed = tri
      m_chunk = jax.lax.cummax(z_c, axis=1)
    else:  # the carry counts only for tokens of its run; keys only within a token's run
      same_run = (seg_c == seg_old[:, None])[:, :, None, None, None]  # [b,c,1,1,1]
      m_prev = jnp.where(same_run, m_old[:, None], common.MASKED_LOGIT)
      allowed = tri & (seg_c[:, :, None] == seg_c[:, None, :])[..., None, None, None]
      m_chunk = jnp.max(jnp.where(allowed, z_c[:, None], common.MASKED_LOGIT), axis=2)
    m_run = jax.lax.stop_gradient(jnp.maximum(m_prev, m_chunk))  # [b,c,k,g,L]
    # MASKED_LOGIT stands for -inf (finite for jax.debug_infs): no usable key yet.
    m_t = jnp.where(m_run > common.MASKED_LOGIT, m_run, 0.0)
    decay = jnp.exp(m_prev - m_t)  # 0 before the first usable key
    arg = jnp.where(allowed, z_c[:, None] - m_t[:, :, None], common.MASKED_LOGIT)  # [b,t,s,k,g,L]
    weights = jnp.exp(arg)
    denom = decay * d_old[:, None] + jnp.sum(weights, axis=2)  # [b,c,k,g,L]
    coef = jnp.where(denom > 0, p_c / jnp.where(denom > 0, denom, 1.0), 0.0)
    scores = jnp.einsum("btkgl,btskgl->btskg", coef, weights)
    out = (jnp.einsum("btkgl,bkgld->btkgd", coef * decay, s_old)
           + jnp.einsum("btskg,bskd->btkgd", scores, v_c.astype(jnp.float32)))
    s_new = (decay[:, -1, ..., None] * s_old
             + jnp.einsum("bskgl,bskd->bkgld", weights[:, -1], v_c.astype(jnp.float32)))
    return (m_run[:, -1], s_new, denom[:, -1], seg_c[:, -1]), out

  if initial is None:
    initial = (jnp.full((b, k, g, num_latents), common.MASKED_LOGIT, jnp.float32),
               jnp.zeros((b, k, g, num_latents, dv), jnp.float32),
               jnp.zeros((b, k, g, num_latents), jnp.float32))
  seg = (jnp.zeros((b, n_chunks * c), jnp.int32) if segment_ids is None
         else segment_ids.astype(jnp.int32))
  carry = (*initial, seg[:, 0])  # the first run continues no carry unless one is given
  (*final, _), out = jax.lax.scan(
      step, carry, (chunks(probs_l), chunks(logits), chunks(value), chunks(seg)))
  out = jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * c, k, g, dv)
  return out[:, :t], tuple(final)


def _check_runs(segment_ids: Array) -> None:
  """A concrete `[batch, seq]` of segment ids must be runs of equal ids: an id that recurs
  after another one would be one segment to `dot_product_attention` but two to the scan."""
  try:
    seg = np.asarray(segment_ids)
  except jax.errors.TracerArrayConversionError:
    return
  for row in seg:
    runs = row[np.r_[True, row[1:] != row[:-1]]]
    if len(runs) != len(np.unique(runs)):
      raise ValueError(f"causal latte needs segment_ids whose segments are runs of equal ids "
                       f"(packed rows); got a row whose ids recur: {runs.tolist()}")


def _latte_logits(query: Array, key: Array, latents: Array, scale: float) -> tuple[Array, Array]:
  """Latte's softmax over latents of the queries `[b, t, k, g, L]` and key-latent logits
  `[b, s, k, g, L]` (float32) for latents `[num_heads, L, head_dim]`."""
  k_heads = key.shape[2]
  w = latents.reshape(k_heads, latents.shape[0] // k_heads, *latents.shape[1:])
  q_logits = jnp.einsum("btkgd,kgld->btkgl", common.group_query(query, k_heads), w,
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
  k_logits = jnp.einsum("bskd,kgld->bskgl", key, w,
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
  return jax.nn.softmax(q_logits, axis=-1), k_logits


# Latte's latent states per head when a layer creates them (`LatteParams`): L = 64 (the
# number benchmarked in experiments/results/cpu_paths.md).
LATTE_NUM_LATENTS = 64


@register("latte", segment_ids=True)
def latte_attention(query, key, value, *, mask=None, is_causal=False, scale=None, latents=None,
                    num_latents=None, chunk_size=LATTE_CHUNK_SIZE, segment_ids=None):
  """Latte: Latent Attention for Linear Time Transformers (Dolga et al., 2024).

  Attention factorised through L latent states l, p(s|t) = Σ_l p(l|t) p(s|l):

      y_t = Σ_l softmax_l(s·q_t·w_l) · Σ_{s'} softmax_{s'}(s·k_{s'}·w_l) v_{s'}

  with the key softmax over all s' (bidirectional) or over s' ≤ t (causal, computed by a scan
  over chunks that carries, per latent, a running max, Σ exp(k·w_l) v and Σ exp(k·w_l): constant
  state per step, linear time). The paper projects x to latent logits with matrices W_q, W_k;
  here the projected heads q, k meet learned latent vectors w_l, so W_q·w_l and W_k·w_l play
  their roles. Key masks only (module docstring).

  Args:
    query: `[batch, q_len, num_heads, head_dim]`.
    key: `[batch, kv_len, num_kv_heads, head_dim]` (`kv_len == q_len` when causal).
    value: `[batch, kv_len, num_kv_heads, value_dim]`.
    mask: boolean key-padding mask (see the module docstring).
    is_causal: token t mixes only tokens s ≤ t.
    scale: logit scale `s`; `1/sqrt(head_dim)` when None.
    latents: `[num_heads, num_latents, head_dim]` latent vectors w_l (required).
    num_latents: optional; checked against `latents.shape[1]`.
    chunk_size: chunk length of the causal scan (memory per chunk ∝ chunk_size²·L). 16 is
      the fastest on CPU: with 64 (the former default) causal latte took 2.4x softmax's time
      at 512 tokens, its [chunk, chunk, L] weights outgrowing the cache; with 16 it breaks
      even there (0.94x forward, 1.0x forward+backward, 0.1x at 4096; 64 latents,
      experiments/results/cpu_paths.md).
    segment_ids: packed rows, as in `dot_product_attention`: the key softmax of each latent
      runs over the query's segment only. Causal: one `[batch, seq]` array whose segments are
      runs of equal ids (as packing makes them), still a linear-time scan that restarts its
      state at each run. Bidirectional: an array or a pair `(q_segment_ids, kv_segment_ids)`,
      computed in the exact quadratic form (memory ∝ q_len·kv_len·L).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  scale = common.default_scale(dims.head_dim, scale)
  if latents is None:
    raise ValueError("latte needs latents: [num_heads, num_latents, head_dim]")
  common.check_float("latents", latents)
  if latents.ndim != 3 or latents.shape[0] != dims.num_heads or latents.shape[2] != dims.head_dim:
    raise ValueError(
        f"latents must have shape [num_heads={dims.num_heads}, num_latents, "
        f"head_dim={dims.head_dim}], got {latents.shape}")
  if num_latents is not None and num_latents != latents.shape[1]:
    raise ValueError(f"num_latents={num_latents!r} disagrees with latents of shape "
                     f"{latents.shape}")
  chunk_size = checks.positive_int("chunk_size", chunk_size)
  if is_causal and dims.q_len != dims.kv_len:
    raise ValueError(
        f"causal latte needs q_len == kv_len, got {dims.q_len} and {dims.kv_len}")

  segments = common.normalize_segment_ids(segment_ids, dims)
  if is_causal and segments is not None:
    if isinstance(segment_ids, (tuple, list)):
      raise ValueError("causal latte takes segment_ids as one [batch, seq] array (packed rows), "
                       "not a (q_segment_ids, kv_segment_ids) pair")
    _check_runs(segment_ids)

  probs_l, k_logits = _latte_logits(query, key, latents, scale)
  key_mask = _grouped_key_mask(_key_mask(mask, dims, "latte", is_causal), dims)

  if is_causal:
    if key_mask is None:
      valid = jnp.ones((1, dims.kv_len, 1, 1, 1), bool)
    else:
      valid = jnp.moveaxis(key_mask, -1, 1)[..., None]
    out, _ = _latte_causal(probs_l, k_logits, valid, value, int(chunk_size),
                           segment_ids=segment_ids)
  elif segments is not None:  # a key softmax per query over its segment: [b, k, g, t, L, s]
    q_seg, kv_seg = segments
    allowed = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None, :, None, :]
    if key_mask is not None:
      allowed = allowed & key_mask[:, :, :, None, None, :]
    key_probs = common.masked_softmax(jnp.moveaxis(k_logits, 1, -1)[:, :, :, None], allowed)
    out = jnp.einsum("btkgl,bkgtls,bskd->btkgd", probs_l, key_probs, value,
                     preferred_element_type=jnp.float32)
  else:
    key_probs = common.masked_softmax(
        jnp.moveaxis(k_logits, 1, -1),
        None if key_mask is None else key_mask[:, :, :, None, :])  # [b, k, g, L, s]
    state = jnp.einsum("bkgls,bskd->bkgld", key_probs, value, preferred_element_type=jnp.float32)
    out = jnp.einsum("btkgl,bkgld->btkgd", probs_l, state)
  row_mask = common.make_mask(dims, mask=mask, is_causal=is_causal, segment_ids=segment_ids)
  out = out.reshape(dims.batch, dims.q_len, dims.num_heads, dims.value_dim)
  return common.apply_row_mask(out, row_mask, dims).astype(query.dtype)


@register_params("latte")
class LatteParams(OpParams):
  """Latent vectors w_l of Latte (Latent Attention for Linear Time Transformers, Dolga et al.
  2024): `op_args["num_latents"]` per head (default `LATTE_NUM_LATENTS`), initialised N(0, 1)
  so that s·q·w_l (s = 1/√d) is O(1). Returns `{"latents": [num_heads, num_latents, head_dim]}`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    num_latents = checks.positive_int("op_args['num_latents']", (self.op_args or {}).get(
        "num_latents", LATTE_NUM_LATENTS))
    latents = self.param(
        "latents",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                     ("heads", "latents", "head_dim")),
        (self.num_heads, num_latents, self.head_dim), self.param_dtype)
    (latents,) = nn.dtypes.promote_dtype(latents, dtype=self.dtype)
    return {"latents": latents}
