"""Mixture-of-experts Transformer language models (models/moe.py, docs/moe.md).

    python -m paxlike.train --config=experiments/moe.py:tiny --workdir=runs/moe-tiny

`tiny` (8 experts, top-2, every layer MoE) trains on the built-in corpus on two CPU cores; `small`
(16 experts, top-2) is a CPU/GPU smoke size. `8x7b` has Mixtral-8x7B's shape and `fine64` a
DeepSeek-V3-style fine-grained shape (64 routed experts, top-6, 2 shared experts, sigmoid router
with the auxiliary-loss-free bias); both are for accelerators and ahead-of-time compiles.
"""

from paxlike.models import moe
from paxlike.config import sized_config

SIZES = {
    "tiny": dict(model=dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=512,
                            expert_mlp_dim=256, num_experts=8, experts_per_token=2,
                            vocab_size=512),
                 batch_size=16, seq_len=128, steps=200),
    "small": dict(model=dict(d_model=256, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1024,
                             expert_mlp_dim=512, num_experts=16, experts_per_token=2,
                             vocab_size=512),
                  batch_size=32, seq_len=256, steps=2000),
    "8x7b": dict(model=dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                            mlp_dim=14336, num_experts=8, experts_per_token=2, vocab_size=32768,
                            rope_theta=1e6, compute_dtype="bfloat16", remat="full"),
                 batch_size=256, seq_len=4096, steps=100000, tokenizer="bpe"),
    "fine64": dict(model=dict(d_model=2048, num_layers=28, num_heads=16, num_kv_heads=16,
                              mlp_dim=10944, expert_mlp_dim=1408, num_experts=64,
                              experts_per_token=6, num_shared_experts=2, router="sigmoid",
                              router_bias_rate=1e-3, vocab_size=32768,
                              compute_dtype="bfloat16", remat="full",
                              aux_loss_weights={"load_balance": 1e-4, "router_z": 0.0}),
                   batch_size=512, seq_len=4096, steps=100000, tokenizer="bpe"),
}


def get_config(size: str = "tiny"):
    return sized_config("experiments/moe.py", SIZES, size, moe.default_config())
