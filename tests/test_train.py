"""The sharded trainer: same numbers on every mesh, shardings as the rules say, accumulation,
resharding restore, and the FLOPs formula behind MFU."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import small_test_config
from paxlike import loop
from paxlike.models import transformer
from paxlike.errors import UserError
from paxlike.mesh import build_mesh
from paxlike.trainer import Trainer


def _losses(tmp_path, name, devices=None, **overrides):
    return np.array(loop.run(small_test_config(**overrides), str(tmp_path / name), devices=devices))


def test_same_losses_on_every_mesh(tmp_path):
    reference = _losses(tmp_path, "single", devices=jax.devices()[:1])
    assert reference.shape == (5,) and reference[-1] < reference[0]
    for name, mesh in {"data8": {"data": 8, "fsdp": 1}, "fsdp8": {"fsdp": 8},
                       "dp_fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
                       "fsdp_context": {"fsdp": 4, "context": 2}}.items():
        losses = _losses(tmp_path, name, **{f"mesh.{k}": v for k, v in mesh.items()})
        np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=name)


def test_mesh_axis_unused_by_preset_is_refused():
    cfg = small_test_config(sharding="fsdp")
    with pytest.raises(UserError, match="mesh.tensor=2 is not used by sharding preset 'fsdp'"):
        Trainer(cfg, build_mesh({"fsdp": 4, "tensor": 2}))


def test_parameters_born_sharded_as_rules_say():
    cfg = small_test_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    trainer = Trainer(cfg, build_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    state = trainer.init_state()
    expected = {  # logical names -> mesh axes under the fsdp_tp preset
        "embed": P("tensor", "fsdp"),                                  # (vocab, embed)
        "unembed": P("fsdp", "tensor"),                                # (embed, vocab)
        "final_norm/scale": P("fsdp"),                                 # (embed,)
        "layers/attn/wq": P(None, "fsdp", "tensor", None),             # (layers, embed, heads, head_dim)
        "layers/attn/wk": P(None, "fsdp", "tensor", None),             # kv_heads over tensor
        "layers/attn/wo": P(None, "tensor", None, "fsdp"),             # (layers, heads, head_dim, embed)
        "layers/mlp/w_gate": P(None, "fsdp", "tensor"),                # (layers, embed, mlp)
        "layers/mlp/w_down": P(None, "tensor", "fsdp"),                # (layers, mlp, embed)
        "layers/attn_norm/scale": P(None, "fsdp"),
    }
    flat = {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert len(flat) == 12
    for name, spec in expected.items():
        assert flat[name].sharding.spec == spec, name
        assert len(flat[name].addressable_shards) == 8
    # Adam's moments live where their parameter lives.
    adam = state.opt_state[1][0]
    for moments in (adam.mu, adam.nu):
        for path, leaf in jax.tree_util.tree_flatten_with_path(moments)[0]:
            name = "/".join(str(k.key) for k in path)
            assert leaf.sharding.spec == flat[name].sharding.spec, name


def test_fsdp8_state_memory_is_one_eighth():
    cfg = small_test_config(**{"mesh.fsdp": 8, "model.d_model": 64, "model.mlp_dim": 256})
    trainer = Trainer(cfg, build_mesh({"fsdp": 8}))
    abstract = trainer.abstract_state()
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    memory = trainer.compile().memory_analysis()
    batch_per_device = sum(x.size * x.dtype.itemsize for x in trainer.abstract_batch().values()) / 8
    state_per_device = memory.argument_size_in_bytes - batch_per_device
    assert state_per_device <= 1.05 * total / 8, (state_per_device, total / 8)


def test_gradient_accumulation_equals_full_batch(tmp_path):
    """Two microbatches of 8 rows (2 per device) against the whole batch of 16: the full-batch
    run is test_same_losses_on_every_mesh's dp_fsdp_tp program (the compile is shared)."""
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    full = _losses(tmp_path, "full", **mesh)
    accumulated = _losses(tmp_path, "micro", **mesh, microbatches=2)
    np.testing.assert_allclose(accumulated, full, rtol=1e-5)


def test_restore_8_devices_onto_4_continues_same_batches(tmp_path):
    uninterrupted = _losses(tmp_path, "straight", steps=6)
    cfg = small_test_config(steps=6)
    part1 = loop.run(cfg, str(tmp_path / "moved"), stop_at=3)
    part2 = loop.run(cfg, str(tmp_path / "moved"), devices=jax.devices()[:4])
    np.testing.assert_allclose(np.array(part1 + part2), uninterrupted, rtol=1e-5)


@pytest.mark.parametrize("d_model,mlp_dim,seq_len", [(256, 1024, 128), (128, 512, 256)])
def test_flops_formula_matches_compiler(d_model, mlp_dim, seq_len):
    # One layer: XLA's cost analysis counts the body of the layer scan once, whatever its length.
    cfg = small_test_config(**{"model.d_model": d_model, "model.mlp_dim": mlp_dim,
                               "model.num_layers": 1, "seq_len": seq_len, "batch_size": 4})
    trainer = Trainer(cfg, build_mesh({}, devices=jax.devices()[:1]))
    cost = trainer.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # MFU's numerator counts causal attention as half of the T x T matrix (MaxText's and
    # Megatron-LM's convention); XLA computes the whole matrix, masked half included.
    tokens = cfg.batch_size * cfg.seq_len
    full_attention = transformer.attention_flops_per_token(cfg.model, cfg.seq_len) * tokens
    computed = trainer.flops_per_step() + 0.5 * full_attention
    assert computed == pytest.approx(cost["flops"], rel=0.10)
    assert trainer.flops_per_step() < cost["flops"] - 0.4 * full_attention
