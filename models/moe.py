"""Mixture-of-experts Transformer: the Llama-style Transformer (models/transformer.py) with a
sparse feed-forward block in every `moe_every`-th layer.

A router (float32) picks `experts_per_token` of `num_experts` SwiGLU experts for each token:
softmax top-k (optionally renormalised over the chosen k), or sigmoid top-k with a per-expert
bias that steers selection only (DeepSeek-V3's auxiliary-loss-free balancing: after every step
the bias moves by `router_bias_rate` towards under-loaded experts, outside the gradient).
Optional shared experts run on every token. Expert weights are stacked `[experts, embed, mlp]`
so the sharding rules place them (`experts` -> the `expert` mesh axis in the presets).

Dispatch (paxlike/kernels/moe, docs/moe.md): `capacity_factor > 0` drops assignments past each
expert's capacity per sequence, in position order (GShard groups; experts sharded by GSPMD with
an all-to-all); `0` is dropless: a grouped matmul, or, when the rules shard `experts` over mesh
axes, expert parallelism in a `shard_map` that exchanges tokens with all-to-all. `moe_dispatch="reference"` runs every expert on every token (the oracle).

Losses (aux, weighted by `model.aux_loss_weights`): the load-balancing loss E · Σ_i f_i · P_i
(f_i: share of the routed assignments that went to expert i, no gradient; P_i: mean router
probability of expert i) at the scope `load_balance` names — `global_batch` (f_i over the whole
global batch: every microbatch and every data shard), `micro_batch` (f_i and P_i over each
microbatch) or `sequence` (per sequence, averaged) — and the router z-loss, mean of
logsumexp(logits)². Both are averaged over the MoE layers. Every token position counts,
padding included: it occupies expert capacity like any other token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from paxlike import sharding
from paxlike.kernels import moe as kernels
from paxlike.models import layers, transformer
from paxlike.planner.moe import MoEActivations
from paxlike.sharding import constrain

ROUTERS = ("softmax", "sigmoid")
LOAD_BALANCE = ("global_batch", "micro_batch", "sequence")
DISPATCH = ("auto", "reference")


def default_config() -> ml_collections.ConfigDict:
    cfg = transformer.default_config()
    cfg.module = __name__
    cfg.update({
        "num_experts": 8,
        "experts_per_token": 2,
        "expert_mlp_dim": 0,         # 0: mlp_dim
        "moe_every": 1,              # every k-th layer is MoE (the others dense); divides num_layers
        "num_shared_experts": 0,     # dense experts of expert_mlp_dim run on every token
        "router": "softmax",         # softmax | sigmoid
        "router_renormalize": True,  # chosen experts' weights renormalised to sum to 1
        "router_bias_rate": 0.0,     # auxiliary-loss-free balancing bias step; 0 = no bias
        "capacity_factor": 0.0,      # 0 = dropless
        "load_balance": "global_batch",
        "moe_dispatch": "auto",      # auto | reference (every expert on every token: the oracle)
        "aux_loss_weights": {"load_balance": 0.01, "router_z": 0.001},
    })
    return cfg


def expert_dim(cfg) -> int:
    return cfg.expert_mlp_dim or cfg.mlp_dim


def validate(cfg) -> list[str]:
    problems = transformer.validate(cfg)
    problems += layers.not_positive(cfg, ("num_experts", "experts_per_token", "moe_every"))
    if problems:
        return problems
    if cfg.experts_per_token > cfg.num_experts:
        problems.append(f"model.experts_per_token={cfg.experts_per_token} exceeds "
                        f"model.num_experts={cfg.num_experts}")
    if cfg.num_layers % cfg.moe_every:
        problems.append(f"model.moe_every={cfg.moe_every} must divide model.num_layers="
                        f"{cfg.num_layers} (every moe_every-th layer is a MoE layer)")
    for key, choices in (("router", ROUTERS), ("load_balance", LOAD_BALANCE),
                         ("moe_dispatch", DISPATCH)):
        if cfg[key] not in choices:
            problems.append(f"model.{key}={cfg[key]!r}; choose one of {list(choices)}")
    for key in ("expert_mlp_dim", "num_shared_experts", "capacity_factor", "router_bias_rate"):
        if cfg[key] < 0:
            problems.append(f"model.{key}={cfg[key]} must be >= 0")
    if cfg.moe_dispatch == "reference" and cfg.capacity_factor > 0:
        problems.append("model.moe_dispatch='reference' is dropless; set model.capacity_factor=0 "
                        "or model.moe_dispatch='auto'")
    return problems


class RouterBias(nnx.Variable):
    """A per-expert selection bias: not trained by the optimizer (it only enters through
    `stop_gradient`), changed by `MoETransformer.update_buffers` after each step."""


class Router(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.kind, self.k, self.renormalize = cfg.router, cfg.experts_per_token, cfg.router_renormalize
        self.w = layers.param(rngs, layers.scaled_normal(cfg.d_model), (cfg.d_model, cfg.num_experts),
                              ("embed", None))
        self.bias = (RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32), out_sharding=(None,))
                     if cfg.router_bias_rate > 0 else None)

    def __call__(self, x):
        """x [B, T, d] -> (expert ids [B, T, k], combine weights [B, T, k], probabilities
        [B, T, E] (what balancing and entropy measure), logits [B, T, E]); all float32."""
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), self.w[...])
        if self.kind == "softmax":
            scores = probs = jax.nn.softmax(logits, axis=-1)
        else:
            scores = jax.nn.sigmoid(logits)
            probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        select = scores if self.bias is None else scores + jax.lax.stop_gradient(self.bias[...])
        _, ids = jax.lax.top_k(select, self.k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        if self.renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return ids, weights, probs, logits


class MoEFFN(nnx.Module):
    """Router, routed experts and optional shared experts."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        e, d, f = cfg.num_experts, cfg.d_model, expert_dim(cfg)
        self.cfg = cfg
        self.router = Router(cfg, rngs)
        self.gate = layers.param(rngs, layers.scaled_normal(d), (e, d, f), ("experts", "embed", "mlp"))
        self.up = layers.param(rngs, layers.scaled_normal(d), (e, d, f), ("experts", "embed", "mlp"))
        self.down = layers.param(rngs, layers.scaled_normal(f, 1 / math.sqrt(2 * cfg.num_layers)),
                                 (e, f, d), ("experts", "mlp", "embed"))
        self.shared = (layers.SwiGLU(d, cfg.num_shared_experts * f, num_layers=cfg.num_layers,
                                     rngs=rngs) if cfg.num_shared_experts else None)

    def __call__(self, x, seen_counts):
        """x [B, T, d]; seen_counts [E] (assignments per expert over the global batch) or None
        (use this batch's). Returns (y [B, T, d], this layer's losses and statistics)."""
        cfg = self.cfg
        ids, weights, probs, logits = self.router(x)
        y, kept = self._experts(x, ids, weights.astype(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)
        counts = jnp.sum(jax.nn.one_hot(ids, cfg.num_experts, dtype=jnp.float32), axis=2)  # [B,T,E]
        total = jnp.sum(counts, axis=(0, 1))
        seen = total if seen_counts is None else seen_counts
        out = {
            "counts": total,
            "load_balance": load_balance_loss(cfg.load_balance, counts, seen, probs),
            "router_z": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
            "load_max": jnp.max(seen) / jnp.maximum(jnp.mean(seen), 1e-30),
            "dropped": jnp.sum(~kept).astype(jnp.float32),
            "entropy": -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30))),
        }
        return constrain(y, ("batch", "length", "act_embed")), out

    def _experts(self, x, ids, weights):
        """(y, kept [B, T, k]) by the configured dispatch."""
        cfg = self.cfg
        w = kernels.ExpertWeights(self.gate[...].astype(x.dtype), self.up[...].astype(x.dtype),
                                  self.down[...].astype(x.dtype))
        b, t, _ = x.shape
        flat = lambda a: a.reshape(-1, a.shape[-1])      # [B, T, ...] -> [B·T, ...]
        all_kept = jnp.ones(ids.shape, bool)
        if cfg.moe_dispatch == "reference":
            return kernels.reference_ffn(flat(x), w, flat(ids), flat(weights)).reshape(x.shape), all_kept
        if cfg.capacity_factor > 0:
            # GShard groups: each sequence has its own capacity, so the drop rule does not
            # depend on the mesh, and sequences stay where their tokens are.
            capacity = kernels.capacity(t, cfg.experts_per_token, cfg.num_experts,
                                        cfg.capacity_factor)
            y, kept = kernels.capacity_ffn(x, w, ids, weights, capacity,
                                           constrain_buffer=_pin_expert_buffer)
            return y, kept
        if sharding.active_axes("experts"):
            return expert_parallel(x, w, ids, weights), all_kept
        # Per device on its own tokens with the experts gathered whole: the grouped matmul is a
        # Pallas kernel on TPU, which the SPMD partitioner cannot split.
        def local(x, w, ids, weights):
            return kernels.dropless_ffn(flat(x), w, flat(ids), flat(weights)).reshape(x.shape)
        tokens, whole = ("batch", "length", None), (None, None, None)
        y = sharding.per_shard(local, (x, w, ids, weights), (tokens, whole, tokens, tokens), tokens)
        return y, all_kept


