"""cuDNN's flash attention on NVIDIA GPUs, through `jax.nn.dot_product_attention(implementation=
"cudnn")`, for causal attention over packed documents.

cuDNN computes attention block by block with an online softmax, as splash does on TPU: the
[T, T] float32 scores and probabilities never exist, and the backward pass recomputes them from
the saved log-sum-exp. What it accepts (checked when the program is lowered for CUDA):
bfloat16 or float16 inputs, a head dimension that is a multiple of 8 and at most 128 (256 on
Hopper and later), grouped-query attention (query heads a multiple of key/value heads).

Masks. Packed documents and causality enter as one boolean mask [B, 1, t, T] built from
positions and segment ids (a query sees a key of its own document at or before its position, the
rule of `ring.dense_attention`), which cuDNN applies as an additive bias: one bfloat16 [t, T]
array per row, shared by all heads, instead of the XLA path's float32 [heads, t, T] scores and
their temporaries. cuDNN's own causal mask is added when the queries are the whole sequence (it
then skips the blocks above the diagonal); with the queries split over devices it would assume
query i sits at key i, which a block of queries does not. (cuDNN's packed-sequence layout, which
needs no bias, is chosen by JAX only when the machine lowering the program has a Hopper GPU, so
it cannot be lowered from a CPU host, and is not used.)

On any other platform the same function runs XLA's attention with the same mask, so a model
configured for cuDNN trains on CPU and TPU too. Tracing the cuDNN branch needs JAX's CUDA plugin
(`jax_cuda12_plugin` / `jax_cuda13_plugin`, installed with `jax[cuda12]` or `jax[cuda13]`);
without it only the XLA branch exists, since no CUDA device could run the program anyway.
"""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp

from paxlike.kernels.platform import by_lowering_platform

DTYPES = ("bfloat16", "float16")
MAX_HEAD_DIM = 256   # Hopper and later; 128 before


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (which reports the cuDNN version the lowering needs) is here."""
    return any(importlib.util.find_spec(f"jax_cuda{v}_plugin") is not None for v in (12, 13))


def _attend(implementation, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    mask = ((q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
            & (kv_positions[:, None, :] <= q_positions[:, :, None]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                        is_causal=q.shape[1] == k.shape[1],
                                        implementation=implementation)


def cudnn_attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """Causal attention of this device's queries over all keys: cuDNN's flash attention where the
    program is lowered for CUDA, XLA's elsewhere (same mask, same result up to rounding).

    q [B, t, H, D] (t: this device's block of queries), k, v [B, T, KV, D]; positions and segment
    ids [B, t] and [B, T] int. Returns [B, t, H, D] in q's dtype; scores scaled by 1/sqrt(D)."""
    if jnp.dtype(q.dtype).name not in DTYPES:
        raise ValueError(f"cuDNN flash attention takes {' or '.join(DTYPES)} inputs, not "
                         f"{jnp.dtype(q.dtype).name}")
    args = (q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    run = lambda implementation: _attend(implementation, *args)  # noqa: E731
    per_platform = {"cuda": "cudnn"} if cuda_plugin_installed() else {}
    return by_lowering_platform(run, per_platform, "xla")

