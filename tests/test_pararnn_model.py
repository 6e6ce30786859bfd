"""ParaGRU / ParaLSTM language models: same numbers on every mesh, parameters sharded as the rules
say, packed rows = separate documents, published initialisation, Newton solve = sequential scan."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import shrunk_config
from paxlike.experiments import pararnn as experiment
from paxlike.models import pararnn
from paxlike import loop
from paxlike.mesh import build_mesh
from paxlike.trainer import Trainer


def small_config(**overrides):
    return shrunk_config(experiment, dict(d_model=32, num_layers=2, expand=2, num_heads=4,
                                          vocab_size=512), steps=4, **overrides)


def model_config(**overrides):
    cfg = small_config().model
    cfg.update(overrides)
    return cfg


def test_paragru_lm_same_losses_on_8_devices_as_on_one(tmp_path):
    # Newton + associative scan (not the CPU default, lax.scan): the solver itself under SPMD, with
    # the batch over data x fsdp and the cell's channels over tensor; then the sequence split
    # over context 4 (x fsdp 2), the blocks passing states, corrections and adjoints on.
    newton = {"model.solver_impl": "xla", "model.num_layers": 1}
    single = loop.run(small_config(**newton), str(tmp_path / "one"), devices=jax.devices()[:1])
    assert len(single) == 4 and single[-1] < single[0]
    for mesh in ({"data": 2, "fsdp": 2, "tensor": 2}, {"context": 4, "fsdp": 2}):
        sharded = loop.run(small_config(**newton, **{f"mesh.{k}": v for k, v in mesh.items()}),
                           str(tmp_path / "_".join(mesh)))
        np.testing.assert_allclose(sharded, single, rtol=1e-5, err_msg=str(mesh))


def _row(lengths, total):
    """(segment_ids, positions) of one row: documents of `lengths`, then padding (segment 0)."""
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                         + [np.zeros(total - sum(lengths))]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths]
                         + [np.zeros(total - sum(lengths))]).astype(np.int32)
    return seg, pos


@pytest.mark.parametrize("cell,impl", [("gru", "xla"), ("lstm", "reference")])
def test_packed_row_equals_separate_documents(cell, impl):
    model = pararnn.build(model_config(cell=cell, solver_impl=impl, num_layers=1), nnx.Rngs(3))
    lengths, total = (5, 13, 9), 32
    doc_tokens = np.asarray(jax.random.randint(jax.random.key(0), (sum(lengths),), 0, 512))
    # Row 0: the three documents packed; row 1: the same tokens as one document (no resets);
    # rows 2-4: each document alone at the start of its own row. One call, one compile.
    tokens = np.zeros((2 + len(lengths), total), np.int32)
    seg, pos = np.zeros_like(tokens), np.zeros_like(tokens)
    tokens[0, :sum(lengths)] = tokens[1, :sum(lengths)] = doc_tokens
    seg[0], pos[0] = _row(lengths, total)
    seg[1], pos[1] = np.ones(total), np.arange(total)
    starts = np.cumsum((0,) + lengths)
    for i, n in enumerate(lengths):
        tokens[2 + i, :n] = doc_tokens[starts[i]:starts[i] + n]
        seg[2 + i], pos[2 + i] = _row((n,), total)
    out = np.asarray(jax.jit(lambda *a: model(*a))(tokens, pos, seg))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(out[0, starts[i]:starts[i] + n], out[2 + i, :n],
                                   atol=2e-5, rtol=1e-5, err_msg=f"document {i}")
    # Without the resets a later document sees the earlier ones: the check has teeth.
    assert np.max(np.abs(out[1, 5:18] - out[0, 5:18])) > 1e-2


def test_either_boundary_mark_resets_state():
    # A boundary marked only by the segment id (positions run on), or only by positions restarting
    # at 0 (same segment id), cuts the state and the conv window all the same.
    model = pararnn.build(model_config(solver_impl="reference", num_layers=1), nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 16), 0, 512)).repeat(3, 0)
    tokens[2, :10] = tokens[0, 6:]
    seg = np.array([[1] * 6 + [2] * 10, [1] * 16, [1] * 10 + [0] * 6])
    pos = np.array([list(range(16)), list(range(6)) + list(range(10)), list(range(10)) + [0] * 6])
    out = np.asarray(jax.jit(lambda *a: model(*a))(tokens, pos, seg))
    np.testing.assert_allclose(out[0, 6:], out[2, :10], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out[1, 6:], out[2, :10], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("expand,heads", [(1, 32), (2, 4)])  # head size 1 (std 1): clip active
def test_cell_initialisation(cell, expand, heads):
    cfg = model_config(cell=cell, expand=expand, num_heads=heads)
    cell_module = pararnn.ParaCell(cfg, nnx.Rngs(7))
    fan_in = pararnn.d_inner(cfg) // heads
    recurrent = np.concatenate([np.asarray(v) for v in cell_module.recurrent_params().values()])
    assert len(cell_module.recurrent_params()) == (3 if cell == "gru" else 5)
    assert np.max(np.abs(recurrent)) <= 0.5
    if fan_in == 1:  # std 1 truncated at 2: a good share of the draws hit the clip
        assert np.mean(np.abs(recurrent) == 0.5) > 0.3
    else:
        assert np.std(recurrent) == pytest.approx(0.88 / math.sqrt(fan_in), rel=0.3)
    w = np.asarray(cell_module.w_in[...])
    bound = math.sqrt(6 / fan_in)  # Kaiming uniform over each head's fan-in
    assert w.shape == (heads, fan_in, 3, fan_in)
    assert np.max(np.abs(w)) <= bound and np.max(np.abs(w)) > 0.9 * bound
    for gate in pararnn.GATES[cell]:
        assert not np.any(np.asarray(getattr(cell_module, f"b_{gate}")[...]))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_newton_solve_equals_sequential_scan(cell):
    tokens = jax.random.randint(jax.random.key(2), (2, 48), 0, 512)
    seg, pos = (np.repeat(a[None], 2, 0) for a in _row((20, 28), 48))

    def loss_and_grads(impl):
        model = pararnn.build(model_config(cell=cell, solver_impl=impl, num_layers=1), nnx.Rngs(1))
        graphdef, params = nnx.split(model)

        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, pos, seg)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads

    seq_logits, seq_grads = loss_and_grads("reference")
    newton_logits, newton_grads = loss_and_grads("xla")
    np.testing.assert_allclose(newton_logits, seq_logits, atol=1e-5)
    for a, b in zip(jax.tree.leaves(newton_grads), jax.tree.leaves(seq_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))


def test_invalid_configs_are_explained():
    bad = model_config(cell="rnn", expand=3, num_heads=5, solver_impl="fast")
    problems = " ".join(pararnn.validate(bad))
    for key in ("model.cell", "num_heads", "model.solver_impl"):
        assert key in problems


def test_parameter_shardings_follow_the_rules():
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    trainer = Trainer(small_config(**{f"mesh.{k}": v for k, v in mesh.items()}), build_mesh(mesh))
    specs = {"/".join(str(k.key) for k in path): s.spec for path, s in
             jax.tree_util.tree_flatten_with_path(trainer.param_shardings)[0]}
    expected = {  # cell channels over tensor; the model dimension over fsdp
        "layers/in_proj": P(None, "fsdp", None, "tensor"),
        "layers/cell/w_in": P(None, "tensor", None, None, None),
        "layers/cell/a_z": P(None, "tensor"),
        "layers/cell/b_c": P(None, "tensor"),
        "layers/conv_w": P(None, None, "tensor"),
        "layers/out_proj": P(None, "tensor", "fsdp"),
        "layers/out_norm/scale": P(None, "tensor"),
        "embed": P("tensor", "fsdp"),
    }
    for name, spec in expected.items():
        assert specs[name] == spec, (name, specs[name])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_train_step_compiles_for_tpu_with_the_mosaic_kernels(cell):
    """The sharded train step compiled by the TPU compiler for v5e:2x2 from this CPU host: with
    solver_impl="auto" the Pallas scan kernel is picked for the platform the step is lowered for,
    and it runs per shard (the partitioner cannot split Mosaic calls). Forward and backward scans
    appear as Mosaic kernels: the forward scan in the Newton loop and the reverse adjoint scan, each
    once in the layer scan's body."""
    pytest.importorskip("libtpu")          # the `tpu` extra; with it installed this must pass
    from paxlike.compiled import topology_devices
    mesh = {"fsdp": 2, "tensor": 2}
    cfg = small_config(**{f"mesh.{k}": v for k, v in mesh.items()}, **{"model.cell": cell})
    assert cfg.model.solver_impl == "auto"
    compiled = Trainer(cfg, build_mesh(mesh, devices=topology_devices("v5e:2x2"))).compile()
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 2