def _pin_expert_buffer(buffer):
    """[groups, E, C, d] capacity buffer: groups over the batch axes that do not hold experts,
    E over the expert axes (GSPMD then moves tokens to their experts with an all-to-all)."""
    active = sharding.active_rules()
    if active is None:
        return buffer
    mesh, _ = active
    experts = sharding.active_axes("experts")
    groups = tuple(a for a in sharding.active_axes("batch") if a not in experts)
    spec = jax.sharding.PartitionSpec(groups or None, experts or None, None, None)
    return jax.lax.with_sharding_constraint(buffer, jax.sharding.NamedSharding(mesh, spec))


def expert_parallel(x, w, ids, weights):
    """Dropless experts in a `shard_map` over the mesh axes the rules give `experts`: tokens stay
    where the rules put them (batch and length axes); an expert axis the tokens are not split over
    (parallel folding: e.g. `tensor` acting as tensor parallelism outside the MoE block) takes
    a slice of them, so no token is processed twice."""
    mesh, rules = sharding.active_rules()
    ep_axes = sharding.active_axes("experts")
    token_axes = sharding.active_axes("batch") + sharding.active_axes("length")
    mlp_axes = tuple(a for a in sharding.active_axes("mlp") if a not in ep_axes)
    spec = lambda names, shape: sharding.logical_to_spec(names, shape, rules, mesh, "MoE input")
    token_spec = spec(("batch", "length", None), x.shape)
    weight_specs = kernels.ExpertWeights(
        jax.sharding.PartitionSpec(ep_axes, None, mlp_axes or None),
        jax.sharding.PartitionSpec(ep_axes, None, mlp_axes or None),
        jax.sharding.PartitionSpec(ep_axes, mlp_axes or None, None))
    platform = mesh.devices.flat[0].platform
    return kernels.expert_parallel_ffn(
        x, w, ids, weights, mesh=mesh, token_spec=token_spec, weight_specs=weight_specs,
        ep_axes=ep_axes, replicated_ep_axes=tuple(a for a in ep_axes if a not in token_axes),
        reduce_axes=mlp_axes, exchange="ragged" if platform == "tpu" else "padded")


