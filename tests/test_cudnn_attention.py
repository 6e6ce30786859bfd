"""cuDNN flash attention (model.attention_impl=cudnn, kernels/attention/cudnn.py).

There is no GPU here. The branch that runs on CUDA is checked by lowering whole train steps for
CUDA (JAX's CUDA plugin, installed by the test extra, reports the cuDNN version the lowering
needs): the attention becomes cuDNN's fused flash-attention calls, forward and backward. The mask
those calls receive, and the split of the queries over devices, are shared with the branch every
other platform runs (XLA's attention), which is checked by its numbers on CPU against the
Transformer's XLA attention, bfloat16, on one device and split 2 x 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs import packed_attention_inputs
from jax.sharding import Mesh, PartitionSpec as P

from paxlike.kernels.attention.cudnn import cuda_plugin_installed, cudnn_attention

B, T, H, KV, D = 2, 256, 4, 2, 16
# Inputs are bfloat16 (cuDNN has no float32 kernel); outputs of size below 1 may differ by one
# bfloat16 rounding (2^-8) where the two computations round in a different order.
BF16_ROUNDING = 2.0 ** -8
FUSED_CALLS = ("fmhaSoftmax", "fmhaSoftmaxBackward",
               "fmhaScaleBiasSoftmax", "fmhaScaleBiasSoftmaxBackward")


def _inputs():
    return packed_attention_inputs(jnp.bfloat16, batch=B, length=T, heads=H, kv_heads=KV,
                                   head_dim=D)


def _xla_attention(q, k, v, pos, seg):
    from paxlike.models.transformer import attention_mask
    return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(seg))


def _split_over(q_ways, head_ways):
    """cudnn_attention in a shard_map: queries over `q` (keys and values whole), heads over
    `heads`, as the Transformer runs it under all-gather context parallelism."""
    mesh = Mesh(np.array(jax.devices()[:q_ways * head_ways]).reshape(q_ways, head_ways),
                ("q", "heads"))
    whole = P(None, None, "heads", None)
    run = jax.shard_map(cudnn_attention, mesh=mesh, in_specs=(
        P(None, "q", "heads", None), whole, whole, P(None, "q"), P(None, None), P(None, "q"),
        P(None, None)), out_specs=P(None, "q", "heads", None), check_vma=False)
    return lambda q, k, v, pos, seg: run(q, k, v, pos, pos, seg, seg)


@pytest.mark.parametrize("ways", [(1, 1), (2, 2)], ids=["one_device", "queries2_heads2"])
def test_mask_and_split_equal_xla_attention(ways):
    """Forward and gradients on every real token (padding outputs are read by no loss: there the
    positions-and-segments mask and the index mask differ)."""
    q, k, v, pos, seg = _inputs()
    real = (seg != 0)[:, :, None, None]
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, D)), jnp.float32)
    loss = lambda attend: lambda *a: jnp.sum(  # noqa: E731
        jnp.where(real, attend(*a).astype(jnp.float32) * weights, 0))
    out = lambda attend: jnp.where(  # noqa: E731
        real, jax.jit(attend)(q, k, v, pos, seg), 0).astype(jnp.float32)
    np.testing.assert_allclose(out(_split_over(*ways)), out(_xla_attention), rtol=0,
                               atol=BF16_ROUNDING)
    grads = jax.jit(jax.grad(loss(_split_over(*ways)), argnums=(0, 1, 2)))(q, k, v, pos, seg)
    want = jax.jit(jax.grad(loss(_xla_attention), argnums=(0, 1, 2)))(q, k, v, pos, seg)
    for g, w, name in zip(grads, want, "qkv"):   # sums of ~100 terms of size ~1
        scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32), rtol=0,
                                   atol=4 * BF16_ROUNDING * scale, err_msg=f"d{name}")


def test_float32_inputs_are_refused():
    q, k, v, pos, seg = _inputs()
    with pytest.raises(ValueError, match="bfloat16 or float16 inputs, not float32"):
        cudnn_attention(q.astype(jnp.float32), k, v, pos, pos, seg, seg)


def _cuda_train_step_text(mesh: dict) -> str:
    """The Transformer's train step (attention_impl=cudnn, bfloat16, 2 layers scanned) lowered
    for CUDA on `mesh`."""
    from configs import small_test_config
    from paxlike.mesh import build_mesh
    from paxlike.trainer import Trainer
    cfg = small_test_config(seq_len=T, batch_size=8, **{
        "model.attention_impl": "cudnn", "model.compute_dtype": "bfloat16",
        **{f"mesh.{k}": v for k, v in mesh.items()}})
    trainer = Trainer(cfg, build_mesh(mesh))
    exported = jax.export.export(
        trainer._train_step, platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(f"__cudnn${name}")
                         for name in FUSED_CALLS])(
        trainer.abstract_state(), trainer.abstract_batch())
    return exported.mlir_module()


@pytest.mark.parametrize("mesh", [{"fsdp": 8}, {"context": 2, "tensor": 2, "fsdp": 2}],
                         ids=["fsdp8", "context2_tensor2_fsdp2"])
def test_train_step_lowers_to_cudnn_flash_attention_for_cuda(mesh):
    """One fused forward and one fused backward call in the scanned layer (bias: the documents'
    mask, one bfloat16 [t, T] array per row); cuDNN's own causal mask (which skips the blocks
    above the diagonal) only when a device holds the whole sequence."""
    assert cuda_plugin_installed(), "the test extra installs jax[cuda13]"
    text = _cuda_train_step_text(mesh)
    calls = {name: text.count(f"@__cudnn${name}(") for name in FUSED_CALLS}
    assert calls == {"fmhaSoftmax": 0, "fmhaSoftmaxBackward": 0,
                     "fmhaScaleBiasSoftmax": 1, "fmhaScaleBiasSoftmaxBackward": 1}, calls
    local = T // mesh.get("context", 1)
    mask_type = "CAUSAL" if local == T else "NO_MASK"
    assert text.count(f'\\22mask_type\\22: \\22{mask_type}\\22') == 2
    assert f"x1x{local}x{T}xbf16>" in text   # the bias: per row, shared by the heads


def test_config_problems_name_the_keys():
    from paxlike.models import transformer
    cfg = transformer.default_config()
    cfg.attention_impl = "cudnn"
    assert any("model.compute_dtype bfloat16 or float16, not float32" in p
               for p in transformer.validate(cfg))
    cfg.compute_dtype, cfg.head_dim = "bfloat16", 20
    assert any("multiple of 8 and at most 256, not 20" in p for p in transformer.validate(cfg))
    cfg.head_dim = 32
    assert transformer.validate(cfg) == []
