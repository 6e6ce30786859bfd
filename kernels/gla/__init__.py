"""Gated linear attention (GLA) kernels: reference recurrence, chunked XLA and Pallas paths."""
from .api import chunk_gla, gla_step, recurrent_gla

__all__ = ["chunk_gla", "recurrent_gla", "gla_step"]
