"""ParaRNN (ParaGRU / ParaLSTM) language models.

    python -m paxlike.train --config=experiments/pararnn.py:tiny --workdir=runs/pararnn-tiny
    python -m paxlike.train --config=experiments/pararnn.py:tiny --config.model.cell=lstm ...

`tiny` trains on the Python standard library's source (byte-level) on a CPU in about a minute
(loss falls from ~6.3; see docs/pararnn_model.md). `small` is a CPU/GPU smoke size. `400m` is for
accelerators (bfloat16 compute, BPE vocabulary, Newton with the Pallas scan) and AOT compiles.
"""

from paxlike.models import pararnn
from paxlike.config import sized_config

# Model shape, then trainer settings that go with it. Mixer-only blocks (mlp_dim=0) with a 2x
# wide cell, as in Mamba-style stacks; 4 heads in the block-diagonal input projection (paper).
SIZES = {
    "tiny": dict(model=dict(d_model=128, num_layers=4, expand=2, num_heads=4, vocab_size=512),
                 batch_size=16, seq_len=128, steps=300),
    "small": dict(model=dict(d_model=512, num_layers=8, expand=2, num_heads=4, vocab_size=512),
                  batch_size=32, seq_len=512, steps=2000),
    # 24 layers x (in 2*1024*2048 + B 3*2048^2/4 + out 2048*1024) = 9.4M/layer (227M), a
    # SwiGLU MLP 3*1024*2048 = 6.3M/layer (151M) and the tied 32K x 1024 embedding: 0.41B.
    "400m": dict(model=dict(d_model=1024, num_layers=24, expand=2, num_heads=4, mlp_dim=2048,
                            vocab_size=32768, tie_embeddings=True, compute_dtype="bfloat16",
                            remat="save_dots"),
                 batch_size=256, seq_len=2048, steps=30000, tokenizer="bpe"),
}


def get_config(size: str = "tiny"):
    return sized_config("experiments/pararnn.py", SIZES, size, pararnn.default_config())
