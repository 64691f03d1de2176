"""Decoder-only Transformer language model (LLaMA-style), with sequence parallelism and decoding.

    model = Model(vocab_size=259, variant="tiny")
    params = model.init(jax.random.key(0), tokens)["params"]            # tokens: int [b, L]
    logits = model.apply({"params": params}, tokens, positions=positions,
                         segment_ids=segment_ids)                        # float32 [b, L, vocab]
    out = generate(model, params, prompt, 64, temperature=0.8, top_k=20, rng=key)

Blocks are pre-RMSNorm x + Attn(RMSNorm(x)), x + SwiGLU(RMSNorm(x)) (no biases), attention with
rotary position embeddings (RoFormer; configurable base) at explicit positions, grouped-query
attention, optional qk-norm, and the attention op picked by registry name through
`big_attn.layers.Attention`. Input and output embeddings are tied or separate. Packed documents
are kept apart by `segment_ids` (a token attends only to earlier tokens of its own segment).

Sequence parallelism (`mesh` with an axis `seq_axis` of size P > 1 and `seq_strategy`): every
attention runs inside `shard_map` over the sequence shards (`Attention(seq_parallel=...)`, that
is `big_attn.parallel.SeqParallel.attention`), "striped" with `striped_attention`
(Brandon et al. 2023), "ring" with `ring_attention` (Liu et al. 2023), "all_gather" by gathering
keys/values. For "striped" the model's per-token inputs and its logits are in striped order:
stripe tokens, positions, segment ids, targets and weights once at the input (`stripe_batch`,
as `loss_fn` does); nothing is permuted between layers. Activations stay sharded over `seq_axis`.

Decoding (`decode=True`, used by `generate`) works for every causal op, in the op's
`big_attn.ops.decoding_form` (collection "cache", `cache_len` tokens per layer): a key/value
cache (`big_attn.layers.kv_cache.KVCache`) read by the split-KV decode op `lean_decode` (Lean
Attention) for the ops registered with a `softmax_form` (softmax, ngpt) and for SwitchHead in
block='moeut'; a recurrent state of constant size (`RecurrentCache`) for the linear and
recurrent ops; the layer's inputs (`InputCache`), over which the op is evaluated whole, for the
others. Decoding equals the full forward of `cache_len` tokens.
Sequence parallelism runs the ops with a `block_form` (blocks of keys merged by a rule,
`big_attn.parallel.merge`), those with a recurrent state and hyena, whose convolutions'
inputs pass between shards (`big_attn.ops.sequence_parallel_form`); the README's table of op
forms lists which ops have which.

Block families (`block`):
- "pre_norm": the block above.
- "ngpt" (nGPT, Loshchilov et al. 2024, "Normalized Transformer with Representation Learning on
  the Hypersphere"): embeddings and hidden states on the unit sphere, no norms,
  h ← Norm(h + α_A(Norm(Attn(h)) − h)) and the same with α_M for the SwiGLU (with scalings
  s_u, s_ν), attention op "ngpt" (unit-norm q, k times s_qk, softmax scale √d_k), logits scaled
  by s_z; the scalings use the paper's init/scale reparametrisation. The weight matrices are
  projected to unit norm along the embedding axis by `normalize_params`, which the training
  loop applies after init and every update (`Model.post_update`). Sequence parallelism and
  decoding work (the cache holds the normalised, scaled keys).
- "moeut" (MoEUT, Csordás et al. 2024, "Mixture-of-Experts Universal Transformers"): σ-MoE
  feed-forward (`sigma_moe`, top-k sigmoid-gated small ReLU experts), SwitchHead attention
  (`SwitchHeadAttention`, the `switchhead` op's mechanism with output experts to the residual),
  peri-layernorm (LayerNorm only before queries, keys and routers), `layer_group_size` G shared
  layers repeated depth/G times, and the router entropy regulariser (`router_entropy_loss`)
  added by `loss_fn`. Sequence parallelism and decoding work (the cache holds the keys and the
  expert-mixed values); `layer_group_size` also applies to the other blocks.
- "transnormer" (TransNormerLLM, Qin et al. 2023, "TransNormerLLM: A Faster and Better Large
  Language Model with Improved TransNormer"): `TransNormerBlock`, parameter-free SRMSNorm,
  gated linear attention with the `lightning` op and the per-layer decay schedule
  `transnormer_decay`, and SGLU; needs attention="lightning", unrolled distinct layers, no
  sequence parallelism or decoding.

Sizes (`decode_variant`; parameters for the 259-token byte vocabulary, tied / untied
embeddings, without qk-norm; counted with `jax.eval_shape`, nothing allocated):

| variant | width | depth | mlp_dim | heads | kv heads | parameters (tied) | (untied)    |
|---------|-------|-------|---------|-------|----------|-------------------|-------------|
| tiny    |   128 |     4 |     384 |     4 |        2 |           820,736 |     853,888 |
| S       |   512 |     8 |    1408 |     8 |        4 |        23,734,272 |  23,866,880 |
| M       |  1024 |    16 |    2816 |    16 |        4 |       180,654,080 | 180,919,296 |
| 1B      |  2048 |    22 |    5632 |    16 |        4 |       992,575,488 | 993,105,920 |

nGPT and MoEUT at the papers' sizes, with the papers' vocabularies (configs/ngpt_1b.py,
configs/moeut_244m.py; checked in tests/test_lm_ngpt_moeut.py):

| model                 | width | depth | heads | FF                       | parameters    | paper |
|-----------------------|-------|-------|-------|--------------------------|---------------|-------|
| nGPT tiny (bytes)     |   128 |     4 |     4 | SwiGLU 384               |       857,859 |       |
| nGPT 0.5B (V=32,000)  |  1024 |    24 |    16 | SwiGLU 4096              |   468,491,520 |  0.5B |
| nGPT 1B (V=32,000)    |  1280 |    36 |    20 | SwiGLU 5120              | 1,026,177,280 |    1B |
| MoEUT bytes (G=2)     |   128 |     8 |     4 | 32 × 32, k=4; 4 att. exp |       936,195 |       |
| MoEUT 244M (V=8,000)  |  1024 |    18 |     4 | 387 × 128, k=16; G=2     |   243,326,784 |  244M |
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_attn import ops, parallel
from big_attn.layers import Attention, KVCache, apply_rope
from big_attn.layers import attention_reuse
from big_attn.layers import settings
from big_attn.models import common as models_common
from big_attn.ops import experts as experts_ops
from big_attn.ops import linear as linear_ops
from big_attn.ops import ngpt as ngpt_ops
from big_attn import tasks
from big_attn.ops import spatial

_VARIANTS = {  # width, depth, mlp_dim, num_heads, num_kv_heads
    "tiny": (128, 4, 384, 4, 2),
    "S": (512, 8, 1408, 8, 4),
    "M": (1024, 16, 2816, 16, 4),
    "1B": (2048, 22, 5632, 16, 4),
}
STRATEGIES = parallel.STRATEGIES
REMAT_POLICIES = ("none", "nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")
BLOCKS = ("pre_norm", "ngpt", "moeut", "transnormer")
# nGPT's eigen learning rates and scalings, `(init, scale)`: a parameter stored as `scale` and
# used as param·(init/scale) (Loshchilov et al. 2024, Section 2.6); None = 1/√width.
NGPT_ALPHA = (0.05, None)
NGPT_S_UV = (1.0, 1.0)
NGPT_S_Z = (1.0, None)
MOE_DEFAULTS = dict(num_experts=None, expert_dim=128, topk=None, att_experts=None, att_topk=2,
                    entropy_reg=0.01, att_entropy_reg=0.001)


def decode_variant(variant: str) -> dict[str, Any]:
  """"1B" -> dict(width=2048, depth=22, mlp_dim=5632, num_heads=16, num_kv_heads=4)."""
  if variant not in _VARIANTS:
    raise ValueError(f"unknown LM variant {variant!r}; expected one of {', '.join(_VARIANTS)}")
  return dict(zip(("width", "depth", "mlp_dim", "num_heads", "num_kv_heads"),
                  _VARIANTS[variant]))


def _rms_norm(dtype, param_dtype, name, epsilon=1e-6):
  return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                            ("norm",)))


# Sequence parallelism is `big_attn.parallel`'s (re-exported here for configs and tests).
SeqParallel = parallel.SeqParallel


def _constrain(module: nn.Module):
  return module.seq_parallel.constrain if module.seq_parallel else lambda y: y


def _restored(module: nn.Module, name: str, size: int, init_scale: tuple[float, float | None],
              width: int, axis: str):
  """A learned vector `[size]` stored as `scale` and used as param·(init/scale) (nGPT)."""
  init, scale = init_scale
  scale = width ** -0.5 if scale is None else scale
  param = module.param(name, nn.with_logical_partitioning(nn.initializers.constant(scale),
                                                          (axis,)),
                       (size,), module.param_dtype)
  return param.astype(jnp.float32) * (init / scale)


# ------------------------------------------------------------------------------------- blocks
class SwiGLU(nn.Module):
  """W_out (silu(x W_gate) ⊙ x W_up) (Shazeer 2020, "GLU Variants Improve Transformer").

  With `ngpt_scaling` (nGPT, Section 2.5): u = x W_up ⊙ s_u, ν = x W_gate ⊙ s_ν √width,
  learned `[mlp_dim]` scalings s_u, s_ν (init 1, scale 1), and W_out (silu(ν) ⊙ u).
  """
  mlp_dim: int
  ngpt_scaling: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    def dense(width, axes, name):
      return nn.Dense(width, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=name, kernel_init=nn.with_logical_partitioning(
                          nn.initializers.lecun_normal(), axes))
    gate = dense(self.mlp_dim, ("embed", "mlp"), "wi_gate")(x)
    up = dense(self.mlp_dim, ("embed", "mlp"), "wi_up")(x)
    if self.ngpt_scaling:
      width = x.shape[-1]
      s_u = _restored(self, "s_u", self.mlp_dim, NGPT_S_UV, width, "mlp")
      s_v = _restored(self, "s_v", self.mlp_dim, NGPT_S_UV, width, "mlp")
      up = (up * s_u).astype(up.dtype)
      gate = (gate * (s_v * width ** 0.5)).astype(gate.dtype)
    return dense(x.shape[-1], ("mlp", "embed"), "wo")(nn.silu(gate) * up)


class DecoderBlock(nn.Module):
  """x + Attn(RMSNorm(x)) then x + SwiGLU(RMSNorm(x)); returns `(x, aux)` for `nn.scan` (the
  second output holds per-layer auxiliary values: with `emit_weights`, the attention weights
  under "attention_weights").

  `attention_free` drops the attention sublayer (MLP Can Be A Good Transformer Learner);
  `share_weights` computes the attention with the `weights` passed in and no query or key
  projection (EchoAtt, `attention_reuse.EchoAttention`); `emit_weights` returns this layer's
  softmax weights for the next layer (`attention_reuse.record_weights`). `parallel` computes
  x + Attn(RMSNorm(x)) + SwiGLU(RMSNorm(x)) with one norm (PAF: Investigating the Role of
  Feed-Forward Networks in Transformers Using Parallel Attention and Feed-Forward Net Design).
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  qk_norm: bool = False
  rope_base: float = 10_000.
  rope_scaling: Any = None
  qkv_bias: bool = False
  out_bias: bool = False
  sliding_window: int | None = None
  norm_eps: float = 1e-6
  dropout: float = 0.0
  seq_parallel: SeqParallel | None = None
  decode: bool = False
  cache_len: int = 0
  attention_free: bool = False
  share_weights: bool = False
  emit_weights: bool = False
  parallel: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids, deterministic: bool = True, weights=None):
    constrain = _constrain(self)
    aux = {}
    parallel = self.parallel and not self.attention_free
    if not self.attention_free:
      op_args = self.attention_args
      if self.sliding_window is not None:
        op_args = dict(op_args or {}, local_window_size=(self.sliding_window - 1, 0))
      y = normed = _rms_norm(self.dtype, self.param_dtype, "attention_norm", self.norm_eps)(x)
      if self.share_weights:
        y = attention_reuse.EchoAttention(
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            use_bias=self.qkv_bias, out_bias=self.out_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, name="attention")(y, weights)
      else:
        with attention_reuse.record_weights(self.emit_weights) as seen:
          y = Attention(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, op=self.attention, op_args=op_args,
                        implementation=self.attention_impl, qk_norm=self.qk_norm,
                        use_bias=self.qkv_bias, out_bias=self.out_bias,
                        rope_base=self.rope_base, rope_scaling=self.rope_scaling,
                        seq_parallel=self.seq_parallel, decode=self.decode,
                        cache_len=self.cache_len, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="attention")(
                            y, is_causal=True, segment_ids=segment_ids, positions=positions)
        if self.emit_weights:
          aux["attention_weights"] = seen["weights"]
      attention_branch = nn.Dropout(rate=self.dropout)(y, deterministic)
      if not parallel:
        x = constrain(x + attention_branch)
    y = normed if parallel else _rms_norm(self.dtype, self.param_dtype, "mlp_norm",
                                          self.norm_eps)(x)
    y = SwiGLU(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return constrain(x + y + attention_branch if parallel else x + y), aux


def srms_norm(x, eps: float = 1e-6):
  """TransNormerLLM's parameter-free SRMSNorm x / sqrt(mean(x²) + ε) over the features."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def transnormer_decay(num_heads: int, layer: int, depth: int) -> np.ndarray:
  """TransNormerLLM's decay of head h in layer l of L, λ_h = exp(−m_h·(1 − l/(L−1) + 1e−5)),
  m_h the ALiBi slopes (`exp(−m_h)` for a one-layer model): lower layers decay faster."""
  ratio = 1.0 if depth == 1 else 1.0 - layer / (depth - 1) + 1e-5
  return np.exp(-linear_ops.alibi_slopes(num_heads) * ratio)


class TransNormerBlock(nn.Module):
  """TransNormerLLM block: x + GLA(SRMSNorm(x)) then x + SGLU(SRMSNorm(x)); returns `(x, {})`.

  Gated linear attention: q = SiLU(x W_q), k = SiLU(x W_k), v = x W_v, u = SiLU(x W_u) per
  head, o = SRMSNorm(Σ_{s≤t} λ^{t−s} q_t·k_s v_s) ⊙ u (the `lightning` op with
  `output_norm=True` and `decay=transnormer_decay(num_heads, layer, depth)`), then W_o. Simple
  GLU: (x W_v ⊙ x W_u) W_o, no activation. No biases. Positions enter through the decay only
  (LRPE's rotation is not used). Segment ids are passed to the op (its quadratic form).
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  layer: int
  depth: int
  attention_args: Any = None
  norm_eps: float = 1e-6
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids, deterministic: bool = True):
    del positions

    def dense(features, axes, name, contract=1):
      return nn.DenseGeneral(features, axis=tuple(range(-contract, 0)), use_bias=False,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                             kernel_init=nn.with_logical_partitioning(
                                 nn.initializers.lecun_normal(), axes))

    heads, kv_heads = (self.num_heads, self.head_dim), (self.num_kv_heads, self.head_dim)
    y = srms_norm(x, self.norm_eps)
    query = nn.silu(dense(heads, ("embed", "heads", "head_dim"), "query")(y))
    key = nn.silu(dense(kv_heads, ("embed", "kv_heads", "head_dim"), "key")(y))
    value = dense(kv_heads, ("embed", "kv_heads", "head_dim"), "value")(y)
    gate = nn.silu(dense(heads, ("embed", "heads", "head_dim"), "gate")(y))
    decay = jnp.asarray(transnormer_decay(self.num_heads, self.layer, self.depth), jnp.float32)
    out = ops.get("lightning")(query, key, value, is_causal=True, segment_ids=segment_ids,
                               decay=decay, output_norm=True, norm_eps=self.norm_eps,
                               **dict(self.attention_args or {}))
    out = dense(x.shape[-1], ("heads", "head_dim", "embed"), "out", contract=2)(out * gate)
    x = x + nn.Dropout(rate=self.dropout)(out, deterministic)
    y = srms_norm(x, self.norm_eps)
    y = (dense(self.mlp_dim, ("embed", "mlp"), "wi_v")(y)
         * dense(self.mlp_dim, ("embed", "mlp"), "wi_u")(y))
    y = dense(x.shape[-1], ("mlp", "embed"), "wo")(y)
    return x + nn.Dropout(rate=self.dropout)(y, deterministic), {}


def _interpolate(module: nn.Module, name: str, h, y):
  """nGPT's normalised residual step h ← Norm(h + α(Norm(y) − h)) with learned `[width]`
  eigen learning rates α (init 0.05, scale 1/√width)."""
  alpha = _restored(module, name, h.shape[-1], NGPT_ALPHA, h.shape[-1], "embed")
  h32 = h.astype(jnp.float32)
  step = ngpt_ops.l2_normalize(y.astype(jnp.float32)) - h32
  return ngpt_ops.l2_normalize(h32 + alpha * step).astype(h.dtype)


class NGPTBlock(nn.Module):
  """nGPT block (Loshchilov et al. 2024, Section 2.2): no norms, hidden states on the sphere,

      h ← Norm(h + α_A (Norm(Attn(h)) − h)),   h ← Norm(h + α_M (Norm(SwiGLU(h)) − h)),

  attention by `attention` (the `ngpt` op: unit-norm q, k scaled by s_qk, softmax scale √d_k)
  and nGPT's scaled SwiGLU. Weights are kept unit-norm along the embedding axis by
  `normalize_params` after each update. Returns `(h, {})`.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  attention: str = "ngpt"
  attention_args: Any = None
  attention_impl: str | None = None
  rope_base: float = 10_000.
  seq_parallel: SeqParallel | None = None
  decode: bool = False
  cache_len: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids, deterministic: bool = True):
    del deterministic  # no dropout in nGPT
    constrain = _constrain(self)
    y = Attention(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                  head_dim=self.head_dim, op=self.attention, op_args=self.attention_args,
                  implementation=self.attention_impl, rope_base=self.rope_base,
                  seq_parallel=self.seq_parallel, decode=self.decode, cache_len=self.cache_len,
                  dtype=self.dtype, param_dtype=self.param_dtype,
                  name="attention")(x, is_causal=True, segment_ids=segment_ids,
                                    positions=positions)
    x = constrain(_interpolate(self, "alpha_attention", x, y))
    y = SwiGLU(self.mlp_dim, ngpt_scaling=True, dtype=self.dtype, param_dtype=self.param_dtype,
               name="mlp")(x)
    return constrain(_interpolate(self, "alpha_mlp", x, y)), {}


def _unit_rows_normal(stddev: float, axis: int):
  """Normal(0, stddev²) rescaled so every slice along `axis` has norm stddev·√size (MoEUT's
  router init: equal-norm expert vectors)."""

  def init(key, shape, dtype=jnp.float32):
    w = jax.random.normal(key, shape, jnp.float32)
    w = w * (stddev * shape[axis] ** 0.5) / jnp.linalg.norm(w, axis=axis, keepdims=True)
    return w.astype(dtype)

  return init


def sigma_moe(x, router_logits, w_in, w_out, topk: int):
  """σ-MoE feed-forward (Csordás et al. 2023, "Approximating Two-Layer Feedforward Networks for
  Efficient Transformers"; MoEUT eq. 3-5):

      s = σ(x_r W_S),   y = Σ_{e ∈ topk(s)} s_e ReLU(x W_1^e) W_2^e.

  Only the selected experts are computed: the `tokens·topk` (token, expert) pairs are sorted by
  expert and multiplied with `jax.lax.ragged_dot`. Gradients flow through the selected experts
  and their gates, not through the selection.

  Args:
    x: `[..., d]` expert inputs.
    router_logits: `[..., E]` x_r W_S (the router may see a normalised x_r).
    w_in: `[E, d, expert_dim]`; w_out: `[E, expert_dim, d_out]`.
    topk: experts per token.
  Returns:
    `[..., d_out]` in x's dtype.
  """
  num, d = w_in.shape[0], x.shape[-1]
  if w_in.shape[1] != d or w_out.shape[:2] != (num, w_in.shape[2]):
    raise ValueError(f"w_in must be [E, d={d}, expert_dim] and w_out [E, expert_dim, d_out], "
                     f"got {w_in.shape} and {w_out.shape}")
  if router_logits.shape != x.shape[:-1] + (num,):
    raise ValueError(f"router_logits must be {x.shape[:-1] + (num,)}, got "
                     f"{router_logits.shape}")
  if not 1 <= topk <= num:
    raise ValueError(f"topk must be in [1, {num}], got {topk}")
  scores = jax.nn.sigmoid(router_logits.astype(jnp.float32)).reshape(-1, num)
  _, chosen = jax.lax.top_k(jax.lax.stop_gradient(scores), topk)       # [n, k]
  gates = jnp.take_along_axis(scores, chosen, axis=-1).reshape(-1)     # [n·k]
  experts = chosen.reshape(-1)
  order = jnp.argsort(experts, stable=True)
  token = order // topk
  sizes = jnp.bincount(experts, length=num).astype(jnp.int32)
  xs = x.reshape(-1, d)[token]
  h = jax.nn.relu(jax.lax.ragged_dot(xs, w_in.astype(xs.dtype), sizes,
                                     preferred_element_type=jnp.float32))
  ys = jax.lax.ragged_dot(h.astype(x.dtype), w_out.astype(x.dtype), sizes,
                          preferred_element_type=jnp.float32)
  ys = ys * gates[order][:, None]
  out = jnp.zeros((scores.shape[0], w_out.shape[-1]), jnp.float32).at[token].add(ys)
  return out.reshape(x.shape[:-1] + (w_out.shape[-1],)).astype(x.dtype)


class SigmaMoE(nn.Module):
  """MoEUT's feed-forward layer: `sigma_moe` over `num_experts` ReLU experts of `expert_dim`
  units, `topk` per token; the router sees `router_input` (peri-layernorm: LN(x)), the experts
  the raw residual x. Returns `(y, router_logits)`."""
  num_experts: int
  expert_dim: int
  topk: int
  init_scale: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, router_input):
    d, num, size = x.shape[-1], self.num_experts, self.expert_dim
    normal = lambda fan_in: nn.initializers.normal(  # pylint: disable=g-long-lambda
        self.init_scale * fan_in ** -0.5)
    w_in = self.param("w_in", nn.with_logical_partitioning(normal(d),
                                                           ("experts", "embed", "mlp")),
                      (num, d, size), self.param_dtype)
    w_out = self.param("w_out", nn.with_logical_partitioning(normal(num * size),
                                                             ("experts", "mlp", "embed")),
                       (num, size, d), self.param_dtype)
    router = self.param("router", nn.with_logical_partitioning(
        _unit_rows_normal(self.init_scale * d ** -0.5, 0), ("embed", "experts")),
                        (d, num), self.param_dtype)
    x, router_input, w_in, w_out, router = nn.dtypes.promote_dtype(
        x, router_input, w_in, w_out, router, dtype=self.dtype)
    logits = router_input @ router
    return sigma_moe(x, logits, w_in, w_out, self.topk), logits


class SwitchHeadAttention(nn.Module):
  """MoEUT's attention: SwitchHead (Csordás et al. 2024), the `switchhead` op's mechanism with
  the paper's weights: dense queries/keys from LN(x), per-head value experts of the raw residual
  x (peri-layernorm), routers from LN(x), output experts W^O_e `[heads, E, head_dim, width]`
  mapping straight to the residual (no shared output projection), RoPE on half the head dims,
  logit scale 1/√head_dim. The values are mixed before attention, so the softmax part runs
  sequence-parallel (`seq_parallel`: `SeqParallel.attention`) or over a key/value cache
  (`decode`: `KVCache`) as in `big_attn.layers.Attention`. Returns `(y, (logits_v,
  logits_o))` with the router logits `[batch, seq, heads, E]`.
  """
  num_heads: int
  head_dim: int
  num_experts: int
  topk: int
  rope_base: float = 10_000.
  init_scale: float = 1.0
  seq_parallel: SeqParallel | None = None
  decode: bool = False
  cache_len: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_norm, x, positions, segment_ids):
    d, h, hd, num = x.shape[-1], self.num_heads, self.head_dim, self.num_experts
    normal = lambda fan_in: nn.initializers.normal(  # pylint: disable=g-long-lambda
        self.init_scale * fan_in ** -0.5)

    def param(name, init, shape, axes):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

    wq = param("query", normal(d), (d, h, hd), ("embed", "heads", "head_dim"))
    wk = param("key", normal(d), (d, h, hd), ("embed", "heads", "head_dim"))
    wv = param("value_experts", normal(d), (d, h, num, hd),
               ("embed", "heads", "experts", "head_dim"))
    wo = param("out_experts", normal(h * hd), (h, num, hd, d),
               ("heads", "experts", "head_dim", "embed"))
    router_init = _unit_rows_normal(self.init_scale * d ** -0.5, 0)
    rv = param("router_v", router_init, (d, h, num), ("embed", "heads", "experts"))
    ro = param("router_o", router_init, (d, h, num), ("embed", "heads", "experts"))
    x_norm, x, wq, wk, wv, wo, rv, ro = nn.dtypes.promote_dtype(
        x_norm, x, wq, wk, wv, wo, rv, ro, dtype=self.dtype)
    query = jnp.einsum("btd,dhk->bthk", x_norm, wq)
    key = jnp.einsum("btd,dhk->bthk", x_norm, wk)
    rot = hd // 2 - (hd // 2) % 2
    if rot:
      rope = lambda y: jnp.concatenate(  # pylint: disable=g-long-lambda
          [apply_rope(y[..., :rot], positions, self.rope_base), y[..., rot:]], axis=-1)
      query, key = rope(query), rope(key)
    logits_v = jnp.einsum("btd,dhe->bthe", x_norm, rv)
    logits_o = jnp.einsum("btd,dhe->bthe", x_norm, ro)
    gate_v = experts_ops.sigmoid_topk_gate(logits_v, self.topk).astype(x.dtype)
    value = jnp.einsum("btd,dhek,bthe->bthk", x, wv, gate_v)
    if self.decode:
      heads = KVCache(self.cache_len, name="cache")(query, key, value, is_causal=True,
                                                    scale=hd ** -0.5)
    elif self.seq_parallel is not None:
      heads = self.seq_parallel.attention(query, key, value, is_causal=True,
                                          segment_ids=segment_ids, scale=hd ** -0.5)
    else:
      heads = ops.dot_product_attention(query, key, value, is_causal=True,
                                        segment_ids=segment_ids, scale=hd ** -0.5,
                                        implementation="xla")
    gate_o = experts_ops.sigmoid_topk_gate(logits_o, self.topk).astype(x.dtype)
    return jnp.einsum("bthe,bthk,hekd->btd", gate_o, heads, wo), (logits_v, logits_o)


def _mean_router_probs(logits):
  """softmax over experts, averaged over the tokens: `[batch, seq, ..., E] -> [batch, ..., E]`
  (float32), the per-layer statistic of MoEUT's entropy regulariser."""
  return jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=1)


class MoEUTBlock(nn.Module):
  """MoEUT layer (Csordás et al. 2024) with peri-layernorm (Section 2.3): layer norms only
  where a linear map feeds a softmax/sigmoid (queries, keys, routers), none on the residual
  or the value/expert paths:

      x ← x + SwitchHead(q, k, routers of LN₁(x); values of x),
      x ← x + σ-MoE(experts of x; router of LN₂(x)).

  Returns `(x, aux)` with aux the token-averaged router probabilities (`_mean_router_probs`)
  of the feed-forward ("ffn" `[batch, E]`) and attention ("att_v", "att_o" `[batch, heads,
  E]`) routers.
  """
  num_heads: int
  head_dim: int
  moe: Any
  rope_base: float = 10_000.
  dropout: float = 0.0
  init_scale: float = 1.0
  seq_parallel: SeqParallel | None = None
  decode: bool = False
  cache_len: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids, deterministic: bool = True):
    constrain = _constrain(self)
    norm = lambda name: nn.LayerNorm(  # pylint: disable=g-long-lambda
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y, (logits_v, logits_o) = SwitchHeadAttention(
        self.num_heads, self.head_dim, self.moe["att_experts"], self.moe["att_topk"],
        rope_base=self.rope_base, init_scale=self.init_scale, seq_parallel=self.seq_parallel,
        decode=self.decode, cache_len=self.cache_len, dtype=self.dtype,
        param_dtype=self.param_dtype, name="attention")(
            norm("attention_norm")(x), x, positions, segment_ids)
    x = constrain(x + nn.Dropout(rate=self.dropout)(y, deterministic))
    y, logits_f = SigmaMoE(self.moe["num_experts"], self.moe["expert_dim"], self.moe["topk"],
                           init_scale=self.init_scale, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="mlp")(x, norm("mlp_norm")(x))
    x = constrain(x + nn.Dropout(rate=self.dropout)(y, deterministic))
    return x, {"ffn": _mean_router_probs(logits_f), "att_v": _mean_router_probs(logits_v),
               "att_o": _mean_router_probs(logits_o)}


def _neg_entropy_of_mean(probs):
  """−H(mean over axis 0 of `probs`), averaged over the rest but the last (experts) axis."""
  p = jnp.mean(probs, axis=0)
  return jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def router_entropy_loss(aux_per_layer, moe) -> jax.Array:
  """MoEUT's router regulariser (Section 2.1, following σ-MoE): for each distinct (shared)
  layer, the negative entropy of the router's softmax averaged over all tokens and over the
  repeats of that layer, weighted `moe["entropy_reg"]` (γ, feed-forward) and
  `moe["att_entropy_reg"]` (δ, each of SwitchHead's two routers); summed over the layers.
  `aux_per_layer`: one dict per distinct layer with arrays `[repeats, batch, ..., E]`."""
  loss = jnp.zeros((), jnp.float32)
  for aux in aux_per_layer:
    loss += moe["entropy_reg"] * _neg_entropy_of_mean(aux["ffn"])
    loss += moe["att_entropy_reg"] * (_neg_entropy_of_mean(aux["att_v"]) +
                                      _neg_entropy_of_mean(aux["att_o"]))
  return loss


class _BlockGroup(nn.Module):
  """G distinct blocks applied in order (MoEUT's layer group); returns `(x, [aux_0..aux_G-1])`."""
  block: Any
  size: int
  block_args: Any

  @nn.compact
  def __call__(self, x, positions, segment_ids, deterministic: bool = True):
    aux = []
    for i in range(self.size):
      x, a = self.block(name=f"layers_{i}", **self.block_args)(x, positions, segment_ids,
                                                              deterministic)
      aux.append(a)
    return x, aux


_EMBED_AXIS = {  # nGPT: the embedding axis of each weight matrix, by the end of its path
    ("embedding", "embedding"): -1, ("unembedding", "kernel"): -2,
    ("attention", "query", "kernel"): -3, ("attention", "key", "kernel"): -3,
    ("attention", "value", "kernel"): -3, ("attention", "out", "kernel"): -1,
    ("mlp", "wi_gate", "kernel"): -2, ("mlp", "wi_up", "kernel"): -2,
    ("mlp", "wo", "kernel"): -1,
}


def normalize_params(params: Any) -> Any:
  """nGPT's weight normalisation (Section 2.6): every weight matrix of the LM (embeddings,
  attention and MLP projections) rescaled to unit norm along its embedding axis; the other
  parameters (scalings, eigen learning rates) unchanged. Also works on scanned (stacked) layers.
  """

  def normalize(path, x):
    names = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    for suffix, axis in _EMBED_AXIS.items():
      if names[-len(suffix):] == suffix:
        return ngpt_ops.l2_normalize(x, axis=axis)
    return x

  return jax.tree_util.tree_map_with_path(normalize, params)


class Model(nn.Module):
  """Decoder-only LM: int tokens `[batch, length]` -> float32 logits `[batch, length, vocab]`.

  Attributes:
    vocab_size: number of token ids.
    variant: size name for `decode_variant` ("tiny", "S", "M", "1B"); explicit fields below
      override it (`width`, `depth`, `num_heads` are needed without a variant).
    width, depth, mlp_dim (default 8/3·width rounded up to 128), num_heads, num_kv_heads
      (GQA; default num_heads), head_dim (default width // num_heads).
    rope_base: RoPE base (e.g. 10_000; 500_000 or more for long contexts).
    rope_scaling: None or a dict of RoPE frequency scaling, `rope_type` "linear", "dynamic" or
      "llama3" with Hugging Face's keys (`big_attn.layers.posemb.rope_frequencies`).
    qkv_bias, out_bias: biases on the query/key/value and on the output projections (Qwen2:
      qkv_bias; Llama's attention_bias: both).
    sliding_window: a token attends to itself and the `sliding_window - 1` tokens before it
      (Mistral); None: the whole prefix. Needs attention="softmax".
    norm_eps: epsilon of the RMSNorms.
    qk_norm: RMS-normalise queries and keys per head.
    tie_embeddings: the output projection is the transposed input embedding.
    attention, attention_args, attention_impl: the op by registry name, its arguments and
      `implementation` (sequence parallelism needs an op with a sequence-parallel form and
      decoding a causal op: `big_attn.ops.sequence_parallel_form`, `decoding_form`).
    dropout: residual dropout rate in training.
    mesh, seq_axis, seq_strategy: sequence parallelism over the mesh axis `seq_axis` with
      strategy "striped", "ring" or "all_gather" (None: off); active when that axis has size > 1.
    decode, cache_len: decoding with a cache of `cache_len` tokens, in the op's decoding form
      (see `generate`).
    remat_policy: "none" or a `jax.checkpoint_policies` name applied to every block.
    scan_layers: stack the blocks with `nn.scan` (parameters get a leading `layers` axis).
    block: "pre_norm" (the LLaMA-style block above), "ngpt" (`NGPTBlock`: normalised
      Transformer, with `attention="ngpt"`; no norms, unit-norm embeddings scaled logits, and
      `post_update` = `normalize_params` after every optimizer step) or "moeut"
      (`MoEUTBlock`: σ-MoE feed-forward and SwitchHead attention with peri-layernorm, needs
      `attention="switchhead"` and `moe`; its router entropy regulariser is sown into the
      "losses" collection and added by `loss_fn`).
    moe: MoEUT sizes, dict(num_experts, expert_dim=128, topk, att_experts, att_topk=2,
      entropy_reg=0.01, att_entropy_reg=0.001).
      "transnormer" (`TransNormerBlock`: TransNormerLLM's SRMSNorm, gated lightning attention
      with the per-layer ALiBi decay schedule and SGLU; needs `attention="lightning"`).
    layer_group_size: G: only G distinct blocks, applied in order depth/G times with shared
      weights (MoEUT's layer grouping; G = 1 is a Universal Transformer); None: depth distinct
      blocks. The repeats run under `nn.scan` (per-repeat caches in decoding).
    shared_attention_layers: block indices whose attention reuses the attention weights of the
      block before (EchoAtt, `big_attn.layers.attention_reuse.EchoAttention`: no query or key
      projection); needs block="pre_norm", attention="softmax", unrolled distinct layers
      (no scan_layers or layer_group_size), no sequence parallelism or decoding.
    attention_free_layers: block indices without an attention sublayer (MLP Can Be A Good
      Transformer Learner: x + SwiGLU(RMSNorm(x)) only); needs block="pre_norm" and unrolled
      distinct layers.
    parallel_block: every block computes x + Attn(RMSNorm(x)) + SwiGLU(RMSNorm(x)), one norm
      for both branches (PAF: Investigating the Role of Feed-Forward Networks in Transformers
      Using Parallel Attention and Feed-Forward Net Design); needs block="pre_norm".
    dtype: compute dtype; param_dtype: parameter dtype.
  Parameters carry the logical axis names vocab, embed, mlp, heads, kv_heads, head_dim, norm
  and layers.
  """
  vocab_size: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rope_base: float = 10_000.
  rope_scaling: Any = None
  qkv_bias: bool = False
  out_bias: bool = False
  sliding_window: int | None = None
  norm_eps: float = 1e-6
  qk_norm: bool = False
  tie_embeddings: bool = True
  attention: str = "softmax"
  attention_args: Any = None
  attention_impl: str | None = None
  dropout: float = 0.0
  mesh: Any = None
  seq_axis: str = "seq"
  seq_strategy: str | None = None
  decode: bool = False
  cache_len: int = 0
  remat_policy: str = "none"
  scan_layers: bool = False
  block: str = "pre_norm"
  moe: Any = None
  layer_group_size: int | None = None
  shared_attention_layers: Any = None
  attention_free_layers: Any = None
  parallel_block: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    models_common.resolve_variant(
        self, decode_variant, required=("width", "depth", "num_heads"),
        defaults=dict(mlp_dim=lambda sizes: -(-8 * sizes["width"] // 3 // 128) * 128,
                      num_kv_heads=lambda sizes: sizes["num_heads"],
                      head_dim=lambda sizes: sizes["width"] // sizes["num_heads"]))
    super().__post_init__()

  def moe_sizes(self) -> dict[str, Any]:
    """`moe` completed with `MOE_DEFAULTS` and checked (block="moeut")."""
    unknown = set(self.moe or {}) - set(MOE_DEFAULTS)
    if unknown:
      raise ValueError(f"unknown moe keys {sorted(unknown)}; expected {sorted(MOE_DEFAULTS)}")
    moe = {**MOE_DEFAULTS, **dict(self.moe or {})}
    for name in ("num_experts", "expert_dim", "topk", "att_experts", "att_topk"):
      if not isinstance(moe[name], int) or moe[name] < 1:
        raise ValueError(f"block='moeut' needs moe[{name!r}], a positive int, got "
                         f"{moe[name]!r}")
    if moe["topk"] > moe["num_experts"] or moe["att_topk"] > moe["att_experts"]:
      raise ValueError(f"moe topk must not exceed the experts: topk {moe['topk']} of "
                       f"{moe['num_experts']}, att_topk {moe['att_topk']} of "
                       f"{moe['att_experts']}")
    return moe

  def post_update(self, params: Any) -> Any:
    """Applied by the training loop after init and every update (`step.post_update_fn`): nGPT
    projects its weight matrices back onto the unit sphere; the identity otherwise."""
    return normalize_params(params) if self.block == "ngpt" else params

  def seq_parallel(self) -> SeqParallel | None:
    """The sequence-parallel layout, or None when off (no strategy, no mesh or one shard)."""
    if self.seq_strategy is None:
      return None
    if self.seq_strategy not in STRATEGIES:
      raise ValueError(f"seq_strategy must be None or one of {STRATEGIES}, got "
                       f"{self.seq_strategy!r}")
    if self.mesh is None or self.seq_axis not in self.mesh.axis_names:
      return None
    sp = SeqParallel(self.mesh, self.seq_axis, self.seq_strategy)
    return sp if sp.num_shards > 1 and not self.decode else None

  def reuse_layers(self) -> tuple[frozenset[int], frozenset[int]]:
    """`(shared_attention_layers, attention_free_layers)` as checked sets of block indices."""
    shared, free = (settings.block_indices(name, getattr(self, name), self.depth)
                    for name in ("shared_attention_layers", "attention_free_layers"))
    if not shared and not free:
      return shared, free
    if self.block != "pre_norm" or self.scan_layers or self.layer_group_size is not None:
      raise ValueError("shared_attention_layers and attention_free_layers need block="
                       "'pre_norm' with unrolled distinct layers (scan_layers=False, "
                       f"layer_group_size=None), got block={self.block!r}, scan_layers="
                       f"{self.scan_layers}, layer_group_size={self.layer_group_size}")
    if shared:
      if 0 in shared or shared & free or any(i - 1 in free for i in shared):
        raise ValueError(f"shared_attention_layers {sorted(shared)}: each reuses the weights of "
                         "the block before, which must have attention (block 0 has none before "
                         f"it; attention_free_layers {sorted(free)})")
      if self.attention != "softmax" or self.decode or self.seq_parallel() is not None:
        raise ValueError("shared_attention_layers reuse softmax weights over the whole sequence: "
                         f"they need attention='softmax' (got {self.attention!r}) without "
                         "decoding or sequence parallelism")
    return shared, free

  def _check(self, tokens, sp):
    if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1:
      raise ValueError(f"num_kv_heads must be a positive int, got {self.num_kv_heads!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    group = self.layer_group_size
    if group is not None and (not isinstance(group, int) or group < 1 or self.depth % group):
      raise ValueError(f"layer_group_size must be a positive divisor of depth {self.depth}, "
                       f"got {group!r}")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers [batch, length], got {tokens.dtype} "
                       f"{tokens.shape}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of "
                       f"{REMAT_POLICIES}")
    if self.block not in BLOCKS:
      raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
    if self.parallel_block and self.block != "pre_norm":
      raise ValueError(f"parallel_block is a form of the pre_norm block: it needs block="
                       f"'pre_norm', got {self.block!r}")
    spatial.check_op(self.attention, "LM", causal=True, grid=False)
    if self.block == "moeut" and self.attention != "switchhead":
      raise ValueError(f"block='moeut' computes SwitchHead attention: set "
                       f"attention='switchhead', got {self.attention!r}")
    if self.block == "transnormer":
      if self.attention != "lightning":
        raise ValueError(f"block='transnormer' computes gated lightning attention: set "
                         f"attention='lightning', got {self.attention!r}")
      if (self.qk_norm or self.scan_layers or self.layer_group_size or sp is not None
          or self.decode):
        raise ValueError("block='transnormer' takes each layer's own decay: it needs "
                         "qk_norm=False, scan_layers=False, layer_group_size=None and no "
                         "sequence parallelism or decoding")
    if self.block == "ngpt" and (self.qk_norm or self.dropout):
      raise ValueError("block='ngpt' normalises queries and keys itself and has no dropout: set "
                       f"qk_norm=False and dropout=0 (got {self.qk_norm}, {self.dropout})")
    if self.block != "moeut":  # moeut's SwitchHead runs softmax attention of mixed values
      if self.decode:
        ops.check_form(self.attention, "decoding")
      if sp is not None:
        ops.check_form(self.attention, "sequence-parallel")
    if sp is not None and tokens.shape[1] % sp.num_shards:
      raise ValueError(f"sequence length {tokens.shape[1]} is not divisible by the "
                       f"{sp.num_shards} shards of mesh axis {sp.axis!r}")
    if self.decode and self.cache_len < 1:
      raise ValueError(f"decode=True needs cache_len >= 1, got {self.cache_len}")
    llama_fields = dict(rope_scaling=self.rope_scaling, qkv_bias=self.qkv_bias,
                        out_bias=self.out_bias, sliding_window=self.sliding_window)
    if self.block != "pre_norm" and any(llama_fields.values()):
      raise ValueError(f"{', '.join(k for k, v in llama_fields.items() if v)} need "
                       f"block='pre_norm', got block={self.block!r}")
    if self.sliding_window is not None:
      if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
        raise ValueError(f"sliding_window must be None or a positive int, got "
                         f"{self.sliding_window!r}")
      if self.attention != "softmax" or sp is not None:
        raise ValueError(f"sliding_window needs attention='softmax' without sequence "
                         f"parallelism, got attention={self.attention!r}, "
                         f"seq_strategy={self.seq_strategy!r}")

  @nn.compact
  def __call__(self, tokens, *, positions=None, segment_ids=None, train: bool = False):
    """Logits of the next token at every position.

    Args:
      tokens: int `[batch, length]`.
      positions: int `[batch, length]` RoPE positions; default 0..length-1 (striped under the
        striped strategy). In decoding, the positions of the new tokens (required).
      segment_ids: int `[batch, length]`: tokens attend only within their segment (packing).
      train: dropout on.
    """
    sp = self.seq_parallel()
    self._check(tokens, sp)
    shared, free = self.reuse_layers()
    width = self.width
    if positions is None:
      if self.decode:
        raise ValueError("decoding needs the positions of the new tokens")
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      if sp is not None and sp.strategy == "striped":
        positions = parallel.stripe(positions, sp.num_shards)

    embed = nn.Embed(self.vocab_size, width, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(stddev=width ** -0.5), ("vocab", "embed")),
                     name="embedding")
    x = embed(tokens)
    if sp is not None:
      x = sp.constrain(x)
    block, block_args = self._block(sp)
    if self.remat_policy != "none" and not self.decode:
      block = nn.remat(block, prevent_cse=not self.scan_layers, static_argnums=(4,),
                       policy=getattr(jax.checkpoint_policies, self.remat_policy))
    deterministic = not train
    in_axes = (nn.broadcast, nn.broadcast, nn.broadcast)
    if self.layer_group_size is not None:
      group = self.layer_group_size
      stack = nn.scan(_BlockGroup, variable_broadcast="params", variable_axes={"cache": 0},
                      split_rngs={"params": False, "dropout": True}, in_axes=in_axes,
                      length=self.depth // group)
      x, aux = stack(block=block, size=group, block_args=block_args, name="layers")(
          x, positions, segment_ids, deterministic)           # aux: G dicts of [repeats, ...]
    elif self.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=in_axes, length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, stacked = stack(name="layers", **block_args)(x, positions, segment_ids, deterministic)
      aux = [jax.tree.map(lambda a, i=i: a[i:i + 1], stacked) for i in range(self.depth)]
    else:
      aux, weights = [], None
      for i in range(self.depth):
        layer = dict(layer=i) if self.block == "transnormer" else {}
        if shared or free:
          layer = dict(attention_free=i in free, share_weights=i in shared,
                       emit_weights=i + 1 in shared and i not in shared)
        x, a = block(name=f"layers_{i}", **block_args, **layer)(
            x, positions, segment_ids, deterministic, *([weights] if shared else []))
        # A run of sharing blocks passes on the weights of the last block that computed them.
        weights = a.pop("attention_weights", weights if i in shared else None)
        aux.append(jax.tree.map(lambda y: y[None], a))
    if self.block == "moeut":
      self.sow("losses", "router_entropy", router_entropy_loss(aux, self.moe_sizes()))
    if self.block == "pre_norm":
      x = _rms_norm(self.dtype, self.param_dtype, "final_norm", self.norm_eps)(x)
    elif self.block == "moeut":
      x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(x)
    elif self.block == "transnormer":
      x = srms_norm(x, self.norm_eps)
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(self.vocab_size, use_bias=self.block == "moeut", dtype=self.dtype,
                        param_dtype=self.param_dtype, name="unembedding",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.normal(stddev=width ** -0.5),
                            ("embed", "vocab")))(x)
    logits = logits.astype(jnp.float32)
    if self.block == "ngpt":  # z ← z ⊙ s_z, s_z restored from init 1, scale 1/√width
      logits = logits * _restored(self, "s_z", self.vocab_size, NGPT_S_Z, width, "vocab")
    return logits

  def _block(self, sp):
    """The block class of `self.block` and its arguments."""
    common = dict(seq_parallel=sp, decode=self.decode, cache_len=self.cache_len,
                  dtype=self.dtype, param_dtype=self.param_dtype, rope_base=self.rope_base)
    if self.block == "moeut":
      if self.num_kv_heads != self.num_heads:
        raise ValueError("block='moeut' has one key/value head per head (SwitchHead), got "
                         f"num_kv_heads={self.num_kv_heads}")
      return MoEUTBlock, dict(num_heads=self.num_heads, head_dim=self.head_dim,
                              moe=self.moe_sizes(), dropout=self.dropout,
                              init_scale=(2 / self.depth) ** 0.5, **common)
    args = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim, mlp_dim=self.mlp_dim, attention=self.attention,
                attention_args=None if self.attention_args is None else dict(self.attention_args),
                attention_impl=self.attention_impl, **common)
    if self.block == "ngpt":
      return NGPTBlock, args
    if self.block == "transnormer":
      return TransNormerBlock, dict(
          num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
          mlp_dim=self.mlp_dim, attention_args=args["attention_args"], depth=self.depth,
          norm_eps=self.norm_eps, dropout=self.dropout, dtype=self.dtype,
          param_dtype=self.param_dtype)
    return DecoderBlock, dict(args, qk_norm=self.qk_norm, dropout=self.dropout,
                              rope_scaling=self.rope_scaling, qkv_bias=self.qkv_bias,
                              out_bias=self.out_bias, sliding_window=self.sliding_window,
                              norm_eps=self.norm_eps, parallel=self.parallel_block)


# ----------------------------------------------------------------------------- training task
def stripe_batch(model: Model, batch: dict[str, Any]) -> dict[str, Any]:
  """The batch in the token order the model computes in: striped once under "striped"."""
  sp = model.seq_parallel()
  if sp is None or sp.strategy != "striped":
    return batch
  return {k: parallel.stripe(v, sp.num_shards) if k in BATCH_KEYS else v
          for k, v in batch.items()}


def _token_losses_and_aux(model, params, batch, *, train, rng):
  batch = stripe_batch(model, batch)
  logits, sown = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"], train=train,
                             rngs=None if rng is None else {"dropout": rng}, mutable=["losses"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  aux = sum(jax.tree.leaves(sown.get("losses", {})), jnp.zeros((), jnp.float32))
  return losses, batch["weights"].astype(jnp.float32), aux


def token_losses(model: Model, params: Any, batch: dict[str, Any], *, train: bool = False,
                 rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy (nats) and loss weights, both `[batch, length]` in model order."""
  losses, weights, _ = _token_losses_and_aux(model, params, batch, train=train, rng=rng)
  return losses, weights


def loss_fn(model: Model, params: Any, batch: dict[str, Any], rng: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over the weighted (non-padding) targets of the batch, plus
  the auxiliary losses the model sows into "losses" (MoEUT's router entropy regulariser)."""
  losses, weights, aux = _token_losses_and_aux(model, params, batch, train=True, rng=rng)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0) + aux


def _batch_spec(info: dict[str, Any], batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  shape = (batch_size, info["seq_len"])
  return {"inputs": (shape, jnp.int32), "targets": (shape, jnp.int32),
          "positions": (shape, jnp.int32), "segment_ids": (shape, jnp.int32),
          "weights": (shape, jnp.float32)}


TASK = tasks.Task(batch_spec=_batch_spec,
                  example_input=lambda info: ((info["seq_len"],), jnp.int32),
                  loss=loss_fn, tokens_per_example=lambda info: info["seq_len"])


# -------------------------------------------------------------------------------- generation
def _sample(logits, rng, temperature: float, top_k: int | None):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: Model, params: Any, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, rng: jax.Array | None = None,
             return_logits: bool = False):
  """Continues `prompt` (int `[batch, t]`, t >= 1) by `max_new_tokens` sampled tokens.

  The prompt fills a cache of `t + max_new_tokens` tokens in one pass (prefill); then one token
  at a time attends to it (`Model`'s decoding: keys and values read by the split-KV op
  `lean_decode`, a recurrent state, or the cached layer inputs, by the op's decoding form).
  `temperature=0` is greedy decoding; `top_k` keeps the k most likely tokens.

  Returns:
    int32 `[batch, t + max_new_tokens]` (prompt then continuation); with `return_logits`, also
    the float32 logits `[batch, max_new_tokens, vocab]` each new token was drawn from.
  """
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be integers [batch, t] with t >= 1, got {prompt.dtype} "
                     f"{prompt.shape}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and not 1 <= top_k <= model.vocab_size:
    raise ValueError(f"top_k must be in [1, {model.vocab_size}], got {top_k}")
  if rng is None:
    if temperature != 0.0:
      raise ValueError("sampling with temperature > 0 needs rng")
    rng = jax.random.key(0)
  b, t = prompt.shape
  decoder = model.clone(decode=True, cache_len=t + max_new_tokens, mesh=None)

  def run(params, prompt, rng):
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, variables = decoder.apply({"params": params}, prompt, positions=positions,
                                      mutable=["cache"])
    first = logits[:, -1]

    def step(carry, i):
      cache, logits, rng = carry
      rng, key = jax.random.split(rng)
      token = _sample(logits, key, temperature, top_k)
      new_logits, variables = decoder.apply(
          {"params": params, "cache": cache}, token[:, None],
          positions=jnp.full((b, 1), t + i, jnp.int32), mutable=["cache"])
      return (variables["cache"], new_logits[:, 0], rng), (token, logits)

    _, (tokens, all_logits) = jax.lax.scan(step, (variables["cache"], first, rng),
                                           jnp.arange(max_new_tokens))
    return jnp.concatenate([prompt.astype(jnp.int32), tokens.T], axis=1), all_logits.swapaxes(0, 1)

  tokens, logits = jax.jit(run)(params, prompt, rng)
  return (tokens, logits) if return_logits else tokens


def count_params(model: Model, seq_len: int = 8) -> int:
  """Parameters of `model`, from `jax.eval_shape` (nothing allocated)."""
  shapes = jax.eval_shape(lambda: model.clone(mesh=None).init(
      jax.random.key(0), np.zeros((1, seq_len), np.int32)))
  return tasks.count_params(shapes["params"])
