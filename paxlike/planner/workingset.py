"""A model family's planner profile: what the cost model knows of a family beyond its parameters
(`cost.param_infos`: the model's own shapes and logical names) and its saved activations
(`residuals.saved_bytes`: traced). Each family declares its profile beside its definition, as
`planner_profile(model_cfg)` in its module (paxlike/family.py); this is the part they share.

The working set is what XLA keeps live at the peak of a train step beyond the parameters,
optimizer state, gradients, batch and saved activations. A family's counts are read from the
compiler's own buffer assignment (`XLA_FLAGS=--xla_dump_to=DIR`: `*-buffer-assignment.txt` gives
every value's offset and size in the temp allocation, `*-live-range.txt` its live range; their
union at each program point is the heap, and its maximum is exactly
`memory_analysis().temp_size_in_bytes`), on 8 emulated CPU devices: find the peak, and count
the arrays live there in units of the model's own sizes (`units`). For every family measured
the peak is one of two candidates:

    layer_backward  the backward pass of the *last* layer (the first iteration of the backward
                    scan): all layers' saved activations are still live (the scan's stacked
                    buffers are freed only after it), and on top of them that layer's arrays
                    (`layer_working`: the family's counts) and the float32 embedding gradient
                    (scatter-add target of the token lookup, live from the head's backward pass
                    to the optimizer)
    loss            every saved activation, the f32 logits, their softmax and cotangent
                    (LOGITS_ARRAYS), the head's weight gathered in the compute dtype with its
                    float32 gradient, and the embedding gradient: the frame every decoder LM
                    shares (models/layers.py `DecoderLM`), counted once here

The larger of the two is the working set. These are counts of arrays, not fitted multiples; the
counts are XLA:CPU's (its fusion decides which intermediates are materialised). TPU generations
keep fitted multiples of `units` (`cost.CALIBRATION`): the TPU compiler's memory analysis reports
more temporary memory than its dumped buffer assignment holds, so its peak cannot be read off a
dump the same way.

Tensor parallelism: the residual stream is summed over `tensor` where a layer's row-parallel
matmuls end (forward) and where the input gradients of its column-parallel ones meet (backward);
how many such sums a layer has, in arrays of the residual stream's size, is the family's
(`tensor_sums_per_layer`). The output head and the token lookup add theirs in `cost.estimate`.
"""

from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
LOGITS_ARRAYS = 3   # f32 logits, their softmax and cotangent, live at the loss


class Profile:
    """The shared part of a family's planner profile. A family subclasses it and defines
    `tensor_dims`, `layer_units`, `layer_working`, `tensor_sums_per_layer` and
    `flops_per_token_extra` (the Transformer's, models/transformer.py, is the example)."""

    lookup_params = ("embed",)   # tables read by token (jnp.take), not multiplied
    float32_params = ()          # weights used in float32 whatever the compute dtype
    # Whether the saved activations outside the layer scan (the head's and the loss's, which
    # the head's backward pass frees) count at the layer_backward peak (`cost.estimate`).
    head_saved_at_layer_peak = False

    def __init__(self, model_cfg):
        m = model_cfg
        self.d, self.vocab, self.layers = m.d_model, m.vocab_size, m.num_layers
        self.dt = DTYPE_BYTES[m.compute_dtype]

    # ------------------------------------------------------------------ what a family defines
    @property
    def tensor_dims(self) -> set[int]:
        """Sizes of the activation dimensions the rules split over `tensor` (heads, MLP width):
        how `residuals.saved_bytes` shards the traced residuals that carry them."""
        raise NotImplementedError

    def layer_units(self, b: int, t: int, tp: int, context: int = 1) -> dict[str, float]:
        """Per-device bytes (or elements, for weights) of one array of each of the layer's own
        transient kinds; `scores` is the one TPU calibrations may weigh (0 when absent). t is
        the local length, the sequence split `context` ways."""
        raise NotImplementedError

    def layer_working(self, remat: str, u: dict[str, float]) -> float:
        """Bytes of the layer's arrays live at its backward peak beyond the saved activations
        and the embedding gradient, from `units` (XLA:CPU counts)."""
        raise NotImplementedError

    def tensor_sums_per_layer(self, backend: str, remat: str) -> float:
        """All-reduces over `tensor` per layer, in arrays of the residual stream [b, t, d]."""
        raise NotImplementedError

    def flops_per_token_extra(self, remat: str, seq_len: int, microbatches: int = 1) -> float:
        """Recomputation FLOPs per token added by remat (beyond the model FLOPs)."""
        raise NotImplementedError

    def context_collectives(self, b: int, t: int, ways: int, tp: int, remat: str,
                            backend: str) -> list[tuple[str, float, float, bool]]:
        """What one layer run sends over `context` when the length is split `ways` ways (local
        rows b, local length t): (collective kind, full buffer bytes, times per layer, whether
        it overlaps with compute). None by default: the recurrent families pass one state per
        block, [b, state] per call, which is negligible next to the layer's other traffic."""
        del b, t, ways, tp, remat, backend
        return []

    def traced_impls(self, backend: str) -> dict:
        """Config keys to set when tracing the saved activations for `backend`: the kernel path
        an `impl="auto"` resolves to there (the trace of "auto" holds every platform's path,
        and autodiff would keep residuals for all of them). None by default."""
        del backend
        return {}

    # ------------------------------------------------------------------------------ shared
    def units(self, b: int, t: int, tp: int, vocab_ways: int,
              context: int = 1) -> dict[str, float]:
        """Per-device bytes of one array of each transient kind."""
        return {"scores": 0.0,
                "logits": b * t * self.vocab / vocab_ways * 4,
                "stream": b * t * self.d * self.dt,
                **self.layer_units(b, t, tp, context),
                "head_weight": self.d * self.vocab / vocab_ways,  # elements
                "embed_grad": self.vocab / vocab_ways * self.d * 4}

    def working_set(self, remat: str, b: int, t: int, tp: int, vocab_ways: int,
                    backend: str = "cpu", context: int = 1) -> dict[str, float]:
        """Bytes live beyond the saved activations at the two candidate peaks (XLA:CPU counts).
        All saved activations count at the loss; at the layer peak those of the head and loss
        only where `head_saved_at_layer_peak` (`cost.estimate` takes them off otherwise)."""
        del backend
        u = self.units(b, t, tp, vocab_ways, context)
        layer = self.layer_working(remat, u) + u["embed_grad"]
        loss = (LOGITS_ARRAYS * u["logits"] + (self.dt + 4) * u["head_weight"]
                + u["embed_grad"])
        return {"layer_backward": layer, "loss": loss}

    def head_flops(self, tokens: float) -> float:
        """Training FLOPs of the output head on `tokens` (forward and backward matmul: 6·d·vocab
        per token): part of the model FLOPs, run once per step (not stretched by a pipeline's
        bubble) and on its own weights (the step-time roofline)."""
        return 6.0 * self.d * self.vocab * tokens

    @staticmethod
    def flops_per_step(cfg) -> float:
        from paxlike import family
        tokens = cfg.batch_size * cfg.seq_len
        return family.load(cfg.model).flops_per_token(cfg.model, cfg.seq_len) * tokens
