"""Linen modules that own the learned weights of attention mechanisms.

The ops in `big_attn.ops` are pure functions that take their weights as arguments. A mechanism
with learned weights registers here, under its op name, a module that creates those weights and
returns them as keyword arguments of the op. `big_attn.layers.Attention` calls it as

    extra_args = ParamsModule(num_heads=..., num_kv_heads=..., head_dim=..., op_args=...,
                              dtype=..., param_dtype=...)(inputs_q, query, key, value)

where `query/key/value` are the projected `[batch, seq, heads, head_dim]` arrays.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

_PARAMS: dict[str, type[nn.Module]] = {}


def register_params(op_name: str):
  """Class decorator: registers the Linen module owning the weights of op `op_name`."""

  def decorator(cls):
    if op_name in _PARAMS:
      raise ValueError(f"parameters for op {op_name!r} are already registered")
    _PARAMS[op_name] = cls
    return cls

  return decorator


def params_module(op_name: str) -> type[nn.Module] | None:
  """The module owning op `op_name`'s weights, or None for a mechanism without weights."""
  return _PARAMS.get(op_name)


class OpParams(nn.Module):
  """Base of the per-op parameter modules (fields shared by all)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  op_args: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32


@register_params("gated_attention")
class GatedAttentionParams(OpParams):
  """The gate G(x) of gated attention (Quantizable Transformers, Bondarenko et al. 2023).

  As in the paper, `inputs_q` is split into `num_heads` equal chunks along the features and
  head h's logit is a linear map (with bias) of chunk h: `G(x)_{t,h} = x_{t,h,:}·w_h + b_h`.
  The bias starts at logit(π_init) so every gate opens to `gate_init` (π_init = 0.25, the
  authors' setting); the kernel uses PyTorch's default `Linear` initialisation
  (U(±1/√fan_in)), as the authors' models did. Returns `{"gate_logits": [batch, q_len,
  num_heads]}`.
  """
  gate_init: float = 0.25

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del query, key, value
    features = inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(
          f"gated_attention splits inputs_q into one chunk per head: features ({features}) "
          f"must be divisible by num_heads ({self.num_heads})")
    if not 0.0 < self.gate_init < 1.0:
      raise ValueError(f"gate_init must be in (0, 1), got {self.gate_init}")
    chunk = features // self.num_heads
    kernel = self.param(
        "gate_kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-1,
                                             out_axis=(), batch_axis=0),
            ("heads", None)),
        (self.num_heads, chunk), self.param_dtype)
    bias = self.param(
        "gate_bias",
        nn.with_logical_partitioning(
            nn.initializers.constant(jnp.log(self.gate_init / (1.0 - self.gate_init))),
            ("heads",)),
        (self.num_heads,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(inputs_q, kernel, bias, dtype=self.dtype)
    x = x.reshape(*x.shape[:-1], self.num_heads, chunk)
    return {"gate_logits": jnp.einsum("...hc,hc->...h", x, kernel) + bias}


@register_params("normalized")
class NormalizedParams(OpParams):
  """Per-head gain g (ones) and shift β (zeros) of normalized attention (Normalized Attention
  Without Probability Cage, Richter & Wattenhofer 2020). Returns `{"gain", "shift"}`, each
  `[num_heads]`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    gain = self.param("gain", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                           ("heads",)),
                      (self.num_heads,), self.param_dtype)
    shift = self.param("shift", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ("heads",)),
                       (self.num_heads,), self.param_dtype)
    gain, shift = nn.dtypes.promote_dtype(gain, shift, dtype=self.dtype)
    return {"gain": gain, "shift": shift}


@register_params("latte")
class LatteParams(OpParams):
  """Latent vectors w_l of Latte (Latent Attention for Linear Time Transformers, Dolga et al.
  2024): `op_args["num_latents"]` per head, initialised N(0, 1) so that s·q·w_l (s = 1/√d) is
  O(1). Returns `{"latents": [num_heads, num_latents, head_dim]}`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    num_latents = (self.op_args or {}).get("num_latents")
    if not isinstance(num_latents, int) or isinstance(num_latents, bool) or num_latents < 1:
      raise ValueError(
          f"op 'latte' needs op_args['num_latents'], a positive int, got {num_latents!r}")
    latents = self.param(
        "latents",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                     ("heads", "latents", "head_dim")),
        (self.num_heads, num_latents, self.head_dim), self.param_dtype)
    (latents,) = nn.dtypes.promote_dtype(latents, dtype=self.dtype)
    return {"latents": latents}


@register_params("focused_linear")
class FocusedLinearParams(OpParams):
  """Weights of focused linear attention (FLatten Transformer, Han et al. 2023).

  - `dwc_kernel`, `dwc_bias`: the rank-restoring depthwise convolution of V, shared across
    heads as in the official code: `[k, 1, head_dim]` over the sequence, or `[k, k, 1, head_dim]`
    when `op_args["grid"] = (height, width)` (image tokens); `k = op_args["dwc_kernel_size"]`,
    5 by default as the paper. PyTorch's Conv default init (U(±1/√fan_in)), zero bias.
  - `feature_scale`: the learnable per-channel scale s of the focused map, `[num_kv_heads,
    head_dim]`, stored as a zero-initialised parameter and returned through softplus (ln 2 at
    init), as the paper.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key
    op_args = dict(self.op_args or {})
    size = op_args.get("dwc_kernel_size", 5)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
      raise ValueError(f"op_args['dwc_kernel_size'] must be a positive int, got {size!r}")
    image = op_args.get("grid") is not None
    spatial, names = ((size, size), ("conv_height", "conv_width")) if image else (
        (size,), ("conv_width",))
    value_dim = value.shape[-1]
    kernel = self.param(
        "dwc_kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            names + (None, "head_dim")),
        spatial + (1, value_dim), self.param_dtype)
    bias = self.param(
        "dwc_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "head_dim")),
        (1, value_dim), self.param_dtype)
    scale = self.param(
        "feature_scale",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("kv_heads", "head_dim")),
        (self.num_kv_heads, self.head_dim), self.param_dtype)
    kernel, bias, scale = nn.dtypes.promote_dtype(kernel, bias, scale, dtype=self.dtype)
    return {"dwc_kernel": kernel, "dwc_bias": bias, "feature_scale": nn.softplus(scale)}


def _op_pair(op_args, name: str, op: str) -> tuple[int, int]:
  """`op_args[name]`, an int or a pair of positive ints, as a pair."""
  value = (op_args or {}).get(name)
  pair = (value, value) if isinstance(value, int) else value
  try:
    a, b = pair
  except (TypeError, ValueError):
    a = b = None
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (a, b)):
    raise ValueError(f"op {op!r} needs op_args[{name!r}], a positive int or a pair of them, "
                     f"got {value!r}")
  return a, b


class _RelativePositionBiasParams(OpParams):
  """A relative position bias table `rpb`, `[num_heads, 2a−1, 2c−1]` for groups of `a × c`
  tokens (`op_args[size_arg]`), truncated-normal initialised with std 0.02 as in Swin.
  `op_args["rpb"] = None` asks for no bias (Twins LSA, DaViT): no table, `{}` returned."""
  size_arg = ""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    if "rpb" in (self.op_args or {}) and self.op_args["rpb"] is None:
      return {}
    a, c = _op_pair(self.op_args, self.size_arg, self.size_arg.split("_")[0])
    rpb = self.param(
        "rpb", nn.with_logical_partitioning(nn.initializers.truncated_normal(stddev=0.02),
                                            ("heads", None, None)),
        (self.num_heads, 2 * a - 1, 2 * c - 1), self.param_dtype)
    (rpb,) = nn.dtypes.promote_dtype(rpb, dtype=self.dtype)
    return {"rpb": rpb}


@register_params("window")
class WindowParams(_RelativePositionBiasParams):
  """Relative position bias of window attention (Swin; MaxViT block attention), sized by
  `op_args["window_size"]`. Returns `{"rpb": [num_heads, 2a−1, 2c−1]}`."""
  size_arg = "window_size"


@register_params("grid")
class GridParams(_RelativePositionBiasParams):
  """Relative position bias of MaxViT grid attention, sized by `op_args["grid_size"]`.
  Returns `{"rpb": [num_heads, 2a−1, 2c−1]}`."""
  size_arg = "grid_size"


@register_params("spatial_reduction")
class SpatialReductionParams(OpParams):
  """Depthwise strided reduction kernels of spatial-reduction attention with
  `op_args["method"] == "conv"` (MViTv2 conv pooling; the PVT/Twins reduction applied to the
  projected heads): `sr_key_kernel [r_h, r_w, head_dim]` and `sr_value_kernel [r_h, r_w,
  value_dim]`, shared by the heads as in MViTv2, initialised to average pooling (1/(r_h·r_w)).
  Returns `{}` for `method="avg"`, which has no weights.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query
    if (self.op_args or {}).get("method", "avg") != "conv":
      return {}
    rh, rw = _op_pair(self.op_args, "reduction", "spatial_reduction")
    init = nn.initializers.constant(1.0 / (rh * rw))
    kernels = {}
    for name, x in (("sr_key_kernel", key), ("sr_value_kernel", value)):
      kernels[name] = self.param(
          name, nn.with_logical_partitioning(init, ("conv_height", "conv_width", "head_dim")),
          (rh, rw, x.shape[-1]), self.param_dtype)
    key_kernel, value_kernel = nn.dtypes.promote_dtype(
        kernels["sr_key_kernel"], kernels["sr_value_kernel"], dtype=self.dtype)
    return {"sr_key_kernel": key_kernel, "sr_value_kernel": value_kernel}


@register_params("mixture_of_heads")
class MixtureOfHeadsParams(OpParams):
  """The routers of MoH (Multi-Head Attention as Mixture-of-Head Attention, Jin et al. 2024):
  `router [features, num_heads]` (W_s for the `op_args["shared_heads"]` first heads, then W_r)
  and, when there are both shared and routed heads, `head_mix [features, 2]` (W_h). Linear maps
  of `inputs_q` without bias, PyTorch's default `Linear` initialisation (U(±1/√fan_in)) as the
  authors' code. Returns `{"router_logits": [batch, q_len, num_heads]}` and, with both kinds of
  heads, `"head_mix_logits": [batch, q_len, 2]`.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del query, key, value
    shared = (self.op_args or {}).get("shared_heads", 0)
    if not isinstance(shared, int) or isinstance(shared, bool) or not 0 <= shared <= self.num_heads:
      raise ValueError(f"op_args['shared_heads'] must be an int in [0, {self.num_heads}], "
                       f"got {shared!r}")
    init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    features = inputs_q.shape[-1]
    router = self.param("router", nn.with_logical_partitioning(init, ("embed", "heads")),
                        (features, self.num_heads), self.param_dtype)
    x, router = nn.dtypes.promote_dtype(inputs_q, router, dtype=self.dtype)
    out = {"router_logits": x @ router}
    if 0 < shared < self.num_heads:
      head_mix = self.param("head_mix", nn.with_logical_partitioning(init, ("embed", None)),
                            (features, 2), self.param_dtype)
      (head_mix,) = nn.dtypes.promote_dtype(head_mix, dtype=self.dtype)
      out["head_mix_logits"] = x @ head_mix
    return out


@register_params("gpsa")
class GPSAParams(OpParams):
  """Weights of ConViT's gated positional self-attention (d'Ascoli et al. 2021), initialised
  "locally" as in the paper (locality strength α = 1): `pos_proj [num_heads, 3]` weighs the
  offsets (δx, δy, δx² + δy²) with v_h = α(2Δx_h, 2Δy_h, −1), so head h attends around its own
  offset Δ_h on a √heads × √heads square centred at 0 (heads beyond that square reuse its
  offsets in order), and `gating [num_heads]` = 1 (the paper's λ init). Returns both.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    side = max(1, int(self.num_heads ** 0.5))
    center = (side - 1) / 2

    def local_init(rng, shape, dtype):
      del rng
      heads = jnp.arange(shape[0]) % (side * side)
      dy, dx = heads // side - center, heads % side - center
      return jnp.stack([2 * dx, 2 * dy, -jnp.ones_like(dx)], -1).astype(dtype)

    pos_proj = self.param("pos_proj", nn.with_logical_partitioning(local_init, ("heads", None)),
                          (self.num_heads, 3), self.param_dtype)
    gating = self.param("gating", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                               ("heads",)),
                        (self.num_heads,), self.param_dtype)
    pos_proj, gating = nn.dtypes.promote_dtype(pos_proj, gating, dtype=self.dtype)
    return {"pos_proj": pos_proj, "gating": gating}


@register_params("levit_bias")
class LeViTBiasParams(OpParams):
  """LeViT's per-head attention bias table `attention_bias [num_heads, h, w]` over the absolute
  offsets of the `op_args["grid"] = (h, w)` image, zero-initialised as in LeViT."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    h, w = _op_pair(self.op_args, "grid", "levit_bias")
    table = self.param("attention_bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("heads", None, None)),
                       (self.num_heads, h, w), self.param_dtype)
    (table,) = nn.dtypes.promote_dtype(table, dtype=self.dtype)
    return {"attention_bias": table}


@register_params("decomposed_relpos")
class DecomposedRelPosParams(OpParams):
  """MViTv2's decomposed relative position tables `rel_h [2h − 1, head_dim]` and
  `rel_w [2w − 1, head_dim]` for the `op_args["grid"] = (h, w)` image, shared by the heads and
  truncated-normal initialised with std 0.02 as in MViTv2."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, query, key, value
    h, w = _op_pair(self.op_args, "grid", "decomposed_relpos")
    init = nn.with_logical_partitioning(nn.initializers.truncated_normal(stddev=0.02),
                                        (None, "head_dim"))
    rel_h = self.param("rel_h", init, (2 * h - 1, self.head_dim), self.param_dtype)
    rel_w = self.param("rel_w", init, (2 * w - 1, self.head_dim), self.param_dtype)
    rel_h, rel_w = nn.dtypes.promote_dtype(rel_h, rel_w, dtype=self.dtype)
    return {"rel_h": rel_h, "rel_w": rel_w}


@register_params("kernelized_rpe")
class KernelizedRPEParams(OpParams):
  """The relative positional encoding `rpe_bias [num_heads, 2·seq − 1]` of kernelized attention
  with RPE (Luo et al. 2021), sized by the query length (a fixed-length model), zero-initialised
  (no positional preference at the start). The random features come from
  `op_args["feature_key"]` (or `"features"`), as for `performer`."""

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del inputs_q, key, value
    length = query.shape[1]
    rpe = self.param("rpe_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              ("heads", None)),
                     (self.num_heads, 2 * length - 1), self.param_dtype)
    (rpe,) = nn.dtypes.promote_dtype(rpe, dtype=self.dtype)
    return {"rpe_bias": rpe}


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
    hidden = (self.op_args or {}).get("hidden_dim") or self.head_dim
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
      raise ValueError(f"op_args['hidden_dim'] must be a positive int, got {hidden!r}")
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


@register_params("switchhead")
class SwitchHeadParams(OpParams):
  """The experts and routers of SwitchHead (Csordás et al. 2024; MoEUT's attention).

  `op_args["num_experts"]` E (4 by default) and `op_args["topk"]` k (2 by default). Owns, per
  head, the value experts `value_expert_kernel [features, num_kv_heads, E, head_dim]`, the
  routers `router_v [features, num_kv_heads, E]` and `router_o [features, num_heads, E]`, and
  the output experts `out_experts [num_heads, E, head_dim, head_dim]`, all fan-in scaled
  normal (variance 1/fan_in). From `inputs_q` (self-attention: keys and values come from the
  same tokens) it returns `value_experts`, `router_logits_v`, `router_logits_o` and
  `out_experts` for the `switchhead` op. The layer's dense value projection is then unused by
  the op, and its output projection follows the output experts.
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del query, value
    op_args = self.op_args or {}
    num = op_args.get("num_experts", 4)
    topk = op_args.get("topk", 2)
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
      raise ValueError(f"op_args['num_experts'] must be a positive int, got {num!r}")
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= num:
      raise ValueError(f"op_args['topk'] must be an int in [1, {num}], got {topk!r}")
    if inputs_q.shape[1] != key.shape[1]:
      raise ValueError("switchhead's parameters are computed from inputs_q: it supports "
                       f"self-attention only, got q_len {inputs_q.shape[1]} and kv_len "
                       f"{key.shape[1]}")
    features, d = inputs_q.shape[-1], self.head_dim
    init = lambda fan_in: nn.initializers.normal(stddev=fan_in ** -0.5)  # pylint: disable=g-long-lambda
    kernel = self.param("value_expert_kernel", nn.with_logical_partitioning(
        init(features), ("embed", "kv_heads", "experts", "head_dim")),
                        (features, self.num_kv_heads, num, d), self.param_dtype)
    router_v = self.param("router_v", nn.with_logical_partitioning(
        init(features), ("embed", "kv_heads", "experts")),
                          (features, self.num_kv_heads, num), self.param_dtype)
    router_o = self.param("router_o", nn.with_logical_partitioning(
        init(features), ("embed", "heads", "experts")),
                          (features, self.num_heads, num), self.param_dtype)
    out_experts = self.param("out_experts", nn.with_logical_partitioning(
        init(d), ("heads", "experts", "head_dim", None)),
                             (self.num_heads, num, d, d), self.param_dtype)
    x, kernel, router_v, router_o, out_experts = nn.dtypes.promote_dtype(
        inputs_q, kernel, router_v, router_o, out_experts, dtype=self.dtype)
    return {"value_experts": jnp.einsum("bsf,fked->bsked", x, kernel),
            "router_logits_v": jnp.einsum("bsf,fke->bske", x, router_v),
            "router_logits_o": jnp.einsum("bsf,fne->bsne", x, router_o),
            "out_experts": out_experts}


@register_params("ngpt")
class NGPTParams(OpParams):
  """nGPT's query/key scaling s_qk (Loshchilov et al. 2024, Section 2.3), `[num_heads,
  head_dim]`, stored as s_qk_scale = 1/√features and restored as s_qk·(s_qk_init/s_qk_scale)
  with s_qk_init = 1 (the paper's reparametrisation). With grouped-query attention a second
  `s_k [num_kv_heads, head_dim]` scales the keys. Returns `{"s_qk"}` (and `{"s_k"}`).
  """

  @nn.compact
  def __call__(self, inputs_q, query, key, value):
    del query, key, value
    scale = inputs_q.shape[-1] ** -0.5
    out = {}
    for name, heads in (("s_qk", self.num_heads), ("s_k", self.num_kv_heads)):
      if name == "s_k" and heads == self.num_heads:
        break
      s = self.param(name, nn.with_logical_partitioning(nn.initializers.constant(scale),
                                                        ("heads", "head_dim")),
                     (heads, self.head_dim), self.param_dtype)
      (s,) = nn.dtypes.promote_dtype(s / scale, dtype=self.dtype)
      out[name] = s
    return out
