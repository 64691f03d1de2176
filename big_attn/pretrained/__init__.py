"""Converters from timm / Hugging Face transformers checkpoints to big_attn models.

torch and the framework are imported only when a converter is called.
"""
from big_attn.pretrained._common import ConversionError
from big_attn.pretrained.timm import from_timm

__all__ = ["ConversionError", "from_timm"]
