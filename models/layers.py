"""Building blocks shared by the model families: parameters with logical names, RMSNorm, RoPE,
the SwiGLU MLP, dropout and the scan over stacked layers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from paxlike import pipeline
from paxlike.family import ModelLoss
from paxlike.sharding import constrain

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute the cheap elementwise work in the backward pass.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def not_positive(cfg, keys) -> list[str]:
    """Problems for the size keys of a model config that are below 1."""
    return [f"model.{key}={cfg[key]} must be positive" for key in keys if cfg[key] < 1]


def validate_common(cfg) -> list[str]:
    """Problems with the model keys every family shares: compute_dtype, remat, dropout_rate."""
    problems = []
    for key, choices in (("compute_dtype", COMPUTE_DTYPES), ("remat", REMAT_POLICIES)):
        if cfg[key] not in choices:
            problems.append(f"model.{key}={cfg[key]!r}; choose one of {list(choices)}")
    if not 0.0 <= cfg.dropout_rate < 1.0:
        problems.append(f"model.dropout_rate={cfg.dropout_rate} must be in [0, 1)")
    return problems


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: Sequence[str | None]
          ) -> nnx.Param:
    """A float32 parameter whose dimensions carry logical axis names (see paxlike.sharding)."""
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), out_sharding=tuple(names))


def scaled_normal(fan_in: int, scale: float = 1.0) -> Callable:
    """Truncated normal with std scale / sqrt(fan_in)."""
    return nnx.initializers.truncated_normal(stddev=scale / math.sqrt(fan_in))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, names: Sequence[str] = ("embed",),
                 rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), names)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype: bf16 variance loses too many bits.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form). x: [B, T, heads, head_dim]; positions: [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, mlp_dim: int, *, num_layers: int, rngs: nnx.Rngs):
        self.w_gate = param(rngs, scaled_normal(d_model), (d_model, mlp_dim), ("embed", "mlp"))
        self.w_up = param(rngs, scaled_normal(d_model), (d_model, mlp_dim), ("embed", "mlp"))
        # Residual-branch outputs scaled down with depth so the residual stream stays O(1).
        self.w_down = param(rngs, scaled_normal(mlp_dim, 1 / math.sqrt(2 * num_layers)),
                            (mlp_dim, d_model), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        gate = constrain(x @ self.w_gate[...].astype(dt), ("batch", "length", "mlp"))
        up = constrain(x @ self.w_up[...].astype(dt), ("batch", "length", "mlp"))
        out = (jax.nn.silu(gate) * up) @ self.w_down[...].astype(dt)
        return constrain(out, ("batch", "length", "act_embed"))


class DecoderLM:
    """The frame shared by the decoder LMs: config check, token embedding, stacked blocks, final
    RMSNorm, output head (tied or not) and the training loss.

    A mixin rather than a sub-module so that the parameters keep their top-level names
    (`embed`, `layers`, `final_norm`, `unembed`) in every model's state and checkpoints.
    """

    def init_decoder(self, cfg, rngs: nnx.Rngs, problems: list[str],
                     make_block: Callable[[nnx.Rngs], nnx.Module], num_blocks: int = 0) -> None:
        """`problems`: the model family's validate(cfg); any of them is a ValueError.
        `num_blocks` stacked blocks (default: `cfg.num_layers`; a block may hold several layers)."""
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        self.compute_dtype = COMPUTE_DTYPES[cfg.compute_dtype]
        self.embed = param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                           ("vocab", "embed"))
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.tie_embeddings = cfg.tie_embeddings
        if not cfg.tie_embeddings:
            self.unembed = param(rngs, scaled_normal(cfg.d_model), (cfg.d_model, cfg.vocab_size),
                                 ("embed", "vocab"))
        self.layers = stack_layers(make_block, num_blocks or cfg.num_layers, rngs)

    def loss(self, batch: dict, *, dropout_key: jax.Array | None = None, stats=None) -> ModelLoss:
        """The family contract's loss (paxlike/family.py): weighted token NLL sums of the
        logits `self(...)` returns; these families have no auxiliary losses or metrics."""
        del stats  # nothing of theirs needs global-batch statistics
        logits = self(batch["inputs"], batch["positions"], batch["segment_ids"],
                      dropout_key=dropout_key)
        return token_nll(logits, batch)

    def embed_tokens(self, tokens: jax.Array, dtype) -> jax.Array:
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        return constrain(x, ("batch", "length", "act_embed"))

    def output_logits(self, x: jax.Array) -> jax.Array:
        """Final norm and head; float32 logits [B, T, vocab]."""
        x = self.final_norm(x)
        dt = x.dtype
        if self.tie_embeddings:
            # Embeddings have std 1; scale so tied logits start at O(1) like the untied head.
            logits = jnp.einsum("btd,vd->btv", x, self.embed[...].astype(dt)) / math.sqrt(x.shape[-1])
        else:
            logits = x @ self.unembed[...].astype(dt)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    # ------------------------------------------------------------------ decoding
    def scan_cached(self, x: jax.Array, cache, apply: Callable):
        """`scan_cached` over the model's stacked layers."""
        return scan_cached(self.layers, x, cache, apply)

    def last_logits(self, x: jax.Array) -> jax.Array:
        """Float32 logits [B, vocab] of the last position of x [B, T, d] (prompts are
        left-padded, so the last position is every row's newest token)."""
        return self.output_logits(x[:, -1:])[:, 0]


