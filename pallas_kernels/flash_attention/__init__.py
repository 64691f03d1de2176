"""Flash attention in Pallas: GPU (Triton lowering) and TPU (Mosaic) kernels, one API.

    from pallas_kernels import flash_attention
    out = flash_attention(q, k, v, is_causal=True)        # [batch, seq, heads, head_dim]

`flash_attention_reference` has the same signature (plain JAX, float32, explicit masks).
"""
from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.gpu_triton import BlockSizes
from pallas_kernels.flash_attention.reference import flash_attention_reference

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference"]
