"""The working set of the Llama-style Transformer (models/transformer.py): what XLA keeps live at
the peak of a train step beyond the parameters, optimizer state, gradients, batch and the saved
activations (`cost.saved_bytes`, traced), derived from the model's shapes.

Where the peak is, and what is live there, was read from the compiler's own buffer assignment
(`XLA_FLAGS=--xla_dump_to=DIR`: `*-buffer-assignment.txt` gives every value's offset and size in
the temp allocation, `*-live-range.txt` its live range; their union at each program point is the
heap, and its maximum is exactly `memory_analysis().temp_size_in_bytes`). On every CPU case of
tests/test_planner.py the peak is in the backward pass of the *last* layer's MLP (the first
iteration of the backward scan): all layers' saved activations are still live (the scan's stacked
buffers are freed only after it), and on top of them one layer's MLP backward. What is live there
is counted in arrays of the model's own sizes, per device:

    mlp      b·t·mlp/tp       the MLP's cotangents: d hidden, d gate, d up, and the two
                              transposed copies the weight-gradient dots read (5), plus what the
                              remat policy recomputes instead of saving: the gate and up outputs
                              under `full` (+3 with their product), the SiLU under `save_dots` (+1)
    scores   b·h/tp·t·t f32   one attention-probability array (recomputed under remat, and the
                              softmax cotangent's buffer otherwise)
    stream   b·t·d            7: the residual-stream cotangent, its copies around the two RMSNorms
                              and the row-parallel outputs
    weights  d·mlp/tp         the layer's MLP weights gathered (2 in the compute dtype) and one
                              float32 weight gradient being formed
    embed    vocab/vw·d f32   the embedding gradient (scatter-add target of the token lookup),
                              live from the head's backward pass to the optimizer

The other candidate peak is the loss: every saved activation, the f32 logits, their softmax and
cotangent (3 logits-sized arrays), the head's weight gathered in the compute dtype with its
float32 gradient, and the embedding gradient. The larger of the two is the working set. These are
counts of arrays, not fitted multiples; the counts are XLA:CPU's (its fusion decides which
intermediates are materialised). TPU generations keep fitted multiples of `units`
(`cost.CALIBRATION`): the TPU compiler's memory analysis reports more temporary memory than its
dumped buffer assignment holds, so its peak cannot be read off a dump the same way.
"""

from __future__ import annotations

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

# MLP-sized arrays live in the backward pass of one layer's MLP, per remat policy (see above).
MLP_ARRAYS = {"none": 5, "save_dots": 6, "full": 8}
STREAM_ARRAYS = 7
LOGITS_ARRAYS = 3


class TransformerActivations:
    """What the planner knows of the Transformer beyond its parameters and traced residuals: the
    per-device sizes of its transient arrays, its working set, and remat's extra FLOPs."""

    lookup_params = ("embed",)   # tables read by token (jnp.take), not multiplied

    def __init__(self, cfg):
        m = cfg.model
        self.d, self.h, self.kv = m.d_model, m.num_heads, m.num_kv_heads
        self.hd = m.head_dim or m.d_model // m.num_heads
        self.mlp, self.vocab, self.layers = m.mlp_dim, m.vocab_size, m.num_layers
        self.dt = _DTYPE_BYTES[m.compute_dtype]

    def units(self, b: int, t: int, tp: int, vocab_ways: int) -> dict[str, float]:
        """Per-device bytes of one array of each transient kind."""
        return {"scores": b * (self.h / tp) * t * t * 4,
                "logits": b * t * self.vocab / vocab_ways * 4,
                "stream": b * t * self.d * self.dt,
                "mlp": b * t * self.mlp / tp * self.dt,
                "mlp_weight": self.d * self.mlp / tp,            # elements
                "head_weight": self.d * self.vocab / vocab_ways,  # elements
                "embed_grad": self.vocab / vocab_ways * self.d * 4}

    def working_set(self, remat: str, b: int, t: int, tp: int, vocab_ways: int
                    ) -> dict[str, float]:
        """Bytes live beyond the saved activations at the two candidate peaks (XLA:CPU counts).

        All saved activations count at both, the output head's included: whether its
        logits-sized residuals are still live at the layer peak could not be told apart in the
        dumps (vocabulary = MLP width there), and counting them matched the compiles better."""
        u = self.units(b, t, tp, vocab_ways)
        layer = (MLP_ARRAYS[remat] * u["mlp"] + u["scores"] + STREAM_ARRAYS * u["stream"]
                 + (2 * self.dt + 4) * u["mlp_weight"] + u["embed_grad"])
        loss = (LOGITS_ARRAYS * u["logits"] + (self.dt + 4) * u["head_weight"]
                + u["embed_grad"])
        return {"layer_backward": layer, "loss": loss}

    @staticmethod
    def flops_per_step(cfg) -> float:
        from paxlike import family
        tokens = cfg.batch_size * cfg.seq_len
        return family.load(cfg.model).flops_per_token(cfg.model, cfg.seq_len) * tokens

    def flops_per_token_extra(self, remat: str, seq_len: int, microbatches: int = 1) -> float:
        """Recomputation FLOPs per token added by remat (beyond the 6N model FLOPs)."""
        d, hd, L = self.d, self.hd, self.layers
        matmul = L * (d * hd * (2 * self.h + 2 * self.kv) + 3 * d * self.mlp)
        attn = L * 4 * self.h * hd * seq_len
        if remat == "full":
            return 2 * matmul + attn
        if remat == "save_dots":
            return attn
        return 0.0
