"""Ring attention: softmax attention over a sequence whose length is split across the devices
of one mesh axis, with memory per device O(T/n).

Each of the n devices keeps its block of queries; the key / value blocks, with their positions
and segment ids, travel around the ring (`ppermute`), one hop per step, and the partial results
are merged with an online softmax (running max and sum per query row). The mask is built from
positions and segment ids, never from array indices: key j is visible to query i iff they are in
the same segment (packed document) and pos_j <= pos_i, so any order of the tokens works (the
zigzag order that balances causal work across devices included). A block with no visible pair
is skipped, `key_chunk` keys at a time (an arriving block is attended chunk by chunk with the same
online softmax, so no score matrix larger than [T/n, key_chunk] per head is ever formed). Rows
that see nothing (never the case for a token that sees itself) give 0, not NaN.

The forward pass's loops are while loops (`forward_loop`: as scans, a model's layer scan made
JAX keep their per-hop intermediates). The backward pass is a custom VJP that runs the ring
again: each step recomputes its block's probabilities from the saved log-sum-exp and sends the
key / value gradients on with their blocks, so that after n hops they arrive home; nothing of
size T x T, or T, is kept per device.

Grouped-query attention: q [B, Tq, H, D], k and v [B, Tk, KV, D] with H a multiple of KV; query
head h reads key / value head h // (H / KV), as `jax.nn.dot_product_attention` does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def visible(q_pos, k_pos, q_seg, k_seg):
    """[B, Tq, Tk] bool: key visible to query (same segment, not later in the document)."""
    return (q_seg[:, :, None] == k_seg[:, None, :]) & (k_pos[:, None, :] <= q_pos[:, :, None])


def dense_attention(q, k, v, positions, segment_ids, scale=None):
    """The reference on one device: the same mask over the whole sequence."""
    mask = visible(positions, positions, segment_ids, segment_ids)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def zigzag_order(length: int, ways: int) -> np.ndarray:
    """Token order that gives each of `ways` contiguous blocks the same causal work: the sequence
    cut into 2·ways chunks, block i holding chunks i and 2·ways - 1 - i. x[..., order] reorders a
    sequence; np.argsort(order) restores it."""
    if length % (2 * ways):
        raise ValueError(f"length {length} must be a multiple of 2 x {ways} for the zigzag order")
    chunks = np.arange(length).reshape(2 * ways, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * ways - 1 - i]])
                           for i in range(ways)])


def _grouped(q, kv_heads):
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)          # [B, Tq, KV, G, D]


def _block_scores(q, k, mask, scale):
    """Masked float32 scores [B, KV, G, Tq, Tk] of grouped queries against one key block."""
    s = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], s, -jnp.inf)


def forward_loop(body, init, start: int, stop: int):
    """carry = body(i, carry) for i = start .. stop - 1, as a while loop, not a scan.

    For the loops of a ring's forward pass (over hops, and over key chunks). Inside a
    differentiated `lax.scan` (a model's layer scan) JAX linearises the scans of a custom VJP's
    forward pass anyway and keeps their per-iteration intermediates (masks, probabilities, key /
    value chunks of every hop), stacked, as residuals that the custom backward never reads:
    O(T^2 / n) per device instead of O(T / n). A while loop's iterations are not kept that way."""
    def step(c):
        i, carry = c
        return i + 1, body(i, carry)
    return jax.lax.while_loop(lambda c: c[0] < stop, step, (jnp.int32(start), init))[1]


def rotate(tree, axis_name, n):
    """Every array of `tree` one hop on around the ring of `axis_name`'s n devices."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


def ring_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, axis_name: str, scale=None,
                   key_chunk: int = 512):
    """This device's attention output [B, Tq, H, D], inside a shard_map over `axis_name` whose
    blocks are the length dimension: q, positions and segment ids of this device's queries, k, v
    and theirs of this device's keys (the same tokens, for self-attention). Each arriving block
    is attended `key_chunk` keys at a time, so no score matrix larger than [Tq, key_chunk] per
    head exists: memory per device is linear in the block length."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if key_chunk < 1:
        raise ValueError(f"key_chunk={key_chunk} must be >= 1 (keys attended at a time)")
    chunk = _chunk(k.shape[1], key_chunk)
    return _ring(q, k, v, q_pos, k_pos, q_seg, k_seg, axis_name, scale, chunk)


def _chunk(length: int, wanted: int) -> int:
    """The largest divisor of `length` that is at most `wanted`."""
    return max(c for c in range(1, min(length, wanted) + 1) if length % c == 0)


def _chunks(chunk, *arrays):
    """Each [B, Tk, ...] array as [Tk / chunk, B, chunk, ...], for a scan over key chunks."""
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)
    return tuple(split(x) for x in arrays)


