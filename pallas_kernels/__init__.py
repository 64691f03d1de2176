"""Pallas kernels of big_attn: each with a plain-JAX reference of the same signature, and an
interpret mode that runs on CPU."""
from pallas_kernels.flash_attention import BlockSizes
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.flash_attention import flash_block_backward
from pallas_kernels.flash_attention import flash_block_forward

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference", "flash_block_backward",
           "flash_block_forward"]