# Per-layer router outputs that are sums over tokens (the others are per-batch means).
_TOKEN_TOTALS = ("counts", "dropped", "entropy")


def load_balance_loss(scope: str, counts, seen, probs):
    """E · Σ_i f_i · P_i at `scope`. counts [B, T, E]: assignments of each token; seen [E]: the
    assignments f is taken from for the global-batch scope; probs [B, T, E]."""
    num_experts = probs.shape[-1]
    share = lambda c: jax.lax.stop_gradient(c / jnp.maximum(jnp.sum(c, -1, keepdims=True), 1e-30))
    if scope == "sequence":
        f, p = share(jnp.sum(counts, axis=1)), jnp.mean(probs, axis=1)    # [B, E]
        return num_experts * jnp.mean(jnp.sum(f * p, axis=-1))
    f = share(seen if scope == "global_batch" else jnp.sum(counts, axis=(0, 1)))
    return num_experts * jnp.sum(f * jnp.mean(probs, axis=(0, 1)))


class MoEBlock(transformer.Block):
    def __init__(self, cfg, rngs: nnx.Rngs):
        super().__init__(cfg, rngs, make_mlp=lambda r: MoEFFN(cfg, r))

    def __call__(self, x, positions, mask, key, seen_counts):
        x, mlp_key = self.attend(x, positions, mask, key)
        y, out = self.mlp(self.mlp_norm(x), seen_counts)
        return self.add_residual(x, y, mlp_key), out

    def feed_forward(self, x):
        return self.mlp(x, None)[0]