def token_nll(logits: jax.Array, batch: dict, **parts) -> ModelLoss:
    """ModelLoss with the weighted token NLL sums of float32 `logits` [B, T, vocab] (and `parts`:
    the family's aux, metrics and stats)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return ModelLoss(nll_sum=jnp.sum(nll * batch["weights"]), weight_sum=jnp.sum(batch["weights"]),
                     **parts)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
    """Creates `num_layers` copies of a layer with parameters stacked on a leading 'layers' axis."""
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return make_layer(rngs)
    return make(rngs)


def scan_cached(layers: nnx.Module, x: jax.Array, cache, apply: Callable):
    """Runs stacked layers over x, each with its own slice of `cache` (a pytree whose arrays have
    a leading layer dimension, or None): `apply(layer, x, layer_cache) -> (x, layer_cache)`.
    Returns (x, the updated cache). For decoding: no dropout, no remat, no pipeline."""
    graphdef, params = nnx.split(layers)

    def body(h, inputs):
        layer_params, layer_cache = inputs
        return apply(nnx.merge(graphdef, layer_params), h, layer_cache)

    return jax.lax.scan(body, x, (params, cache))


def scan_layers(layers: nnx.Module, x: jax.Array, apply: Callable, *, remat: str,
                key: jax.Array | None = None, batch_inputs=None, per_layer=None):
    """Applies stacked layers in a `lax.scan`, so compile time does not grow with depth.

    `apply(layer, x, key, batch)` runs one layer. `batch` is `batch_inputs`: a pytree of arrays
    whose leading dimension is the batch, like `x`'s (positions, attention masks); under a
    pipeline each microbatch gets its own rows. `key` (if given) is folded with the layer index
    (under a pipeline, first with the microbatch index, as gradient accumulation does).
    With `per_layer` (a pytree whose arrays have a leading layer dimension, possibly empty),
    `apply(layer, x, key, batch, inputs) -> (x, outputs)` gets its layer's slice of it and the
    result is `(x, outputs [microbatches, layers, ...])`, where microbatches is 1 unless a pipeline
    runs the layers: how layers take and report per-layer quantities (a mixture-of-experts
    router's global token counts and its load statistics).

    Inside `paxlike.pipeline.use(spec)` the layers run as a pipeline over the `pipeline` mesh axis
    (paxlike/pipeline.py); a stack nested in a layer then runs plainly inside its stage.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {list(REMAT_POLICIES)}")
    graphdef, state = nnx.split(layers)

    def run(h, key, batch, extra, first_layer, count, stacked=None, take=None):
        """Scans `count` layers given either `stacked` ([count, ...], sliced by the scan) or by
        `take(index)`, called inside the (possibly rematerialised) body."""
        def body(carry, inputs):
            layer_state, index, extra = inputs
            layer_state = take(index) if take is not None else layer_state
            layer_key = None if key is None else jax.random.fold_in(key, first_layer + index)
            layer = nnx.merge(graphdef, layer_state)
            if per_layer is None:
                return apply(layer, carry, layer_key, batch), {}
            return apply(layer, carry, layer_key, batch, extra)

        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        return jax.lax.scan(body, h, (stacked, jnp.arange(count), extra))

    num_layers = jax.tree.leaves(state)[0].shape[0]
    spec = pipeline.active()
    if spec is None:
        x, outputs = run(x, key, batch_inputs, per_layer, 0, num_layers, stacked=state)
        return x if per_layer is None else (x, jax.tree.map(lambda v: v[None], outputs))

    per_stage = num_layers // (spec.stages * spec.repeats)

    def stage(weights, h, batch, repeat, microbatch, stage_index):
        first = (repeat * spec.stages + stage_index) * per_stage
        pick = lambda tree, i, n=None: jax.tree.map(
            lambda v: (jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False) if n is None
                       else jax.lax.dynamic_slice_in_dim(v, i, n, 0)), tree)
        # The stage's weights [R, K, ...] are invariant over the schedule's iterations: each
        # layer is taken from them inside the layer's body, so that the backward pass keeps no
        # per-iteration copy of them (with remat it takes the layer again).
        flat = jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), weights)
        take = lambda index: pick(flat, repeat * per_stage + index)
        stage_key = None if key is None else jax.random.fold_in(key, microbatch)
        return run(h, stage_key, pick(batch, microbatch), pick(per_layer, first, per_stage),
                   first, per_stage, take=take)

    with pipeline.use(None):    # stacks nested inside a layer run plainly within its stage
        x, outputs = pipeline.run(stage, pipeline.stage_weights(state, spec), x, batch_inputs, spec)
    return x if per_layer is None else (x, outputs)
