"""Flax Linen layers: attention with the mechanism picked by name, and its building blocks."""
from big_attn.layers.attention import Attention
from big_attn.layers.op_params import OpParams, params_module, register_params

__all__ = ["Attention", "OpParams", "params_module", "register_params"]
