"""ParaGRU / ParaLSTM language models: same numbers on every mesh, packed rows = separate
documents, published initialisation, Newton solve = sequential scan."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import pararnn as experiment
from models import pararnn
from paxlike import loop


def small_config(**overrides):
    cfg = experiment.get_config("tiny")
    cfg.model.update(d_model=32, num_layers=2, expand=2, num_heads=4, vocab_size=512)
    cfg.update(batch_size=16, seq_len=32, steps=4, log_every=1, eval_every=0,
               checkpoint_every=0, async_checkpoints=False)
    cfg.optimizer.warmup_steps = 2
    cfg.data.eval_batches = 1
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def model_config(**overrides):
    cfg = small_config().model
    cfg.update(overrides)
    return cfg


def test_paragru_lm_same_losses_on_8_devices_as_on_one(tmp_path):
    # Newton + associative scan (not the CPU default, lax.scan): the solver itself under SPMD, with
    # the batch over data x fsdp and the cell's channels over tensor.
    newton = {"model.solver_impl": "parallel"}
    single = loop.run(small_config(**newton), str(tmp_path / "one"), devices=jax.devices()[:1])
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    sharded = loop.run(small_config(**newton, **mesh), str(tmp_path / "eight"))
    assert len(single) == 4 and single[-1] < single[0]
    np.testing.assert_allclose(sharded, single, rtol=1e-5)


def _inputs(lengths, total):
    """One packed row: documents of `lengths`, then padding (segment 0) up to `total`."""
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                         + [np.zeros(total - sum(lengths))]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths]
                         + [np.zeros(total - sum(lengths))]).astype(np.int32)
    return seg[None], pos[None]


@pytest.mark.parametrize("cell,impl", [("gru", "parallel"), ("lstm", "sequential")])
def test_packed_row_equals_separate_documents(cell, impl):
    model = pararnn.build(model_config(cell=cell, solver_impl=impl), nnx.Rngs(3))
    lengths, total = (5, 13, 9), 32
    tokens = jax.random.randint(jax.random.key(0), (1, total), 0, 512)
    seg, pos = _inputs(lengths, total)
    packed = model(tokens, pos, seg)
    start = 0
    for n in lengths:
        alone = model(tokens[:, start:start + n], jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
        np.testing.assert_allclose(packed[:, start:start + n], alone, atol=2e-5, rtol=1e-5)
        start += n
    # Without the resets a later document would see the earlier ones: the check has teeth.
    unpacked = model(tokens, jnp.arange(total)[None], jnp.ones((1, total), jnp.int32))
    assert np.max(np.abs(unpacked[:, 5:18] - packed[:, 5:18])) > 1e-2


def test_segment_change_alone_resets_state():
    # A document boundary marked only by the segment id (positions not restarting) still resets.
    model = pararnn.build(model_config(solver_impl="sequential"), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 512)
    seg = jnp.array([[1] * 6 + [2] * 10])
    out = model(tokens, jnp.arange(16)[None], seg)
    alone = model(tokens[:, 6:], jnp.arange(10)[None], jnp.ones((1, 10), jnp.int32))
    np.testing.assert_allclose(out[:, 6:], alone, atol=2e-5, rtol=1e-5)


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
    seg, pos = _inputs((20, 28), 48)
    seg, pos = np.repeat(seg, 2, 0), np.repeat(pos, 2, 0)

    def loss_and_grads(impl):
        model = pararnn.build(model_config(cell=cell, solver_impl=impl), nnx.Rngs(1))
        graphdef, params = nnx.split(model)

        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, pos, seg)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads

    seq_logits, seq_grads = loss_and_grads("sequential")
    newton_logits, newton_grads = loss_and_grads("parallel")
    np.testing.assert_allclose(newton_logits, seq_logits, atol=1e-5)
    for a, b in zip(jax.tree.leaves(newton_grads), jax.tree.leaves(seq_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))


def test_invalid_configs_are_explained():
    bad = model_config(cell="rnn", expand=3, num_heads=5, solver_impl="fast")
    problems = " ".join(pararnn.validate(bad))
    for key in ("model.cell", "num_heads", "model.solver_impl"):
        assert key in problems
