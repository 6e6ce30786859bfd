"""Training across weak links: replicas that synchronise every H steps instead of every step.

With `optimizer.outer` set, every index of the `data` mesh axis is a *replica*: it keeps its own
parameters and inner optimizer state (a leading [R] dimension sharded over `data`) and trains on
its own rows of the global batch with the ordinary train step (paxlike/step.py), `vmap`ped over
the replicas with `spmd_axis_name="data"`, so inside a replica FSDP / tensor sharding work as
usual and no collective crosses `data`. Every `outer_every` (H) steps an outer step runs:

  diloco   pseudo-gradient Δ = θ − mean_r θ_r (θ: the outer parameters, `TrainState.params`),
           Nesterov momentum m ← μ m + Δ, θ ← θ − lr (Δ + μ m), every replica restarts from θ.
           One all-reduce of the parameters over `data` per H steps. With `outer_fragments` F > 1
           (streaming DiLoCo) the layer stack is cut into F strided fragments (layer l is in
           fragment l mod F; embedding, head and norms in fragment 0), and fragment f syncs
           after steps f·H/F + kH: the same bytes per H steps, 1/F of them at a time.
  noloco   no all-reduce: each replica keeps its own outer parameters φ_r and momentum, and
           averages with one peer, m_r ← μ m_r + lr·mean_pair(θ − φ) + lr·(mean_pair(φ) − φ_r),
           φ_r ← φ_r + m_r, θ_r ← φ_r. Pairs are a perfect matching drawn per round from a seeded
           stream (one of the R − 1 matchings of a round-robin schedule, so that every pairing
           is a static `ppermute`); the exchange is two parameter-sized permutes. The model
           (`TrainState.params`) is the replicas' mean, computed only when it is read (eval,
           checkpoints: `consolidate`), so that cost is outside the train step.
  co2      DiLoCo with the outer update one round late: after round r the replicas' local
           pseudo-gradients are kept unreduced, and their all-reduce runs in the sync step of
           round r + 1, where nothing in that step's forward / backward pass depends on it (the
           compiler may overlap it: docs/lowcomm.md says what the compiled schedules do). The
           outer step at the end of round r + 1 applies round r's mean. CO2's staleness penalty
           and momentum clipping are not implemented.

A replica whose loss, gradient norm or parameters are not finite is left out of every mean (so
its NaN never spreads), reported in the step's `bad_replicas` metric, and restarted at the
sync from the outer parameters (noloco: its peer's) with its inner moments zeroed. The step's
`loss` and other metrics are means over the finite replicas (NaN only when none is finite, which
the health policy then handles).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from paxlike.errors import UserError
from paxlike.step import TrainState

METHODS = ("none", "diloco", "noloco", "co2")
AXIS = "data"     # the replica axis
META_KEY = "outer"


def validate(opt) -> list[str]:
    """Problems with the outer-optimizer keys of the optimizer section."""
    method = opt.get("outer", "none")
    if method not in METHODS:
        return [f"optimizer.outer={method!r}; choose one of {', '.join(METHODS)}"]
    if method == "none":
        return []
    problems = []
    every, fragments = opt.get("outer_every", 50), opt.get("outer_fragments", 1)
    if not isinstance(every, int) or every < 1:
        problems.append(f"optimizer.outer_every={every!r} must be an integer >= 1")
    if opt.get("outer_lr", 0.7) <= 0:
        problems.append(f"optimizer.outer_lr={opt.outer_lr} must be > 0")
    if not 0 <= opt.get("outer_momentum", 0.9) < 1:
        problems.append(f"optimizer.outer_momentum={opt.outer_momentum} must be in [0, 1)")
    if not isinstance(fragments, int) or fragments < 1:
        problems.append(f"optimizer.outer_fragments={fragments!r} must be an integer >= 1")
    elif fragments > 1 and method != "diloco":
        problems.append(f"optimizer.outer_fragments={fragments} (streaming) needs "
                        f"optimizer.outer=diloco, not {method}")
    elif isinstance(every, int) and every >= 1 and fragments > every:
        problems.append(f"optimizer.outer_fragments={fragments} must be <= optimizer.outer_every"
                        f"={every} (each fragment syncs once per {every} steps)")
    return problems


def replica_rules(rules) -> dict[str, tuple[str, ...]]:
    """The sharding rules inside a replica: every logical name without the replica axis."""
    return {name: tuple(a for a in axes if a != AXIS) for name, axes in rules.items()}


def matchings(replicas: int) -> list[list[tuple[int, int]]]:
    """The R − 1 perfect matchings of a round-robin schedule (circle method): every pair of
    replicas meets in exactly one of them."""
    last, rounds = replicas - 1, []
    for k in range(last):
        pairs = [(k, last)] + [((k + i) % last, (k - i) % last) for i in range(1, replicas // 2)]
        rounds.append(pairs)
    return rounds


def _per_replica(sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(sharding.mesh, PartitionSpec(AXIS, *sharding.spec))


def _finite_rows(tree) -> jax.Array:
    """[R] bool: every element of replica r's arrays is finite."""
    rows = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
            for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(rows).all(axis=0)


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def _mean_rows(x: jax.Array, ok: jax.Array) -> jax.Array:
    """Mean over the replicas (dimension 0) whose `ok` is set; zeros when none is."""
    total = jnp.sum(jnp.where(_rows(ok, x), x, 0), axis=0)
    return total / jnp.maximum(jnp.sum(ok), 1).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Outer:
    method: str
    every: int
    lr: float
    momentum: float
    fragments: int
    replicas: int
    seed: int
    # per parameter leaf (flattened order): the index of its 'layers' dimension, or None
    layer_axes: tuple

    @classmethod
    def from_config(cls, cfg, replicas: int, layer_axes: tuple) -> Outer | None:
        opt = cfg.optimizer
        method = opt.get("outer", "none")
        if method == "none":
            return None
        if method == "noloco" and (replicas < 2 or replicas % 2):
            raise UserError(f"optimizer.outer=noloco pairs replicas, so mesh.data={replicas} must "
                            f"be even and >= 2")
        if cfg.mesh.get("pipeline", 1) > 1:
            raise UserError("optimizer.outer with mesh.pipeline > 1 is not supported; set "
                            "mesh.pipeline=1 (replicas may use fsdp, tensor, expert, context)")
        return cls(method, int(opt.outer_every), float(opt.outer_lr), float(opt.outer_momentum),
                   int(opt.get("outer_fragments", 1)), replicas, int(cfg.seed), layer_axes)

    # ------------------------------------------------------------------ schedule (on the host)
    def offset(self, fragment: int) -> int:
        return fragment * self.every // self.fragments

    def syncs_after(self, step: int) -> tuple[int, ...]:
        """The fragments synchronised after optimizer step `step` (counted from 1): () for an
        inner step, (0,) for a whole sync when there is one fragment."""
        return tuple(f for f in range(self.fragments)
                     if step > 0 and step >= self.offset(f)
                     and (step - self.offset(f)) % self.every == 0)

    def meta(self) -> dict:
        return {"method": self.method, "replicas": self.replicas, "fragments": self.fragments}

    # ------------------------------------------------------------------------------- state
    def init(self, params, inner_init: Callable) -> dict:
        """The update rule's state: every replica starts from `params`."""
        copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (self.replicas,) + p.shape), params)
        state = {"replicas": copies, "inner": jax.vmap(inner_init)(copies)}
        per_replica = self.method == "noloco"
        state["momentum"] = jax.tree.map(jnp.zeros_like, copies if per_replica else params)
        if self.method == "noloco":
            state["anchors"] = copies
        if self.method == "co2":
            state["pending"] = jax.tree.map(jnp.zeros_like, copies)
        return state

    def state_shardings(self, param_shardings, inner_shardings) -> dict:
        per_replica = lambda tree: jax.tree.map(_per_replica, tree)
        shardings = {"replicas": per_replica(param_shardings),
                     "inner": per_replica(inner_shardings)}
        shardings["momentum"] = (per_replica(param_shardings) if self.method == "noloco"
                                 else param_shardings)
        if self.method == "noloco":
            shardings["anchors"] = per_replica(param_shardings)
        if self.method == "co2":
            shardings["pending"] = per_replica(param_shardings)
        return shardings

    # ------------------------------------------------------------------------- the step
    def step(self, state: TrainState, batch: dict, inner_step: Callable,
             sync: tuple[int, ...] = ()) -> tuple[TrainState, dict]:
        """One inner step of every replica (`inner_step(state, rows) -> (state, metrics)`, the
        ordinary train step), then the outer step of the fragments in `sync`."""
        outer_state = state.opt_state
        rows = {k: v.reshape((self.replicas, -1) + v.shape[1:]) for k, v in batch.items()}

        def one(params, inner, replica_rows, index):
            replica = TrainState(step=state.step, params=params, opt_state=inner,
                                 rng=jax.random.fold_in(state.rng, index))
            new, metrics = inner_step(replica, replica_rows)
            return new.params, new.opt_state, metrics

        replicas, inner, metrics = jax.vmap(one, spmd_axis_name=AXIS)(
            outer_state["replicas"], outer_state["inner"], rows, jnp.arange(self.replicas))
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        outer_state = dict(outer_state, replicas=replicas, inner=inner)
        params = state.params
        if sync:
            ok = ok & _finite_rows(replicas)
            update = {"diloco": self._diloco, "co2": self._co2, "noloco": self._noloco}
            params, outer_state = update[self.method](params, outer_state, ok, sync, state.step)
            outer_state = self._repair(outer_state, ok, params)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=outer_state,
                               rng=state.rng)
        return new_state, self._metrics(metrics, ok)

    def _metrics(self, metrics: dict, ok: jax.Array) -> dict:
        count = jnp.sum(ok).astype(jnp.float32)
        means = {k: jnp.sum(jnp.where(ok, v, 0.0)) / count for k, v in metrics.items()}
        means["learning_rate"] = metrics["learning_rate"][0]
        means["bad_replicas"] = self.replicas - count
        return means

    def consolidate(self, state: TrainState) -> TrainState:
        """The state with `params` the model every replica agrees on: for noloco the mean of the
        replicas' outer parameters (one all-reduce, paid only here); else unchanged."""
        if self.method != "noloco":
            return state
        anchors = state.opt_state["anchors"]
        ok = _finite_rows(anchors)
        return state.replace(params=jax.tree.map(lambda a: _mean_rows(a, ok), anchors))

    # --------------------------------------------------------------- fragments of the tree
    def _slices(self, fragment: int):
        """Per parameter leaf: the index into it that fragment `fragment` covers (None: the
        leaf is not in it). Replica arrays take the same index after their [R] dimension."""
        out = []
        for axis in self.layer_axes:
            if self.fragments == 1:
                out.append(())
            elif axis is None:
                out.append(() if fragment == 0 else None)
            else:
                out.append((slice(None),) * axis + (slice(fragment, None, self.fragments),))
        return out

    def _map_fragments(self, fn, sync, shared: list, per_replica: list):
        """Applies `fn(shared_parts, replica_parts) -> (shared_parts, replica_parts)` leaf by leaf
        to the fragments in `sync` of each tree in `shared` (shaped like the params) and
        `per_replica` ([R] + the params' shape), writing the results back."""
        flat_s = [jax.tree.flatten(t) for t in shared]
        flat_r = [jax.tree.flatten(t) for t in per_replica]
        leaves_s = [list(leaves) for leaves, _ in flat_s]
        leaves_r = [list(leaves) for leaves, _ in flat_r]
        for fragment in sync:
            for i, index in enumerate(self._slices(fragment)):
                if index is None:
                    continue
                rindex = (slice(None),) + index
                new_s, new_r = fn([ls[i][index] for ls in leaves_s],
                                  [lr[i][rindex] for lr in leaves_r])
                for ls, value in zip(leaves_s, new_s):
                    ls[i] = ls[i].at[index].set(value) if index else value
                for lr, value in zip(leaves_r, new_r):
                    lr[i] = lr[i].at[rindex].set(value) if index else value
        return ([jax.tree.unflatten(tdef, ls) for (_, tdef), ls in zip(flat_s, leaves_s)],
                [jax.tree.unflatten(tdef, lr) for (_, tdef), lr in zip(flat_r, leaves_r)])

    def _nesterov(self, theta, momentum, delta, keep):
        momentum_new = self.momentum * momentum + delta
        theta_new = theta - self.lr * (delta + self.momentum * momentum_new)
        return jnp.where(keep, theta_new, theta), jnp.where(keep, momentum_new, momentum)

    # ------------------------------------------------------------------- the outer steps
    def _diloco(self, params, outer_state, ok, sync, step):
        keep = jnp.any(ok)

        def update(shared, per_replica):
            theta, momentum = shared
            (replicas,) = per_replica
            delta = theta - _mean_rows(replicas, ok)           # all-reduce over the replicas
            theta, momentum = self._nesterov(theta, momentum, delta, keep)
            return [theta, momentum], [jnp.broadcast_to(theta, replicas.shape)]

        (params, momentum), (replicas,) = self._map_fragments(
            update, sync, [params, outer_state["momentum"]], [outer_state["replicas"]])
        return params, dict(outer_state, replicas=replicas, momentum=momentum)

    def _co2(self, params, outer_state, ok, sync, step):
        pending_ok = _finite_rows(outer_state["pending"])
        keep = jnp.any(pending_ok)

        def update(shared, per_replica):
            theta, momentum = shared
            replicas, pending = per_replica
            # Round r - 1's mean: it does not depend on this step's work, so its all-reduce
            # may run beside it.
            delta = _mean_rows(pending, pending_ok)
            fresh = jnp.where(_rows(ok, replicas), theta - replicas, 0.0)   # round r's, unreduced
            theta, momentum = self._nesterov(theta, momentum, delta, keep)
            return [theta, momentum], [jnp.broadcast_to(theta, replicas.shape), fresh]

        (params, momentum), (replicas, pending) = self._map_fragments(
            update, sync, [params, outer_state["momentum"]],
            [outer_state["replicas"], outer_state["pending"]])
        return params, dict(outer_state, replicas=replicas, momentum=momentum, pending=pending)

    def _noloco(self, params, outer_state, ok, sync, step):
        exchange = self._exchange(step)
        ok_peer = exchange(ok)

        def update(shared, per_replica):
            replicas, anchors, momentum = per_replica
            local = replicas - anchors
            local_peer, anchors_peer = exchange(local), exchange(anchors)
            both = _rows(ok_peer, replicas)
            mean_local = jnp.where(both, (local + local_peer) / 2, local)
            mean_anchor = jnp.where(both, (anchors + anchors_peer) / 2, anchors)
            momentum_new = (self.momentum * momentum + self.lr * mean_local
                            + self.lr * (mean_anchor - anchors))
            anchors_new = anchors + momentum_new
            # A replica that is not finite restarts from its peer's outer parameters.
            mine = _rows(ok, replicas)
            anchors_new = jnp.where(mine, anchors_new, anchors_peer)
            momentum_new = jnp.where(mine, momentum_new, 0.0)
            return [], [anchors_new, anchors_new, momentum_new]

        _, (replicas, anchors, momentum) = self._map_fragments(
            update, sync, [], [outer_state["replicas"], outer_state["anchors"],
                               outer_state["momentum"]])
        return params, dict(outer_state, replicas=replicas, anchors=anchors, momentum=momentum)

    def _exchange(self, step: jax.Array) -> Callable:
        """x [R, ...] -> its peer's rows, for this round's matching (chosen from a stream seeded
        by `seed` and the round number; each matching is a static `ppermute` over `data`)."""
        rounds = matchings(self.replicas)
        perms = [[p for a, b in pairs for p in ((a, b), (b, a))] for pairs in rounds]
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), (step + 1) // self.every)
        choice = jax.random.randint(key, (), 0, len(perms))

        def permute(x, perm):
            from paxlike import sharding
            active = sharding.active_rules()
            if active is None:    # one device: the permutation as an index
                order = np.zeros(self.replicas, np.int32)
                for src, dst in perm:
                    order[dst] = src
                return x[order]
            return jax.shard_map(lambda b: jax.lax.ppermute(b, AXIS, perm), mesh=active[0],
                                 in_specs=PartitionSpec(AXIS), out_specs=PartitionSpec(AXIS),
                                 axis_names=frozenset({AXIS}), check_vma=False)(x)

        def exchange(x):
            if len(perms) == 1:
                return permute(x, perms[0])
            return jax.lax.switch(choice, [lambda v, p=p: permute(v, p) for p in perms], x)
        return exchange

    def _repair(self, outer_state, ok, params):
        """Replicas that were not finite: their inner moments zeroed (the step counts kept, so
        their learning-rate schedule goes on), their parameters already reset by the outer step
        where it covered them, and everywhere else set to the outer parameters."""
        bad = ~ok
        inner = jax.tree.map(
            lambda x: jnp.where(_rows(bad, x), 0, x) if jnp.issubdtype(x.dtype, jnp.floating)
            else x, outer_state["inner"])
        if self.method == "noloco":
            source = outer_state["anchors"]
        else:
            source = jax.tree.map(lambda r, p: jnp.broadcast_to(p, r.shape),
                                  outer_state["replicas"], params)
        replicas = jax.tree.map(lambda r, s: jnp.where(_rows(bad, r), s, r),
                                outer_state["replicas"], source)
        return dict(outer_state, replicas=replicas, inner=inner)


def check_resume(saved_meta: dict | None, step: int | None, outer: Outer | None) -> None:
    """A checkpoint holds every replica's own state: it resumes only with the same method and
    replica count (the other mesh axes may change). Raises UserError otherwise."""
    if saved_meta is None:
        return
    saved = saved_meta.get(META_KEY) or {"method": "none"}
    method = outer.method if outer else "none"
    if saved["method"] != method:
        raise UserError(
            f"the checkpoint of step {step} was written with optimizer.outer={saved['method']}, "
            f"this run has optimizer.outer={method}: their optimizer states differ; resume with "
            f"--config.optimizer.outer={saved['method']}, or start a new workdir")
    if outer and (saved["replicas"], saved.get("fragments", 1)) != (outer.replicas,
                                                                   outer.fragments):
        raise UserError(
            f"the checkpoint of step {step} holds {saved['replicas']} {method} replicas "
            f"({saved.get('fragments', 1)} fragments), this run has mesh.data={outer.replicas} "
            f"({outer.fragments}): each replica's parameters and optimizer state are its own, "
            f"so resume with --config.mesh.data={saved['replicas']} and "
            f"--config.optimizer.outer_fragments={saved.get('fragments', 1)} (the other mesh "
            f"axes may change)")
