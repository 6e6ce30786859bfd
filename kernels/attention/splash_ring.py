"""Ring attention whose block computation is the splash kernel (TPU; interpret mode elsewhere).

The ring is `ring.py`'s: each device keeps its block of t queries, the key / value blocks (with
their segment ids) travel one hop per step, partial results merge by their log-sum-exp, and the
backward pass runs the ring again with the key / value gradients travelling home with their
blocks. What changes is the computation of one (query block, key block) pair: splash's flash
kernel instead of XLA einsums, so that no score array exists in HBM.

Splash masks are static, so the token order must be known: `order="contiguous"` (device i holds
tokens [i·t, (i+1)·t)) or `order="zigzag"` (`ring.zigzag_order`: device i holds chunks i and
2n−1−i of t/2 tokens). Packed documents enter as segment ids. With the block of device j
arriving at device i:

* j = i (the first step): causal, in both orders (in zigzag order the second chunk sees all of
  the first, and each chunk itself causally: exactly "key index <= query index" over the block);
* contiguous, j < i: every query sees every key (a full mask); j > i: nothing (skipped);
* zigzag, j < i: every query sees the first chunk of the block (chunk j) and not the second;
  j > i: only the second query chunk (chunk 2n−1−i) sees keys, all of them.

So three kernels per order, chosen per step by the devices' indices (`lax.switch`). Splash's
forward returns each row's log-sum-exp with the output, and its backward accepts the output and
log-sum-exp to normalise with: given the merged (global) ones, it returns exactly one block's
share of dq, dk and dv, as ring flash attention needs. That backward is splash's private
`_splash_attention_bwd` (JAX ships no public entry point for it); `tests/test_splash_ring.py`
checks the whole against XLA attention, so a change of its signature fails there.

A row that sees no key in a call gets log-sum-exp = splash's mask value (about −2.4e38) and a
meaningless output, which the merge weighs by exp(mask value − lse) = 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _kernel

from paxlike.kernels.attention.ring import forward_loop, rotate
from paxlike.kernels.attention.splash import BLOCK, LANES, block_sizes, heads_first

ORDERS = ("contiguous", "zigzag")
SKIP, CAUSAL, FULL, FIRST_KEYS, LAST_QUERIES = range(5)   # how a key block meets the queries


def _sizes(q_len: int, kv_len: int) -> splash.BlockSizes:
    sizes = block_sizes(q_len, kv_len)
    if sizes is None:
        raise ValueError(f"splash ring attention: blocks of up to {BLOCK} do not divide {q_len} "
                         f"queries / {kv_len} keys; a device's block of the sequence must be a "
                         f"multiple of {2 * LANES} (of {LANES} per zigzag chunk) and of "
                         f"{2 * BLOCK} beyond it")
    return sizes


def _kernel_for(kind: int, t: int, heads: int, interpret: bool):
    """The splash kernel of one kind of block pair for blocks of t tokens, saving residuals.
    (Built where it is traced: its mask arrays belong to that trace.)"""
    half = t // 2
    q_len, kv_len, mask = {
        CAUSAL: (t, t, splash.CausalMask((t, t))),
        FULL: (t, t, splash.FullMask((t, t))),
        FIRST_KEYS: (t, half, splash.FullMask((t, half))),
        LAST_QUERIES: (half, t, splash.FullMask((half, t))),
    }[kind]
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads),
                                  block_sizes=_sizes(q_len, kv_len), head_shards=1,
                                  q_seq_shards=1, interpret=interpret, save_residuals=True)


def _parts(kind: int, t: int):
    """(query rows, key rows) a kind of pair computes, as slices of the blocks."""
    half, whole = t // 2, slice(None)
    return {CAUSAL: (whole, whole), FULL: (whole, whole), FIRST_KEYS: (whole, slice(0, half)),
            LAST_QUERIES: (slice(half, t), whole)}[kind]


def _kinds(order: str, me, other):
    """The kind of the pair (this device's queries, device `other`'s keys), traced."""
    earlier = other < me
    if order == "contiguous":
        return jnp.where(other == me, CAUSAL, jnp.where(earlier, FULL, SKIP))
    return jnp.where(other == me, CAUSAL, jnp.where(earlier, FIRST_KEYS, LAST_QUERIES))


def _forward_pair(kind, q, k, v, q_seg, k_seg, interpret):
    """(out [B, H, t, D] float32, lse [B, H, t]) of one pair; rows outside the pair's query part
    get lse = -inf."""
    b, h, t, d = q.shape
    rows, keys = _parts(kind, t)
    kernel = _kernel_for(kind, t, h, interpret)

    def one(q, k, v, sq, skv):
        out, (lse,) = kernel(q, k, v, splash.SegmentIds(q=sq, kv=skv))
        return out, lse
    out, lse = jax.vmap(one)(q[:, :, rows], k[:, :, keys], v[:, :, keys], q_seg[:, rows],
                             k_seg[:, keys])
    full_out = jnp.zeros((b, h, t, d), jnp.float32).at[:, :, rows].set(out.astype(jnp.float32))
    full_lse = jnp.full((b, h, t), -jnp.inf, jnp.float32).at[:, :, rows].set(lse)
    return full_out, full_lse


def _backward_pair(kind, q, k, v, q_seg, k_seg, out, lse, d_out, interpret):
    """(dq [B, H, t, D], dk, dv [B, KV, t, D]) float32: this pair's share of the gradients,
    normalised by the merged `out` and `lse` of every pair."""
    b, h, t, d = q.shape
    rows, keys = _parts(kind, t)
    kernel = _kernel_for(kind, t, h, interpret)
    kw = kernel.kwargs
    dq_info, dkv_info = _collapsed(kernel.dq_mask_info), _collapsed(kernel.dkv_mask_info)

    def one(q, k, v, sq, skv, o, l, do):
        res = (q, k, v, splash.SegmentIds(q=sq, kv=skv), None, o, l, dq_info, dkv_info)
        grads = _kernel._splash_attention_bwd(
            False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"],
            kw["residual_checkpoint_name"], kw["mask_function"], kw["attn_logits_soft_cap"],
            kw["interpret"], res, do)
        return grads[3:6]
    dq, dk, dv = jax.vmap(one)(q[:, :, rows], k[:, :, keys], v[:, :, keys], q_seg[:, rows],
                               k_seg[:, keys], out[:, :, rows].astype(q.dtype), lse[:, :, rows],
                               d_out[:, :, rows])
    f32 = jnp.float32
    zeros = lambda x: jnp.zeros(x.shape, f32)  # noqa: E731
    return (zeros(q).at[:, :, rows].set(dq.astype(f32)),
            zeros(k).at[:, :, keys].set(dk.astype(f32)),
            zeros(v).at[:, :, keys].set(dv.astype(f32)))


def _collapsed(info):
    """A mask info as splash's entry point hands it to its kernels (partial mask blocks with
    their leading dimensions merged)."""
    if info is None or info.partial_mask_blocks is None:
        return info
    blocks = info.partial_mask_blocks
    return info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))


def _merge(out, lse, part_out, part_lse):
    new = jnp.logaddexp(lse, part_lse)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    weight = lambda l: jnp.where(jnp.isfinite(l), jnp.exp(l - safe), 0.0)[..., None]  # noqa: E731
    return out * weight(lse) + part_out * weight(part_lse), new


def splash_ring_attention(q, k, v, q_segment_ids, kv_segment_ids, *, axis_name, order: str,
                          interpret: bool = False):
    """This device's attention output [B, t, H, D] inside a shard_map over `axis_name` whose
    blocks are the length in `order` (see the module doc); q [B, t, H, D], k, v [B, t, KV, D],
    segment ids [B, t] of this device's tokens. Scores scaled by 1/sqrt(D)."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r}; choose one of {ORDERS}")
    scale = q.shape[-1] ** -0.5
    out = _ring((heads_first(q) * scale).astype(q.dtype), heads_first(k), heads_first(v),
                q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
                axis_name, order, bool(interpret))
    return heads_first(out)


