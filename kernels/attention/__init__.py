"""Attention over a sequence split across devices: ring attention (docs/context.md)."""
from .ring import dense_attention, ring_attention, zigzag_order

__all__ = ["dense_attention", "ring_attention", "zigzag_order"]
