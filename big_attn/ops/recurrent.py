"""The recurrent (state) form of the causal linear and recurrent ops, for decoding and LASP.

For causal attention `lightning`, `performer`, `focused_linear`, `fast`, `lognormal_linear`,
`retention` and `latte` need, at token t, only a fixed-size state of the tokens before it:

    S_t = λ·S_{t−1} + φ(k_t) v_tᵀ,   z_t = λ·z_{t−1} + φ(k_t),   out_t = φ(q_t)ᵀS_t / φ(q_t)ᵀz_t

(λ = 1 without decay; lightning has no denominator, retention normalises by its decay row sums
c_t, which depend on the position t; latte keeps one S, z per latent with a softmax over keys).
`state_form(name, query, key, value, **op_args)` returns the op's `StateForm`: the state after
no token, and `append(state, q, k, v) -> (out, state)`, which returns the op's causal outputs of
the new tokens given the state of the earlier ones, computed by the op's own chunked code path
(`linear._chunked`, `retention._chunkwise_causal`, `latent._latte_causal`) from the op's own
feature maps. The state also carries what makes those outputs independent of later tokens:

- the running max M of the key log-features (performer, lognormal_linear: φ(k_j) is stored as
  exp(log φ(k_j) − M) and rescaled when M grows; latte: per latent, an online softmax);
- the position t (retention's c_t; the decay between two states);
- lognormal_linear's moment sums (Σ and Σ² of the query and key entries so far), from which
  α_t, β_t are matched over tokens 0..t exactly as the op does;
- focused_linear's last K − 1 values for its causal depthwise convolution (kernel size K).

Decoding keeps a `RecurrentState` instead of a key/value cache: memory constant in the length.
`combine_states` joins the state of a span with that of the span after it, which sequence
parallelism (`big_attn.parallel.linear_state`) uses to pass states between shards.
Masks have no state form here; packed rows (segment ids) are `big_attn.parallel.linear_state`'s
(`append` leaves out keys by `key_valid`; latte's `append` takes the runs themselves).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from big_attn.ops import common
from big_attn.ops import latent
from big_attn.ops import linear
from big_attn.ops import retention as retention_ops
from big_attn.ops.registry import get

Array = jax.Array


class RecurrentState(NamedTuple):
  """What a causal op carries from the tokens before a chunk (float32 or wider).

  kv: Σ decayed φ(k) vᵀ, `[b, k, G, m, dv]` (latte: `[b, k, g, L, dv]`), relative to key_max.
  norm: Σ decayed φ(k), `[b, k, G, m]` (latte: `[b, k, g, L]`).
  key_max: the running max M of the key log-features, `[b, k]` (latte: `[b, k, g, L]`),
    `common.MASKED_LOGIT` before the first key and for ops without one.
  position: int32 scalar, how many tokens the state has seen.
  sums: `[b, 4]` Σ q, Σ q², Σ k, Σ k² over the entries seen (lognormal_linear), else None.
  window: `[b, K − 1, k, dv]` the last values (focused_linear's DWC), else None.
  """
  kv: Array
  norm: Array
  key_max: Array
  position: Array
  sums: Array | None = None
  window: Array | None = None


class StateForm(NamedTuple):
  """The causal recurrence of one op with its arguments bound.

  initial: the state before the first token.
  append: `(state, query, key, value, key_valid=None) -> (out, state)` for `[b, n, heads,
    dim]` new tokens (n >= 1, as many keys as queries): the op's causal outputs of those tokens
    after the state's tokens, and the state after them. `key_valid` `[b, n]` bool: only those
    keys enter the state and the outputs (the others' statistics that are not of the kv
    state, lognormal_linear's moment sums and focused_linear's value window, still do).
  sums: `(query, key) -> [b, 4]` the additive statistics of a chunk that the features of later
    tokens depend on (lognormal_linear's moments), or None.
  log_decay: log λ per state row, `[k|1, G|1]`, or None (λ = 1): for `combine_states`.
  packed: `append` also takes `segment_ids` `[b, n]` (packed rows, runs of equal ids): a token
    attends to the earlier tokens of its run, the state continues into the first token's run
    and is that of the last token's run after (latte).
  runs_inside: `(state, query, key, value, segment_ids) -> out`, the op's outputs on packed
    rows of new tokens that see none of the state's keys but depend on its position and sums
    (lognormal_linear: α_t, β_t are matched over the row's tokens across runs), or None (the
    op on the new tokens alone).
  """
  initial: RecurrentState
  append: Callable[..., tuple[Array, RecurrentState]]
  sums: Callable[[Array, Array], Array] | None
  log_decay: Array | None
  packed: bool = False
  runs_inside: Callable[..., Array] | None = None


def combine_states(earlier: RecurrentState, later: RecurrentState,
                   log_decay: Array | None) -> RecurrentState:
  """The state after `earlier`'s tokens followed by `later`'s.

  `later` is a state computed by `append` from `earlier`'s position and sums but with empty
  kv, norm, key_max and a zero window (the contribution of a span, as each sequence shard
  computes it without knowing the kv state before it). Both are brought to the larger key max,
  `earlier` is decayed by λ^n over the n tokens of `later`, and the window keeps the last
  values of both.
  """
  extra = earlier.norm.ndim - earlier.key_max.ndim
  m_a = earlier.key_max.reshape(earlier.key_max.shape + (1,) * extra)
  m_b = later.key_max.reshape(m_a.shape)
  top = jax.lax.stop_gradient(jnp.maximum(m_a, m_b))
  w_a = jnp.exp(jnp.minimum(m_a - top, 0.0))
  w_b = jnp.exp(jnp.minimum(m_b - top, 0.0))
  steps = later.position - earlier.position
  if log_decay is not None:
    w_a = w_a * jnp.exp(log_decay[..., None] * steps.astype(log_decay.dtype))
  window = None
  if earlier.window is not None:
    size = earlier.window.shape[1]
    seen = jnp.minimum(steps, size)
    shifted = jax.lax.dynamic_slice_in_dim(
        jnp.concatenate([earlier.window, jnp.zeros_like(earlier.window)], 1), seen, size, 1)
    from_later = jnp.arange(size) >= size - seen
    window = jnp.where(from_later[None, :, None, None], later.window, shifted)
  return RecurrentState(
      kv=w_a[..., None] * earlier.kv + w_b[..., None] * later.kv,
      norm=w_a * earlier.norm + w_b * later.norm,
      key_max=jnp.maximum(earlier.key_max, later.key_max), position=later.position,
      sums=later.sums, window=window)


def _pieces(length: int, chunk: int) -> list[tuple[int, int, int]]:
  """`(start, stop, chunk)`: a multiple of `chunk`, then the rest as one chunk (no padding,
  so a decayed state is never decayed over padded tokens)."""
  main = length - length % chunk
  pieces = [(0, main, chunk)] if main else []
  return pieces + ([(main, length, length - main)] if length > main else [])


def _appender(name: str, run: Callable, chunk: int) -> Callable:
  """`append` from `run(state, q, k, v, chunk, key_valid, **runs) -> (out, state)` over one
  chunked piece (`key_valid` None or `[b, piece]`; `runs`: the packed forms' `segment_ids`)."""

  def append(state: RecurrentState, query, key, value, key_valid=None, **runs):
    common.check_qkv(query, key, value)
    if query.shape[1] != key.shape[1] or query.shape[1] == 0:
      raise ValueError(f"{name} state form: append takes n >= 1 new tokens with as many keys "
                       f"as queries, got q_len {query.shape[1]} and kv_len {key.shape[1]}")
    if key_valid is not None and key_valid.shape != key.shape[:2]:
      raise ValueError(f"{name} state form: key_valid must have shape [batch, n] = "
                       f"{key.shape[:2]}, got {key_valid.shape}")
    outs = []
    for start, stop, size in _pieces(query.shape[1], chunk):
      valid = None if key_valid is None else key_valid[:, start:stop]
      piece = {arg: x[:, start:stop] for arg, x in runs.items()}
      out, state = run(state, query[:, start:stop], key[:, start:stop], value[:, start:stop],
                       size, valid, **piece)
      outs.append(out)
    return jnp.concatenate(outs, axis=1), state

  return append


def _empty(batch: int, kv_shape: tuple[int, ...], max_shape: tuple[int, ...], dtype,
           **extra) -> RecurrentState:
  return RecurrentState(
      kv=jnp.zeros((batch, *kv_shape), dtype), norm=jnp.zeros((batch, *kv_shape[:-1]), dtype),
      key_max=jnp.full((batch, *max_shape), common.MASKED_LOGIT, dtype),
      position=jnp.zeros((), jnp.int32), **extra)


def _linear_form(name: str, query, key, value, features: Callable, *, num_features: int,
                 chunk: int, log_decay=None, normalize=True, out_map=None, sums=None,
                 dwc=None) -> StateForm:
  """State form over `linear._chunked`: `features(qg, kg, state) -> (φ_q, φ_k, key_log_max)`
  of grouped queries/keys; `out_map` maps `[b, n, heads, dv]` outputs token-wise; `dwc` is
  `(kernel, bias)` of focused_linear's 1-D causal convolution."""
  dims = common.check_qkv(query, key, value)
  dtype = linear._compute_dtype(query, key, value)
  groups = 1 if log_decay is None else log_decay.shape[-1]
  window = None
  if dwc is not None:
    window = jnp.zeros((dims.batch, dwc[0].shape[0] - 1, dims.num_kv_heads, dims.value_dim),
                       dtype)
  initial = _empty(dims.batch, (dims.num_kv_heads, groups, num_features, dims.value_dim),
                   (dims.num_kv_heads,), dtype,
                   sums=None if sums is None else jnp.zeros((dims.batch, 4), dtype),
                   window=window)

  def run(state, q, k, v, size, valid):
    chunk_dims = common.check_qkv(q, k, v)
    qg, kg = linear._grouped_qk(q, k, chunk_dims, dtype)
    v = v.astype(dtype)
    phi_q, phi_k, key_log_max = features(qg, kg, state)
    phi_q, phi_k, grouped_decay = linear._group_features(
        phi_q, phi_k, None if valid is None else valid[:, :, None, None], log_decay)
    num, den, (kv, norm, key_max) = linear._chunked(
        phi_q, phi_k, v, grouped_decay, size, key_log_max,
        initial=(state.kv, state.norm, state.key_max))
    out = linear._divide_rows(num, den) if normalize else num
    b, n = q.shape[:2]
    out = out.reshape(b, n, dims.num_heads, dims.value_dim)
    if out_map is not None:
      out = out_map(out)
    new_window = state.window
    if dwc is not None:
      history = jnp.concatenate([state.window, v], axis=1)
      conv = linear._depthwise_conv(history, dwc[0].astype(dtype), dwc[1],
                                    linear._Masks(None, None), chunk_dims, True, None)[:, -n:]
      out = (out.reshape(b, n, dims.num_kv_heads, dims.groups, dims.value_dim)
             + conv[:, :, :, None]).reshape(out.shape)
      new_window = history[:, history.shape[1] - state.window.shape[1]:]
    new_sums = None if sums is None else state.sums + sums(qg, kg)
    return out.astype(q.dtype), RecurrentState(kv, norm, key_max, state.position + n,
                                               new_sums, new_window)

  def chunk_sums(q, k):
    return sums(common.group_query(q, k.shape[2]).astype(dtype), k.astype(dtype))

  return StateForm(initial, _appender(name, run, chunk), None if sums is None else chunk_sums,
                   log_decay)


def _lightning(query, key, value, *, scale=None, decay=linear.LIGHTNING_DECAY,
               block_size=linear.LIGHTNING_BLOCK_SIZE,
               output_norm=False, norm_eps=linear.SRMS_EPS) -> StateForm:
  dims = common.check_qkv(query, key, value)
  dtype = linear._compute_dtype(query, key, value)

  def features(qg, kg, state):
    del state
    return (qg if scale is None else qg * scale), kg, None

  return _linear_form("lightning", query, key, value, features, num_features=dims.head_dim,
                      chunk=block_size, log_decay=linear._log_decay(decay, dims, dtype),
                      normalize=False,
                      out_map=functools.partial(linear._srms_norm, eps=norm_eps)
                      if output_norm else None)


def _performer(query, key, value, *, scale=None, features=None, feature_key=None,
               num_features=None, chunk_size=linear.CHUNK_SIZE) -> StateForm:
  dims = common.check_qkv(query, key, value)
  dtype = linear._compute_dtype(query, key, value)
  scale = common.default_scale(dims.head_dim, scale)
  w = linear._performer_features(features, feature_key, num_features, dims.head_dim)
  w = w.astype(dtype)

  def feature_map(qg, kg, state):
    return linear._favor_features(qg, kg, w, scale, None, True, state.key_max)

  return _linear_form("performer", query, key, value, feature_map, num_features=w.shape[0],
                      chunk=chunk_size)


def _focused_linear(query, key, value, *, power=linear.FOCUSED_POWER, feature_scale=None,
                    eps=linear.FOCUSED_EPS, dwc_kernel=None, dwc_bias=None,
                    dwc_kernel_size=None, chunk_size=linear.CHUNK_SIZE) -> StateForm:
  del dwc_kernel_size  # Checked by the op.
  dims = common.check_qkv(query, key, value)

  def features(qg, kg, state):
    del state
    return (*linear._focused_features(qg, kg, feature_scale, power, eps), None)

  return _linear_form("focused_linear", query, key, value, features,
                      num_features=dims.head_dim, chunk=chunk_size,
                      dwc=None if dwc_kernel is None else (dwc_kernel, dwc_bias))


def _fast(query, key, value, *, scale=None, order=linear.FAST_ORDER, eps=linear.FAST_EPS,
          chunk_size=linear.CHUNK_SIZE) -> StateForm:
  dims = common.check_qkv(query, key, value)
  scale = 1.0 if scale is None else scale

  def features(qg, kg, state):
    del state
    return (linear._taylor_features(qg, order, scale, eps),
            linear._taylor_features(kg, order, scale, eps), None)

  return _linear_form("fast", query, key, value, features,
                      num_features=sum(dims.head_dim ** n for n in range(order + 1)),
                      chunk=chunk_size)


def _lognormal_linear(query, key, value, *, scale=None, alpha=None, beta=None,
                      chunk_size=linear.CHUNK_SIZE) -> StateForm:
  dims = common.check_qkv(query, key, value)
  dtype = linear._compute_dtype(query, key, value)
  scale = common.default_scale(dims.head_dim, scale)
  alpha = None if alpha is None else linear._scalar("alpha", alpha, dtype)
  beta = None if beta is None else linear._scalar("beta", beta, dtype)

  def features(qg, kg, state):
    return linear._lognormal_features(qg, kg, alpha, beta, scale, None, True, state.key_max,
                                      state.sums, state.position)

  def sums(qg, kg):
    q_sums, k_sums = linear._token_sums(qg), linear._token_sums(kg)
    return jnp.stack([jnp.sum(x, 1) for x in (*q_sums, *k_sums)], axis=-1)

  def runs_inside(state, q, k, v, segment_ids):
    masks = linear._plan_masks(common.check_qkv(q, k, v), None, True, segment_ids)
    return linear._lognormal_attention(q, k, v, masks, is_causal=True, scale=scale, alpha=alpha,
                                       beta=beta, chunk_size=chunk_size, prefix_sums=state.sums,
                                       position=state.position)

  form = _linear_form("lognormal_linear", query, key, value, features,
                      num_features=dims.head_dim, chunk=chunk_size, sums=sums)
  return form._replace(runs_inside=runs_inside)


def _retention(query, key, value, *, scale=None, gamma=None, renormalize=True,
               chunk_size=None) -> StateForm:
  del renormalize  # 2-D only.
  dims = common.check_qkv(query, key, value)
  scale = common.default_scale(dims.head_dim, scale)
  log_gamma = retention_ops._log_gamma(gamma, dims.num_heads, retention_ops.retnet_gammas)
  log_gamma = log_gamma.reshape(dims.num_kv_heads, dims.groups)
  initial = _empty(dims.batch, (dims.num_kv_heads, dims.groups, dims.head_dim, dims.value_dim),
                   (dims.num_kv_heads,), jnp.float32)

  def run(state, q, k, v, size, valid):
    chunk_dims = common.check_qkv(q, k, v)
    if valid is not None:  # The state is linear in the keys.
      k = jnp.where(valid[:, :, None, None], k, jnp.zeros((), k.dtype))
    out, (kv, norm) = retention_ops._chunkwise_causal(
        q, k, v, log_gamma, chunk_dims, scale, size, initial=(state.kv, state.norm),
        position=state.position)
    b, n = q.shape[:2]
    out = out.reshape(b, n, dims.num_heads, dims.value_dim).astype(q.dtype)
    return out, state._replace(kv=kv, norm=norm, position=state.position + n)

  return StateForm(initial, _appender("retention", run, chunk_size or linear.CHUNK_SIZE), None,
                   log_gamma)


def _latte(query, key, value, *, scale=None, latents=None, num_latents=None,
           chunk_size=latent.LATTE_CHUNK_SIZE
           ) -> StateForm:
  del num_latents  # Checked by the op.
  dims = common.check_qkv(query, key, value)
  scale = common.default_scale(dims.head_dim, scale)
  shape = (dims.num_kv_heads, dims.groups, latents.shape[1])
  initial = _empty(dims.batch, (*shape, dims.value_dim), shape, jnp.float32)

  def run(state, q, k, v, size, valid, segment_ids=None):
    probs_l, k_logits = latent._latte_logits(q, k, latents, scale)
    valid = (jnp.ones((1, q.shape[1], 1, 1, 1), bool) if valid is None
             else valid[:, :, None, None, None])
    out, (key_max, kv, norm) = latent._latte_causal(
        probs_l, k_logits, valid, v, size, initial=(state.key_max, state.kv, state.norm),
        segment_ids=segment_ids)
    b, n = q.shape[:2]
    out = out.reshape(b, n, dims.num_heads, dims.value_dim).astype(q.dtype)
    return out, state._replace(kv=kv, norm=norm, key_max=key_max, position=state.position + n)

  return StateForm(initial, _appender("latte", run, chunk_size), None, None, packed=True)


# The one name -> state form table.
STATE_FORMS: dict[str, Callable[..., StateForm]] = {
    "lightning": _lightning,
    "performer": _performer,
    "focused_linear": _focused_linear,
    "fast": _fast,
    "lognormal_linear": _lognormal_linear,
    "retention": _retention,
    "latte": _latte,
}


def state_form(name: str, query: Array, key: Array, value: Array, **op_args) -> StateForm:
  """The causal `StateForm` of op `name` with `op_args`, for `[b, n, heads, dim]` arrays of
  the shapes (and dtypes) that `append` will receive (any n; e.g. the first new tokens).

  The arguments are checked by the op itself (traced once on these arrays with
  `is_causal=True`). Raises a `ValueError` naming the op for ops without a state form, for
  `mask`/`segment_ids`, and for arguments without a recurrent form (2-D grids).
  """
  get(name)  # A KeyError listing the known ops for an unknown name.
  if name not in STATE_FORMS:
    raise ValueError(
        f"op {name!r} has no recurrent state form: its causal output at a token is not a "
        "function of a fixed-size state of the earlier tokens (softmax-family ops need all "
        f"earlier keys and values: a KV cache). Ops with a state form: {', '.join(STATE_FORMS)}")
  if op_args.pop("is_causal", True) is not True:
    raise ValueError(f"{name} state form: is_causal must be True (it is the causal recurrence)")
  for arg in ("mask", "segment_ids", "grid"):
    if op_args.get(arg) is not None:
      raise ValueError(f"{name} state form: {arg}={op_args[arg]!r} is not supported (the state "
                       "is of one unmasked causal 1-D sequence)")
  op_args = {arg: v for arg, v in op_args.items() if v is not None}
  jax.eval_shape(functools.partial(get(name), is_causal=True, **op_args),
                 *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value)))
  return STATE_FORMS[name](query, key, value, **op_args)
