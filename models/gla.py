"""Gated linear attention (GLA) language model (Yang et al., ICML 2024) in Flax NNX.

Layer (docs/gla.md, "Gate used by the GLA layer"), with H heads, K = d·expand_k keys and
V = d·expand_v values in total:

    q, k = x W_q, x W_k                               [T, H, K/H]
    v    = x W_v                                      [T, H, V/H]
    g    = logsigmoid(x W_1 W_2 + b) / τ              low-rank data-dependent log decay, τ = 16
    o_h  = chunk_gla(q_h, k_h, v_h, g_h)              S_t = diag(e^{g_t}) S_{t-1} + k_tᵀ v_t
    y    = (swish(x W_r) ⊙ concat_h RMSNorm(o_h)) W_O

Block = pre-norm GLA + pre-norm SwiGLU, residuals; no positional encoding (the decay orders
tokens). LM = embedding → scanned blocks → final RMSNorm → output head. Packed documents are kept
apart by passing `segment_ids` to the kernel, which clears the state where the id changes.

Decoding (paxlike/decode.py) carries one [B, H, K/H, V/H] float32 state per layer: `prefill` (the
prompts through the chunked kernel) and `decode_step` (one token through the recurrent step, O(1)
per token). Both reproduce the logits of the full forward pass.

The trainer uses this module through `build(cfg, rngs)` and `flops_per_token(cfg, seq_len)`, the
planner through `planner_profile(cfg)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from paxlike.kernels import gla as gla_kernels
from paxlike.kernels.gla.api import SUB_CHUNK
from paxlike.kernels.gla.context import sequence_sharded_gla
from paxlike.models import layers
from paxlike.planner import workingset
from paxlike.sharding import active_axes, constrain, per_shard

GLA_IMPLS = gla_kernels.IMPLS    # auto | reference | xla | pallas (paxlike.kernels.platform)

# Activation layouts: heads are sharded over `tensor` exactly like the weights that produce them.
SEQ = ("batch", "length", "act_embed")
HEADS = ("batch", "length", "heads", "head_dim")
KERNEL_STATE = ("batch", "heads", None, None)      # the recurrent state in the kernel's shard_map


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "module": "paxlike.models.gla",
        "vocab_size": 512,
        "d_model": 128,
        "num_layers": 4,
        "num_heads": 4,
        "expand_k": 0.5,            # total key dim = d_model · expand_k (paper: d/2)
        "expand_v": 1.0,            # total value dim = d_model · expand_v (paper: d)
        "gate_low_rank_dim": 16,    # rank of the gate projection W_1 W_2
        "gate_logit_normalizer": 16.0,  # τ in g = logsigmoid(·) / τ
        "mlp_dim": 512,
        "tie_embeddings": False,
        "norm_eps": 1e-6,
        "dropout_rate": 0.0,
        "chunk_size": 64,           # kernel chunk (multiple of 16; power of two for pallas)
        "gla_impl": "auto",         # kernels.gla impl: auto | reference | xla | pallas
        "compute_dtype": "float32",
        "remat": "none",            # none | full | save_dots
    })


def key_dim(cfg) -> int:
    """Total key (and gate) dimension over all heads."""
    return int(round(cfg.d_model * cfg.expand_k))


def value_dim(cfg) -> int:
    return int(round(cfg.d_model * cfg.expand_v))


def validate(cfg) -> list[str]:
    """Problems with a model config, as messages naming the key and the fix."""
    problems = layers.not_positive(cfg, ("vocab_size", "d_model", "num_layers", "num_heads",
                                         "mlp_dim", "gate_low_rank_dim"))
    if problems:
        return problems
    for key, total in (("expand_k", key_dim(cfg)), ("expand_v", value_dim(cfg))):
        if cfg[key] <= 0 or abs(total - cfg.d_model * cfg[key]) > 1e-9 or total % cfg.num_heads:
            problems.append(f"model.d_model={cfg.d_model} × model.{key}={cfg[key]} must be a whole "
                            f"number divisible by model.num_heads={cfg.num_heads}")
    if cfg.gate_logit_normalizer <= 0:
        problems.append(f"model.gate_logit_normalizer={cfg.gate_logit_normalizer} must be > 0")
    if cfg.chunk_size < 16 or cfg.chunk_size % 16:
        problems.append(f"model.chunk_size={cfg.chunk_size} must be a positive multiple of 16")
    if cfg.gla_impl not in GLA_IMPLS:
        problems.append(f"model.gla_impl={cfg.gla_impl!r}; choose one of {list(GLA_IMPLS)}")
    elif cfg.gla_impl in ("pallas", "auto") and cfg.chunk_size & (cfg.chunk_size - 1):
        problems.append(f"model.chunk_size={cfg.chunk_size} must be a power of two for the Pallas "
                        f"kernel (model.gla_impl={cfg.gla_impl!r})")
    return problems + layers.validate_common(cfg)


class GatedLinearAttention(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, h, r = cfg.d_model, cfg.num_heads, cfg.gate_low_rank_dim
        dk, dv = key_dim(cfg) // h, value_dim(cfg) // h
        self.tau = float(cfg.gate_logit_normalizer)
        self.chunk_size, self.impl = cfg.chunk_size, cfg.gla_impl
        proj = lambda hd: layers.param(rngs, layers.scaled_normal(d), (d, h, hd),
                                       ("embed", "heads", "head_dim"))
        self.wq, self.wk, self.wv = proj(dk), proj(dk), proj(dv)
        self.wr = proj(dv)  # output gate
        # Low-rank gate. The rank-16 axis is tiny and stays replicated (no logical name).
        self.w_gate_down = layers.param(rngs, layers.scaled_normal(d), (d, r), ("embed", None))
        self.w_gate_up = layers.param(rngs, layers.scaled_normal(r), (r, h, dk),
                                      (None, "heads", "head_dim"))
        # The bias is stored flat over (heads · head_dim): the trainer decides weight decay by the
        # number of logical axes (matrices have two), and a bias must not be decayed. 'heads' on
        # the flat axis shards it in the same contiguous per-head blocks as (heads, head_dim).
        self.gate_bias = layers.param(rngs, nnx.initializers.zeros, (h * dk,), ("heads",))
        # Per-head RMSNorm of the output, its scale shared by the heads (as in the paper's code).
        self.out_norm = layers.RMSNorm(dv, eps=cfg.norm_eps, names=("head_dim",), rngs=rngs)
        self.wo = layers.param(rngs, layers.scaled_normal(h * dv, 1 / math.sqrt(2 * cfg.num_layers)),
                               (h, dv, d), ("heads", "head_dim", "embed"))

    def _project(self, x):
        """x [B, T, d] -> q, k, v, output gate r (compute dtype) and log decay g (float32)."""
        dt = x.dtype
        heads = lambda w: constrain(jnp.einsum("btd,dhk->bthk", x, w[...].astype(dt)), HEADS)
        q, k, v, r = heads(self.wq), heads(self.wk), heads(self.wv), heads(self.wr)
        low = constrain(x @ self.w_gate_down[...].astype(dt), ("batch", "length", None))
        logits = jnp.einsum("btr,rhk->bthk", low, self.w_gate_up[...].astype(dt))
        # The decay accumulates over many steps in the kernel: keep it in float32 even under bf16.
        bias = self.gate_bias[...].reshape(self.w_gate_up.shape[1:])
        g = jax.nn.log_sigmoid(logits.astype(jnp.float32) + bias) / self.tau
        return q, k, v, r, constrain(g, HEADS)

    def _output(self, o, r):
        """Per-head norm, swish gate and output projection: o, r [B, T, H, V/H] -> [B, T, d]."""
        o = self.out_norm(o.astype(r.dtype)) * jax.nn.silu(r)
        out = jnp.einsum("bthk,hkd->btd", constrain(o, HEADS), self.wo[...].astype(r.dtype))
        return constrain(out, SEQ)

    def __call__(self, x, segment_ids=None, state=None):
        """Whole sequence: x [B, T, d] -> (y [B, T, d], final state [B, H, K/H, V/H] float32).

        `state` (optional) continues a previous call; the kernel resets it where segment_ids change.
        Without a state (training) no final state is computed and None is returned.
        """
        q, k, v, r, g = self._project(x)

        # Pallas kernels are opaque to the SPMD partitioner: the kernel runs per shard, split over
        # batch and heads. With the length split over `context`, each device holds one block of
        # the sequence and the blocks pass their states on (kernels/gla/context.py).
        context = active_axes("length")
        io = ("batch", "length" if context else None, "heads", None)

        def kernel(q, k, v, g, state, segment_ids):
            kw = dict(initial_state=state, segment_ids=segment_ids, chunk_size=self.chunk_size,
                      output_final_state=state is not None, impl=self.impl)
            if context:
                return sequence_sharded_gla(q, k, v, g, axis_name=context, **kw)
            return gla_kernels.chunk_gla(q, k, v, g, **kw)
        o, final = per_shard(kernel, (q, k, v, g, state, segment_ids),
                             (io,) * 4 + (KERNEL_STATE, io[:2]), (io, KERNEL_STATE))
        return self._output(constrain(o, HEADS), r), final

    def step(self, x, state):
        """One token per row through the recurrent step: x [B, 1, d] -> (y [B, 1, d], state)."""
        q, k, v, r, g = self._project(x)
        o, state = gla_kernels.gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state)
        return self._output(o[:, None], r), state


class Block(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.dropout_rate = cfg.dropout_rate
        self.mix_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mix = GatedLinearAttention(cfg, rngs)
        self.mlp_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mlp = layers.SwiGLU(cfg.d_model, cfg.mlp_dim, num_layers=cfg.num_layers, rngs=rngs)

    def __call__(self, x, segment_ids=None, key=None, state=None, decode=False):
        """x [B, T, d] -> (x, state). decode=True: T = 1 through the recurrent step."""
        keys = (None, None) if key is None else jax.random.split(key)
        h = self.mix_norm(x)
        h, state = self.mix.step(h, state) if decode else self.mix(h, segment_ids, state)
        x = x + layers.dropout(h, self.dropout_rate, keys[0])
        x = x + layers.dropout(self.mlp(self.mlp_norm(x)), self.dropout_rate, keys[1])
        return constrain(x, SEQ), state


class GLALanguageModel(layers.DecoderLM, nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.init_decoder(cfg, rngs, validate(cfg), lambda r: Block(cfg, r))

    def _embed(self, tokens):
        return self.embed_tokens(tokens, self.compute_dtype)

    def _logits(self, x):
        return self.output_logits(x)

    def __call__(self, tokens, positions, segment_ids, *, dropout_key=None):
        """tokens, positions, segment_ids: [B, T] int. Returns float32 logits [B, T, vocab].

        `positions` is unused: GLA has no positional encoding. Documents are separated by the
        state resets at segment_ids changes.
        """
        del positions
        x = layers.scan_layers(self.layers, self._embed(tokens),
                               lambda blk, h, k, ids: blk(h, ids, k)[0],
                               remat=self.cfg.remat, key=dropout_key, batch_inputs=segment_ids)
        return self._logits(x)

    # ------------------------------------------------------------------ decoding
    def init_cache(self, batch_size: int, max_len: int = 0) -> jax.Array:
        """Zero recurrent state of every layer: [layers, B, H, K/H, V/H] float32, whatever the
        length (`max_len` is not needed: the state does not grow)."""
        del max_len
        cfg = self.cfg
        h = cfg.num_heads
        cache = jnp.zeros((cfg.num_layers, batch_size, h, key_dim(cfg) // h, value_dim(cfg) // h),
                          jnp.float32)
        return constrain(cache, ("layers",) + KERNEL_STATE)

    def prefill(self, tokens, positions, segment_ids, *, max_len: int = 0):
        """Left-padded prompts [B, T] through the chunked kernel: the state resets where the
        segment id changes, so the padding (segment 0) leaves nothing behind.
        Returns (float32 logits [B, vocab] after the last token, cache)."""
        del positions
        x, cache = self.scan_cached(
            self._embed(tokens), self.init_cache(tokens.shape[0]),
            lambda blk, h, state: blk(h, segment_ids, state=state))
        return self.last_logits(x), cache

    def decode_step(self, tokens, cache):
        """One token per row: tokens [B] -> (float32 logits [B, vocab], updated cache)."""
        x, cache = self.scan_cached(self._embed(tokens[:, None]), cache,
                                    lambda blk, h, state: blk(h, state=state, decode=True))
        return self.last_logits(x), cache


def build(cfg, rngs: nnx.Rngs) -> GLALanguageModel:
    return GLALanguageModel(cfg, rngs)


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward, no rematerialisation).

    6 · N_matmul + 3 · L · (C · (K + V) + 4 · K · V / H), where N_matmul counts the weights
    used in matrix multiplies (q, k, v, output-gate, output and low-rank gate projections, MLP,
    output head; not the embedding lookup), K and V are the total key and value dims, C the chunk
    size and H the heads. The second term is the chunked GLA itself, per layer and token in the
    forward pass: intra-chunk scores Q Kᵀ and their product with V over whole C × C blocks
    (2 · C · K/H + 2 · C · V/H per head as computed, counted as half: causal, the convention
    of the Transformer's attention, models/transformer.py),
    plus reading and writing the K/H × V/H state (2 · 2 · K/H · V/H per head); the backward
    pass is counted as twice the forward. `seq_len` does not enter: the cost is linear in T.
    """
    del seq_len
    d, L, H = cfg.d_model, cfg.num_layers, cfg.num_heads
    K, V, R = key_dim(cfg), value_dim(cfg), cfg.gate_low_rank_dim
    mixer = d * (2 * K + 2 * V) + V * d + d * R + R * K
    mlp = 3 * d * cfg.mlp_dim
    n_matmul = L * (mixer + mlp) + d * cfg.vocab_size
    gla = cfg.chunk_size * (K + V) + 4 * K * V / H     # intra-chunk blocks causally halved
    return 6.0 * n_matmul + 3.0 * L * gla


