"""Train-step speed on this machine: paxlike's step vs a minimal hand-written JAX + optax step.

    python benchmarks/step.py [--size=bench] [--steps=20] [--cpu_devices=1]

Both steps train the same Transformer (models/transformer.py) on the same batch. The hand-written
one is what a user would write first: `jax.jit` of value_and_grad + optax AdamW, no shardings, no
donation, no accumulation loop. MFU is reported against a float32 matrix-multiply rate measured in
the same run (the machine's practical peak), and paxlike's FLOPs-per-token formula.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time_interleaved(fns: dict, steps: int) -> dict[str, float]:
    """Median seconds per call of each blocking `fn()`, calling them in turn so that load from
    other processes on this shared machine hits all of them alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu_devices", type=int, default=1)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from paxlike.experiments import transformer as experiment
    from paxlike.mesh import build_mesh
    from paxlike.trainer import Trainer

    cfg = experiment.get_config("tiny")
    cfg.model.update(d_model=args.d_model, num_layers=args.num_layers, num_heads=8,
                     num_kv_heads=4, mlp_dim=int(args.d_model * 8 / 3) // 64 * 64)
    cfg.update(batch_size=args.batch_size, seq_len=args.seq_len, steps=1000)
    cfg.mesh.fsdp = -1
    trainer = Trainer(cfg, build_mesh({"fsdp": -1}))
    rng = np.random.default_rng(0)
    shape = (cfg.batch_size, cfg.seq_len)
    host_batch = {
        "inputs": rng.integers(0, 256, shape, dtype=np.int32),
        "targets": rng.integers(0, 256, shape, dtype=np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(cfg.seq_len, dtype=np.int32), shape).copy(),
        "weights": np.ones(shape, np.float32),
    }
    batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host_batch.items()}

    # paxlike's step.
    state = trainer.init_state()
    trainer.compile(state)

    def paxlike_step():
        nonlocal state
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)

    # The hand-written step on the same model.
    model = experiment.transformer.build(cfg.model, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def plain_step(params, opt_state, batch):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(batch["inputs"], batch["positions"], batch["segment_ids"])
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.mean(nll)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    plain_batch = {k: jnp.asarray(v) for k, v in host_batch.items()}

    def handwritten_step():
        nonlocal params, opt_state
        params, opt_state, loss = plain_step(params, opt_state, plain_batch)
        loss.block_until_ready()

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    flops = trainer.flops_per_step()
    tokens = cfg.batch_size * cfg.seq_len
    results = _time_interleaved({
        "paxlike": paxlike_step, "hand-written jax+optax": handwritten_step,
        "gemm": lambda: matmul(a, a).block_until_ready()}, args.steps)
    gemm = 2 * n ** 3 / results.pop("gemm")

    print(f"machine: {platform.node()} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), {jax.devices()[0].device_kind} x {jax.device_count()}, "
          f"jax {jax.__version__}")
    print(f"model: d_model={cfg.model.d_model} layers={cfg.model.num_layers} "
          f"heads={cfg.model.num_heads}/{cfg.model.num_kv_heads} mlp={cfg.model.mlp_dim} "
          f"vocab={cfg.model.vocab_size}; batch {cfg.batch_size} x {cfg.seq_len} tokens; "
          f"{flops / 1e9:.1f} GFLOP/step")
    print(f"float32 GEMM 2048^3 (same run, interleaved): {gemm / 1e9:.1f} GFLOP/s")
    print()
    print(f"| step | ms/step | tokens/s | GFLOP/s | % of GEMM rate | vs hand-written |")
    print(f"|---|---|---|---|---|---|")
    base = results["hand-written jax+optax"]
    for name, seconds in results.items():
        rate = flops / seconds
        print(f"| {name} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {rate / 1e9:.1f} | "
              f"{100 * rate / gemm:.1f}% | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
