"""Splash attention (kernels/attention/splash.py, Pallas interpret mode on CPU) against XLA's
attention with the Transformer's mask (causal within each packed document), forward and
gradients, float32:
causal, packed documents with padding, grouped-query heads, on one device and with the queries
split over 2 devices and the heads over 2 (the kernel's mask blocks split with them); and the
Transformer with model.attention_impl=splash training like XLA attention on one device; and
splash as the block computation of ring attention, alone and in the Transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs import packed_attention_inputs
from jax.sharding import Mesh, PartitionSpec as P

from paxlike.kernels.attention.splash import SplashKernel, splash_attention

B, T, H, KV, D = 2, 256, 4, 2, 16   # key blocks are whole multiples of 128 tokens


def _inputs():
    return packed_attention_inputs(jnp.float32, batch=B, length=T, heads=H, kv_heads=KV,
                                   head_dim=D)


def _xla_attention(q, k, v, pos, seg):
    from paxlike.models.transformer import attention_mask
    return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(seg))


def _split_over(q_ways, head_ways):
    """splash_attention in a shard_map: queries over `q` (keys and values whole), heads over
    `heads`."""
    mesh = Mesh(np.array(jax.devices()[:q_ways * head_ways]).reshape(q_ways, head_ways),
                ("q", "heads"))
    kernel = SplashKernel(T, H, q_shards=q_ways, head_shards=head_ways, interpret=True)
    whole = P(None, None, "heads", None)
    run = jax.shard_map(splash_attention, mesh=mesh, in_specs=(
        kernel.in_spec(mesh, ("heads",), ("q",)), P(None, "q", "heads", None), whole, whole,
        P(None, "q"), P(None, None)), out_specs=P(None, "q", "heads", None), check_vma=False)
    return lambda q, k, v, pos, seg: run(kernel.kernel, q, k, v, seg, seg)


@pytest.mark.parametrize("ways", [(1, 1), (2, 2)], ids=["one_device", "queries2_heads2"])
def test_splash_equals_attention_over_the_whole_sequence(ways):
    q, k, v, pos, seg = _inputs()
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, D)), jnp.float32)
    loss = lambda attend: lambda *a: jnp.sum(attend(*a) * weights)  # noqa: E731
    want, want_grads = jax.jit(jax.value_and_grad(loss(_xla_attention), argnums=(0, 1, 2)))(
        q, k, v, pos, seg)
    got, grads = jax.jit(jax.value_and_grad(loss(_split_over(*ways)), argnums=(0, 1, 2)))(
        q, k, v, pos, seg)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w, name in zip(grads, want_grads, "qkv"):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("ways,order", [(2, "contiguous"), (4, "zigzag")])
def test_splash_as_ring_attention_block_equals_attention_over_the_whole_sequence(ways, order):
    """Ring attention with splash per block pair (kernels/attention/splash_ring.py) on `ways`
    devices, tokens in `order`: outputs and gradients of XLA attention over the whole sequence
    with the positions-and-segments mask (two packed documents, then padding; GQA), rtol 1e-5,
    on every real token."""
    from paxlike.kernels.attention.ring import dense_attention, zigzag_order
    from paxlike.kernels.attention.splash_ring import splash_ring_attention
    t, heads, kv_heads = 256, 2, 1            # per device: two zigzag chunks of 128
    length = ways * t
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, length, h, D)), jnp.float32)
               for h in (heads, kv_heads, kv_heads))
    seg = np.ones((1, length), int)
    seg[:, 300:], seg[:, length - 40:] = 2, 0
    pos = np.concatenate([np.arange(300), np.arange(length - 340), np.zeros(40, int)])[None]
    seg, pos = jnp.asarray(seg, jnp.int32), jnp.asarray(pos, jnp.int32)
    perm = zigzag_order(length, ways) if order == "zigzag" else np.arange(length)
    mesh = Mesh(np.array(jax.devices()[:ways]), ("c",))
    run = jax.shard_map(lambda q, k, v, s: splash_ring_attention(
        q, k, v, s, s, axis_name="c", order=order, interpret=True), mesh=mesh,
        in_specs=(P(None, "c"),) * 4, out_specs=P(None, "c"), check_vma=False)
    weights = jnp.asarray(rng.standard_normal((1, length, heads, D)), jnp.float32)
    real = (seg != 0)[:, :, None, None]

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.where(real, attend(q, k, v) * weights, 0))
    ring = lambda q, k, v: run(q[:, perm], k[:, perm], v[:, perm],  # noqa: E731
                               seg[:, perm])[:, np.argsort(perm)]
    whole = lambda q, k, v: dense_attention(q, k, v, pos, seg)  # noqa: E731
    got, grads = jax.jit(jax.value_and_grad(loss(ring), argnums=(0, 1, 2)))(q, k, v)
    want, want_grads = jax.value_and_grad(loss(whole), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(jnp.where(real, jax.jit(ring)(q, k, v), 0),
                               jnp.where(real, whole(q, k, v), 0), rtol=1e-5, atol=1e-5)
    for g, w, name in zip(grads, want_grads, "qkv"):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_lengths_the_blocks_do_not_fit_are_refused(tmp_path):
    from configs import small_test_config
    from paxlike import loop
    from paxlike.errors import UserError
    with pytest.raises(ValueError, match=r"length must be a multiple of 128"):
        SplashKernel(96, 4)
    with pytest.raises(ValueError, match=r"must divide into 3 x 1 shards"):
        SplashKernel(256, 4, q_shards=3)
    for overrides in ({"seq_len": 96},     # a run says so before it writes anything
                      {"seq_len": 256, "model.context_parallel": "ring", "mesh.context": 2,
                       "mesh.fsdp": 4}):  # ring: chunks of 64 per device
        workdir = tmp_path / "run"
        with pytest.raises(UserError, match=r"model.attention_impl=splash: .* change seq_len"):
            loop.run(small_test_config(**overrides, **{"model.attention_impl": "splash"}),
                     str(workdir))
        assert not workdir.exists()


@pytest.mark.parametrize("context_parallel,seq_len", [("all_gather", 256), ("ring", 512)])
def test_transformer_with_splash_trains_like_xla_attention(tmp_path, context_parallel, seq_len):
    """model.attention_impl=splash on context 2 x tensor 2 x fsdp 2 gives the losses of XLA
    attention on one device. all_gather: queries, heads and the kernel's mask blocks split,
    keys and values gathered whole; ring: splash computes each block pair of ring attention
    (kernels/attention/splash_ring.py) on the zigzag order."""
    from configs import small_test_config
    from paxlike import loop
    run = {"seq_len": seq_len, "batch_size": 8, "steps": 3, "model.num_layers": 1}
    reference = loop.run(small_test_config(**run), str(tmp_path / "xla"),
                         devices=jax.devices()[:1])
    splash = loop.run(small_test_config(**run, **{
        "model.attention_impl": "splash", "model.context_parallel": context_parallel,
        "mesh.context": 2, "mesh.tensor": 2, "mesh.fsdp": 2}), str(tmp_path / "splash"))
    np.testing.assert_allclose(splash, reference, rtol=1e-5)
