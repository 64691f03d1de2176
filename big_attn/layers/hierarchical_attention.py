"""Hierarchical Attention (FasterViT: Fast Vision Transformers with Hierarchical Attention).

    hat = HierarchicalAttention(num_heads=2, window=4, carriers_per_window=1)
    y = hat.apply(variables, x)      # x, y: [batch, H, W, C]; H, W multiples of `window`

With windows of `window` x `window` tokens and L = `carriers_per_window` = g² carrier tokens per
window (a g x g grid; L = 1: one token per window):

    ct = AvgPool_{window/g}(DWConv_3x3(x))                  (carrier initialisation, per window)
    ct = ct + MHSA(LN(ct)),   ct = ct + MLP(LN(ct))         (all carriers of the image attend)
    z = [ct_w, x_w]                                         (each window and its own L carriers)
    z = z + MHSA(LN(z)),      z = z + MLP(LN(z))            (window² + L tokens per window)
    [ct_w, x_w] = z,          out = x_w + Upsample_nearest(ct_w)

so each local token reads the whole image's summary through its window's carriers, at the cost of
window attention plus attention over H·W·L / window² carriers. The last line is the propagation
FasterViT does at the end of a stage (here after the one block). MHSA: `big_attn.layers.
Attention` (softmax, query/key/value/out projections with biases); MLP: Dense(mlp_ratio·C),
exact GELU, Dense(C); LayerNorm eps 1e-5 (PyTorch's). Not built: FasterViT's learned relative
position biases of the windows and carriers, layer scale and drop path (a MetaFormer block
supplies the latter two), and padding of maps that are not multiples of the window (a ValueError).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_attn.layers.attention import Attention
from big_attn.layers.mlp import MlpBlock
from big_attn.layers.norm import layer_norm


class HierarchicalAttention(nn.Module):
  """FasterViT's HAT block with carrier-token propagation, `[b, H, W, C] -> [b, H, W, C]`.

  Attributes:
    num_heads: attention heads (dividing C) of both the carrier and the local attention.
    window: side of the square windows; H and W must be multiples of it.
    carriers_per_window: L, a perfect square g² with g dividing `window` (1: the window mean).
    mlp_ratio: hidden width of the MLPs over C.
  Parameters: `carrier_posemb` (the depthwise 3x3 conv), `carrier_norm1`, `carrier_attention`,
  `carrier_norm2`, `carrier_mlp`, then `norm1`, `attention`, `norm2`, `mlp` of the local step.
  """
  num_heads: int
  window: int = 7
  carriers_per_window: int = 1
  mlp_ratio: float = 4.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _check(self, shape):
    if len(shape) != 4:
      raise ValueError(f"HierarchicalAttention: x must be [batch, H, W, C], got shape {shape}")
    _, h, w, c = shape
    ws, carriers = self.window, self.carriers_per_window
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
      raise ValueError(f"HierarchicalAttention: window must be a positive int, got {ws!r}")
    if h % ws or w % ws:
      raise ValueError(f"HierarchicalAttention: the map's H x W ({h} x {w}) must be multiples "
                       f"of window ({ws})")
    grid = math.isqrt(carriers) if isinstance(carriers, int) and carriers > 0 else 0
    if grid * grid != carriers or ws % grid:
      raise ValueError(f"HierarchicalAttention: carriers_per_window must be a perfect square "
                       f"g² with g dividing window ({ws}), got {carriers!r}")
    if not isinstance(self.num_heads, int) or self.num_heads < 1 or c % self.num_heads:
      raise ValueError(f"HierarchicalAttention: num_heads must be a positive int dividing the "
                       f"channels ({c}), got {self.num_heads!r}")
    return grid

  def _transformer(self, x, prefix):
    """x + MHSA(LN(x)), then x + MLP(LN(x)) over `[batch, len, C]`."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + Attention(num_heads=self.num_heads, use_bias=True, **kw, name=f"{prefix}attention")(
        layer_norm(**kw, name=f"{prefix}norm1", epsilon=1e-5)(x))
    y = layer_norm(**kw, name=f"{prefix}norm2", epsilon=1e-5)(x)
    return x + MlpBlock(mlp_dim=int(self.mlp_ratio * x.shape[-1]), approximate_gelu=False,
                        **kw, name=f"{prefix}mlp")(y)

  @nn.compact
  def __call__(self, x):
    g = self._check(x.shape)
    b, h, w, c = x.shape
    ws, s = self.window, self.window // g
    nh, nw = h // ws, w // ws
    posemb = nn.Conv(c, (3, 3), padding="SAME", feature_group_count=c, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="carrier_posemb",
                     kernel_init=nn.with_logical_partitioning(
                         nn.initializers.lecun_normal(),
                         ("conv_height", "conv_width", None, "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            ("mlp",)))(x)
    # [b, nh, g, s, nw, g, s, c] -> per window its g x g carriers: [b, nh, nw, g, g, c].
    carriers = posemb.reshape(b, nh, g, s, nw, g, s, c).mean(axis=(3, 6))
    carriers = carriers.transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * nw * g * g, c)
    carriers = self._transformer(carriers, "carrier_")
    windows = x.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5)
    tokens = jnp.concatenate([carriers.reshape(b * nh * nw, g * g, c),
                              windows.reshape(b * nh * nw, ws * ws, c)], axis=1)
    tokens = self._transformer(tokens, "")
    carriers = tokens[:, :g * g].reshape(b, nh, nw, g, 1, g, 1, c)
    windows = tokens[:, g * g:].reshape(b, nh, nw, g, s, g, s, c) + carriers
    return windows.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
