"""Shardings and compiled programs for one (config, mesh): the train step, the eval step and a
train state born sharded.

The step itself is in paxlike/step.py (model loss, gradient schedule, update rule); here it gets
its shardings. Parameters and optimizer state are created by a jitted init whose `out_shardings`
come from the logical-axis rules, so no host ever holds a full copy; the train step has explicit
in/out shardings and donates the old state.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from paxlike import family, optim, outer, pipeline, sharding, step
from paxlike.errors import UserError
from paxlike.metrics import RESERVED_KEYS
from paxlike.data import BATCH_KEYS
from paxlike.step import TrainState

@dataclasses.dataclass
class Trainer:
    cfg: object
    mesh: Mesh

    def __post_init__(self):
        cfg = self.cfg
        self.module = family.load(cfg.model)
        self.rules = sharding.get_rules(cfg.sharding, self.mesh)
        abstract_model = nnx.eval_shape(lambda: self.module.build(cfg.model, nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract_model)
        self.model_type = type(abstract_model)
        self.pipeline = self._pipeline_spec(abstract_model)   # its errors before the sharding's
        with sharding.use_rules(self.mesh, self.rules):
            param_shardings = sharding.param_shardings(abstract_params, self.mesh, self.rules)
        # Weight decay on matrices only: norm scales carry a single logical axis besides 'layers'.
        decay_mask = jax.tree.map(
            lambda v: len([n for n in sharding.variable_names(v) if n != "layers"]) > 1,
            abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.update = optim.make_update_rule(cfg.optimizer, cfg.steps, nnx.to_pure_dict(decay_mask))
        # With an outer optimizer every `data` index is a replica training on its own
        # (paxlike/outer.py); inside one, the rules without `data`.
        layer_axes = jax.tree.map(
            lambda v: sharding.variable_names(v).index("layers")
            if "layers" in sharding.variable_names(v) else -1,
            abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.outer = outer.Outer.from_config(
            cfg, self.mesh.shape[outer.AXIS],
            tuple(None if a < 0 else a for a in jax.tree.leaves(nnx.to_pure_dict(layer_axes))))
        self.step_rules = outer.replica_rules(self.rules) if self.outer else self.rules
        aux_weights = family.aux_loss_weights(cfg.model)
        global_stats = getattr(abstract_model, "reads_global_stats", True)
        self.schedule = (step.Accumulate(cfg.microbatches, aux_weights, global_stats)
                         if self.pipeline is None else
                         step.Pipeline(self.pipeline, aux_weights, global_stats))

        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.param_shardings = nnx.to_pure_dict(param_shardings)
        abstract_pure = nnx.to_pure_dict(abstract_params)
        opt_shardings = self.update.state_shardings(jax.eval_shape(self.update.init, abstract_pure),
                                                    self.param_shardings, self.replicated)
        if self.outer:
            opt_shardings = self.outer.state_shardings(self.param_shardings, opt_shardings)
        self.state_shardings = TrainState(step=self.replicated, params=self.param_shardings,
                                          opt_state=opt_shardings, rng=self.replicated)
        # Each microbatch is split over the batch axes (a pipeline's are those inside a stage);
        # the global batch arrives split over them too, and a pipeline's also over `pipeline`.
        rows = cfg.batch_size // cfg.microbatches
        if self.pipeline is None:
            spec = sharding.batch_spec(self.rules, self.mesh, (rows, cfg.seq_len))
        else:
            sharding.batch_spec(pipeline.stage_rules(self.rules), self.mesh, (rows, cfg.seq_len))
            spec = sharding.batch_spec(self.rules, self.mesh, (cfg.batch_size, cfg.seq_len))
        self.batch_sharding = NamedSharding(self.mesh, spec)
        self.length_order = self._length_order()
        # The model's loss parts, traced abstractly on what one loss call sees (a microbatch, or
        # a pipeline's whole batch): their names are checked now, before a run writes anything.
        call_rows = rows if self.pipeline is None else cfg.batch_size
        call = {k: jax.ShapeDtypeStruct((call_rows, cfg.seq_len), v.dtype)
                for k, v in self.abstract_batch().items()}
        parts = jax.eval_shape(self._pipelined_loss, abstract_pure, call, None, None)
        family.check_loss_names(parts, aux_weights, RESERVED_KEYS)

        self._programs = {}   # sync fragments -> the jitted train step ((): no outer step)
        self._train_step = self.program(())
        self._eval_step = jax.jit(
            functools.partial(step.eval_sums, self._pipelined_loss),
            in_shardings=(self.param_shardings, self.batch_sharding, self.replicated),
            out_shardings=self.replicated)

    def loss(self, params, batch, dropout_key, stats, rules=None) -> family.ModelLoss:
        """The model family's loss on a batch, with activations sharded by the rules (`rules`:
        other ones, e.g. those inside a replica)."""
        model = nnx.merge(self.graphdef, params)
        with sharding.use_rules(self.mesh, self.rules if rules is None else rules):
            return model.loss(batch, dropout_key=dropout_key, stats=stats)

    def _pipelined_loss(self, params, batch, dropout_key, stats) -> family.ModelLoss:
        with pipeline.use(self.pipeline):
            return self.loss(params, batch, dropout_key, stats)

    def _length_order(self):
        """The zigzag token order when ring attention splits the length over devices (each
        device then holds chunks i and 2n-1-i of a row: equal causal work), else None."""
        if self.cfg.model.get("context_parallel", "all_gather") != "ring":
            return None
        ways = math.prod(self.mesh.shape[a] for a in self.rules["length"]
                         if a in self.mesh.shape)
        if ways == 1:
            return None
        if self.cfg.seq_len % (2 * ways):
            raise UserError(f"seq_len={self.cfg.seq_len} must be a multiple of 2 x {ways} (the "
                            f"devices splitting the length) for ring attention's zigzag order")
        from paxlike.kernels.attention import zigzag_order
        return zigzag_order(self.cfg.seq_len, ways)

    def _pipeline_spec(self, abstract_model) -> pipeline.PipelineSpec | None:
        """The pipeline schedule when mesh.pipeline > 1, after checking that it fits the model."""
        cfg, stages = self.cfg, self.mesh.shape["pipeline"]
        stacked = getattr(abstract_model, "layers", None)
        num_layers = jax.tree.leaves(nnx.state(stacked))[0].shape[0] if stacked is not None else 0
        if stages > 1 and stacked is None:
            raise UserError(f"mesh.pipeline={stages}: model family {cfg.model.module} has no "
                            f"stacked `layers` to split into stages; set mesh.pipeline=1")
        return pipeline.checked_spec(stages, cfg.microbatches, cfg.pipeline_repeats, num_layers,
                                     cfg.pipeline_fsdp_gather)

    @property
    def _update_buffers(self):
        """The model's `update_buffers(stats)` as params -> params, or None when it has none."""
        if not hasattr(self.model_type, "update_buffers"):
            return None

        def apply(params, stats):
            model = nnx.merge(self.graphdef, params)
            model.update_buffers(stats)
            return nnx.to_pure_dict(nnx.state(model))
        return apply

    def _train_step_impl(self, state: TrainState, batch: dict, sync: tuple[int, ...] = ()):
        # Traced under the rules: the schedule's microbatch constraints shard by them too.
        with sharding.use_rules(self.mesh, self.step_rules):
            loss_fn = functools.partial(self.loss, rules=self.step_rules)
            one = functools.partial(step.train_step, loss_fn=loss_fn, schedule=self.schedule,
                                    update=self.update, update_buffers=self._update_buffers)
            if self.outer is None:
                return one(state, batch)
            return self.outer.step(state, batch, one, sync)

    def program(self, sync: tuple[int, ...]):
        """The jitted train step that ends with the outer step of the fragments `sync` (()
        for none: every step without an outer optimizer)."""
        if sync not in self._programs:
            self._programs[sync] = jax.jit(
                functools.partial(self._train_step_impl, sync=sync),
                in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
        return self._programs[sync]

    def consolidate(self, state: TrainState) -> TrainState:
        """The state whose `params` are the model to evaluate and save (paxlike/outer.py)."""
        if self.outer is None or self.outer.method != "noloco":
            return state
        if not hasattr(self, "_consolidate"):
            with sharding.use_rules(self.mesh, self.rules):
                self._consolidate = jax.jit(self.outer.consolidate,
                                            in_shardings=(self.state_shardings,),
                                            out_shardings=self.state_shardings,
                                            donate_argnums=(0,))
        return self._consolidate(state)

    # ----------------------------------------------------------------------------- state
    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
        shapes = jax.eval_shape(self._init_impl)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def init_state(self, params=None) -> TrainState:
        """A fresh, sharded train state: initialised parameters, or `params` (a tree like the
        parameters, e.g. a seed model's or imported weights) with a fresh optimizer state around
        them (with an outer optimizer, every replica starting from them)."""
        if params is not None:
            return jax.jit(self._state_around, in_shardings=(self.param_shardings,),
                           out_shardings=self.state_shardings)(params)
        lowered = jax.jit(self._init_impl, out_shardings=self.state_shardings).lower()
        # The init runs once. On CPU, LLVM's optimisation of the random-number code costs about a
        # second per initializer at compile time and buys nothing, so it is skipped.
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        options = {"xla_backend_optimization_level": 0} if on_cpu else {}
        return lowered.compile(compiler_options=options)()

    def _keys(self):
        """(the parameters' init key, the state's dropout key) from the seed."""
        return jax.random.split(jax.random.PRNGKey(self.cfg.seed))

    def _init_impl(self) -> TrainState:
        init_key, _ = self._keys()
        with sharding.use_rules(self.mesh, self.rules):
            model = self.module.build(self.cfg.model, nnx.Rngs(params=init_key))
        return self._state_around(nnx.to_pure_dict(nnx.state(model)))

    def _state_around(self, params) -> TrainState:
        _, rng = self._keys()
        opt_state = (self.outer.init(params, self.update.init) if self.outer
                     else self.update.init(params))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                          rng=rng)

    # ----------------------------------------------------------------------------- steps
    def abstract_batch(self) -> dict:
        shape = (self.cfg.batch_size, self.cfg.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32,
                                        sharding=self.batch_sharding) for k in BATCH_KEYS}

    def compile(self, state=None, sync: tuple[int, ...] = ()):
        """Compiles a train step ahead of time (for `state`, else the abstract state): by default
        the one every step runs (with an outer optimizer, the inner steps')."""
        state = self.abstract_state() if state is None else state
        compiled = self.program(sync).lower(state, self.abstract_batch()).compile()
        if not sync:
            self._compiled_train_step = compiled
        return compiled

    def syncs_after(self, step: int) -> tuple[int, ...]:
        """The outer-step fragments optimizer step `step` (from 1) ends with; () for none."""
        return self.outer.syncs_after(step) if self.outer and step else ()

    def train_step(self, state: TrainState, batch, step: int | None = None
                   ) -> tuple[TrainState, dict]:
        """One train step; with an outer optimizer `step` (the optimizer step this is, from 1)
        says whether it ends with an outer step."""
        sync = self.syncs_after(step) if step is not None else ()
        compiled = (getattr(self, "_compiled_train_step", None) if not sync else None
                    ) or self.program(sync)
        return compiled(state, {k: batch[k] for k in BATCH_KEYS})

    def eval_step(self, params, batch, token_bytes: jax.Array) -> dict:
        return self._eval_step(params, {k: batch[k] for k in BATCH_KEYS}, token_bytes)

    def flops_per_step(self) -> float:
        tokens = self.cfg.batch_size * self.cfg.seq_len
        return self.module.flops_per_token(self.cfg.model, self.cfg.seq_len) * tokens
