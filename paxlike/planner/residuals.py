"""Saved activations, traced: what autodiff keeps for the backward pass of a family's own
training loss under a remat policy (`jax.ad_checkpoint`'s saved_residuals, abstract: no FLOPs,
no memory), and their per-device bytes for a plan's local batch and tensor split. Part of the
cost model (`paxlike.planner.cost`): a trace of the model itself, not a formula that could
drift from it."""

from __future__ import annotations

import functools
import math

from paxlike.errors import UserError

_PROBE_BATCH = 3   # traced batch size: a prime no model dimension is likely to equal
_ROUTED_PROBE = 5  # a second batch size, to tell routed (flattened) arrays from weights


@functools.lru_cache(maxsize=64)
def _residuals(model_key: str, remat: str, seq_len: int, probe: int = _PROBE_BATCH
               ) -> tuple[tuple[tuple[int, ...], int, bool], ...]:
    """(shape, itemsize, out of the layer scan) of every array autodiff saves for the backward
    pass of the training loss, for a global batch of `probe` sequences. Traced abstractly (no
    FLOPs, no memory): this is the model's own remat policy, not a formula that could drift."""
    import json

    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals

    from paxlike import family
    from paxlike.data import BATCH_KEYS
    model_cfg = ml_collections.ConfigDict(json.loads(model_key))
    model_cfg.remat = remat
    model = nnx.eval_shape(lambda: family.load(model_cfg).build(model_cfg, nnx.Rngs(0)))
    graphdef, params = nnx.split(model)

    def loss(p, batch):   # the family's own training loss (paxlike/family.py)
        return nnx.merge(graphdef, p).loss(batch).nll_sum

    batch = {k: jax.ShapeDtypeStruct((probe, seq_len),
                                     jnp.float32 if k == "weights" else jnp.int32)
             for k in BATCH_KEYS}
    out = []
    for aval, source in saved_residuals(loss, params, batch):
        if "from the argument" in source:   # parameters and inputs: counted elsewhere
            continue
        out.append((tuple(aval.shape), aval.dtype.itemsize, "scan_layers" in source))
    return tuple(out)


def saved_bytes(cfg, acts, remat: str, b: int, t: int, tp: int, weight_ways: int = 1,
                vocab_ways: int = 1, routed=None, split: bool = False, backend: str = "cpu"):
    """Per-device bytes of saved activations for `b` local sequences of `t` tokens, with heads /
    MLP dimensions split `tp` ways and the output head's vocabulary dimension `vocab_ways` (for
    arrays that carry the batch dimension). Arrays without a batch dimension are weights cast to
    the compute dtype: sharded like the weights, `weight_ways` ways.

    routed: for a mixture-of-experts model, a predicate on shapes: leave out the arrays that grow
    with the batch but carry no batch dimension (its flattened [tokens·k, ...] rows, told apart by
    a second trace with another batch size) and the batch-carrying arrays the predicate names:
    their per-device size depends on the dispatch layout, and the family's profile counts
    them (`paxlike.planner.moe`).

    split: return (per-layer bytes of the layer scan's residuals, bytes of the other arrays that
    carry the batch, bytes of those not from the layer scan) instead of the total: a pipeline
    keeps the layers' residuals per microbatch in flight and takes its weights inside the layers'
    bodies (paxlike/planner/pipeline.py); the head's are freed before the layers' backward.

    acts: the family's planner profile (`cost.profile`). backend: traced with the kernels it
    runs (`traced_impls`: "auto" traces every platform's)."""
    import json
    m = cfg.model
    key = json.dumps({**m.to_dict(), **acts.traced_impls(backend)}, sort_keys=True)
    split_dims = acts.tensor_dims if tp > 1 else set()
    found = _residuals(key, remat, t)
    grows = [False] * len(found)
    if routed is not None:
        other = _residuals(key, remat, t, _ROUTED_PROBE)
        if len(other) != len(found):
            raise UserError("the model saves a different set of arrays at another batch size; "
                            "the planner cannot tell its routed arrays apart")
        grows = [a[0] != o[0] for a, o in zip(found, other)]
    total, stacked_total, per_layer, weights, outside = 0.0, 0.0, 0.0, 0.0, 0.0
    for (shape, itemsize, scanned), grown in zip(found, grows):
        size = math.prod(shape) * itemsize
        if _PROBE_BATCH not in shape:
            if not grown:                  # a weight in the compute dtype
                total += size / weight_ways
                weights += size / weight_ways
            continue
        if routed is not None and routed(shape):
            continue
        size = size / _PROBE_BATCH * b
        rest = list(shape)
        stacked = rest.index(_PROBE_BATCH) == 1   # by the layer scan: [layers, batch, ...]
        if stacked:
            rest.pop(0)
        rest.remove(_PROBE_BATCH)
        if t in rest:
            rest.remove(t)
        if m.vocab_size in rest and not stacked:   # the output head's logits and their kin
            size /= vocab_ways
        elif split_dims & set(rest):
            size /= tp
        total += size
        outside += 0.0 if scanned else size
        if stacked:
            stacked_total += size
            per_layer += size / shape[0]
    if split:
        return per_layer, total - stacked_total - weights, outside
    return total
