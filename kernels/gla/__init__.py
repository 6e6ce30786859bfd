"""Gated linear attention (GLA) kernels: reference recurrence, chunked XLA and Pallas paths.

``IMPLS`` are the ``impl`` values of ``chunk_gla`` (``paxlike.kernels.platform``). See docs/gla.md.
"""
from .api import IMPLS, chunk_gla, gla_step, recurrent_gla

__all__ = ["chunk_gla", "recurrent_gla", "gla_step", "IMPLS"]