# ------------------------------------------------------------------------- the planner's profile
def planner_profile(cfg) -> "Profile":
    return Profile(cfg)


class Profile(workingset.Profile):
    """What the planner knows of the GLA model beyond its parameters and traced residuals
    (paxlike/planner/workingset.py has the frame and how the counts are read; docs/planner.md,
    "Every family", the cases they were read from and checked on).

    On every CPU case read the peak is inside the chunked kernel's backward pass of the last
    layer (kernels/gla/chunked.py, `_bwd_body`, in the branch of the stable sub-chunk ops: the
    compiler allocates both branches of the fast/stable `lax.cond`, and the stable one holds
    more), after that layer's MLP backward. Live there, per device, beyond the layers' saved
    activations and the embedding gradient, in arrays of the model's own sizes (K, V: key and
    value dims over all heads, H heads, C = chunk_size, c = 16 rows per sub-chunk; with more
    than 4 chunks the XLA path walks the sequence in blocks of 4, so the kernel's own arrays
    are those of one block, n·C tokens, n = min(chunks, 4)):

        diag       b·nC·K/tp·c f32      the diagonal sub-blocks' factors [.., C/c, c, c, K/H]: 4
        off        b·nC·K/tp·C/c f32    the off-diagonal keys' factors [.., C/c, C, K/H]: 4
        scores     b·nC·H/tp·C f32      intra-chunk scores [.., C, C]: 1
        sub_scores b·nC·H/tp·c f32      diagonal-block scores [.., c, c]: 1
        kernel_key / kernel_value       the kernel's [.., C, K/H] f32 (5) and [.., C, V/H] (2)
        states     [n, b, H, K/H, V/H] f32: the chunk states and their gradients (2), two more
        key / value b·t·K/tp, b·t·V/tp  f32, the whole sequence: the layer's q, k, g and v
                                        (saved slices, or recomputed under remat), dO, and under
                                        remat the recomputed gate's log-sigmoid and logits
        stream     b·t·d                the residual-stream cotangent and its neighbours
        low_rank   b·t·r f32            the gate's low-rank activation
        weights    the layer's matrices gathered (compute dtype): all of the mixer's, and the
                   MLP's three (one under remat `full`)

    Tensor parallelism (XLA:CPU HLO of the fsdp x tensor cases): the forward sums the output
    projection and the MLP down (2); the backward the input gradients of q, k, v and the output
    gate (4, in one tuple all-reduce with the low-rank gate's [b, t, r]) and of the MLP gate and
    up (2); full remat sums the output projection's again (the MLP's input needs it; nothing
    needs the MLP's recomputed output). TPU: the Transformer's rule (one sum of the
    column-parallel projections sharing an input), unverified for this family.
    """

    KERNEL = {"diag": 4, "off": 4, "scores": 1, "sub_scores": 1, "kernel_key": 5,
              "kernel_value": 2}
    KEY = {"none": 3, "save_dots": 6, "full": 7}
    VALUE = {"none": 2, "save_dots": 3, "full": 2}
    STREAM = {"none": 5, "save_dots": 5, "full": 7}
    MLP_WEIGHTS = {"none": 3, "save_dots": 3, "full": 1}
    SUB, BLOCK = SUB_CHUNK, 4   # rows per sub-chunk; chunks per block (kernels/gla/xla.py)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.h, self.K, self.V = cfg.num_heads, key_dim(cfg), value_dim(cfg)
        self.mlp, self.r, self.chunk = cfg.mlp_dim, cfg.gate_low_rank_dim, cfg.chunk_size
        self.impl = cfg.gla_impl

    @property
    def tensor_dims(self) -> set[int]:
        return {self.h, self.mlp}

    def traced_impls(self, backend: str) -> dict:
        if self.impl != "auto":
            return {}
        pallas = backend != "cpu" and not self.chunk & (self.chunk - 1)
        return {"gla_impl": "pallas" if pallas else "xla"}

    def layer_units(self, b: int, t: int, tp: int, context: int = 1) -> dict[str, float]:
        C, h, K, V = self.chunk, self.h / tp, self.K / tp, self.V / tp
        n = min(-(-t // C), self.BLOCK)
        rows = b * n * C     # the sequences' rows one kernel call (or block) works on
        return {"scores": rows * h * C * 4, "diag": rows * K * self.SUB * 4,
                "off": rows * K * C // self.SUB * 4, "sub_scores": rows * h * self.SUB * 4,
                "kernel_key": rows * K * 4, "kernel_value": rows * V * 4,
                "states": (2 * n + 2) * b * K * (self.V / self.h) * 4,
                "key": b * t * K * 4, "value": b * t * V * 4, "low_rank": b * t * self.r * 4,
                "mixer_weight": self.d * (2 * K + 3 * V + self.r) + self.r * K,   # elements
                "mlp_weight": self.d * self.mlp / tp}

    def layer_working(self, remat: str, u: dict[str, float]) -> float:
        kernel = sum(n * u[k] for k, n in self.KERNEL.items()) + u["states"]
        return (kernel + self.KEY[remat] * u["key"] + self.VALUE[remat] * u["value"]
                + self.STREAM[remat] * u["stream"] + u["low_rank"]
                + self.dt * (u["mixer_weight"] + self.MLP_WEIGHTS[remat] * u["mlp_weight"]))

    def tensor_sums_per_layer(self, backend: str, remat: str) -> float:
        if backend == "cpu":
            return 8 + self.r / self.d + (1 if remat == "full" else 0)
        return 4 + (1 if remat == "full" else 0)

    def flops_per_token_extra(self, remat: str, seq_len: int, microbatches: int = 1) -> float:
        """The masked half of the causal intra-chunk blocks (computed, not counted as model
        FLOPs), and remat's recomputation: the layers' forward pass (`full`), or only the
        chunked GLA, whose einsums carry batch dimensions and are not saved by `save_dots`."""
        L, d, K, V, H = self.layers, self.d, self.K, self.V, self.h
        gla = 2 * self.chunk * (K + V) + 4 * K * V / H
        masked = 3 * L * self.chunk * (K + V)    # the causal blocks' computed, uncounted half
        if remat == "full":
            matmul = d * (2 * K + 3 * V + self.r) + self.r * K + 3 * d * self.mlp
            return masked + L * (2 * matmul + gla)
        return masked + (L * gla if remat == "save_dots" else 0.0)