class MoEGroup(nnx.Module):
    """`moe_every` layers: `moe_every - 1` dense Transformer blocks, then a MoE block; the model
    stacks `num_layers / moe_every` of these."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.remat = cfg.remat
        self.dense = (layers.stack_layers(lambda r: transformer.Block(cfg, r), cfg.moe_every - 1,
                                          rngs) if cfg.moe_every > 1 else None)
        self.moe = MoEBlock(cfg, rngs)

    def __call__(self, x, positions, mask, key, seen_counts):
        keys = (None, None) if key is None else jax.random.split(key)
        if self.dense is not None:
            # The group is already inside the rematerialised outer scan.
            x = layers.scan_layers(self.dense, x, lambda blk, h, k, b: blk(h, *b, k),
                                   remat="none", key=keys[0], batch_inputs=(positions, mask))
        return self.moe(x, positions, mask, keys[1], seen_counts)

    def cached(self, x, positions, mask, cache, start):
        """The group over its layers' KV caches [moe_every, B, slots, ...] (decoding)."""
        run = lambda blk, h, c: blk.cached(h, positions, mask, c, start)
        dense, moe = jax.tree.map(lambda a: a[:-1], cache), jax.tree.map(lambda a: a[-1], cache)
        if self.dense is not None:
            x, dense = layers.scan_cached(self.dense, x, dense, run)
        x, moe = self.moe.cached(x, positions, mask, moe, start)
        return x, jax.tree.map(lambda d, m: jnp.concatenate([d, m[None]]), dense, moe)


