"""Decoding (paxlike/decode.py) against the full forward pass, for every family that decodes.

Reference: the model's own training forward pass run on each prompt and its continuation alone
(unpadded): greedy decoding must pick its argmax at every position, and every decode step's
logits must equal its logits there (float32). The batch mixes prompt lengths, so the
left-padding and the per-row positions are checked too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paxlike import decode, sharding
from paxlike.mesh import build_mesh
from paxlike.models import gla, moe, pararnn, transformer

SMALL = dict(vocab_size=96, d_model=32, num_layers=2, num_heads=4, mlp_dim=64)
FAMILIES = {
    "transformer": (transformer, dict(num_kv_heads=2)),
    "gla": (gla, dict(chunk_size=16)),
    "paragru": (pararnn, dict(cell="gru")),
    "paralstm": (pararnn, dict(cell="lstm", mlp_dim=0)),
    # Dropless: with a capacity, the full forward pass may drop what one token at a time keeps.
    "moe": (moe, dict(num_kv_heads=2, num_experts=4, moe_every=2, capacity_factor=0.0)),
}
# Lengths 21, 1 and 4: the longest crosses a GLA chunk (16) in the prefill.
PROMPTS = [[5, 17, 3, 9, 40, 2, 11] * 3, [8], [60, 61, 62, 1]]


def _model_cfg(name):
    module, extra = FAMILIES[name]
    cfg = module.default_config()
    cfg.update(SMALL, **extra)
    return cfg


def _params(cfg):
    module = {m.__name__: m for m, _ in FAMILIES.values()}[cfg.module]
    return nnx.to_pure_dict(nnx.state(module.build(cfg, nnx.Rngs(0)))), module


def _mesh(data=1, tensor=1):
    devices = jax.devices()[:data * tensor]
    return build_mesh({"data": data, "fsdp": 1, "tensor": tensor}, devices=devices)


def _full_logits(module, cfg, params, sequences):
    """Training forward pass logits [rows, T, vocab] of each sequence alone: right-padded into
    one batch (the padding, segment 0, comes after every token that is read)."""
    model = nnx.merge(nnx.graphdef(module.build(cfg, nnx.Rngs(0))), params)
    length = max(map(len, sequences))
    tokens = np.zeros((len(sequences), length), np.int32)
    segments = np.zeros_like(tokens)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)], segments[row, :len(seq)] = seq, 1
    positions = np.broadcast_to(np.arange(length), tokens.shape)
    return np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_decoding_equals_the_full_forward_pass(name):
    cfg = _model_cfg(name)
    params, module = _params(cfg)
    mesh = _mesh()
    decoder = decode.Decoder(cfg, mesh, sharding.get_rules("fsdp_tp", mesh),
                             decode.Sampling(temperature=0))
    new = 6
    out = decoder.generate(params, PROMPTS, new, keep_logits=True)
    assert out.decode_steps == new - 1
    full = _full_logits(module, cfg, params, [p + g for p, g in zip(PROMPTS, out.tokens)])
    for row, prompt in enumerate(PROMPTS):
        generated = out.tokens[row]
        assert len(generated) == new
        at = full[row, len(prompt) - 1:len(prompt) - 1 + new]  # the logits each token came from
        np.testing.assert_allclose(out.logits[:, row], at, rtol=1e-5, atol=1e-5)
        assert generated == [int(t) for t in at.argmax(-1)]


def test_decoding_on_a_sharded_mesh_equals_one_device():
    """data 2 x tensor 2 (batch and heads split, the cache with them) against one device."""
    cfg = _model_cfg("transformer")
    params, _ = _params(cfg)
    results = []
    for mesh in (_mesh(), _mesh(data=2, tensor=2)):
        decoder = decode.Decoder(cfg, mesh, sharding.get_rules("fsdp_tp", mesh),
                                 decode.Sampling(temperature=0))
        placed = jax.device_put(params, decoder.param_shardings)
        results.append(decoder.generate(placed, PROMPTS, 5, keep_logits=True))
    one, split = results
    assert one.tokens == split.tokens
    np.testing.assert_allclose(one.logits, split.logits, rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_from_the_seed_and_respects_top_k():
    cfg = _model_cfg("gla")
    params, _ = _params(cfg)
    mesh = _mesh()
    how = decode.Sampling(temperature=1.0, top_k=3)
    decoder = decode.Decoder(cfg, mesh, sharding.get_rules("fsdp_tp", mesh), how)
    runs = [decoder.generate(params, PROMPTS[:1], 12, seed=s, keep_logits=True) for s in (7, 7, 8)]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].tokens != runs[2].tokens
    for run in runs:
        top3 = np.argsort(run.logits[:, 0], axis=-1)[:, -3:]
        assert all(t in allowed for t, allowed in zip(run.tokens[0], top3))


def test_sample_top_p_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.vmap(lambda k: decode.sample(logits, k, decode.Sampling(top_p=0.7))[0])
    seen = set(np.asarray(draw(keys)).tolist())
    assert seen == {0, 1}        # 0.5 < 0.7, 0.5 + 0.3 reaches it: tokens 2 and 3 never drawn
    greedy = decode.sample(logits, keys[0], decode.Sampling(temperature=0))
    assert int(greedy[0]) == 0


def test_eos_ends_a_row_and_bad_settings_are_refused():
    cfg = _model_cfg("transformer")
    params, _ = _params(cfg)
    mesh = _mesh()
    decoder = decode.Decoder(cfg, mesh, sharding.get_rules("fsdp_tp", mesh),
                             decode.Sampling(temperature=0))
    free = decoder.generate(params, PROMPTS, 6)
    eos = free.tokens[0][2]                       # row 0 emits this third: it now ends there
    stopped = decoder.generate(params, PROMPTS, 6, eos_id=eos)
    assert stopped.tokens[0] == free.tokens[0][:free.tokens[0].index(eos)]
    for row in (1, 2):
        expected = free.tokens[row]
        cut = expected.index(eos) if eos in expected else len(expected)
        assert stopped.tokens[row] == expected[:cut]
    from paxlike.errors import UserError
    with pytest.raises(UserError, match="top_p"):
        decode.Sampling(top_p=0).check()
    with pytest.raises(UserError, match="at least one token"):
        decoder.generate(params, [[1], []], 3)
