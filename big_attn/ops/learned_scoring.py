"""Attention whose scores come from a small learned network of (q_i, k_j) instead of q·k.

Both ops materialise a `[batch, heads, q_len, kv_len, hidden]` tensor (memory n²·hidden) and
take their weights as arguments; `NeuralAttentionParams` and `GATv2Params` below own them for
the `Attention` layer. Masks, `is_causal`, `segment_ids` and `local_window_size` combine as in
`dot_product_attention`; masked keys get weight 0 and fully masked rows return zeros.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_attn.ops import checks
from big_attn.ops import common
from big_attn.ops.registry import BlockForm, OpParams, PairScores, register, register_params

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh}
NONLINEARITIES = ("leaky_relu", "tanh")


def _weight(name: str, x, shape: tuple[int, ...], what: str) -> jax.Array:
  if x is None:
    raise ValueError(f"{name} is required: {what} = {shape}")
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating array, got "
                    f"{getattr(x, 'dtype', type(x).__name__)}")
  if x.shape != shape:
    raise ValueError(f"{name} must have shape {what} = {shape}, got {x.shape}")
  return x.astype(jnp.float32)


def _attend(logits, value, dims, query_dtype, mask, is_causal, segment_ids, local_window_size,
            scale):
  """softmax_j(scale·logits, masked) V of the scores `logits [b, n, t, s]`."""
  logits = logits.reshape(dims.batch, dims.num_kv_heads, dims.groups, dims.q_len, dims.kv_len)
  full_mask = common.make_mask(dims, mask=mask, is_causal=is_causal, segment_ids=segment_ids,
                               local_window_size=local_window_size)
  logits = logits * jnp.float32(1.0 if scale is None else scale)
  probs = common.masked_softmax(logits, common.grouped(full_mask, dims))
  return common.weighted_values(probs, value, dims).astype(query_dtype)


def _block_form(query, key, scale, scores: PairScores, arrays: dict,
                local_window_size) -> BlockForm:
  """Softmax blocks of the pairwise `scores` times c = `scale` (1 when None)."""
  if local_window_size is not None:
    raise ValueError("the sequence-parallel form of learned pairwise scores takes no "
                     f"local_window_size, got {local_window_size!r}")
  return BlockForm("softmax", query, key, 1.0 if scale is None else scale, pair_scores=scores,
                   pair_arrays=arrays)


def _neural_weights(dims, w1, b1, w2, hidden_dim, activation) -> dict:
  """Neural Attention's checked weights `{"w1", "b1", "w2"}` in float32."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
  n, d = dims.num_heads, dims.head_dim
  hidden = getattr(w1, "shape", (None,))[-1]
  if hidden_dim is not None and hidden_dim != hidden:
    raise ValueError(f"hidden_dim ({hidden_dim}) must equal w1.shape[-1] ({hidden})")
  return {"w1": _weight("w1", w1, (n, 2 * d, hidden), "[num_heads, 2*head_dim, hidden]"),
          "b1": _weight("b1", b1, (n, hidden), "[num_heads, hidden]"),
          "w2": _weight("w2", w2, (n, hidden), "[num_heads, hidden]")}


def _neural_scores(arrays, query, key, *, activation):
  """Neural Attention's `PairScores`: w2ᵀσ(W1_q q_i + W1_k k_j + b1), float32 `[b, n, t, s]`."""
  w1, b1, w2 = arrays["w1"], arrays["b1"], arrays["w2"]
  (b, t, n, d), (s, k), hidden = query.shape, key.shape[1:3], w1.shape[-1]
  g = n // k
  w1 = w1.reshape(k, g, 2 * d, hidden)
  q = common.group_query(query, k).astype(jnp.float32)
  from_q = jnp.einsum("btkgd,kgdh->bkgth", q, w1[:, :, :d]) + b1.reshape(1, k, g, 1, hidden)
  from_k = jnp.einsum("bskd,kgdh->bkgsh", key.astype(jnp.float32), w1[:, :, d:])
  hidden_act = ACTIVATIONS[activation](from_q[:, :, :, :, None] + from_k[:, :, :, None])
  return jnp.einsum("bkgtsh,kgh->bkgts", hidden_act, w2.reshape(k, g, hidden)).reshape(
      b, n, t, s)


def _neural_block_form(query, key, scale, *, w1=None, b1=None, w2=None, hidden_dim=None,
                       activation="relu", local_window_size=None) -> BlockForm:
  """Softmax blocks of Neural Attention's MLP scores of each block's (q_i, k_j) pairs."""
  arrays = _neural_weights(common.check_qkv(query, key, key), w1, b1, w2, hidden_dim,
                           activation)
  return _block_form(query, key, scale,
                     PairScores(_neural_scores, (("activation", activation),)), arrays,
                     local_window_size)


