"""Gated linear attention (GLA) language models (models/gla.py).

    python -m paxlike.train --config=experiments/gla.py:tiny --workdir=runs/gla_tiny

`tiny` trains on the Python standard library's source (byte-level) on a CPU in about a minute.
`small` is a CPU/GPU smoke size. `340m` and `1.3b` are the paper's shapes (24 layers, d = 1024 /
2048, 4 heads, key dim d/2, value dim d, SwiGLU MLP at 8/3·d rounded up to a multiple of 256) and
training recipe (AdamW, lr 3e-4 cosine to 3e-5, weight decay 0.01, clip 1.0, 0.5M-token batches of
2048-token sequences, 0.5B warmup tokens; 15B and 100B tokens), with a BPE vocabulary, for
accelerators and ahead-of-time compiles.
"""

from paxlike.models import gla
from paxlike.config import sized_config

TOKENS_PER_STEP = 256 * 2048  # the paper's 0.5M-token batches
# The paper's recipe: lr 3e-4 cosine to 3e-5, wd 0.01, clip 1.0, 0.5B warmup tokens.
PAPER_OPTIMIZER = dict(learning_rate=3e-4, min_lr_ratio=0.1, weight_decay=0.01, clip_norm=1.0,
                       warmup_steps=500_000_000 // TOKENS_PER_STEP)

# Model shape, then trainer settings that go with it.
SIZES = {
    "tiny": dict(model=dict(d_model=128, num_layers=4, num_heads=4, mlp_dim=512, vocab_size=512),
                 batch_size=16, seq_len=128, steps=300),
    "small": dict(model=dict(d_model=512, num_layers=8, num_heads=4, mlp_dim=1408, vocab_size=512),
                  batch_size=32, seq_len=512, steps=2000),
    "340m": dict(model=dict(d_model=1024, num_layers=24, num_heads=4, mlp_dim=2816,
                            vocab_size=32768, compute_dtype="bfloat16"),
                 batch_size=256, seq_len=2048, steps=15_000_000_000 // TOKENS_PER_STEP,
                 tokenizer="bpe", optimizer=PAPER_OPTIMIZER),
    "1.3b": dict(model=dict(d_model=2048, num_layers=24, num_heads=4, mlp_dim=5632,
                            vocab_size=32768, compute_dtype="bfloat16", remat="save_dots"),
                 batch_size=256, seq_len=2048, steps=100_000_000_000 // TOKENS_PER_STEP,
                 tokenizer="bpe", optimizer=PAPER_OPTIMIZER),
}


def get_config(size: str = "tiny"):
    return sized_config("experiments/gla.py", SIZES, size, gla.default_config())
