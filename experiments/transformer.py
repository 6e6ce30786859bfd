"""Llama-style Transformer language models.

    python -m paxlike.train --config=experiments/transformer.py:tiny --workdir=runs/tiny

`tiny` trains on the Python standard library's source (byte-level) on two CPU cores in about a
minute and a quarter (200 steps); loss falls from ~6.9 to ~2.1. `small` is a CPU/GPU smoke size.
`125m`, `1b` and `7b` are for accelerators (bfloat16 compute, BPE vocabulary) and for
ahead-of-time compiles.
"""

from paxlike.models import transformer
from paxlike.config import sized_config

# Model shape, then trainer settings that go with it.
SIZES = {
    "tiny": dict(model=dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=512,
                            vocab_size=512),
                 batch_size=16, seq_len=128, steps=200),
    "small": dict(model=dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1408,
                             vocab_size=512),
                  batch_size=32, seq_len=512, steps=2000),
    "125m": dict(model=dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                            mlp_dim=2048, vocab_size=32768, tie_embeddings=True,
                            compute_dtype="bfloat16"),
                 batch_size=256, seq_len=2048, steps=20000, tokenizer="bpe"),
    "1b": dict(model=dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                          mlp_dim=8192, vocab_size=32768, compute_dtype="bfloat16",
                          remat="save_dots"),
               batch_size=512, seq_len=2048, steps=50000, tokenizer="bpe"),
    "7b": dict(model=dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                          mlp_dim=11008, vocab_size=32768, compute_dtype="bfloat16",
                          remat="full"),
               batch_size=1024, seq_len=4096, steps=100000, tokenizer="bpe"),
}


def get_config(size: str = "tiny"):
    return sized_config("experiments/transformer.py", SIZES, size, transformer.default_config())
