"""The GLA language model: decoding with the recurrent state reproduces the full forward pass,
packed documents are independent, and it trains in the sharded trainer with heads over `tensor`
giving the same losses as one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import shrunk_config
from paxlike.experiments import gla as gla_experiment
from paxlike.models import gla
from paxlike import loop
from paxlike.mesh import build_mesh
from paxlike.trainer import Trainer

# chunk_size 16 so that the short test sequences cross several kernel chunks.
SMALL_MODEL = dict(d_model=32, num_layers=2, num_heads=4, mlp_dim=64, vocab_size=512, chunk_size=16)


def _config(**overrides):
    return shrunk_config(gla_experiment, SMALL_MODEL, steps=4, **overrides)


def _model(**overrides):
    cfg = _config().model
    cfg.update(overrides)
    return gla.build(cfg, nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens, segment_ids):
    return model(tokens, jnp.zeros_like(tokens), segment_ids)


def test_packed_documents_equal_separate_documents():
    model = _model()
    rng = np.random.default_rng(0)
    lengths, T = (7, 20, 13), 48
    docs = [rng.integers(0, 256, n) for n in lengths]
    # Row 0: the documents packed, then padding (segment 0, as the data pipeline writes it).
    # Rows 1-3: each document alone at the start of a row (trailing padding cannot reach it).
    tokens, segments = np.zeros((4, T), int), np.zeros((4, T), int)
    start = 0
    for i, doc in enumerate(docs):
        tokens[0, start:start + len(doc)], segments[0, start:start + len(doc)] = doc, i + 1
        tokens[i + 1, :len(doc)], segments[i + 1, :len(doc)] = doc, 1
        start += len(doc)
    logits = _forward(model, jnp.asarray(tokens), jnp.asarray(segments))
    start = 0
    for i, doc in enumerate(docs):
        np.testing.assert_allclose(logits[0, start:start + len(doc)], logits[i + 1, :len(doc)],
                                   rtol=1e-5, atol=1e-5)
        start += len(doc)


def test_trains_with_tensor_and_context_parallelism_same_as_one_device(tmp_path):
    single = np.array(loop.run(_config(), str(tmp_path / "single"), devices=jax.devices()[:1]))
    assert single.shape == (4,) and single[-1] < single[0]
    # heads over tensor, and the sequence over context, its blocks passing states on (fsdp has
    # nothing GLA-specific: tests/test_train.py covers it)
    for mesh in ({"data": 2, "context": 2, "tensor": 2}, {"context": 4, "fsdp": 2}):
        sharded = np.array(loop.run(_config(**{f"mesh.{k}": v for k, v in mesh.items()}),
                                    str(tmp_path / "_".join(mesh))))
        np.testing.assert_allclose(sharded, single, rtol=1e-5, err_msg=str(mesh))


def test_parameters_sharded_with_heads_on_tensor():
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    trainer = Trainer(_config(**{f"mesh.{k}": v for k, v in mesh.items()}), build_mesh(mesh))
    params = trainer.abstract_state().params
    flat = {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    expected = {  # logical names -> mesh axes under the fsdp_tp preset (leading axis: layers)
        "embed": P("tensor", "fsdp"),
        "unembed": P("fsdp", "tensor"),
        "layers/mix/wq": P(None, "fsdp", "tensor", None),         # (embed, heads, head_dim)
        "layers/mix/wk": P(None, "fsdp", "tensor", None),
        "layers/mix/wv": P(None, "fsdp", "tensor", None),
        "layers/mix/wr": P(None, "fsdp", "tensor", None),
        "layers/mix/w_gate_down": P(None, "fsdp", None),          # (embed, rank 16)
        "layers/mix/w_gate_up": P(None, None, "tensor", None),    # (rank, heads, head_dim)
        "layers/mix/gate_bias": P(None, "tensor"),                # (heads · head_dim)
        "layers/mix/out_norm/scale": P(None, None),               # (head_dim,): shared by heads
        "layers/mix/wo": P(None, "tensor", None, "fsdp"),         # (heads, head_dim, embed)
        "layers/mlp/w_gate": P(None, "fsdp", "tensor"),
        "layers/mlp/w_down": P(None, "tensor", "fsdp"),
        "layers/mix_norm/scale": P(None, "fsdp"),
        "final_norm/scale": P("fsdp"),
    }
    for name, spec in expected.items():
        assert flat[name].sharding.spec == spec, (name, flat[name].sharding.spec)
    assert set(expected) <= set(flat) and len(flat) == len(expected) + 2  # + mlp w_up, mlp_norm


def test_config_problems_name_the_keys():
    cfg = gla.default_config()
    assert gla.validate(cfg) == []
    for size in gla_experiment.SIZES:
        assert gla.validate(gla_experiment.get_config(size).model) == [], size
    cfg.update(d_model=30, chunk_size=24, gla_impl="cuda", remat="some")
    problems = " ".join(gla.validate(cfg))
    for key in ("model.expand_k", "model.chunk_size", "model.gla_impl", "model.remat"):
        assert key in problems, (key, problems)
    with pytest.raises(ValueError, match="model.num_heads"):
        _model(num_heads=3)


def test_bfloat16_compute_tracks_float32():
    tokens = jax.random.randint(jax.random.key(2), (2, 40), 0, 512)
    segments = jnp.ones_like(tokens)
    ref = _forward(_model(), tokens, segments)
    low = _forward(_model(compute_dtype="bfloat16"), tokens, segments)
    assert low.dtype == jnp.float32
    rel = float(jnp.sqrt(jnp.mean((low - ref) ** 2) / jnp.mean(ref ** 2)))
    assert rel < 3e-2, rel


def test_flops_formula_matches_compiler():
    # One layer: XLA's cost analysis counts the body of the layer scan once, whatever its length.
    cfg = _config(**{"model.d_model": 128, "model.mlp_dim": 512, "model.num_layers": 1,
                     "model.chunk_size": 64, "seq_len": 128, "batch_size": 4})
    trainer = Trainer(cfg, build_mesh({}, devices=jax.devices()[:1]))
    cost = trainer.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # The causal intra-chunk blocks count as half (the Transformer's convention); XLA computes
    # them whole: the profile's extra FLOPs without remat are exactly that masked half.
    masked = gla.planner_profile(cfg.model).flops_per_token_extra("none", cfg.seq_len)
    assert masked == 3 * cfg.model.num_layers * 64 * (gla.key_dim(cfg.model) + gla.value_dim(cfg.model))
    computed = trainer.flops_per_step() + masked * cfg.batch_size * cfg.seq_len
    assert computed == pytest.approx(cost["flops"], rel=0.10)


def test_train_step_compiles_for_tpu_with_the_mosaic_kernels():
    """The whole sharded train step, lowered for a real TPU topology from this CPU host: with
    gla_impl="auto" the kernels are picked by the platform the step is lowered for, so the TPU
    compiler must see the Pallas (Mosaic) kernels, forward and backward, in every layer."""
    pytest.importorskip("libtpu")          # the `tpu` extra; with it installed this must pass
    from paxlike.compiled import topology_devices
    mesh = {"fsdp": 2, "tensor": 2}
    cfg = _config(**{f"mesh.{k}": v for k, v in mesh.items()}, **{"model.chunk_size": 64,
                                                                   "seq_len": 128})
    assert cfg.model.gla_impl == "auto"
    compiled = Trainer(cfg, build_mesh(mesh, devices=topology_devices("v5e:2x2"))).compile()
    # 4 kernels (state, out, state + W, grads) per layer; layers are one scan body
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 4
