"""Logical axis names -> mesh axes.

Models name every dimension of every weight and activation logically ('embed', 'heads', 'batch'…)
and never mention mesh axes. A rules table (plain data, chosen by name in the config) maps each
logical name to an ordered tuple of mesh axes. This module is the one place where that mapping
happens, for parameters (`param_shardings`) and activations (`constrain`).

A rule's mesh axes are applied in order, skipping an axis already used by an earlier dimension of
the same array and axes of size 1. A dimension that the remaining axes do not divide is an error:
silently replicating it would hide a memory blow-up until the job runs on the real fleet.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Mapping, Sequence

import flax
import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from paxlike.errors import UserError

# paxlike places parameters itself (born sharded by a jitted init with out_shardings); Flax's
# eager sharding would instead demand a mesh while a model is merely being described.
flax.config.update("flax_always_shard_variable", False)

Rules = Mapping[str, tuple[str, ...]]

# Logical names used by models. Weights: vocab, embed, heads, kv_heads, head_dim, mlp, layers.
# Activations: batch, length, act_embed (the model dimension of activations), plus heads/kv_heads/
# mlp/vocab, which shard the same way on weights and activations.
# Stacked layers are split into pipeline stages (paxlike/pipeline.py).
_COMMON = {"head_dim": (), "act_embed": (), "layers": ("pipeline",), "state": ()}
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # Weights sharded over fsdp on the model dimension, and over tensor on heads / mlp / vocab.
    "fsdp_tp": {**_COMMON, "batch": ("data", "pipeline", "fsdp", "expert"), "length": ("context",),
                "embed": ("fsdp",), "vocab": ("tensor",), "heads": ("tensor",),
                "kv_heads": ("tensor",), "mlp": ("tensor",), "experts": ("expert",)},
    # MoE parallel folding (docs/moe.md): one set of devices, two layouts. Outside the MoE block
    # `tensor` splits attention heads and dense MLPs; inside it, `expert` and `tensor` together
    # split the experts (each device takes its own slice of the tokens there).
    "fold_tensor": {**_COMMON, "batch": ("data", "pipeline", "fsdp", "expert"), "length": ("context",),
                    "embed": ("fsdp",), "vocab": ("tensor",), "heads": ("tensor",),
                    "kv_heads": ("tensor",), "mlp": ("tensor",), "experts": ("expert", "tensor")},
    # Outside the MoE block `expert` splits the sequence (context parallelism); inside it, experts.
    "fold_context": {**_COMMON, "batch": ("data", "pipeline", "fsdp"), "length": ("context", "expert"),
                     "embed": ("fsdp",), "vocab": ("tensor",), "heads": ("tensor",),
                     "kv_heads": ("tensor",), "mlp": ("tensor",), "experts": ("expert",)},
    # ZeRO-3 style: every weight sharded over fsdp only; batch over every data-like axis.
    "fsdp": {**_COMMON, "batch": ("data", "pipeline", "fsdp", "expert"), "length": ("context",),
             "embed": ("fsdp",), "vocab": (), "heads": (), "kv_heads": (), "mlp": (),
             "experts": ()},
    # Plain data parallelism: weights replicated, batch over every data-like axis.
    "data": {**_COMMON, "batch": ("data", "pipeline", "fsdp", "expert"), "length": (),
             "embed": (), "vocab": (), "heads": (), "kv_heads": (), "mlp": (), "experts": ()},
}


def get_rules(preset: str, mesh: Mesh | None = None) -> dict[str, tuple[str, ...]]:
    """The rules of a named preset; with `mesh`, checks that every mesh axis in use has a rule
    (an axis no rule maps to would silently replicate all the work along it)."""
    if preset not in PRESETS:
        raise UserError(f"unknown sharding preset {preset!r}; choose one of {', '.join(PRESETS)}")
    rules = dict(PRESETS[preset])
    if mesh is not None:
        mapped = {axis for axes in rules.values() for axis in axes}
        unused = [f"mesh.{a}={n}" for a, n in mesh.shape.items() if n > 1 and a not in mapped]
        if unused:
            raise UserError(f"{', '.join(unused)} is not used by sharding preset {preset!r}, so its "
                            f"devices would all do the same work; set it to 1 or choose a preset "
                            f"that uses it ({', '.join(p for p in PRESETS if p != preset)})")
    return rules


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, rules: Rules,
                    mesh: Mesh, what: str = "array") -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry the logical `names` (`shape` None: no
    divisibility check)."""
    shape = (0,) * len(names) if shape is None else shape    # 0 is divisible by any mesh size
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} logical names {tuple(names)} for shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise UserError(f"{what}: logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        axes = tuple(a for a in rules[name] if a not in used and mesh.shape.get(a, 1) > 1)
        ways = math.prod(mesh.shape[a] for a in axes)
        if dim % ways:
            sizes = ", ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
            raise UserError(
                f"{what}: dimension {name!r} of size {dim} is not divisible by {sizes} (= {ways}); "
                f"change the model size or the mesh")
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def variable_names(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a model attached to a parameter."""
    names = variable.get_metadata().get("out_sharding")
    if names is None:
        raise ValueError(f"parameter of shape {variable.shape} has no logical axis names")
    return tuple(names)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedSharding for every parameter, from its logical names and the rules."""
    def one(path, variable):
        where = "parameter " + "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        spec = logical_to_spec(variable_names(variable), variable.shape, rules, mesh, where)
        return NamedSharding(mesh, spec)
    return jax.tree.map_with_path(one, abstract_state,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))


# The (mesh, rules) that `constrain` uses while a model is traced by the trainer.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "paxlike_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
    """Makes `constrain` shard activations on `mesh` by `rules` inside the block."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains an activation to the sharding its logical names map to.

    Outside `use_rules` (a model run on its own, e.g. in a kernel test) this returns `x` unchanged;
    the trainer always traces models inside `use_rules`, so CPU runs exercise the sharding path.
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, x.shape, rules, mesh, "activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_spec(rules: Rules, mesh: Mesh, shape: Sequence[int]) -> PartitionSpec:
    """Sharding of a [batch, length] input array."""
    return logical_to_spec(("batch", "length"), shape, rules, mesh, "input batch")


def active_rules() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `use_rules`, or None outside it."""
    return _ACTIVE.get()


def active_axes(name: str) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the active rules split logical dimension `name` over; () outside
    `use_rules`. For code that must know it runs on a block of a dimension (e.g. a recurrence
    over a sequence split over `context` passes its state between the blocks)."""
    active = _ACTIVE.get()
    if active is None:
        return ()
    mesh, rules = active
    return tuple(a for a in rules.get(name, ()) if mesh.shape.get(a, 1) > 1)


def per_shard(fn: Callable, args: Sequence, names: Sequence[Sequence[str | None]], out_names):
    """fn(*args) run once per device on its local blocks (`jax.shard_map`), with the arrays laid
    out as their logical names map under the active rules.

    For kernels the SPMD partitioner cannot split (Pallas Mosaic and Triton calls are opaque to
    it: "Mosaic kernels cannot be automatically partitioned"). `names` has one names tuple per
    argument (applied to every array of a pytree argument); `out_names` mirrors fn's result: one
    names tuple for an array, or a tuple of them for a tuple of arrays (None results allowed).
    Instead of names, an argument may come with a function mesh -> its `shard_map` in_spec (for
    a kernel object whose arrays split in their own way).
    A dimension the kernel couples, like a recurrence's length, must be named None so it arrives
    whole, unless fn handles its blocks itself (`active_axes`). Outside `use_rules` (a model run
    on its own) this is fn(*args).
    """
    active = _ACTIVE.get()
    if active is None:
        return fn(*args)
    mesh, rules = active
    in_specs = tuple(
        n(mesh) if callable(n) else
        jax.tree.map(lambda a, n=n: logical_to_spec(n, a.shape, rules, mesh, "activation"), x)
        for n, x in zip(names, args))
    # Result shapes are not known before fn runs; the inputs' checks cover their dimensions.
    out_spec = lambda n: logical_to_spec(n, None, rules, mesh, "kernel result")
    single = not out_names or not isinstance(out_names[0], (tuple, list))
    out_specs = out_spec(out_names) if single else tuple(out_spec(n) for n in out_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)