class MoETransformer(transformer.KVCacheDecoding, layers.DecoderLM, nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.init_decoder(cfg, rngs, validate(cfg), lambda r: MoEGroup(cfg, r),
                          num_blocks=cfg.num_layers // cfg.moe_every)
        self.layers_per_block = cfg.moe_every       # decoding: a stacked block's KV caches
        # Only global-batch balancing needs every microbatch's counts before its loss; the other
        # scopes return them just to be summed (router bias, metrics), which costs no extra pass.
        self.reads_global_stats = cfg.load_balance == "global_batch"

    def forward(self, tokens, positions, segment_ids, *, dropout_key=None, seen_counts=None):
        """(float32 logits [B, T, vocab], per-MoE-layer outputs stacked [num MoE layers, ...])."""
        x = self.embed_tokens(tokens, self.compute_dtype)
        mask = (segment_ids if transformer.uses_segment_ids(self.cfg)
                else transformer.attention_mask(segment_ids))
        x, per_layer = layers.scan_layers(
            self.layers, x, lambda grp, h, k, b, inputs: grp(h, *b, k, inputs["seen"]),
            remat=self.cfg.remat, key=dropout_key, batch_inputs=(positions, mask),
            per_layer={"seen": seen_counts})
        # One entry per microbatch (several when a pipeline runs the layers): token totals add
        # up, the losses and load ratios are averaged, as gradient accumulation would.
        out = {name: jnp.sum(v, 0) if name in _TOKEN_TOTALS else jnp.mean(v, 0)
               for name, v in per_layer.items()}
        return self.output_logits(x), out

    def __call__(self, tokens, positions, segment_ids, *, dropout_key=None):
        return self.forward(tokens, positions, segment_ids, dropout_key=dropout_key)[0]

    def loss(self, batch, *, dropout_key=None, stats=None):
        """Token NLL, the two router losses (mean over MoE layers), per-layer metrics, and the
        expert counts as global-batch statistics (paxlike/family.py)."""
        seen = None if stats is None else stats["expert_tokens"]
        logits, out = self.forward(batch["inputs"], batch["positions"], batch["segment_ids"],
                                   dropout_key=dropout_key, seen_counts=seen)
        assignments = jnp.float32(batch["inputs"].size * self.cfg.experts_per_token)
        tokens = jnp.float32(batch["inputs"].size)
        one = jnp.float32(1)
        metrics = {"moe_load_max": (jnp.mean(out["load_max"]), one),
                   "moe_dropped": (jnp.mean(out["dropped"]), assignments),
                   "router_entropy": (jnp.mean(out["entropy"]), tokens)}
        for i in range(out["counts"].shape[0]):
            layer = (i + 1) * self.cfg.moe_every - 1
            metrics[f"moe_load_max/layer{layer}"] = (out["load_max"][i], one)
            metrics[f"moe_dropped/layer{layer}"] = (out["dropped"][i], assignments)
            metrics[f"router_entropy/layer{layer}"] = (out["entropy"][i], tokens)
        return layers.token_nll(
            logits, batch,
            aux={"load_balance": jnp.mean(out["load_balance"]), "router_z": jnp.mean(out["router_z"])},
            metrics=metrics, stats={"expert_tokens": out["counts"]})

    def update_buffers(self, stats) -> None:
        """Auxiliary-loss-free balancing: each router's bias moves by `router_bias_rate` towards
        its under-loaded experts, by the sign of the load error over the step's global batch."""
        router = self.layers.moe.mlp.router
        if router.bias is None:
            return
        counts = stats["expert_tokens"]       # [num MoE layers, E]
        error = jnp.mean(counts, axis=-1, keepdims=True) - counts
        router.bias[...] = router.bias[...] + self.cfg.router_bias_rate * jnp.sign(error)


def build(cfg, rngs: nnx.Rngs) -> MoETransformer:
    return MoETransformer(cfg, rngs)


def active_params_per_token(cfg) -> dict[str, float]:
    """Weights each token multiplies by, per kind (the MoE layers count k routed experts)."""
    d, hd, f = cfg.d_model, transformer.head_dim(cfg), expert_dim(cfg)
    moe_layers = cfg.num_layers // cfg.moe_every
    return {
        "attention": cfg.num_layers * d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads),
        "dense_mlp": (cfg.num_layers - moe_layers) * 3 * d * cfg.mlp_dim,
        "router": moe_layers * d * cfg.num_experts,
        "experts": moe_layers * 3 * d * f * (cfg.experts_per_token + cfg.num_shared_experts),
        "head": d * cfg.vocab_size,
    }


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 · (weights each token uses) + causal attention counted as
    half, as for the dense Transformer (models/transformer.py) but counting only the k routed
    experts a token goes to (capacity padding and dropped tokens are not model FLOPs)."""
    return (6.0 * sum(active_params_per_token(cfg).values())
            + 0.5 * transformer.attention_flops_per_token(cfg, seq_len))


# ------------------------------------------------------------------------- the planner's profile
def planner_profile(cfg) -> "Profile":
    return Profile(cfg)


class Profile(MoEActivations, transformer.Profile):
    """The Transformer's profile (attention, dense layers, head) with the experts' dispatch
    layout, expert-parallel exchanges, routed arrays and FLOPs on top: planner logic that lives
    in paxlike/planner/moe.py, where its counts are documented."""
