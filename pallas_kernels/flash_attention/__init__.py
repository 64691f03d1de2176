"""Flash attention in Pallas: GPU (Triton lowering) and TPU (Mosaic) kernels, one API.

    from pallas_kernels import flash_attention
    out = flash_attention(q, k, v, is_causal=True)        # [batch, seq, heads, head_dim]

`flash_attention_reference` has the same signature (plain JAX, float32, explicit masks).
`flash_block_forward` / `flash_block_backward` expose the kernels as one block of a blockwise
schedule (`big_attn.parallel` ring and striped attention): `(out, lse)` forward, and gradients
from the global lse, with a shifted causal diagonal (`causal_offset`).
"""
from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.api import flash_block_backward
from pallas_kernels.flash_attention.api import flash_block_forward
from pallas_kernels.flash_attention.gpu_triton import BlockSizes
from pallas_kernels.flash_attention.reference import flash_attention_reference

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference", "flash_block_backward",
           "flash_block_forward"]
