"""A model family defined outside paxlike, as a user would add one: this file alone (placed in
models/ or anywhere importable) plus an experiment config that names it in `model.module`.

A bigram language model (each token predicts the next through one hidden layer) whose loss has
every part of the family contract (paxlike/family.py):
  * auxiliary losses: `z_loss`, the mean squared log-partition function, and `balance`, a
    load-balancing loss over 8 groups of the vocabulary shaped like a mixture-of-experts router's:
    G · Σ_i f_i · p_i, with f_i the share of tokens whose top prediction falls in group i and p_i
    the mean probability mass on group i;
  * a metric: `accuracy` of the top prediction, as (sum, count);
  * global-batch statistics: f_i is computed from the group counts of the whole global batch
    (`stats`), as global-batch load balancing does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from paxlike.family import ModelLoss

GROUPS = 8


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "module": __name__,
        "vocab_size": 512,
        "d_model": 32,
        "aux_loss_weights": {"z_loss": 1e-3, "balance": 1e-2},
    })


def validate(cfg) -> list[str]:
    problems = [f"model.{k}={cfg[k]} must be positive" for k in ("vocab_size", "d_model")
                if cfg[k] < 1]
    if cfg.vocab_size % GROUPS:
        problems.append(f"model.vocab_size={cfg.vocab_size} must be a multiple of {GROUPS}")
    return problems


def _param(rngs, shape, names, std):
    init = nnx.initializers.normal(std)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


class BigramLM(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        v, d = cfg.vocab_size, cfg.d_model
        self.embed = _param(rngs, (v, d), ("vocab", "embed"), 1.0)
        self.hidden = _param(rngs, (d, d), ("embed", "mlp"), 1 / math.sqrt(d))
        self.unembed = _param(rngs, (d, v), ("mlp", "vocab"), 1 / math.sqrt(d))

    def logits(self, tokens):
        x = jnp.take(self.embed[...], tokens, axis=0)
        return jnp.tanh(x @ self.hidden[...]) @ self.unembed[...]

    def loss(self, batch, *, dropout_key=None, stats=None) -> ModelLoss:
        del dropout_key  # no dropout in this model
        logits = self.logits(batch["inputs"])
        w = batch["weights"]
        tokens = jnp.sum(w)
        denominator = jnp.maximum(tokens, 1.0)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        log_z = jax.nn.logsumexp(logits, axis=-1)
        z_loss = jnp.sum(w * log_z ** 2) / denominator

        group_size = logits.shape[-1] // GROUPS
        top = jnp.argmax(logits, axis=-1)
        counts = jnp.sum(jax.nn.one_hot(top // group_size, GROUPS) * w[..., None], axis=(0, 1))
        own = {"group_counts": counts, "tokens": tokens}
        seen = own if stats is None else stats
        f = jax.lax.stop_gradient(seen["group_counts"] / jnp.maximum(seen["tokens"], 1.0))
        probs = jax.nn.softmax(logits, axis=-1).reshape(*logits.shape[:-1], GROUPS, group_size)
        p = jnp.sum(probs.sum(-1) * w[..., None], axis=(0, 1)) / denominator
        balance = GROUPS * jnp.sum(f * p)

        correct = jnp.sum((top == batch["targets"]) * w)
        return ModelLoss(nll_sum=jnp.sum(nll * w), weight_sum=tokens,
                         aux={"z_loss": z_loss, "balance": balance},
                         metrics={"accuracy": (correct, tokens)}, stats=own)


def build(cfg, rngs: nnx.Rngs) -> BigramLM:
    return BigramLM(cfg, rngs)


def flops_per_token(cfg, seq_len: int) -> float:
    del seq_len
    return 6.0 * (cfg.d_model ** 2 + cfg.d_model * cfg.vocab_size)