@register("neural_attention", segment_ids=True, block_form=_neural_block_form)
def neural_attention(query, key, value, *, mask=None, is_causal=False, scale=None, w1=None,
                     b1=None, w2=None, hidden_dim=None, activation="relu", segment_ids=None,
                     local_window_size=None):
  """Neural Attention (Neural Attention: A Novel Mechanism for Enhanced Expressive Power in
  Transformer Models, DiGiugno & Mahmood 2025): a feed-forward network scores each pair.

    s_ij = c · w2ᵀ σ(W1 [q_i; k_j] + b1),   out = softmax_j(s_ij, masked) V

  per head, with W1 `[2·head_dim, hidden]`, c = `scale` (1 when None) and σ = `activation`.
  W1 [q; k] = W1_q q + W1_k k is evaluated as two projections added by broadcasting, so the
  cost is one `[q_len, kv_len, hidden]` tensor per head (memory n²·hidden; the paper keeps
  hidden small and uses the mechanism in few layers). The paper's output bias b_a is
  omitted: it is the same for every key and cancels in the softmax. The paper's down-
  projection of q and k to d' before concatenation is a factorisation of W1.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, segment_ids, local_window_size: as `dot_product_attention`.
    scale: multiplies the scores; 1 when None.
    w1: `[num_heads, 2·head_dim, hidden]`, rows `[:head_dim]` act on q, the rest on k.
    b1: `[num_heads, hidden]`.
    w2: `[num_heads, hidden]`.
    hidden_dim: optional; checked against `w1.shape[-1]`.
    activation: σ, one of "relu", "gelu", "tanh".

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  arrays = _neural_weights(dims, w1, b1, w2, hidden_dim, activation)
  logits = _neural_scores(arrays, query, key, activation=activation)
  return _attend(logits, value, dims, query.dtype, mask, is_causal, segment_ids,
                 local_window_size, scale)


def _gatv2_static(nonlinearity, negative_slope) -> tuple:
  """GATv2's checked static arguments, as `PairScores.static`."""
  if nonlinearity not in NONLINEARITIES:
    raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
  return (("nonlinearity", nonlinearity),
          ("negative_slope", checks.non_negative_float("negative_slope", negative_slope)))


def _gatv2_weights(dims, attn_vec) -> dict:
  """GATv2's checked vector a, `{"attn_vec"}` in float32."""
  return {"attn_vec": _weight("attn_vec", attn_vec, (dims.num_heads, dims.head_dim),
                              "[num_heads, head_dim]")}


