"""Splash attention: the block-sparse flash attention kernel for TPU that ships with JAX's Pallas
TPU ops (`jax.experimental.pallas.ops.tpu.splash_attention`), for causal attention over packed
documents.

Flash attention never holds the [T, T] scores: it walks blocks of keys with an online softmax
(running maximum and sum per query row), and the backward pass recomputes each block's
probabilities from the saved log-sum-exp. Splash adds block sparsity: the causal mask is known
before the program runs, so blocks entirely above the diagonal are never visited (about half of
them at long T). Packed documents enter as segment ids: a query sees a key iff it is at or after
it in the row and in the same document, the mask of the Transformer's XLA path
(`attention_mask`). For tokens in their natural order that is the positions-and-segments mask of
`ring.dense_attention` on every real token (positions rise within a document); they differ only
among padding tokens (all at position 0), whose outputs no loss reads.

Sharding: the kernel carries its mask's block structure as arrays, and with the queries split over
devices each device needs the rows of its own block of queries. `SplashKernel` is built for the
whole sequence and the splits (`head_shards`, `q_shards`); `in_spec(mesh, head_axes, q_axes)` is
the `shard_map` spec of its arrays, so that each device receives its part with its queries. The
keys and values arrive whole (the all-gather of context parallelism). Grouped-query attention: the
local query head h reads local key / value head h // (H / KV), which is the global pairing
whenever both head counts are split over the same devices.

On TPU the kernel compiles with Mosaic; on any other platform it runs in Pallas interpret mode
(slow: for checking only). Block sizes: 512 (or the whole local length when shorter); they must
divide the local query length and the key length, and key blocks are multiples of 128.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

BLOCK = 512
LANES = 128   # the kernel's key blocks are whole multiples of the TPU's 128 lanes


def block_sizes(q_len: int, kv_len: int) -> "splash.BlockSizes | None":
    """Splash's block sizes (forward and backward) for `q_len` queries over `kv_len` keys:
    blocks of up to BLOCK that divide both lengths, key blocks whole multiples of LANES; None
    where the lengths cannot be tiled so."""
    bq, bkv = min(BLOCK, q_len), min(BLOCK, kv_len)
    if q_len % bq or kv_len % bkv or bkv % LANES:
        return None
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                             block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                             block_kv_dq=bkv)


def heads_first(x):
    """[B, T, H, D] <-> [B, H, T, D]: splash's layout is heads first."""
    return jnp.swapaxes(x, 1, 2)


class SplashKernel:
    """The splash kernel for causal attention over `length` tokens and `num_heads` query heads,
    its queries split `q_shards` ways and heads `head_shards` ways."""

    def __init__(self, length: int, num_heads: int, *, q_shards: int = 1, head_shards: int = 1,
                 interpret: bool = False):
        if length % q_shards or num_heads % head_shards:
            raise ValueError(f"splash attention: {length} tokens and {num_heads} heads must "
                             f"divide into {q_shards} x {head_shards} shards")
        local = length // q_shards
        sizes = block_sizes(local, length)
        if sizes is None:
            raise ValueError(f"splash attention: blocks of up to {BLOCK} queries / keys do not "
                             f"divide the local length {local} / the length {length}; the "
                             f"length must be a multiple of {LANES}, and of {BLOCK} beyond it")
        mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
        self.kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=head_shards,
                                             q_seq_shards=q_shards, interpret=interpret)

    def in_spec(self, mesh, head_axes, q_axes):
        """The `shard_map` in_spec of `self.kernel` with heads over `head_axes` and queries over
        `q_axes` (mesh axis names, a tuple each, possibly empty)."""
        spec = jax.sharding.PartitionSpec(head_axes or None, q_axes or None)
        return self.kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, spec))


def splash_attention(kernel, q, k, v, q_segment_ids, kv_segment_ids):
    """Causal attention of this device's queries over all keys.

    kernel: `SplashKernel(...).kernel`, or its local part inside `shard_map`; q [B, t, H, D] (t:
    this device's block of queries), k, v [B, T, KV, D]; segment ids [B, t] and [B, T] int.
    Returns [B, t, H, D] in q's dtype. Scores are scaled by 1/sqrt(D)."""
    scale = q.shape[-1] ** -0.5

    def one(q, k, v, sq, skv):
        return kernel(q, k, v, splash.SegmentIds(q=sq, kv=skv))
    o = jax.vmap(one)((heads_first(q) * scale).astype(q.dtype), heads_first(k), heads_first(v),
                      q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
    return heads_first(o).astype(q.dtype)
