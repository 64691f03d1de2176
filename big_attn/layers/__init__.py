"""Flax Linen layers: attention with the mechanism picked by name, and its building blocks."""
from big_attn.layers.attention import Attention
from big_attn.layers.compression import comcat, comcat_attention
from big_attn.layers.conv_attention import convolution_attention
from big_attn.layers.hierarchical_attention import HierarchicalAttention
from big_attn.layers.hyena import HyenaOperator, ImplicitFilter
from big_attn.layers.kv_cache import InputCache, KVCache, RecurrentCache
from big_attn.layers.mlp import MlpBlock
from big_attn.layers.norm import batch_norm, conv_norm, layer_norm
from big_attn.layers.pointer import PointerHead
from big_attn.layers.token_merging import DeformableTokenMerging
from big_attn.ops.registry import OpParams, params_module, register_params
from big_attn.layers.posemb import PositionEmbedding, apply_rope, posemb_sincos_2d

__all__ = ["Attention", "DeformableTokenMerging", "HierarchicalAttention", "HyenaOperator", "ImplicitFilter", "InputCache", "KVCache",
            "RecurrentCache", "MlpBlock", "OpParams", "PointerHead",
            "PositionEmbedding", "apply_rope", "batch_norm", "conv_norm",
            "comcat", "comcat_attention", "convolution_attention", "layer_norm",
           "params_module", "posemb_sincos_2d", "register_params"]
