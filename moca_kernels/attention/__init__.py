"""Attention over packed text+image sequences: mask description and the masked_attention op."""

from .mask import AttentionMask
from .op import masked_attention

__all__ = ["AttentionMask", "masked_attention"]
