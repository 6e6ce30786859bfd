"""Decoding speed and cache memory (paxlike/decode.py): the KV cache and recurrent states against
recomputing the whole forward pass for every new token.

For each family, a model of the same width (random weights; speed does not depend on them) decodes
--new tokens greedily after a --prompt-token prompt, batch 1, on one CPU device:
- "cached": the compiled decode step, one per token (paxlike.decode.Decoder);
- "recompute" (Transformer only: the baseline a cache replaces): the training forward pass over
  the whole fixed-size buffer (prompt + new tokens, later slots padding) for every token, taking
  the argmax at the newest position; one compiled program as well.
Per-token time early (first 64 decode steps) and late (last 64) shows whether it grows with the
position; cache bytes per sequence are the decode state's arrays.

    .venv/bin/python benchmarks/generate.py            # 512 new tokens (docs/generate.md)
    .venv/bin/python benchmarks/generate.py --new=128  # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/gla.py's machine()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gla import machine  # noqa: E402
from paxlike import decode, sharding  # noqa: E402
from paxlike.mesh import build_mesh  # noqa: E402
from paxlike.models import gla, pararnn, transformer  # noqa: E402

WIDTH = dict(vocab_size=4096, d_model=256, num_layers=4, num_heads=8, mlp_dim=1024)
FAMILIES = {
    "transformer": (transformer, dict(num_kv_heads=4)),
    "gla": (gla, dict(chunk_size=64)),
    "paragru": (pararnn, dict(cell="gru")),
}


def _model(name):
    module, extra = FAMILIES[name]
    cfg = module.default_config()
    cfg.update(WIDTH, **extra)
    model = module.build(cfg, nnx.Rngs(0))
    return cfg, model


def recompute_per_token(model, prompt, new):
    """Greedy decoding by the full forward pass over a fixed buffer, once per token: (tokens,
    seconds per token)."""
    length = len(prompt) + new
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(prompt)] = prompt
    positions = jnp.arange(length)[None]

    @nnx.jit
    def next_token(model, tokens, filled):
        segments = (jnp.arange(length) < filled).astype(jnp.int32)[None]
        logits = model(tokens, positions, segments)
        return jnp.argmax(logits[0, filled - 1]).astype(jnp.int32)

    next_token(model, jnp.asarray(tokens), len(prompt)).block_until_ready()   # compile
    times = []
    for i in range(new):
        filled = len(prompt) + i
        start = time.perf_counter()
        token = int(next_token(model, jnp.asarray(tokens), filled))
        times.append(time.perf_counter() - start)
        if filled < length:
            tokens[0, filled] = token
    return tokens[0, len(prompt):].tolist(), times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=512, help="tokens generated")
    args = parser.parse_args()
    mesh = build_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    rules = sharding.get_rules("fsdp_tp", mesh)
    prompt = list(np.random.default_rng(0).integers(0, WIDTH["vocab_size"], args.prompt))
    print(f"machine: {machine()}")
    print(f"batch 1, prompt {args.prompt} tokens, {args.new} new tokens, greedy, float32; "
          f"width {WIDTH}\n")
    print("| family | decode | ms/token (all) | ms/token first 64 | ms/token last 64 | "
          "tokens/s | cache bytes/sequence | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name in FAMILIES:
        cfg, model = _model(name)
        params = nnx.to_pure_dict(nnx.state(model))
        decoder = decode.Decoder(cfg, mesh, rules, decode.Sampling(temperature=0))
        out = decoder.generate(params, [prompt], args.new)
        times = out.step_s
        cached_ms = 1e3 * statistics.mean(times)
        rows = [("cached", times, out.cache_bytes)]
        if name == "transformer":
            tokens, base = recompute_per_token(model, prompt, args.new)
            same = tokens == out.tokens[0]
            rows.append((f"recompute{'' if same else ' (DIFFERENT TOKENS)'}", base[1:], 0))
        for label, ts, cache_bytes in rows:
            ms = 1e3 * statistics.mean(ts)
            speedup = "" if label == "cached" else f"cache {ms / cached_ms:.1f}x faster"
            print(f"| {name} | {label} | {ms:.2f} | {1e3 * statistics.median(ts[:64]):.2f} | "
                  f"{1e3 * statistics.median(ts[-64:]):.2f} | {1e3 / ms:.0f} | "
                  f"{cache_bytes if cache_bytes else '-'} | {speedup} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