def _switch(kind, fn, skipped, *args):
    """fn(kind, *args) for the traced `kind`; SKIP gives `skipped` (fills of fn's results)."""
    branches = [functools.partial(fn, c) for c in (CAUSAL, FULL, FIRST_KEYS, LAST_QUERIES)]
    shapes = jax.eval_shape(branches[0], *args)
    skip = lambda *a: tuple(jnp.full(s.shape, fill, s.dtype)  # noqa: E731
                            for s, fill in zip(shapes, skipped))
    return jax.lax.switch(kind, [skip] + branches, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k, v, q_seg, k_seg, axis_name, order, interpret):
    return _forward(q, k, v, q_seg, k_seg, axis_name, order, interpret)[0]


def _forward(q, k, v, q_seg, k_seg, axis_name, order, interpret):
    n, me = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    pair = functools.partial(_forward_pair, interpret=interpret)

    def step(hop, carry):
        out, lse, blk = carry
        blk = rotate(blk, axis_name, n)
        kind = _kinds(order, me, (me - hop) % n)
        part = _switch(kind, pair, (0.0, -jnp.inf), q, *blk[:2], q_seg, blk[2])
        return (*_merge(out, lse, *part), blk)

    out, lse = _forward_pair(CAUSAL, q, k, v, q_seg, k_seg, interpret)
    out, lse, _ = forward_loop(step, (out, lse, (k, v, k_seg)), 1, n)
    return out.astype(q.dtype), lse


def _forward_rule(q, k, v, q_seg, k_seg, axis_name, order, interpret):
    out, lse = _forward(q, k, v, q_seg, k_seg, axis_name, order, interpret)
    return out, (q, k, v, q_seg, k_seg, out, lse)


def _backward_rule(axis_name, order, interpret, residuals, d_out):
    q, k, v, q_seg, k_seg, out, lse = residuals
    n, me = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    pair = lambda kind, k, v, ks: _backward_pair(  # noqa: E731
        kind, q, k, v, q_seg, ks, out, lse, d_out, interpret)

    def step(carry, hop):
        dq, blk = carry
        k_blk, v_blk, ks, dk, dv = blk
        kind = _kinds(order, me, (me - hop) % n)
        dq_part, dk_part, dv_part = _switch(kind, pair, (0.0, 0.0, 0.0), k_blk, v_blk, ks)
        # The key / value gradients travel with their blocks: after n hops they are home.
        blk = (k_blk, v_blk, ks, dk + dk_part, dv + dv_part)
        return (dq + dq_part, rotate(blk, axis_name, n)), None

    f32 = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    (dq, (_, _, _, dk, dv)), _ = jax.lax.scan(
        step, (f32(q), (k, v, k_seg, f32(k), f32(v))), jnp.arange(n))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_forward_rule, _backward_rule)