def _gatv2_scores(arrays, query, key, *, nonlinearity, negative_slope):
  """GATv2's `PairScores`: aᵀφ(q_i + k_j), float32 `[b, n, t, s]`."""
  (b, t, n, d), (s, k) = query.shape, key.shape[1:3]
  q = common.group_query(query, k).astype(jnp.float32)
  pre = (jnp.transpose(q, (0, 2, 3, 1, 4))[:, :, :, :, None]
         + jnp.transpose(key.astype(jnp.float32), (0, 2, 1, 3))[:, :, None, None])
  if nonlinearity == "tanh":
    act = jnp.tanh(pre)
  else:
    act = jax.nn.leaky_relu(pre, negative_slope)
  return jnp.einsum("bkgtsd,kgd->bkgts", act,
                    arrays["attn_vec"].reshape(k, n // k, d)).reshape(b, n, t, s)


def _gatv2_block_form(query, key, scale, *, attn_vec=None, nonlinearity="leaky_relu",
                      negative_slope=0.2, local_window_size=None) -> BlockForm:
  """Softmax blocks of GATv2's scores aᵀφ(q_i + k_j) of each block's pairs."""
  arrays = _gatv2_weights(common.check_qkv(query, key, key), attn_vec)
  return _block_form(query, key, scale,
                     PairScores(_gatv2_scores, _gatv2_static(nonlinearity, negative_slope)),
                     arrays, local_window_size)


@register("gatv2", segment_ids=True, block_form=_gatv2_block_form)
def gatv2_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                    attn_vec=None, nonlinearity="leaky_relu", negative_slope=0.2,
                    segment_ids=None, local_window_size=None):
  """Dynamic (GATv2) and additive (Bahdanau) attention scores.

  GATv2 (How Attentive are Graph Attention Networks?, Brody et al. 2022), `nonlinearity=
  "leaky_relu"`:      s_ij = c · aᵀ LeakyReLU(W_l h_i + W_r h_j)
  Additive attention (Neural Machine Translation by Jointly Learning to Align and Translate,
  Bahdanau et al. 2015), `nonlinearity="tanh"`:      s_ij = c · vᵀ tanh(W_1 h_i + W_2 h_j)
  then out = softmax_j(s_ij, masked) V.

  In attention terms q_i = W_l h_i and k_j = W_r h_j are the layer's query/key projections, so
  s_ij = c · aᵀ φ(q_i + k_j) per head, with a = `attn_vec` and c = `scale` (1 when None).
  The non-linearity after the sum makes the ranking of keys depend on the query ("dynamic"
  attention), unlike GAT's aᵀ LeakyReLU([W h_i; W h_j]). Memory n²·head_dim per head.

  Args:
    query, key, value: `[batch, seq, heads, head_dim]`; key/value heads divide query heads.
    mask, is_causal, segment_ids, local_window_size: as `dot_product_attention`.
    scale: multiplies the scores; 1 when None.
    attn_vec: `[num_heads, head_dim]`, the vector a (or Bahdanau's v).
    nonlinearity: "leaky_relu" (GATv2) or "tanh" (additive).
    negative_slope: LeakyReLU slope (0.2 as GATv2).

  Returns:
    `[batch, q_len, num_heads, value_dim]` in the query's dtype.
  """
  dims = common.check_qkv(query, key, value)
  static = _gatv2_static(nonlinearity, negative_slope)
  logits = _gatv2_scores(_gatv2_weights(dims, attn_vec), query, key, **dict(static))
  return _attend(logits, value, dims, query.dtype, mask, is_causal, segment_ids,
                 local_window_size, scale)


@register_params("neural_attention")
class NeuralAttentionParams(OpParams):
  """The scoring MLP of Neural Attention (DiGiugno & Mahmood 2025), per head: `w1 [num_heads,
  2·head_dim, hidden]`, `b1 [num_heads, hidden]` (zeros), `w2 [num_heads, hidden]`, with
  `hidden = op_args["hidden_dim"]` (head_dim when absent). Weights use PyTorch's default
  `Linear` initialisation (U(±1/√fan_in)), as the authors' code. Returns `{"w1", "b1", "w2"}`.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    hidden = checks.positive_int("op_args['hidden_dim']",
                                 (self.op_args or {}).get("hidden_dim") or self.head_dim)
    init = lambda in_axis, out_axis: nn.initializers.variance_scaling(  # pylint: disable=g-long-lambda
        1.0 / 3.0, "fan_in", "uniform", in_axis=in_axis, out_axis=out_axis, batch_axis=0)
    w1 = self.param("w1", nn.with_logical_partitioning(init(-2, -1), ("heads", None, "mlp")),
                    (self.num_heads, 2 * self.head_dim, hidden), self.param_dtype)
    b1 = self.param("b1", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                       ("heads", "mlp")),
                    (self.num_heads, hidden), self.param_dtype)
    w2 = self.param("w2", nn.with_logical_partitioning(init(-1, ()), ("heads", "mlp")),
                    (self.num_heads, hidden), self.param_dtype)
    w1, b1, w2 = nn.dtypes.promote_dtype(w1, b1, w2, dtype=self.dtype)
    return {"w1": w1, "b1": b1, "w2": w2}


@register_params("gatv2")
class GATv2Params(OpParams):
  """The attention vector a of GATv2 / additive attention (How Attentive are Graph Attention
  Networks?, Brody et al. 2022), `[num_heads, head_dim]`, initialised U(±√(3/head_dim)) so
  that aᵀφ(q + k) is O(1). Returns `{"attn_vec"}`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    attn_vec = self.param(
        "attn_vec",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=-1,
                                             out_axis=(), batch_axis=0),
            ("heads", "head_dim")),
        (self.num_heads, self.head_dim), self.param_dtype)
    (attn_vec,) = nn.dtypes.promote_dtype(attn_vec, dtype=self.dtype)
    return {"attn_vec": attn_vec}


def pointer_log_probs(query, key, *, attn_vec, mask=None, is_causal=False):
  """Pointer Networks (Vinyals, Fortunato & Jaitly 2015): the attention distribution over the
  input positions is the output.

    u_ij = vᵀ tanh(q_i + k_j),   log p(C_i = j) = log softmax_j(u_ij)  over the valid j,

  with q_i = W_2 d_i (decoder state) and k_j = W_1 e_j (encoder state): the additive scores of
  `gatv2` with `nonlinearity="tanh"`, normalised over the input positions instead of weighting
  values.

  Args:
    query: `[batch, q_len, heads, head_dim]`, the projected decoder states.
    key: `[batch, kv_len, heads, head_dim]`, the projected encoder states (the candidates).
    attn_vec: `[heads, head_dim]`, the vector v.
    mask: boolean, True = may be pointed at, broadcastable to `[batch, heads, q_len, kv_len]`.
    is_causal: step i points only at positions j <= i.

  Returns:
    float32 log-probabilities `[batch, heads, q_len, kv_len]`; −inf at masked positions (a row
    with no valid position is −inf everywhere).
  """
  dims = common.check_qkv(query, key, key)
  logits = _gatv2_scores(_gatv2_weights(dims, attn_vec), query, key, nonlinearity="tanh",
                         negative_slope=0.0)
  full_mask = common.make_mask(dims, mask=mask, is_causal=is_causal)
  if full_mask is None:
    return jax.nn.log_softmax(logits, axis=-1)
  full_mask = jnp.broadcast_to(full_mask, logits.shape)
  # Rows with no valid position are normalised over all positions, then masked out entirely,
  # so that no −inf − (−inf) reaches the gradient.
  has_valid = full_mask.any(-1, keepdims=True)
  log_probs = jax.nn.log_softmax(jnp.where(full_mask | ~has_valid, logits, -jnp.inf), axis=-1)
  return jnp.where(full_mask, log_probs, -jnp.inf)
