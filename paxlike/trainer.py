"""The train step, the eval step, and a train state born sharded.

`Trainer` owns the compiled programs for one (config, mesh): parameters and optimizer state are
created by a jitted init whose `out_shardings` come from the logical-axis rules, so no host ever
holds a full copy; the train step has explicit in/out shardings and donates the old state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from paxlike import optim, sharding
from paxlike.config import model_module

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


@flax.struct.dataclass
class TrainState:
    step: jax.Array      # int32 scalar: number of completed optimizer steps
    params: Any          # nested dict of float32 arrays, as `nnx.to_pure_dict(nnx.state(model))`
    opt_state: Any
    rng: jax.Array       # uint32[2]; the dropout key of step s is fold_in(rng, s)


@dataclasses.dataclass
class Trainer:
    cfg: Any
    mesh: Mesh

    def __post_init__(self):
        cfg = self.cfg
        self.module = model_module(cfg)
        self.rules = sharding.get_rules(cfg.sharding, self.mesh)
        abstract_model = nnx.eval_shape(lambda: self.module.build(cfg.model, nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract_model)
        with sharding.use_rules(self.mesh, self.rules):
            param_shardings = sharding.param_shardings(abstract_params, self.mesh, self.rules)
        # Weight decay on matrices only: norm scales carry a single logical axis besides 'layers'.
        decay_mask = jax.tree.map(
            lambda v: len([n for n in sharding.variable_names(v) if n != "layers"]) > 1,
            abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        decay_mask = nnx.to_pure_dict(decay_mask)
        self.tx, self.schedule = optim.make_optimizer(cfg.optimizer, cfg.steps, decay_mask)

        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.param_shardings = nnx.to_pure_dict(param_shardings)
        abstract_pure = nnx.to_pure_dict(abstract_params)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_pure)
        self.state_shardings = TrainState(
            step=self.replicated, params=self.param_shardings,
            opt_state=optim.state_shardings(self.tx, abstract_opt, self.param_shardings,
                                            self.replicated),
            rng=self.replicated)
        self.batch_sharding = NamedSharding(
            self.mesh, sharding.batch_spec(self.rules, self.mesh,
                                           (cfg.batch_size // cfg.microbatches, cfg.seq_len)))
        self._train_step = jax.jit(
            self._train_step_impl, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
        self._eval_step = jax.jit(
            self._eval_step_impl, in_shardings=(self.param_shardings, self.batch_sharding,
                                                self.replicated),
            out_shardings=self.replicated)

    # ----------------------------------------------------------------------------- state
    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
        shapes = jax.eval_shape(self._init_impl)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def init_state(self) -> TrainState:
        lowered = jax.jit(self._init_impl, out_shardings=self.state_shardings).lower()
        # The init runs once. On CPU, LLVM's optimisation of the random-number code costs about a
        # second per initializer at compile time and buys nothing, so it is skipped.
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        options = {"xla_backend_optimization_level": 0} if on_cpu else {}
        return lowered.compile(compiler_options=options)()

    def _init_impl(self) -> TrainState:
        key = jax.random.PRNGKey(self.cfg.seed)
        init_key, rng = jax.random.split(key)
        with sharding.use_rules(self.mesh, self.rules):
            model = self.module.build(self.cfg.model, nnx.Rngs(params=init_key))
        params = nnx.to_pure_dict(nnx.state(model))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params), rng=rng)

    # ----------------------------------------------------------------------------- steps
    def _loss_sums(self, params, batch, dropout_key):
        """(Σ weight · token NLL, Σ weight) over a batch, in float32."""
        model = nnx.merge(self.graphdef, params)
        with sharding.use_rules(self.mesh, self.rules):
            logits = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                           dropout_key=dropout_key)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(nll * batch["weights"]), jnp.sum(batch["weights"])

    def _train_step_impl(self, state: TrainState, batch):
        """One optimizer step over the global batch, accumulated over `microbatches` parts.

        The loss is the mean NLL over all weighted tokens of the global batch, so splitting the
        batch into microbatches changes nothing but the order of float additions.
        """
        m = self.cfg.microbatches
        # Microbatch i takes rows i, i+m, i+2m…: every device keeps its own rows (no resharding).
        split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)
        micro = {k: split(batch[k]) for k in BATCH_KEYS}
        total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        dropout_key = jax.random.fold_in(state.rng, state.step)

        def accumulate(grads_and_loss, inputs):
            grads, loss = grads_and_loss
            mb, index = inputs
            mb = {k: sharding.constrain(v, ("batch", "length")) for k, v in mb.items()}
            scaled = lambda p: self._loss_sums(p, mb, jax.random.fold_in(dropout_key, index))[0] / total_weight
            mb_loss, mb_grads = jax.value_and_grad(scaled)(state.params)
            return (jax.tree.map(jnp.add, grads, mb_grads), loss + mb_loss), None

        with sharding.use_rules(self.mesh, self.rules):
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)),
                                            (micro, jnp.arange(m)))
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": self.schedule(state.step)}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
        return new_state, metrics

    def _eval_step_impl(self, params, batch, token_bytes):
        nll, weight = self._loss_sums(params, batch, None)
        num_bytes = jnp.sum(jnp.take(token_bytes, batch["targets"]) * batch["weights"])
        return {"nll": nll, "tokens": weight, "bytes": num_bytes}

    def abstract_batch(self) -> dict:
        shape = (self.cfg.batch_size, self.cfg.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32,
                                        sharding=self.batch_sharding) for k in BATCH_KEYS}

    def compile(self, state=None):
        """Compiles the train step ahead of time (for `state`, else the abstract state)."""
        state = self.abstract_state() if state is None else state
        self._compiled_train_step = self._train_step.lower(state, self.abstract_batch()).compile()
        return self._compiled_train_step

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        step = getattr(self, "_compiled_train_step", None) or self._train_step
        return step(state, {k: batch[k] for k in BATCH_KEYS})

    def eval_step(self, params, batch, token_bytes: jax.Array) -> dict:
        return self._eval_step(params, {k: batch[k] for k in BATCH_KEYS}, token_bytes)

    def flops_per_step(self) -> float:
        tokens = self.cfg.batch_size * self.cfg.seq_len
        return self.module.flops_per_token(self.cfg.model, self.cfg.seq_len) * tokens
