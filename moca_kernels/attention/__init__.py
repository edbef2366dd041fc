"""Attention over packed text+image sequences: mask description, padding helpers and the masked_attention op."""

from .mask import AttentionMask, pack, unpack
from .op import masked_attention

__all__ = ["AttentionMask", "masked_attention", "pack", "unpack"]
