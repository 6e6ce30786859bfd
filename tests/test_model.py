"""The Transformer on its own: packed documents are independent, remat changes nothing but memory,
depth does not grow the program, bfloat16 compute tracks float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import small_test_config
from paxlike.models import transformer
from paxlike.mesh import build_mesh
from paxlike.trainer import Trainer


def _model(**overrides):
    cfg = small_test_config(**{f"model.{k}": v for k, v in overrides.items()}).model
    return transformer.build(cfg, nnx.Rngs(0))


def _doc_inputs(tokens):
    t = len(tokens)
    return (jnp.asarray(tokens)[None], jnp.arange(t)[None], jnp.ones((1, t), jnp.int32))


def test_packed_documents_do_not_see_each_other():
    model = _model()
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, n) for n in (7, 12, 13)]
    packed = jnp.asarray(np.concatenate(docs))[None]
    positions = jnp.asarray(np.concatenate([np.arange(len(d)) for d in docs]))[None]
    segments = jnp.asarray(np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)]))[None]
    logits = model(packed, positions, segments)[0]
    start = 0
    for doc in docs:
        alone = model(*_doc_inputs(doc))[0]
        np.testing.assert_allclose(logits[start:start + len(doc)], alone, rtol=1e-5, atol=1e-5)
        start += len(doc)


def test_remat_policies_give_identical_gradients():
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    segments = jnp.ones((2, 16), jnp.int32)
    grads = {}
    for remat in ("none", "full", "save_dots"):
        graphdef, params = nnx.split(_model(remat=remat))

        def loss(p):
            return nnx.merge(graphdef, p)(tokens, positions, segments).std()
        grads[remat] = jax.grad(loss)(params)
    for remat in ("full", "save_dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     grads[remat], grads["none"])


def test_program_size_does_not_grow_with_depth():
    def hlo_ops(num_layers):
        cfg = small_test_config(**{"model.num_layers": num_layers})
        trainer = Trainer(cfg, build_mesh({}, devices=jax.devices()[:1]))
        text = trainer._train_step.lower(trainer.abstract_state(), trainer.abstract_batch()).as_text()
        return sum(1 for line in text.splitlines() if "=" in line)
    assert hlo_ops(8) == hlo_ops(2)


def test_bfloat16_compute_tracks_float32():
    tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, 256)
    positions = jnp.broadcast_to(jnp.arange(32), (2, 32))
    segments = jnp.ones((2, 32), jnp.int32)
    f32 = _model()(tokens, positions, segments)
    bf16 = _model(compute_dtype="bfloat16")(tokens, positions, segments)
    assert bf16.dtype == jnp.float32  # logits are always returned in float32
    rel = float(jnp.sqrt(jnp.mean((bf16 - f32) ** 2) / jnp.mean(f32 ** 2)))
    assert rel < 2e-2, rel


@pytest.mark.parametrize("bad,message", [
    (dict(num_heads=3), "not divisible by model.num_heads"),
    (dict(num_kv_heads=3), "not a multiple of model.num_kv_heads"),
    (dict(remat="sometimes"), "model.remat"),
    (dict(compute_dtype="float16"), "model.compute_dtype"),
])
def test_invalid_model_config_is_named(bad, message):
    cfg = small_test_config(**{f"model.{k}": v for k, v in bad.items()}).model
    assert any(message in p for p in transformer.validate(cfg))
