"""ParaRNN language models: ParaGRU / ParaLSTM blocks trained in parallel over the sequence.

Each layer is a Mamba-style mixer block around a nonlinear RNN cell with diagonal recurrent
weights (Danieli et al., 2025; docs/pararnn.md, "Cells"):

    x -> RMSNorm -> in_proj -> (u, g)
    u -> short causal depthwise conv -> SiLU -> block-diagonal multi-head B u + b   (one GEMM)
      -> cell over the sequence (kernels.pararnn.solve: Newton + parallel scan, or lax.scan)
    y = RMSNorm_per_head(h * SiLU(g)) -> out_proj -> + residual        [+ optional SwiGLU MLP]

Only the diagonal recurrent weights (a_*, and the LSTM peepholes p_*) live inside the solver: the
input projection of every gate for every step is computed once, up front, as a single einsum, so
the Newton iterations touch nothing but elementwise work and a linear scan.

Packed documents: the recurrent state and the conv window are cut at every document start (a
change of segment id, or position 0). The cell receives a `keep` flag per step and multiplies the
carried state by it, so a packed row computes exactly what separate documents would.

The trainer uses this module through `build(cfg, rngs)` and `flops_per_token(cfg, seq_len)`, the
planner through `planner_profile(cfg)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from paxlike.kernels import pararnn
from paxlike.kernels.pararnn import cells
from paxlike.models import layers
from paxlike.planner import workingset
from paxlike.sharding import active_axes, constrain, per_shard

CELLS = ("gru", "lstm")
SOLVER_IMPLS = pararnn.IMPLS     # auto | reference | xla | pallas (paxlike.kernels.platform)
# solve(fallback=None) is spelled "none" in the config
FALLBACKS = ("none",) + tuple(f for f in pararnn.FALLBACKS if f is not None)
# Recurrent (diagonal) weights of each cell, and the gates whose input projection B x + b is
# computed outside the solver (order = the x[0..2] order of kernels.pararnn.cells).
RECURRENT = {"gru": ("a_z", "a_r", "a_c"), "lstm": ("a_f", "a_z", "a_o", "p_f", "p_o")}
GATES = {"gru": cells.GRU_GATES, "lstm": cells.LSTM_GATES}
RECURRENT_CLIP = 0.5


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "module": "paxlike.models.pararnn",
        "cell": "gru",            # gru | lstm
        "vocab_size": 512,
        "d_model": 128,
        "num_layers": 4,
        "expand": 1,              # cell width d_inner = expand * d_model
        "num_heads": 4,           # blocks of the block-diagonal input projection B (paper: 4)
        "conv_width": 4,          # taps of the short causal conv
        "mlp_dim": 0,             # > 0 adds a pre-norm SwiGLU MLP after each mixer
        "tie_embeddings": False,
        "norm_eps": 1e-6,
        "dropout_rate": 0.0,
        "compute_dtype": "float32",
        "remat": "none",          # none | full | save_dots
        # The cell solve (kernels.pararnn.solve): auto | reference | xla | pallas. "auto" = the
        # reference lax.scan on CPU, Newton with the Pallas scan on accelerators.
        "solver_impl": "auto",
        "newton_iterations": 3,
        "newton_tol": 0.0,        # > 0: stop early under this residual (and judge convergence)
        "solver_fallback": "none",  # none | reference | damped, when Newton does not converge
        "warn_unconverged": True,
    })


def d_inner(cfg) -> int:
    return cfg.expand * cfg.d_model


def validate(cfg) -> list[str]:
    """Problems with a model config, as messages naming the key and the fix."""
    problems = layers.not_positive(cfg, ("vocab_size", "d_model", "num_layers", "expand",
                                         "num_heads", "conv_width", "newton_iterations"))
    if problems:
        return problems
    if d_inner(cfg) % cfg.num_heads:
        problems.append(f"model.expand * model.d_model = {d_inner(cfg)} is not divisible by "
                        f"model.num_heads={cfg.num_heads}")
    for key, choices in (("cell", CELLS), ("solver_impl", SOLVER_IMPLS),
                         ("solver_fallback", FALLBACKS)):
        if cfg[key] not in choices:
            problems.append(f"model.{key}={cfg[key]!r}; choose one of {list(choices)}")
    if cfg.mlp_dim < 0 or cfg.newton_tol < 0:
        problems.append("model.mlp_dim and model.newton_tol must be >= 0 (0 disables them)")
    return problems + layers.validate_common(cfg)


# --------------------------------------------------------------------------------- initialisers
def clipped_normal(fan_in: int, clip: float = RECURRENT_CLIP):
    """Diagonal recurrent / peephole weights: truncated normal, std 1/sqrt(fan_in), |w| <= clip.

    The clip keeps the recurrence only weakly nonlinear in h at initialisation, where Newton
    converges in the published three iterations."""
    def init(key, shape, dtype):
        w = jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) / math.sqrt(fan_in)
        return jnp.clip(w, -clip, clip)
    return init


def kaiming_uniform(fan_in: int):
    """He/Kaiming uniform, U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), as the published B."""
    bound = math.sqrt(6.0 / fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


# --------------------------------------------------------------------------------- the cell
class ParaCell(nnx.Module):
    """ParaGRU / ParaLSTM: block-diagonal input projection, diagonal recurrence, Newton solve.

    `__call__(u, keep) -> h`: u [B, T, d_inner] cell inputs, keep [B, T] (0 where the state
    resets), h [B, T, d_inner] float32 hidden states.
    """

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kind = cfg.cell
        di, nh = d_inner(cfg), cfg.num_heads
        hd = di // nh
        n_gates = len(GATES[self.kind])
        # One [heads, in, gate, out] weight: B is block-diagonal over heads, every gate at once.
        self.w_in = layers.param(rngs, kaiming_uniform(hd), (nh, hd, n_gates, hd),
                                 ("heads", "head_dim", None, "head_dim"))
        # Vectors over the cell width are kept one per gate and 1-D, so the trainer's weight-decay
        # mask (matrices only) leaves them alone, like norm scales.
        for gate in GATES[self.kind]:
            setattr(self, f"b_{gate}", layers.param(rngs, nnx.initializers.zeros, (di,), ("mlp",)))
        for name in RECURRENT[self.kind]:
            setattr(self, name, layers.param(rngs, clipped_normal(hd), (di,), ("mlp",)))

    def gate_inputs(self, u):
        """B u + b for every gate and step: [B, T, gates, d_inner] float32, one GEMM."""
        b, t, di = u.shape
        nh = self.cfg.num_heads
        uh = constrain(u.reshape(b, t, nh, di // nh), ("batch", "length", "heads", "head_dim"))
        x = jnp.einsum("bthi,higo->btgho", uh, self.w_in[...].astype(u.dtype),
                       preferred_element_type=jnp.float32)
        x = x.reshape(b, t, x.shape[2], di)
        bias = jnp.stack([getattr(self, f"b_{g}")[...] for g in GATES[self.kind]])
        return constrain(x + bias, ("batch", "length", None, "mlp"))

    def recurrent_params(self):
        return {name: getattr(self, name)[...] for name in RECURRENT[self.kind]}

    def step_functions(self, params):
        """(cell(h, (x, keep)), analytic Jacobian, jacobian kind) for kernels.pararnn.solve."""
        if self.kind == "gru":
            f, jac, kind = cells.paragru_cell, cells.paragru_jacobian, "diagonal"
        else:
            f, jac, kind = cells.paralstm_cell, cells.paralstm_jacobian, "block2"

        # A document start multiplies the carried state by 0, so the step sees h_{l-1} = 0 exactly
        # as the first step of a separate document would; d/dh picks up the same factor.
        def cell(h, xk):
            x, keep = xk
            return f(params, h * keep, x)

        def jacobian(h, xk):
            x, keep = xk
            return jac(params, h * keep, x) * keep
        return cell, jacobian, kind

    @property
    def state_names(self) -> tuple:
        """Logical names of one step's state: [B, d_inner] (GRU) or [B, 2, d_inner] (LSTM's [c; h])."""
        return ("batch", "mlp") if self.kind == "gru" else ("batch", None, "mlp")

    def __call__(self, u, keep, final_state: bool = False):
        """Hidden states h [B, T, d_inner]; with final_state, also the cell's state after the
        last step (what decoding continues from)."""
        cfg = self.cfg
        x = self.gate_inputs(u)

        # Pallas kernels are opaque to the SPMD partitioner: solve per shard, split over batch
        # and channels (independent: the recurrence is per channel). With the length split over
        # `context` each device holds one block of the sequence and the blocks pass states,
        # Newton corrections and adjoints on (kernels/pararnn/context.py); otherwise the length
        # arrives whole. With newton_tol each shard of batch and channels stops on its own
        # residual (the blocks of one sequence stop together).
        context = active_axes("length")
        length = "length" if context else None

        def solve(x, keep, params):
            cell, jacobian, kind = self.step_functions(params)
            b, t, _, di = x.shape
            h0 = jnp.zeros((b, di) if kind == "diagonal" else (b, 2, di), jnp.float32)
            # The solve runs in float32 whatever the compute dtype: Newton's residual and the
            # scan's long products of Jacobians lose too much in bfloat16.
            hs = pararnn.solve(
                cell, h0, (x, keep), jacobian=kind, jacobian_fn=jacobian,
                iterations=cfg.newton_iterations, tol=cfg.newton_tol or None,
                impl=cfg.solver_impl, warn=cfg.warn_unconverged,
                fallback=None if cfg.solver_fallback == "none" else cfg.solver_fallback,
                axis_name=context or None)
            return hs
        names = self.state_names
        hs = per_shard(solve, (x, keep.astype(jnp.float32), self.recurrent_params()),
                       (("batch", length, None, "mlp"), ("batch", length), ("mlp",)),
                       names[:1] + (length,) + names[1:])
        h = constrain(hs[:, :, 1] if self.kind == "lstm" else hs,  # LSTM's state is [c; h]: read h
                      ("batch", "length", "mlp"))
        return (h, constrain(hs[:, -1], names)) if final_state else h

    def step(self, u, state):
        """One step per row: u [B, 1, d_inner] (after the conv), the previous state ->
        (h [B, 1, d_inner], new state)."""
        cell, _, _ = self.step_functions(self.recurrent_params())
        x = self.gate_inputs(u)[:, 0]
        state = jax.vmap(cell)(state, (x, jnp.ones(x.shape[:1], jnp.float32)))
        h = state[:, 1] if self.kind == "lstm" else state
        return h[:, None], constrain(state, self.state_names)


# --------------------------------------------------------------------------------- the block
def document_index(positions, segment_ids):
    """[B, T] int: number of document starts up to and including each token.

    A document starts where positions restart at 0 or the segment id changes; tokens of one
    document share an index, so two tokens may exchange information iff their indices agree."""
    change = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jnp.cumsum(change | (positions == 0), axis=1)


def causal_conv(u, weight, bias, doc):
    """Depthwise causal conv, u [B, T, C], weight [K, C]; tap k reads token t-k only if it is in
    the same document (otherwise it counts as the zero padding before a document)."""
    k_taps = weight.shape[0]
    out = u * weight[0]
    for k in range(1, k_taps):  # K is 4: a few shifted multiply-adds beat a conv op here
        shifted = jnp.pad(u, ((0, 0), (k, 0), (0, 0)))[:, :-k]
        same = jnp.pad(doc, ((0, 0), (k, 0)), constant_values=-1)[:, :-k] == doc
        out = out + jnp.where(same[..., None], shifted, 0) * weight[k]
    return out + bias


class MixerBlock(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, di, nh = cfg.d_model, d_inner(cfg), cfg.num_heads
        self.cfg = cfg
        self.norm = layers.RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.in_proj = layers.param(rngs, layers.scaled_normal(d), (d, 2, di), ("embed", None, "mlp"))
        # Taps newest-first (tap 0 = the current token), scaled-normal over the K-tap fan-in.
        self.conv_w = layers.param(rngs, layers.scaled_normal(cfg.conv_width), (cfg.conv_width, di),
                                   (None, "mlp"))
        self.conv_b = layers.param(rngs, nnx.initializers.zeros, (di,), ("mlp",))
        self.cell = ParaCell(cfg, rngs)
        # Holds the gated norm's scale and eps; the per-head normalisation itself is in `mixer`.
        self.out_norm = layers.RMSNorm(di, eps=cfg.norm_eps, names=("mlp",), rngs=rngs)
        self.out_proj = layers.param(rngs, layers.scaled_normal(di, 1 / math.sqrt(2 * cfg.num_layers)),
                                     (di, d), ("mlp", "embed"))
        self.num_heads = nh
        if cfg.mlp_dim:
            self.mlp_norm = layers.RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
            self.mlp = layers.SwiGLU(d, cfg.mlp_dim, num_layers=cfg.num_layers, rngs=rngs)

    def mixer(self, x, doc, keep, final_state: bool = False):
        """The mixer over a sequence; with final_state also the decoding state after its last
        token: {"conv": the last conv_width - 1 conv inputs of the last document (zeros before
        it), "cell": the cell's state}."""
        u, g = self._inputs(x)
        conv_in = jax.nn.silu(causal_conv(u, self.conv_w[...].astype(x.dtype),
                                          self.conv_b[...].astype(x.dtype), doc))
        if not final_state:
            return self._output(self.cell(conv_in, keep), g)
        h, cell_state = self.cell(conv_in, keep, final_state=True)
        taps = self.cfg.conv_width - 1
        window = jnp.pad(u, ((0, 0), (taps, 0), (0, 0)))[:, -taps:] if taps else u[:, :0]
        same = jnp.pad(doc, ((0, 0), (taps, 0)), constant_values=-1)[:, -taps:] == doc[:, -1:]
        window = jnp.where(same[..., None], window, 0)
        return self._output(h, g), {"conv": constrain(window, ("batch", None, "mlp")),
                                    "cell": cell_state}

    def mixer_step(self, x, state):
        """One token per row through the conv window and the cell's step: x [B, 1, d] ->
        (y [B, 1, d], state)."""
        u, g = self._inputs(x)
        window = jnp.concatenate([state["conv"], u], axis=1)     # oldest first, newest last
        taps = self.conv_w[...].astype(x.dtype)[::-1]             # oldest first too
        conv_in = jax.nn.silu(jnp.einsum("bkc,kc->bc", window, taps)[:, None]
                              + self.conv_b[...].astype(x.dtype))
        h, cell_state = self.cell.step(conv_in, state["cell"])
        return self._output(h, g), {"conv": window[:, 1:], "cell": cell_state}

    def _inputs(self, x):
        """x [B, T, d] -> the conv's input u and the output gate g, [B, T, d_inner] each."""
        ug = jnp.einsum("btd,dgc->btgc", self.norm(x), self.in_proj[...].astype(x.dtype))
        return (constrain(ug[:, :, 0], ("batch", "length", "mlp")),
                constrain(ug[:, :, 1], ("batch", "length", "mlp")))

    def _output(self, h, g):
        """Gated per-head norm and out_proj: h (float32), g [B, T, d_inner] -> [B, T, d]."""
        dt = g.dtype
        y = h * jax.nn.silu(g.astype(jnp.float32))
        # Gated RMSNorm per head (group norm): statistics never cross a head, so a head-sharded
        # (tensor-parallel) layout needs no all-reduce here.
        b, t, di = y.shape
        yh = y.reshape(b, t, self.num_heads, di // self.num_heads)
        yh = yh * jax.lax.rsqrt(jnp.mean(yh * yh, axis=-1, keepdims=True) + self.out_norm.eps)
        y = (yh.reshape(b, t, di) * self.out_norm.scale[...]).astype(dt)
        out = y @ self.out_proj[...].astype(dt)
        return constrain(out, ("batch", "length", "act_embed"))

    def __call__(self, x, doc, keep, key=None):
        rate = self.cfg.dropout_rate
        keys = (None, None) if key is None else jax.random.split(key)
        x = x + layers.dropout(self.mixer(x, doc, keep), rate, keys[0])
        return self._feed_forward(x, keys[1])

    def prefill(self, x, doc, keep):
        """The block over prompts, returning the decoding state (no dropout)."""
        y, state = self.mixer(x, doc, keep, final_state=True)
        return self._feed_forward(x + y, None), state

    def decode(self, x, state):
        y, state = self.mixer_step(x, state)
        return self._feed_forward(x + y, None), state

    def _feed_forward(self, x, key):
        if self.cfg.mlp_dim:
            x = x + layers.dropout(self.mlp(self.mlp_norm(x)), self.cfg.dropout_rate, key)
        return constrain(x, ("batch", "length", "act_embed"))


class ParaRNNLM(layers.DecoderLM, nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.init_decoder(cfg, rngs, validate(cfg), lambda r: MixerBlock(cfg, r))

    def __call__(self, tokens, positions, segment_ids, *, dropout_key=None):
        """tokens, positions, segment_ids: [B, T] int. Returns float32 logits [B, T, vocab]."""
        x = self.embed_tokens(tokens, self.compute_dtype)
        x = layers.scan_layers(self.layers, x, lambda blk, h, k, b: blk(h, *b, k),
                               remat=self.cfg.remat, key=dropout_key,
                               batch_inputs=_documents(positions, segment_ids))
        return self.output_logits(x)

    # ------------------------------------------------------------------ decoding
    # Per layer: the conv's last conv_width - 1 inputs and the cell's state; O(1) per token.
    def prefill(self, tokens, positions, segment_ids, *, max_len: int = 0):
        """Left-padded prompts [B, T] (each padding token is a document of its own, so nothing
        of it reaches the prompt): (float32 logits [B, vocab] after the last token, cache)."""
        del max_len   # the state does not grow with the length
        doc, keep = _documents(positions, segment_ids)
        x, cache = self.scan_cached(self.embed_tokens(tokens, self.compute_dtype), None,
                                    lambda blk, h, _: blk.prefill(h, doc, keep))
        return self.last_logits(x), cache

    def decode_step(self, tokens, cache):
        """One token per row: tokens [B] -> (float32 logits [B, vocab], updated cache)."""
        x = self.embed_tokens(tokens[:, None], self.compute_dtype)
        x, cache = self.scan_cached(x, cache, lambda blk, h, state: blk.decode(h, state))
        return self.last_logits(x), cache


def _documents(positions, segment_ids):
    """(document index, keep flag: 0 where the cell's state resets) of every token, [B, T]."""
    doc = document_index(positions, segment_ids)
    keep = jnp.concatenate([jnp.zeros_like(doc[:, :1]), (doc[:, 1:] == doc[:, :-1])], axis=1)
    return doc, constrain(keep.astype(jnp.float32), ("batch", "length"))


def build(cfg, rngs: nnx.Rngs) -> ParaRNNLM:
    return ParaRNNLM(cfg, rngs)


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward, no rematerialisation).

    6 · N_matmul + 6 · L · K · d_inner, where N_matmul counts the weights used in matrix
    multiplies per layer — in_proj (2 · d · d_inner), the block-diagonal B
    (gates · d_inner² / heads), out_proj (d_inner · d), the optional MLP (3 · d · mlp_dim) — plus
    the output head (d · vocab), and the second term is the K-tap depthwise conv. The cell's own
    work is elementwise and linear in the width (per Newton iteration: the cell, its Jacobian and
    a scan over d_inner channels, ~30 · d_inner FLOPs a token), which is under 1% of the matmuls
    at the configured sizes and is left out, as norms and activations are; `seq_len` does not
    enter (no attention).
    """
    del seq_len
    d, di, L = cfg.d_model, d_inner(cfg), cfg.num_layers
    gates = len(GATES[cfg.cell])
    per_layer = 2 * d * di + gates * di * di // cfg.num_heads + di * d + 3 * d * cfg.mlp_dim
    n_matmul = L * per_layer + d * cfg.vocab_size
    return 6.0 * n_matmul + 6.0 * L * cfg.conv_width * di


# ------------------------------------------------------------------------- the planner's profile
def planner_profile(cfg) -> "Profile":
    return Profile(cfg)


class Profile(workingset.Profile):
    """What the planner knows of the ParaRNN models beyond their parameters and traced
    residuals (paxlike/planner/workingset.py has the frame and how the counts are read;
    docs/planner.md, "Every family", the cases they were read from and checked on).

    On the CPU cases read (ParaGRU; the solve is the reference `lax.scan` there) the peak is in
    the last layer's backward pass through the cell and its input projection: the scan's
    backward over the sequence, with the recomputed cell and conv of that layer. Live there, per
    device, beyond the layers' saved activations and the embedding gradient:

        inner    b·t·d_inner/tp f32   the cell's per-step arrays and their cotangents, the
                                      conv's shifted copies, u, g and the gate inputs [.., 3, ·]:
                                      18; 26 under `save_dots`, 28 under `full` (the layer's
                                      forward recomputed beside them)
        stream   b·t·d                4 (5 under `full`)
        masks    b·t·d_inner/tp bool  the conv's document masks (conv_width - 1), computed once
                                      outside the layer scan and saved for it (remat `none`)
        weights  the layer's matrices gathered (compute dtype): the mixer's (in_proj, B,
                 out_proj) and, with an MLP, its three (one under `full`, as in GLA)

    With an MLP under remat `full` the MLP's input needs the mixer's output, so the cell's
    forward is recomputed before the MLP's backward pass and its arrays are live there: that
    phase (24 inner, 9 stream and the MLP's 8 arrays of b·t·mlp/tp, the Transformer's count
    under `full`) is the peak when it is the larger (the fsdp 2 x tensor 4 case). Under `none`
    and `save_dots` the MLP's backward runs before the cell is recomputed (save_dots keeps
    out_proj's output) and stayed below the cell's phase (2% in the save_dots case read).

    Tensor parallelism (XLA:CPU HLO): the forward sums out_proj's output (and the MLP's down),
    the backward in_proj's input gradient (and the MLP's gate and up separately); under full
    remat nothing needs the block's recomputed output, so its last sum is not repeated (out_proj
    is, where an MLP follows it). The block-diagonal B and the cell need none: heads and
    channels stay on their device. TPU: the Transformer's rule (the MLP's gate and up summed
    once), unverified for this family.
    """

    INNER = {"none": 18, "save_dots": 26, "full": 28}
    STREAM = {"none": 4, "save_dots": 4, "full": 5}
    MLP_WEIGHTS = {"none": 3, "save_dots": 3, "full": 1}
    MLP_PHASE = {"inner": 24, "stream": 9, "mlp": 8}   # remat full, with an MLP

    def __init__(self, cfg):
        super().__init__(cfg)
        self.di, self.h, self.mlp = d_inner(cfg), cfg.num_heads, cfg.mlp_dim
        self.gates, self.conv, self.impl = len(GATES[cfg.cell]), cfg.conv_width, cfg.solver_impl

    @property
    def tensor_dims(self) -> set[int]:
        return {self.di, self.h, self.mlp} - {0}

    def traced_impls(self, backend: str) -> dict:
        if self.impl != "auto":
            return {}
        return {"solver_impl": "reference" if backend == "cpu" else "pallas"}

    def layer_units(self, b: int, t: int, tp: int, context: int = 1) -> dict[str, float]:
        di = self.di / tp
        return {"inner": b * t * di * 4, "masks": (self.conv - 1) * b * t * di,
                "mlp": b * t * self.mlp / tp * self.dt,
                "mixer_weight": self.d * di * 3 + self.gates * di * self.di / self.h,
                "mlp_weight": self.d * self.mlp / tp}                       # elements

    def layer_working(self, remat: str, u: dict[str, float]) -> float:
        weights = self.dt * (u["mixer_weight"] + self.MLP_WEIGHTS[remat] * u["mlp_weight"])
        cell = (self.INNER[remat] * u["inner"] + self.STREAM[remat] * u["stream"]
                + (u["masks"] if remat == "none" else 0.0))
        if remat == "full" and self.mlp:
            cell = max(cell, sum(n * u[k] for k, n in self.MLP_PHASE.items()))
        return cell + weights

    def tensor_sums_per_layer(self, backend: str, remat: str) -> float:
        mlp = bool(self.mlp)   # full remat: out_proj's sum again where the MLP's input needs it
        return 2 + (3 if backend == "cpu" else 2) * mlp + (mlp if remat == "full" else 0)

    def flops_per_token_extra(self, remat: str, seq_len: int, microbatches: int = 1) -> float:
        """Remat recomputes the layers' forward pass (`full`), or the block-diagonal B (its
        einsum has a batch dimension, the heads, so `save_dots` does not keep it) and the conv."""
        L, d, di = self.layers, self.d, self.di
        b_proj = self.gates * di * di / self.h
        if remat == "full":
            return L * (2 * (3 * d * di + b_proj + 3 * d * self.mlp) + 2 * self.conv * di)
        return L * (2 * b_proj + 2 * self.conv * di) if remat == "save_dots" else 0.0
