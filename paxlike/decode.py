"""Sampling from a model: prompts → one left-padded batch → prefill → one compiled decode step
per token.

A model family that decodes provides (paxlike/family.py)

    model.prefill(tokens, positions, segment_ids, *, max_len) -> (logits [B, vocab], cache)
    model.decode_step(tokens [B], cache) -> (logits [B, vocab], cache)

Prompts are left-padded to a common length: the padding is segment 0 and every prompt segment
1, positions count from 0 at each prompt's first token, so each family keeps the padding out of
the prompt exactly as it keeps packed documents apart in training, and the last position of the
batch is every row's newest token. The cache (a Transformer's KV cache, a recurrent family's
state) is created by the prefill and sharded by the model's own logical names, like activations.

The decode step has one shape for the whole generation (the cache's fixed size, a traced step
counter), so it compiles once; the next token is sampled inside it, and only the [B] sampled ids
come back to the host each step (which is what lets the caller stream them).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from paxlike import family, sharding
from paxlike.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits. temperature 0 is greedy (argmax)."""
    temperature: float = 1.0
    top_k: int = 0          # keep the k most likely tokens; 0: all
    top_p: float = 1.0      # keep the smallest set of tokens whose probability reaches p; 1: all

    def check(self) -> None:
        problems = []
        if not self.temperature >= 0:
            problems.append(f"--temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            problems.append(f"--top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top_p={self.top_p} must be in (0, 1] (1 keeps every token)")
        if problems:
            raise UserError("; ".join(problems))


def sample(logits: jax.Array, key: jax.Array, how: Sampling) -> jax.Array:
    """Token ids [B] (int32) drawn from float32 logits [B, vocab]."""
    if how.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / how.temperature
    if 0 < how.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, how.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if how.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs      # the mass of the likelier tokens
        # The kept set always includes the most likely token (before = 0 < top_p).
        cutoff = jnp.min(jnp.where(before < how.top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_padded(prompts: Sequence[Sequence[int]], rows: int) -> dict[str, np.ndarray]:
    """tokens, positions, segment_ids [rows, T] int32 with each prompt right-aligned (rows
    beyond the prompts repeat the last one: a batch that the mesh's batch axes divide)."""
    length = max(len(p) for p in prompts)
    out = {k: np.zeros((rows, length), np.int32) for k in ("tokens", "positions", "segment_ids")}
    for row in range(rows):
        prompt = prompts[min(row, len(prompts) - 1)]
        start = length - len(prompt)
        out["tokens"][row, start:] = prompt
        out["positions"][row, start:] = np.arange(len(prompt))
        out["segment_ids"][row, start:] = 1
    return out


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]        # per prompt: the generated ids (up to and without the EOS)
    prompt_tokens: int             # padded prompt tokens run through the prefill (rows x T)
    prefill_s: float               # the prefill's run time (compile excluded)
    step_s: list[float]            # each decode step's run time (one token for every row)
    cache_bytes: int               # the cache (KV cache or recurrent state) of one row
    compile_s: float               # compiling the prefill and the decode step
    logits: np.ndarray | None = None   # with keep_logits: [steps, prompts, vocab]

    @property
    def decode_steps(self) -> int:
        return len(self.step_s)

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)


class Decoder:
    """The compiled prefill and decode step of one model on one mesh."""

    def __init__(self, model_cfg, mesh: Mesh, rules, sampling: Sampling = Sampling()):
        sampling.check()
        self.mesh, self.rules, self.sampling = mesh, rules, sampling
        module = family.load(model_cfg)
        abstract = nnx.eval_shape(lambda: module.build(model_cfg, nnx.Rngs(0)))
        missing = [m for m in ("prefill", "decode_step") if not hasattr(abstract, m)]
        if missing:
            raise UserError(f"model family {model_cfg.module} cannot decode: its model has no "
                            f"{' or '.join(missing)} (see paxlike/decode.py)")
        self.graphdef, abstract_params = nnx.split(abstract)
        self.model_type = type(abstract)
        with sharding.use_rules(mesh, rules):
            self.param_shardings = nnx.to_pure_dict(
                sharding.param_shardings(abstract_params, mesh, rules))
        self.abstract_params = jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
            nnx.to_pure_dict(abstract_params), self.param_shardings)
        self.batch_ways = math.prod(mesh.shape[a] for a in rules["batch"] if a in mesh.shape)
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("max_len",))
        self._step = jax.jit(self._step_impl, donate_argnums=(1,))

    def _model(self, params):
        return nnx.merge(self.graphdef, params)

    def _prefill_impl(self, params, batch, key, *, max_len):
        with sharding.use_rules(self.mesh, self.rules):
            logits, cache = self._model(params).prefill(
                batch["tokens"], batch["positions"], batch["segment_ids"], max_len=max_len)
        return sample(logits, jax.random.fold_in(key, 0), self.sampling), logits, cache

    def _step_impl(self, params, cache, tokens, key, index):
        with sharding.use_rules(self.mesh, self.rules):
            logits, cache = self._model(params).decode_step(tokens, cache)
        return sample(logits, jax.random.fold_in(key, index), self.sampling), logits, cache

    def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 seed: int = 0, eos_id: int | None = None,
                 on_tokens: Callable[[np.ndarray], None] | None = None,
                 keep_logits: bool = False) -> Generation:
        """Up to `max_new_tokens` tokens after each prompt (non-empty token lists), stopping a
        row at `eos_id`. `on_tokens(ids [len(prompts)])` sees every step's sampled ids as they
        arrive (for streaming). `keep_logits`: also return every step's logits, for tests."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise UserError(f"--max_new_tokens={max_new_tokens} must be >= 1")
        n = len(prompts)
        rows = -(-n // self.batch_ways) * self.batch_ways
        batch = {k: jnp.asarray(v) for k, v in left_padded(prompts, rows).items()}
        max_len = batch["tokens"].shape[1] + max_new_tokens
        key = jax.random.key(seed)

        start = time.perf_counter()
        prefill = self._prefill.lower(params, batch, key, max_len=max_len).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens, logits, cache = prefill(params, batch, key)
        tokens.block_until_ready()
        prefill_s = time.perf_counter() - start
        cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))

        start = time.perf_counter()
        step = self._step.lower(params, cache, tokens, key, jnp.int32(1)).compile()
        compile_s += time.perf_counter() - start

        out, done, kept, step_s = [[] for _ in range(n)], np.zeros(n, bool), [], []
        for i in range(max_new_tokens):
            ids = np.asarray(tokens)[:n]
            if keep_logits:
                kept.append(np.asarray(logits)[:n])
            for row in np.flatnonzero(~done):
                if eos_id is not None and ids[row] == eos_id:
                    done[row] = True
                else:
                    out[row].append(int(ids[row]))
            if on_tokens is not None:
                on_tokens(np.where(done, -1, ids))
            if done.all() or i == max_new_tokens - 1:
                break
            begin = time.perf_counter()
            tokens, logits, cache = step(params, cache, tokens, key, jnp.int32(i + 1))
            tokens.block_until_ready()
            step_s.append(time.perf_counter() - begin)
        return Generation(tokens=out, prompt_tokens=int(batch["tokens"].size),
                          prefill_s=prefill_s, step_s=step_s, compile_s=compile_s,
                          cache_bytes=cache_bytes // rows,
                          logits=np.stack(kept) if keep_logits else None)
