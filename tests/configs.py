"""Small configs for tests (the tiny experiment shrunk so a step takes milliseconds), and helpers
for the tests that run the command-line tools."""

import hashlib
import os
import re
import socket
import subprocess
import sys

from paxlike.experiments import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: this checkout on the path, CPU only, and the session's
    compilation cache (set in conftest) so that repeated runs reuse compiled programs."""
    import jax
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def free_port() -> int:
    """A TCP port free on this machine now: a jax.distributed coordinator's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_workers(script, *args) -> list[str]:
    """Runs `python script i port *args` as processes 0 and 1 of a jax.distributed job on CPU
    (without the suite's 8 emulated devices and XLA flags); their outputs. Fails the test when
    either exits non-zero or runs past 120 s."""
    import pytest
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), *map(str, args)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("2-process run timed out")
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    return logs


def snapshot(directory) -> dict[str, str]:
    """{relative path: sha256 of contents} of every file below `directory`."""
    result = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return result


def shrunk_config(experiment, model: dict, *, steps: int = 5, **overrides):
    """An experiment's `tiny` config shrunk so a train step takes milliseconds.

    `model` replaces model sizes; `overrides` are dotted keys ("mesh.fsdp", "model.remat", ...).
    """
    cfg = experiment.get_config("tiny")
    cfg.model.update(model)
    cfg.update(batch_size=16, seq_len=32, steps=steps, log_every=1, eval_every=0,
               checkpoint_every=0, async_checkpoints=False)
    cfg.optimizer.warmup_steps = 2
    cfg.data.eval_batches = 1
    cfg.metrics.plot = False      # drawing loss.png costs 0.1-0.7 s a run; its own tests draw it
    return set_keys(cfg, overrides)


def set_keys(cfg, overrides: dict):
    """cfg with dotted keys ("mesh.fsdp", "model.remat", ...) set to the given values."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def small_test_config(**overrides):
    """The Transformer used by most trainer tests."""
    return shrunk_config(transformer, dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                           mlp_dim=64, vocab_size=512), **overrides)


def compile_on_cpu(cfg, mesh: dict):
    """(plan, compiled train step) of `cfg` on `mesh` over the 8 emulated CPU devices: the
    compiles the planner's CPU predictions are checked against."""
    from paxlike.mesh import build_mesh
    from paxlike.planner import cost
    from paxlike.trainer import Trainer
    plan = cost.Plan.make(mesh, {}, cfg.sharding, cfg.microbatches, cfg.model.remat)
    return plan, Trainer(cfg, build_mesh(mesh)).compile()


def prediction_vs_cpu_compile(cfg, plan, compiled) -> dict:
    """The cost model's prediction for a CPU compile beside the compiler's own figures:
    "memory" and "collectives" (predicted / compiled per-device bytes and collective volume),
    "kinds" {collective kind: (predicted, compiled volume)}, and the raw figures."""
    from paxlike.planner import cost, fleets, hlo
    predicted = cost.estimate(cfg, plan, fleets.parse_fleet("cpu-8"), "cpu")
    m = compiled.memory_analysis()
    actual = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
              - m.alias_size_in_bytes)
    found = hlo.collectives(compiled.as_text(), 8)
    volume = sum(v["volume"] for v in found.values())
    return {"memory": predicted.bytes_per_device / actual,
            "collectives": sum(predicted.comm_by_kind.values()) / volume,
            "kinds": {k: (predicted.comm_by_kind.get(k, 0.0), v["volume"])
                      for k, v in found.items()},
            "predicted": predicted, "bytes": actual, "volume": volume, "found": found}


def cli_overrides(**overrides) -> list[str]:
    """The same small model as command-line flags, for subprocess tests."""
    flags = [f"--config.model.{k}={v}" for k, v in dict(
        d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64).items()]
    settings = {"batch_size": 16, "seq_len": 32, "log_every": 1, "eval_every": 0,
                "optimizer.warmup_steps": 2, "metrics.plot": False, **overrides}
    flags += [f"--config.{k}={v}" for k, v in settings.items()]
    return flags


def assert_one_line_error(result, message: str = "") -> str:
    """A command refused bad input the documented way: exit status 2, and the error is ONE line:
    exactly one stderr line starts with `paxlike: error:`, it is the last line, it matches the
    regular expression `message`, and there is no traceback. Returns that line."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("paxlike: error:")]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def packed_attention_inputs(dtype, *, batch=2, length=256, heads=4, kv_heads=2, head_dim=16):
    """q, k, v (normal, `dtype`), positions and segment ids of a batch of 2 rows for attention
    kernels: row 0 holds documents of 100 and 120 tokens, then 36 of padding (segment 0,
    position 0); row 1 one document of `length`."""
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, h, head_dim)), dtype)
               for h in (heads, kv_heads, kv_heads))
    pad = length - 220
    segments = np.array([[1] * 100 + [2] * 120 + [0] * pad, [1] * length])
    positions = np.array([list(range(100)) + list(range(120)) + [0] * pad, list(range(length))])
    return q, k, v, jnp.asarray(positions, jnp.int32), jnp.asarray(segments, jnp.int32)
