"""Combining language models of one shape: parameter averaging and the posterior-weighted
ensemble (Branch-Train-Merge, arXiv 2208.03306; the workflow is paxlike/btm.py, docs/btm.md).

    average_params(load, weights)      Σ_k w_k θ_k, one parameter tree
    mixture_logprobs(lp, segs, w, p)   the ensemble's per-token log-probabilities from each
                                       model's: p(x_t | x_<t) = Σ_k P(k | x_<t) p_k(x_t | x_<t),
                                       P(k | x_<t) ∝ prior_k Π_{s<t} p_k(x_s | x_<s)
    Scorer                             per-token log-probabilities log p(target_t | inputs_≤t) of
                                       any model of the config, on a data config's eval batches
    token_metrics(lp, weights, bytes)  eval loss and bits per byte from them
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from paxlike import family, sharding
from paxlike.errors import UserError
from paxlike.mesh import build_mesh


def normalized_weights(weights: Sequence[float] | None, count: int, flag: str = "--weights"
                       ) -> np.ndarray:
    """`weights` (one per model, >= 0, not all 0; None: uniform) scaled to sum to 1."""
    if weights is None:
        return np.full(count, 1.0 / count)
    w = np.asarray(weights, np.float64)
    if w.shape != (count,):
        raise UserError(f"{flag} gives {len(w)} weight(s) for {count} experts; give one per "
                        f"expert, in the order of btm.json (or leave it out for equal weights)")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise UserError(f"{flag}={','.join(f'{x:g}' for x in w)}: weights must be finite, >= 0 "
                        f"and not all 0 (they are scaled to sum to 1)")
    return w / w.sum()


def average_params(load: Callable[[int], object], weights: np.ndarray):
    """The weighted average Σ_k w_k θ_k of the parameter trees `load(k)` (w sums to 1).

    Computed as θ_a + Σ_{k≠a} w_k (θ_k − θ_a), anchored on the model a of largest weight:
    the same sum in exact arithmetic, but the copies of one model, or a one-hot weight, give
    that model back bit for bit (its differences are exactly 0), and models branched from one
    seed differ by small deltas, whose weighted sum loses less precision than a sum of whole
    parameters. At most three trees are held at once (θ_a, the sum, θ_k); models of weight 0
    are not read. Non-float leaves (integer buffers) are taken from θ_a."""
    anchor = int(np.argmax(weights))
    base = load(anchor)
    total = base
    for k, w in enumerate(weights):
        if k == anchor or w == 0:
            continue
        theta = load(k)
        total = jax.tree.map(
            lambda t, x, b, w=float(w): t + w * (x - b) if jnp.issubdtype(t.dtype, jnp.floating)
            else t, total, theta, base)
    return total


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):   # every term -inf: log(0) = -inf is the answer
        return np.log(np.sum(np.exp(x - top), axis=axis)) + np.squeeze(top, axis)


def mixture_logprobs(expert_logprobs: np.ndarray, segment_ids: np.ndarray, weights: np.ndarray,
                     prior: np.ndarray) -> np.ndarray:
    """The ensemble's log p(target_t | x_≤t) [B, T] from each model's, `expert_logprobs`
    [K, B, T], in float64.

    A sequence is one document segment of a packed row (the models see nothing else). At each
    position the models are weighted by their posterior given the sequence so far,
    P(k | x_<t) ∝ prior_k Π p_k(earlier targets of the same segment), in log space; positions of
    weight 0 (padding, the token after a document's end) add nothing to it. Summed over a
    sequence, the ensemble's log-likelihood is log Σ_k prior_k p_k(sequence): the Bayesian
    mixture of the models."""
    lp = np.asarray(expert_logprobs, np.float64)
    K, B, T = lp.shape
    counted = np.where(np.asarray(weights)[None] > 0, lp, 0.0)
    before = np.cumsum(counted, axis=-1) - counted          # Σ over positions < t, whole row
    segs = np.asarray(segment_ids)
    starts = np.ones((B, T), bool)
    starts[:, 1:] = segs[:, 1:] != segs[:, :-1]
    start_of = np.maximum.accumulate(np.where(starts, np.arange(T), 0), axis=-1)
    prefix = before - np.take_along_axis(before, np.broadcast_to(start_of, (K, B, T)), axis=-1)
    with np.errstate(divide="ignore"):                       # a prior of 0 is log 0 = -inf
        log_prior = np.log(np.asarray(prior, np.float64))
    joint = log_prior[:, None, None] + prefix                # log prior_k p_k(x_<t)
    log_posterior = joint - _logsumexp(joint, axis=0)[None]
    return _logsumexp(log_posterior + lp, axis=0)


def token_metrics(logprobs: np.ndarray, weights: np.ndarray, target_bytes: np.ndarray) -> dict:
    """Mean NLL per weighted token ("eval_loss", nats) and bits per byte, as the trainer's eval
    computes them (paxlike/loop.py `evaluate`)."""
    w = np.asarray(weights, np.float64)
    nll = -float(np.sum(np.asarray(logprobs, np.float64) * w))
    tokens, num_bytes = float(w.sum()), float(np.sum(np.asarray(target_bytes) * w))
    return {"eval_loss": nll / max(tokens, 1.0),
            "bits_per_byte": nll / math.log(2) / max(num_bytes, 1.0), "tokens": tokens}


class Scorer:
    """Per-token log-probabilities of models of one config on one mesh: FSDP over the devices
    (as many as divide the batch), the run's sharding rules. Every model of the config shares
    the one compiled program."""

    def __init__(self, cfg, devices=None):
        devices = list(jax.devices() if devices is None else devices)
        count = math.gcd(len(devices), cfg.batch_size)
        self.mesh = build_mesh({"fsdp": count}, devices=devices[:count])
        self.rules = sharding.get_rules(cfg.sharding, self.mesh)
        module = family.load(cfg.model)
        abstract = nnx.eval_shape(lambda: module.build(cfg.model, nnx.Rngs(0)))
        if not callable(abstract):
            raise UserError(f"model family {cfg.model.module} has no forward pass returning "
                            f"logits (model(tokens, positions, segment_ids)) to score tokens with")
        self.graphdef, abstract_params = nnx.split(abstract)
        with sharding.use_rules(self.mesh, self.rules):
            shardings = nnx.to_pure_dict(
                sharding.param_shardings(abstract_params, self.mesh, self.rules))
        # The restore target for Checkpoints.restore_params: shapes with their shardings.
        self.abstract_params = jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
            nnx.to_pure_dict(abstract_params), shardings)
        self.batch_sharding = NamedSharding(
            self.mesh, sharding.batch_spec(self.rules, self.mesh, (cfg.batch_size, cfg.seq_len)))
        self._score = jax.jit(self._score_impl)

    def _score_impl(self, params, batch):
        with sharding.use_rules(self.mesh, self.rules):
            model = nnx.merge(self.graphdef, params)
            logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        # logit of the target minus the log-normaliser: no second [B, T, vocab] array.
        picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    def eval_batches(self, cfg, workdir: str, count: int | None = None):
        """The val split of `cfg`'s data (the run in `workdir`: its tokenizer) as eval batches
        on these devices: the first `count` (default cfg.data.eval_batches; 0: all), and on the
        host their targets, weights, segment ids and bytes per target token."""
        from paxlike import data
        data_cfg = copy.deepcopy(cfg.data)
        if count is not None:
            # 0: every batch of the val split (the dataset stops at the split's end).
            data_cfg.eval_batches = count if count > 0 else 1 << 40
        if data_cfg.get("eval_batches", 4) < 1:
            raise UserError(f"data.eval_batches={data_cfg.eval_batches} leaves nothing to "
                            f"evaluate; pass --eval_batches=N (N >= 1, or 0 for the whole split)")
        ds = data.build(data_cfg, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
                        seed=cfg.seed, workdir=workdir, batch_sharding=self.batch_sharding,
                        save_tokenizer=False)
        batches = ds.eval_batches()
        token_bytes = np.asarray(ds.tokenizer.token_bytes)
        host = [jax.device_get({k: b[k] for k in ("targets", "weights", "segment_ids")})
                for b in batches]
        for h in host:
            h["bytes"] = token_bytes[h["targets"]]
        return batches, host

    def logprobs(self, params, batch) -> np.ndarray:
        """log p(targets | inputs) [B, T] (float32, on the host) of one batch."""
        return np.asarray(jax.device_get(self._score(params, batch)))
