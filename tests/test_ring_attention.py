"""Ring attention (kernels/attention/ring.py) against attention over the whole sequence on one
device, forward and gradients, float32 1e-5: causal, packed documents with padding, grouped-query
heads, the length split 2, 4 and 8 ways, in natural and zigzag token order."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from paxlike.kernels.attention import dense_attention, ring_attention, zigzag_order

B, T, H, KV, D = 2, 32, 4, 2, 8


def _inputs():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, h, D)), jnp.float32) for h in (H, KV, KV))
    # Row 0: documents of 12 and 14 tokens, then 6 of padding (segment 0, position 0); row 1:
    # one document of 32.
    segments = np.array([[1] * 12 + [2] * 14 + [0] * 6, [1] * T])
    positions = np.array([list(range(12)) + list(range(14)) + [0] * 6, list(range(T))])
    return q, k, v, jnp.asarray(positions, jnp.int32), jnp.asarray(segments, jnp.int32)


def _ring_fn(ways):
    mesh = Mesh(np.array(jax.devices()[:ways]), ("context",))
    seq, ids = P(None, "context", None, None), P(None, "context")

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(seq, seq, seq, ids, ids),
                       out_specs=seq, check_vma=False)
    def attend(q, k, v, pos, seg):
        # Chunks of 4 keys: a block of 16 (2 ways) is attended in 4 chunks, one of 4 (8 ways) in 1.
        return ring_attention(q, k, v, pos, pos, seg, seg, axis_name="context", key_chunk=4)
    return attend


def _loss(attend, weights):
    return lambda q, k, v, pos, seg: jnp.sum(attend(q, k, v, pos, seg) * weights)


@pytest.mark.parametrize("ways", [2, 4, 8])
@pytest.mark.parametrize("zigzag", [False, True], ids=["natural", "zigzag"])
def test_ring_equals_attention_over_the_whole_sequence(ways, zigzag):
    q, k, v, pos, seg = _inputs()
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, D)), jnp.float32)
    want = dense_attention(q, k, v, pos, seg)
    want_grads = jax.grad(_loss(dense_attention, weights), argnums=(0, 1, 2))(q, k, v, pos, seg)

    order = zigzag_order(T, ways) if zigzag else np.arange(T)
    back = np.argsort(order)
    permute = lambda x: x[:, order]
    ring = _ring_fn(ways)
    got = ring(*map(permute, (q, k, v, pos, seg)))[:, back]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(_loss(ring, permute(weights)), argnums=(0, 1, 2))(
        *map(permute, (q, k, v, pos, seg)))
    for name, g, w in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(g[:, back], w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bad_arguments_are_named():
    q, k, v, pos, seg = _inputs()
    with pytest.raises(ValueError, match="key_chunk=0 must be >= 1"):
        ring_attention(q, k, v, pos, pos, seg, seg, axis_name="context", key_chunk=0)
    with pytest.raises(ValueError, match="length 30 must be a multiple of 2 x 4"):
        zigzag_order(30, 4)


def test_zigzag_balances_the_visible_blocks():
    """Counted per device over a causal sequence: the natural order leaves device 0 one block of
    work and device n-1 all n; the zigzag order gives every device the same."""
    ways, t = 4, 64
    for order, expected in ((np.arange(t), None), (zigzag_order(t, ways), "equal")):
        pos = order.reshape(ways, -1)
        work = [sum(int((pos[j][None, :] <= pos[i][:, None]).sum()) for j in range(ways))
                for i in range(ways)]
        if expected:
            assert len(set(work)) == 1, work
        else:
            assert work == sorted(work) and work[-1] > 3 * work[0], work


def test_ring_context_parallel_train_steps_equal_one_device(tmp_path):
    """The Transformer with model.context_parallel=ring on context 4 x fsdp 2 (tokens fed in
    zigzag order by the data pipeline) trains with the losses of one device (dense attention,
    tokens in order): ring attention, its gradients and the reorder together."""
    import jax
    from configs import small_test_config
    from paxlike import loop
    reference = loop.run(small_test_config(), str(tmp_path / "one"), devices=jax.devices()[:1])
    ring = loop.run(small_test_config(**{"model.context_parallel": "ring", "mesh.context": 4,
                                         "mesh.fsdp": 2}), str(tmp_path / "ring"))
    np.testing.assert_allclose(ring, reference, rtol=1e-5)


def test_ring_attention_in_the_mixture_of_experts_transformer(tmp_path):
    """The MoE Transformer shares the attention: with context_parallel=ring on context 4 x
    fsdp 2 (zigzag order; routing is per token, so the reorder changes no expert's load) it
    trains with the losses of one device."""
    import jax
    from paxlike import loop
    from test_moe_model import moe_config
    reference = loop.run(moe_config(), str(tmp_path / "one"), devices=jax.devices()[:1])
    ring = loop.run(moe_config(**{"model.context_parallel": "ring", "mesh.context": 4,
                                  "mesh.fsdp": 2}), str(tmp_path / "ring"))
    np.testing.assert_allclose(ring, reference, rtol=1e-5)
