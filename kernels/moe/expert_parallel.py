"""Dropless expert parallelism: experts are split over mesh axes, tokens travel to their experts'
devices with a ragged all-to-all and come back the same way.

`expert_parallel_body` runs per device inside `jax.shard_map`; `expert_parallel_ffn` wraps it.
The expert-parallel (EP) group is the flattened `ep_axes` (a tuple of mesh axes behaves as one
axis in row-major order, as `jax.lax.axis_index` and the collectives treat it); device r of it
holds experts r*E_local ... (r+1)*E_local - 1, the blocks of the weights' expert dimension split
over exactly those axes.

Per device, with n local tokens, k choices each and P = EP group size:
1. sort the n*k assignments by global expert id (stable), which also groups them by destination
   device r = id // E_local;
2. all_gather the per-expert counts [E] over the group -> counts[src, e], from which every
   device derives send/recv sizes and sender-side output offsets (receivers stack sources in
   device order, each source's rows in expert order);
3. exchange the rows into a receive buffer of n*k*P rows, the worst case (every device sends
   all its rows here), so nothing is ever dropped;
4. zero the padding rows past what arrived (jnp.where: a NaN there must not survive), re-sort
   by local expert (the local expert of each received row follows from counts, so no ids are
   exchanged), run the experts as grouped matmuls, unsort;
5. exchange the rows back with the sizes and offsets reversed, unsort to token order, combine;
6. with tensor parallelism inside the experts (f split over `reduce_axes`), each device's
   output is a partial sum: psum over reduce_axes, done on the combined [n, d] output, the
   smallest tensor it is linear in.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .exchange import ragged_exchange, resolve_exchange
from .grouped import grouped_swiglu, sort_by_expert
from .reference import ExpertWeights, check_weights, combine_rows


def _axes(spec_entry) -> tuple:
    """A PartitionSpec entry (None, a name or a tuple of names) as a tuple of names."""
    if spec_entry is None:
        return ()
    return tuple(spec_entry) if isinstance(spec_entry, (tuple, list)) else (spec_entry,)


def _exclusive_cumsum(a, axis=0):
    return jnp.cumsum(a, axis=axis) - a


def _dispatch(x, ids, combine, w: ExpertWeights, *, axis, ep_size: int, exchange: str,
              gmm_impl: str, pad_value):
    """Steps 1-5 of the module docstring on local tokens x [n, d], ids/combine [n, k]."""
    n, d = x.shape
    k = ids.shape[1]
    local_experts = w.gate.shape[0]
    num_experts = local_experts * ep_size
    rows_out = n * k
    rows_in = rows_out * ep_size
    me = jax.lax.axis_index(axis)

    # 1. Sort by global expert: contiguous per destination device, expert order inside.
    flat = ids.reshape(-1)
    order, inverse, counts = sort_by_expert(flat, num_experts)
    send = x[order // k]

    # 2. counts[src, e]; sizes[src, dst] = rows src sends to dst.
    counts = jax.lax.all_gather(counts, axis)                                   # [P, E]
    sizes = counts.reshape(ep_size, ep_size, local_experts).sum(-1)             # [P, P]
    send_sizes, recv_sizes = sizes[me], sizes[:, me]
    input_offsets = _exclusive_cumsum(send_sizes)
    # Receiver dst stacks its sources in device order: my slice lands after those of all
    # lower-ranked sources.
    output_offsets = _exclusive_cumsum(sizes, axis=0)[me]
    recv_offsets = _exclusive_cumsum(recv_sizes)

    # 3. Rows in; the buffer starts as pad_value, so the padding test can fill it with NaN.
    received = ragged_exchange(
        exchange, send, jnp.full((rows_in, d), pad_value, x.dtype), input_offsets, send_sizes,
        output_offsets, recv_sizes, axis_name=axis, pad_value=pad_value)

    # 4. Local expert of each received row: source-major, expert-minor runs of
    # counts[src, my experts]; padding rows (past all runs) get the sentinel local_experts.
    mine = jax.lax.dynamic_slice_in_dim(counts, me * local_experts, local_experts, axis=1)
    runs = jnp.append(mine.reshape(-1), rows_in - mine.sum())
    run_expert = jnp.append(jnp.tile(jnp.arange(local_experts), ep_size), local_experts)
    local_ids = jnp.repeat(run_expert, runs, total_repeat_length=rows_in)
    # Padding rows hold pad_value (NaN in the tests): select zeros, never multiply by a mask.
    received = jnp.where((local_ids < local_experts)[:, None], received,
                         jnp.zeros((), received.dtype))
    order_in, inverse_in, group_sizes = sort_by_expert(local_ids, local_experts)
    out = grouped_swiglu(received[order_in], group_sizes, w, impl=gmm_impl)
    out = out.astype(x.dtype)[inverse_in]

    # 5. Rows back: what came from src (at recv_offsets[src]) returns to where src took it
    # from (src's input offset for me). No slice back is longer than n*k rows.
    back = ragged_exchange(
        exchange, out, jnp.full((rows_out, d), pad_value, x.dtype), recv_offsets, recv_sizes,
        _exclusive_cumsum(sizes, axis=1)[:, me], send_sizes, axis_name=axis,
        pad_value=pad_value, max_slice_size=rows_out)
    return combine_rows(combine, back[inverse].reshape(n, k, d), x.dtype)


def expert_parallel_body(x, w: ExpertWeights, expert_ids, combine, *, ep_axes,
                         replicated_ep_axes=(), reduce_axes=(), exchange: str = "padded",
                         gmm_impl: str = "auto", pad_value=0.0):
    """The per-device EP computation; call it inside `jax.shard_map` (with check_vma=False)
    over a mesh that has ep_axes, replicated_ep_axes and reduce_axes.

    x [..., d] local tokens (any leading dims), expert_ids [..., k] GLOBAL expert ids,
    combine [..., k]; w: this device's experts, gate/up [E_local, d, f_local],
    down [E_local, f_local, d]. Returns y with x's shape and dtype.

    replicated_ep_axes (a subset of ep_axes): axes over which the local tokens are replicated;
      each device takes its 1/size slice of them before dispatch and all_gathers after, so no
      token is computed twice. The local token count must divide by their size.
    reduce_axes: axes that split f ("tensor-parallel experts"); the outputs are psum-ed there.
    exchange: "ragged" (jax.lax.ragged_all_to_all; TPU) | "padded" (padded_ragged_all_to_all).
    gmm_impl: the grouped matmul's impl. pad_value: fills every padding slot and the initial
      receive buffers (it never reaches the result).
    """
    ep_axes, replicated_ep_axes, reduce_axes = (
        _axes(ep_axes), _axes(replicated_ep_axes), _axes(reduce_axes))
    if exchange not in ("ragged", "padded"):
        raise ValueError(f"exchange must be 'ragged' or 'padded' in the body, got {exchange!r}")
    d = x.shape[-1]
    check_weights(w, d)
    if expert_ids.shape != x.shape[:-1] + expert_ids.shape[-1:] or (
            combine.shape != expert_ids.shape):
        raise ValueError(f"expert_ids and combine must be [..., k] over x's leading dims "
                         f"{x.shape[:-1]}: got {expert_ids.shape}, {combine.shape}")
    lead, k = x.shape[:-1], expert_ids.shape[-1]
    x, ids, combine = x.reshape(-1, d), expert_ids.reshape(-1, k), combine.reshape(-1, k)

    if replicated_ep_axes:
        parts = jax.lax.axis_size(replicated_ep_axes)
        if x.shape[0] % parts:
            raise ValueError(f"{x.shape[0]} local tokens do not split over the {parts} devices "
                             f"of replicated_ep_axes {replicated_ep_axes}")
        size = x.shape[0] // parts
        start = jax.lax.axis_index(replicated_ep_axes) * size
        x, ids, combine = (jax.lax.dynamic_slice_in_dim(a, start, size)
                           for a in (x, ids, combine))

    y = _dispatch(x, ids, combine, w, axis=ep_axes, ep_size=jax.lax.axis_size(ep_axes),
                  exchange=exchange, gmm_impl=gmm_impl, pad_value=pad_value)
    if reduce_axes:
        y = jax.lax.psum(y, reduce_axes)
    if replicated_ep_axes:
        y = jax.lax.all_gather(y, replicated_ep_axes, axis=0, tiled=True)
    return y.reshape(*lead, d)


def expert_parallel_ffn(x, w: ExpertWeights, expert_ids, combine, *, mesh, token_spec,
                        ep_axes, weight_specs: ExpertWeights | None = None,
                        replicated_ep_axes=(), reduce_axes=(), exchange: str = "auto",
                        gmm_impl: str = "auto", pad_value=0.0):
    """Dropless expert-parallel SwiGLU MoE on global arrays, via `jax.shard_map`.

    x [*lead, d] with lead = [N] or [B, T] (any number of leading dims); expert_ids, combine
    [*lead, k]; w: global ExpertWeights. Returns y [*lead, d] in x.dtype, sharded like x.

    token_spec: PartitionSpec of the leading dims (e.g. P(("data", "expert")) for [N] or
      P("data", None) for [B, T]); x gets token_spec + (None,) for d, ids/combine the same
      with k unsharded. A spec of all of x whose last (d) entry is None is accepted too. Tokens must not be split over reduce_axes or replicated_ep_axes.
    ep_axes: mesh axes (a name or tuple) the experts are split over.
    weight_specs: ExpertWeights of PartitionSpecs; default gate/up P(ep_axes, None, reduce),
      down P(ep_axes, reduce, None). The expert dim must be split over exactly ep_axes and f
      over exactly reduce_axes (anything else would mis-sum).
    replicated_ep_axes, reduce_axes, pad_value: see `expert_parallel_body`.
    exchange: "auto" (ragged when the mesh's devices are TPUs, else padded) | "ragged" |
      "padded". gmm_impl: "auto" | "xla" | "pallas".
    """
    ep_axes, replicated_ep_axes, reduce_axes = (
        _axes(ep_axes), _axes(replicated_ep_axes), _axes(reduce_axes))
    exchange = resolve_exchange(exchange, mesh)
    for name, axes in (("ep_axes", ep_axes), ("replicated_ep_axes", replicated_ep_axes),
                       ("reduce_axes", reduce_axes)):
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(f"{name} {unknown} are not axes of the mesh {dict(mesh.shape)}")
    if not ep_axes:
        raise ValueError("ep_axes must name at least one mesh axis")
    if not set(replicated_ep_axes) <= set(ep_axes):
        raise ValueError(f"replicated_ep_axes {replicated_ep_axes} must be among ep_axes "
                         f"{ep_axes}")
    if set(reduce_axes) & set(ep_axes):
        raise ValueError(f"reduce_axes {reduce_axes} and ep_axes {ep_axes} must be disjoint")
    check_weights(w, x.shape[-1])
    ep_size = math.prod(mesh.shape[a] for a in ep_axes)
    if w.gate.shape[0] % ep_size:
        raise ValueError(f"{w.gate.shape[0]} experts do not split over the {ep_size} devices "
                         f"of ep_axes {ep_axes}")

    token_spec = tuple(token_spec)
    if len(token_spec) == x.ndim and token_spec[-1] is None:
        token_spec = token_spec[:-1]     # a spec of the whole x, d unsharded, is accepted too
    token_spec = P(*token_spec)
    if len(token_spec) > x.ndim - 1:
        raise ValueError(f"token_spec {token_spec} has more entries than x's leading dims "
                         f"{x.shape[:-1]}")
    token_axes = {a for entry in token_spec for a in _axes(entry)}
    if token_axes & (set(reduce_axes) | set(replicated_ep_axes)):
        raise ValueError(f"token_spec {token_spec} splits tokens over reduce_axes or "
                         f"replicated_ep_axes ({reduce_axes}, {replicated_ep_axes}): tokens "
                         f"must be replicated there")
    reduce = reduce_axes or None
    if weight_specs is None:
        weight_specs = ExpertWeights(P(ep_axes, None, reduce), P(ep_axes, None, reduce),
                                     P(ep_axes, reduce, None))
    for name, spec, f_dim in (("gate", weight_specs.gate, 2), ("up", weight_specs.up, 2),
                              ("down", weight_specs.down, 1)):
        spec = tuple(spec) + (None,) * (3 - len(spec))
        if _axes(spec[0]) != ep_axes or set(_axes(spec[f_dim])) != set(reduce_axes) or (
                _axes(spec[3 - f_dim])):
            raise ValueError(f"weight_specs.{name} = {P(*spec)}: the expert dim must be split "
                             f"over exactly ep_axes {ep_axes}, f over exactly reduce_axes "
                             f"{reduce_axes}, d not at all")

    x_spec = P(*token_spec, *(None,) * (x.ndim - len(token_spec)))
    body = functools.partial(
        expert_parallel_body, ep_axes=ep_axes, replicated_ep_axes=replicated_ep_axes,
        reduce_axes=reduce_axes, exchange=exchange, gmm_impl=gmm_impl, pad_value=pad_value)
    return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, weight_specs, x_spec, x_spec),
                         out_specs=x_spec, check_vma=False)(x, w, expert_ids, combine)