def _unchunk(x):
    """[Tk / chunk, B, chunk, ...] back to [B, Tk, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ring(q, k, v, q_pos, k_pos, q_seg, k_seg, axis_name, scale, chunk):
    return _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, axis_name, scale, chunk)[0]


def _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, axis_name, scale, chunk):
    n = jax.lax.axis_size(axis_name)
    b, tq, h, d = q.shape
    kv = k.shape[2]
    qg = _grouped(q, kv)
    shape = (b, kv, h // kv, tq)

    def key_chunk(index, carry, chunks):
        k_c, v_c, kp, ks = (jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False)
                            for x in chunks)
        mask = visible(q_pos, kp, q_seg, ks)

        def attend(acc, m, l):
            s = _block_scores(qg, k_c, mask, scale)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqt,btkd->bkgqd", p.astype(v_c.dtype), v_c,
                preferred_element_type=jnp.float32)
            return acc, m_new, l * correction + p.sum(-1)

        return jax.lax.cond(mask.any(), attend, lambda *a: a, *carry)

    def attend_block(acc, m, l, blk):
        chunks = _chunks(chunk, *blk)
        return forward_loop(lambda i, c: key_chunk(i, c, chunks), (acc, m, l), 0,
                            blk[0].shape[1] // chunk)

    def step(hop, carry):
        acc, m, l, blk = carry
        return (*attend_block(acc, m, l, blk), rotate(blk, axis_name, n))

    init = (jnp.zeros(shape + (d,), jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.float32), (k, v, k_pos, k_seg))
    # n - 1 hops bring every other block here; the last block needs no hop onward.
    acc, m, l, blk = forward_loop(step, init, 0, n - 1)
    acc, m, l = attend_block(acc, m, l, blk)
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)      # [B, KV, G, Tq]
    out = jnp.moveaxis(out, 3, 1).reshape(b, tq, h, d).astype(q.dtype)
    return out, lse


def _forward_rule(q, k, v, q_pos, k_pos, q_seg, k_seg, axis_name, scale, chunk):
    out, lse = _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, axis_name, scale, chunk)
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _backward_rule(axis_name, scale, chunk, residuals, d_out):
    q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = residuals
    n = jax.lax.axis_size(axis_name)
    kv = k.shape[2]
    qg, dog = _grouped(q, kv), _grouped(d_out, kv)
    # D_i = Σ_d dO_id · O_id: the softmax backward's row term.
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", dog.astype(jnp.float32),
                       _grouped(out, kv).astype(jnp.float32))

    def key_chunk(dq, keys):
        k_c, v_c, kp, ks = keys
        mask = visible(q_pos, kp, q_seg, ks)

        def grads(dq):
            p = jnp.exp(_block_scores(qg, k_c, mask, scale) - lse[..., None])
            dv_c = jnp.einsum("bkgqt,bqkgd->btkd", p, dog.astype(jnp.float32))
            dp = jnp.einsum("bqkgd,btkd->bkgqt", dog, v_c, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[..., None]) * scale
            dq = dq + jnp.einsum("bkgqt,btkd->bqkgd", ds, k_c.astype(jnp.float32))
            return dq, jnp.einsum("bkgqt,bqkgd->btkd", ds, qg.astype(jnp.float32)), dv_c

        skip = lambda dq: (dq, jnp.zeros(k_c.shape, jnp.float32), jnp.zeros(v_c.shape, jnp.float32))
        dq, dk_c, dv_c = jax.lax.cond(mask.any(), grads, skip, dq)
        return dq, (dk_c, dv_c)

    def step(carry, _):
        dq, blk = carry
        k_blk, v_blk, kp, ks, dk_blk, dv_blk = blk
        dq, (dk_c, dv_c) = jax.lax.scan(key_chunk, dq, _chunks(chunk, k_blk, v_blk, kp, ks))
        dk_blk, dv_blk = dk_blk + _unchunk(dk_c), dv_blk + _unchunk(dv_c)
        # The key / value gradients travel with their blocks: after n hops they are home.
        return (dq, rotate((k_blk, v_blk, kp, ks, dk_blk, dv_blk), axis_name, n)), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    init = (zeros(qg), (k, v, k_pos, k_seg, zeros(k), zeros(v)))
    (dq, (_, _, _, _, dk, dv)), _ = jax.lax.scan(step, init, None, length=n)
    return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None, None, None, None)


_ring.defvjp(_forward_rule, _backward_rule)
