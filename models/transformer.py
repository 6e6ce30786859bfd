"""Llama-style decoder-only Transformer in Flax NNX.

RMSNorm pre-norm blocks, rotary positions, grouped-query attention and a SwiGLU MLP; layers stacked
on a 'layers' axis and applied with `lax.scan`. Every parameter carries logical axis names (see
`paxlike.sharding` for how they become mesh axes). Packed sequences: `segment_ids` keep documents
from attending to each other and `positions` restart at each document.

The trainer uses this module through `build(cfg, rngs)` and `flops_per_token(cfg, seq_len)`, the
planner through `planner_profile(cfg)`.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from paxlike.errors import UserError
from paxlike.kernels import attention as attention_kernels
from paxlike.kernels.attention import cudnn
from paxlike.kernels.attention.splash import SplashKernel, splash_attention
from paxlike.kernels.attention.splash_ring import splash_ring_attention
from paxlike.kernels.platform import by_lowering_platform
from paxlike.models import layers
from paxlike.planner import workingset
from paxlike.sharding import active_axes, active_rules, constrain, per_shard


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "module": "paxlike.models.transformer",
        "vocab_size": 512,
        "d_model": 128,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 0,  # 0: d_model // num_heads
        "mlp_dim": 512,
        "tie_embeddings": False,
        "rope_theta": 10000.0,
        "norm_eps": 1e-6,
        "dropout_rate": 0.0,
        "compute_dtype": "float32",
        "remat": "none",  # none | full | save_dots
        # With the length split over `context`: "all_gather" (GSPMD gathers keys and values) or
        # "ring" (blocks of keys and values travel around the devices: memory O(T/n); the data
        # pipeline then feeds the tokens in zigzag order, so every device does equal work).
        "context_parallel": "all_gather",
        # The attention computation outside ring attention: "xla" (jax.nn.dot_product_attention
        # with a [T, T] mask; the [T, T] scores exist), "splash" (the block-sparse flash
        # kernel for TPU, kernels/attention/splash.py: no [T, T] array; compiled by Mosaic on
        # TPU, interpreted elsewhere, which is slow: for checking only) or "cudnn" (cuDNN's
        # flash attention on CUDA GPUs, kernels/attention/cudnn.py: bfloat16 / float16 only;
        # XLA's attention on other platforms).
        "attention_impl": "xla",
    })


CONTEXT_PARALLEL = ("all_gather", "ring")
ATTENTION_IMPLS = ("xla", "splash", "cudnn")


def uses_segment_ids(cfg) -> bool:
    """Whether attention takes the segment ids (ring, splash, cudnn) instead of a [B, 1, T, T]
    mask."""
    return (cfg.get("context_parallel", "all_gather") == "ring"
            or cfg.get("attention_impl", "xla") != "xla")


def head_dim(cfg) -> int:
    return cfg.head_dim or cfg.d_model // cfg.num_heads


def validate(cfg) -> list[str]:
    """Problems with a model config, as messages naming the key and the fix."""
    problems = layers.not_positive(cfg, ("vocab_size", "d_model", "num_layers", "num_heads",
                                         "num_kv_heads", "mlp_dim"))
    if problems:
        return problems
    if not cfg.head_dim and cfg.d_model % cfg.num_heads:
        problems.append(f"model.d_model={cfg.d_model} is not divisible by model.num_heads="
                        f"{cfg.num_heads}; change one or set model.head_dim")
    if cfg.num_heads % cfg.num_kv_heads:
        problems.append(f"model.num_heads={cfg.num_heads} is not a multiple of model.num_kv_heads="
                        f"{cfg.num_kv_heads} (grouped-query attention shares each KV head)")
    if cfg.get("context_parallel", "all_gather") not in CONTEXT_PARALLEL:
        problems.append(f"model.context_parallel={cfg.context_parallel!r}; choose one of "
                        f"{list(CONTEXT_PARALLEL)}")
    if cfg.get("attention_impl", "xla") not in ATTENTION_IMPLS:
        problems.append(f"model.attention_impl={cfg.attention_impl!r}; choose one of "
                        f"{list(ATTENTION_IMPLS)}")
    elif cfg.get("attention_impl", "xla") == "cudnn":
        if cfg.compute_dtype not in cudnn.DTYPES:
            problems.append(f"model.attention_impl=cudnn needs model.compute_dtype "
                            f"{' or '.join(cudnn.DTYPES)}, not {cfg.compute_dtype} (cuDNN's "
                            f"flash attention has no float32 kernel); or use attention_impl=xla")
        if head_dim(cfg) % 8 or head_dim(cfg) > cudnn.MAX_HEAD_DIM:
            problems.append(f"model.attention_impl=cudnn needs a head dimension that is a "
                            f"multiple of 8 and at most {cudnn.MAX_HEAD_DIM}, not "
                            f"{head_dim(cfg)}; change model.head_dim or use attention_impl=xla")
    if head_dim(cfg) % 2:
        problems.append(f"head dimension {head_dim(cfg)} must be even for rotary embeddings")
    return problems + layers.validate_common(cfg)


class Attention(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
        self.rope_theta = cfg.rope_theta
        self.ring = cfg.get("context_parallel", "all_gather") == "ring"
        self.impl = cfg.get("attention_impl", "xla")
        self.num_heads = h
        self.wq = layers.param(rngs, layers.scaled_normal(d), (d, h, hd), ("embed", "heads", "head_dim"))
        self.wk = layers.param(rngs, layers.scaled_normal(d), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.wv = layers.param(rngs, layers.scaled_normal(d), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.wo = layers.param(rngs, layers.scaled_normal(h * hd, 1 / math.sqrt(2 * cfg.num_layers)),
                               (h, hd, d), ("heads", "head_dim", "embed"))

    def __call__(self, x, positions, mask):
        """`mask`: [B, 1, T, T] bool, or the segment ids [B, T] under ring context parallelism
        (ring attention builds each block's mask from positions and segment ids) or splash or
        cuDNN attention (`uses_segment_ids`)."""
        q, k, v = self._project(x, positions)
        context = active_axes("length") if self.ring else ()
        if context:
            return self._output(self._ring(q, k, v, positions, mask, context))
        if self.impl == "splash":
            return self._output(self._splash(q, k, v, mask))
        if self.impl == "cudnn" and not self.ring:
            return self._output(self._cudnn(q, k, v, positions, mask))
        if self.ring:   # ring attention on a length that is not split: the same mask, one device
            return self._output(attention_kernels.dense_attention(q, k, v, positions, mask))
        return self._attend(q, k, v, mask)

    def _ring(self, q, k, v, positions, segment_ids, context):
        """Ring attention over the length's blocks on the `context` axes: XLA's blocks, or with
        attention_impl=splash the splash kernel per block pair (which relies on the trainer's
        zigzag token order, kernels/attention/splash_ring.py)."""
        axis = context[0] if len(context) == 1 else context
        specs = (HEADS, KV_HEADS, KV_HEADS, TOKENS, TOKENS)
        if self.impl != "splash":
            def ring(q, k, v, pos, seg):
                return attention_kernels.ring_attention(q, k, v, pos, pos, seg, seg,
                                                        axis_name=axis)
            return per_shard(ring, (q, k, v, positions, segment_ids), specs, HEADS)

        def run(interpret):
            def ring(q, k, v, pos, seg):
                with _splash_length_errors():
                    return splash_ring_attention(q, k, v, seg, seg, axis_name=axis,
                                                 order="zigzag", interpret=interpret)
            return per_shard(ring, (q, k, v, positions, segment_ids), specs, HEADS)
        return by_lowering_platform(run, {"tpu": False}, True)

    def cached(self, x, positions, mask, cache, start):
        """Attention of x's tokens over the KV cache after writing their keys and values into
        it at slot `start`: (output, updated {"k", "v"} [B, slots, kv_heads, head_dim])."""
        q, k, v = self._project(x, positions)
        write = lambda c, new: constrain(jax.lax.dynamic_update_slice_in_dim(
            c, new.astype(c.dtype), start, axis=1), CACHE)
        k, v = write(cache["k"], k), write(cache["v"], v)
        return self._attend(q, k.astype(x.dtype), v.astype(x.dtype), mask), {"k": k, "v": v}

    def _project(self, x, positions):
        dt = x.dtype
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dt))
        q = constrain(layers.rope(q, positions, self.rope_theta), HEADS)
        k = constrain(layers.rope(k, positions, self.rope_theta), KV_HEADS)
        return q, k, constrain(v, KV_HEADS)

    def _splash(self, q, k, v, segment_ids):
        """Splash attention per device: queries split like the activations (over `context` too,
        with the keys and values gathered whole, as all-gather context parallelism does) and
        heads over `tensor`; the kernel's mask blocks split with them."""
        active = active_rules()
        mesh = active[0] if active else None
        ways = lambda axes: math.prod(mesh.shape[a] for a in axes) if axes else 1  # noqa: E731
        q_axes, head_axes = active_axes("length"), active_axes("heads")

        def run(interpret):
            with _splash_length_errors():
                kernel = SplashKernel(q.shape[1], self.num_heads, q_shards=ways(q_axes),
                                      head_shards=ways(head_axes), interpret=interpret)
            whole = ("batch", None, "kv_heads", "head_dim")
            return per_shard(splash_attention, (kernel.kernel, q, k, v, segment_ids, segment_ids),
                             (lambda mesh: kernel.in_spec(mesh, head_axes, q_axes), HEADS,
                              whole, whole, TOKENS, ("batch", None)), HEADS)
        return by_lowering_platform(run, {"tpu": False}, True)

    def _cudnn(self, q, k, v, positions, segment_ids):
        """cuDNN attention per device: queries split like the activations (over `context` too,
        with the keys and values gathered whole, as all-gather context parallelism does), heads
        over `tensor`. cuDNN's custom call cannot be partitioned along the sequence by XLA
        ("Sharding on sequence dim is not allowed"), so it runs inside `shard_map`."""
        whole = ("batch", None, "kv_heads", "head_dim")
        return per_shard(cudnn.cudnn_attention,
                         (q, k, v, positions, positions, segment_ids, segment_ids),
                         (HEADS, whole, whole, TOKENS, ("batch", None), TOKENS, ("batch", None)),
                         HEADS)

    def _attend(self, q, k, v, mask):
        return self._output(jax.nn.dot_product_attention(q, k, v, mask=mask))

    def _output(self, o):
        o = constrain(o, HEADS)
        out = jnp.einsum("bthk,hkd->btd", o, self.wo[...].astype(o.dtype))
        return constrain(out, ("batch", "length", "act_embed"))


@contextlib.contextmanager
def _splash_length_errors():
    """A sequence the splash kernel's blocks cannot tile is the user's to change."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"model.attention_impl=splash: {e}; change seq_len, or use "
                        f"model.attention_impl=xla") from None


class Block(nnx.Module):
    """Pre-norm attention and feed-forward with residuals. `make_mlp(rngs)` builds the
    feed-forward part (default: the dense SwiGLU); the mixture-of-experts family passes its own."""

    def __init__(self, cfg, rngs: nnx.Rngs, make_mlp=None):
        self.dropout_rate = cfg.dropout_rate
        self.attn_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mlp = (make_mlp or (lambda r: layers.SwiGLU(cfg.d_model, cfg.mlp_dim,
                                                         num_layers=cfg.num_layers, rngs=r)))(rngs)

    def __call__(self, x, positions, mask, key=None):
        x, mlp_key = self.attend(x, positions, mask, key)
        return self.add_residual(x, self.mlp(self.mlp_norm(x)), mlp_key)

    def attend(self, x, positions, mask, key):
        """The attention half: (x after its residual, the dropout key left for the MLP half)."""
        keys = (None, None) if key is None else jax.random.split(key)
        x = x + layers.dropout(self.attn(self.attn_norm(x), positions, mask), self.dropout_rate, keys[0])
        return x, keys[1]

    def cached(self, x, positions, mask, cache, start):
        """The block over the KV cache (decoding: no dropout): (x, updated cache)."""
        h, cache = self.attn.cached(self.attn_norm(x), positions, mask, cache, start)
        x = x + h
        return self.add_residual(x, self.feed_forward(self.mlp_norm(x)), None), cache

    def feed_forward(self, x):
        return self.mlp(x)

    def add_residual(self, x, mlp_out, key):
        x = x + layers.dropout(mlp_out, self.dropout_rate, key)
        return constrain(x, ("batch", "length", "act_embed"))


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: causal, and only within the same packed document.

    Padding (segment 0) attends to earlier padding, so no softmax row is empty (no NaN)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same)[:, None]


class KVCacheDecoding:
    """Decoding for a DecoderLM whose stacked blocks attend through `Block.cached`
    (paxlike/decode.py): a fixed-size KV cache per layer [B, max_len, kv_heads, head_dim]
    (compute dtype), the segment id of every slot, each row's next position and the slots written
    so far. Every call attends over all max_len slots with a mask (unwritten slots are in the
    future), so the decode step has one shape and compiles once. `layers_per_block`: None when
    each stacked block is one layer, else the layers in one block (whose `cached` then gets
    their caches [n, ...])."""

    # Rotary positions beyond the training length were never trained: paxlike.generate refuses
    # a prompt plus new tokens longer than the run's seq_len.
    decode_length_limited = True
    layers_per_block = None

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        cfg = self.cfg
        kv = jnp.zeros((cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, head_dim(cfg)),
                       self.compute_dtype)
        kv = constrain(kv, ("layers",) + CACHE)
        return {"k": kv, "v": kv, "segments": jnp.zeros((batch_size, max_len), jnp.int32),
                "next_position": jnp.zeros((batch_size,), jnp.int32),
                "length": jnp.zeros((), jnp.int32)}

    def prefill(self, tokens, positions, segment_ids, *, max_len: int):
        """Left-padded prompts [B, T] (padding: segment 0) into a fresh cache of `max_len` slots:
        (float32 logits [B, vocab] after the last token, cache)."""
        return self._extend(tokens, positions, segment_ids,
                            self.init_cache(tokens.shape[0], max_len))

    def decode_step(self, tokens, cache):
        """One token per row [B] appended to the cache: (float32 logits [B, vocab], cache)."""
        last = jax.lax.dynamic_index_in_dim(cache["segments"], cache["length"] - 1, 1)
        return self._extend(tokens[:, None], cache["next_position"][:, None], last, cache)

    def _extend(self, tokens, positions, segment_ids, cache):
        start, t = cache["length"], tokens.shape[1]
        segments = jax.lax.dynamic_update_slice_in_dim(cache["segments"], segment_ids, start, 1)
        # Query slot start + i sees key slot j <= start + i of its own segment: the training
        # mask (attention_mask) over the cache's slots.
        causal = (start + jnp.arange(t))[:, None] >= jnp.arange(segments.shape[1])[None, :]
        mask = (causal & (segment_ids[:, :, None] == segments[:, None, :]))[:, None]
        x = self.embed_tokens(tokens, self.compute_dtype)
        n = self.layers_per_block
        blocks = lambda a: a if n is None else a.reshape(a.shape[0] // n, n, *a.shape[1:])
        x, kv = self.scan_cached(x, {"k": blocks(cache["k"]), "v": blocks(cache["v"])},
                                 lambda blk, h, c: blk.cached(h, positions, mask, c, start))
        kv = jax.tree.map(lambda a: a.reshape(cache["k"].shape), kv)
        return self.last_logits(x), dict(kv, segments=segments, length=start + t,
                                         next_position=positions[:, -1] + 1)


class Transformer(KVCacheDecoding, layers.DecoderLM, nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.init_decoder(cfg, rngs, validate(cfg), lambda r: Block(cfg, r))

    def __call__(self, tokens, positions, segment_ids, *, dropout_key=None):
        """tokens, positions, segment_ids: [B, T] int. Returns float32 logits [B, T, vocab]."""
        x = self.embed_tokens(tokens, self.compute_dtype)
        mask = segment_ids if uses_segment_ids(self.cfg) else attention_mask(segment_ids)
        x = layers.scan_layers(self.layers, x, lambda blk, h, k, b: blk(h, *b, k),
                               remat=self.cfg.remat, key=dropout_key,
                               batch_inputs=(positions, mask))
        return self.output_logits(x)


CACHE = ("batch", None, "kv_heads", "head_dim")    # one layer's keys or values in the KV cache
HEADS = ("batch", "length", "heads", "head_dim")
KV_HEADS = ("batch", "length", "kv_heads", "head_dim")
TOKENS = ("batch", "length")


def build(cfg, rngs: nnx.Rngs) -> Transformer:
    return Transformer(cfg, rngs)


def attention_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token of the attention scores and their weighted sum over the whole
    T × T matrix: 12 · L · H · D_h · T (2 · 2 · T · H · D_h per layer per token in the forward
    pass, tripled for the backward). XLA's `jax.nn.dot_product_attention` computes all of it,
    the causally masked half included."""
    return 12.0 * cfg.num_layers * cfg.num_heads * head_dim(cfg) * seq_len


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward, no rematerialisation): the numerator of MFU.

    6 · N_matmul + half of `attention_flops_per_token`, where N_matmul counts the weights used in
    matrix multiplies (attention projections, MLP, output head; not the embedding lookup).
    Causal attention is counted as half of the T × T matrix, the convention of MaxText (since
    July 2025), Megatron-LM and NeMo, so that MFU figures compare with theirs; the masked half
    that XLA computes anyway is work without model FLOPs (the planner prices it:
    `Profile.flops_per_token_extra`).
    """
    d, hd, L = cfg.d_model, head_dim(cfg), cfg.num_layers
    attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * d * cfg.mlp_dim
    n_matmul = L * (attn + mlp) + d * cfg.vocab_size
    return 6.0 * n_matmul + 0.5 * attention_flops_per_token(cfg, seq_len)


# ------------------------------------------------------------------------- the planner's profile
def planner_profile(cfg) -> "Profile":
    return Profile(cfg)


class Profile(workingset.Profile):
    """What the planner knows of the Transformer beyond its parameters and traced residuals
    (paxlike/planner/workingset.py has the frame and how the counts are read).

    On the short-sequence CPU cases of tests/test_planner.py the peak is the backward pass of the
    last layer's MLP (on long sequences its attention's: `working_set`). Live there, per device,
    beyond the saved activations and the embedding gradient:

        mlp      b·t·mlp/tp       the MLP's cotangents: d hidden, d gate, d up, and the two
                                  transposed copies the weight-gradient dots read (5), plus what
                                  the remat policy recomputes instead of saving: the gate and up
                                  outputs under `full` (+3 with their product), the SiLU under
                                  `save_dots` (+1)
        scores   b·h/tp·t·keys    one float32 attention-probability array (recomputed under
                                  remat, and the softmax cotangent's buffer otherwise): keys = t,
                                  T under all-gather context parallelism, a key chunk under
                                  ring attention, none under splash (`keys_at_once`)
        stream   b·t·d            7: the residual-stream cotangent, its copies around the two
                                  RMSNorms and the row-parallel outputs
        weights  d·mlp/tp         the layer's MLP weights gathered (2 in the compute dtype) and
                                  one float32 weight gradient being formed

    Tensor parallelism: the row-parallel outputs (attention projection, MLP down) are summed over
    `tensor` in the forward pass (2). In the backward pass XLA:CPU sums the input gradient of
    each column-parallel matmul separately (q, k, v, gate, up: 5) where the TPU compiler sums
    q/k/v once and gate/up once (2; read from v5e and v5p HLO). Full remat recomputes the
    forward's sums: both on CPU; on TPU only the attention's, the MLP's output being unused by
    the backward pass (1b-class fsdp 16 x tensor 4 on v5p).
    """

    MLP_ARRAYS = {"none": 5, "save_dots": 6, "full": 8}
    RING_KEY_CHUNK = 512   # kernels/attention/ring.py's default key_chunk
    ATTENTION_ARRAYS = {"none": 2, "save_dots": 4, "full": 4}
    RING_ATTENTION_ARRAYS = 4
    STREAM_ARRAYS = 7
    # Whether the output head's logits-sized residuals are still live at the layer peak could
    # not be told apart in the dumps (vocabulary = MLP width there); counting them matched the
    # compiles better.
    head_saved_at_layer_peak = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.h, self.kv, self.hd = cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
        self.mlp = cfg.mlp_dim
        self.splash = cfg.get("attention_impl", "xla") == "splash"
        self.context_parallel = cfg.get("context_parallel", "all_gather")

    @property
    def tensor_dims(self) -> set[int]:
        return {self.h, self.kv, self.mlp}

    def layer_units(self, b: int, t: int, tp: int, context: int = 1) -> dict[str, float]:
        return {"scores": b * (self.h / tp) * t * self.keys_at_once(t, context) * 4,
                "mlp": b * t * self.mlp / tp * self.dt,
                "mlp_weight": self.d * self.mlp / tp}            # elements

    def working_set(self, remat, b, t, tp, vocab_ways, backend="cpu", context=1):
        """The frame's two candidate peaks and a third, the backward pass of the last layer's
        attention, which is the peak once the scores outgrow the MLP (long sequences):
        ATTENTION_ARRAYS score-sized arrays (XLA: the probabilities recomputed, their cotangent,
        the softmax's and the mask's temporaries; with remat none the probabilities are saved
        activations instead), RING_ATTENTION_ARRAYS chunk-sized ones under ring attention, and
        the residual stream's arrays. Read from XLA:CPU compiles at T = 512-2048 (d 64, fsdp 8
        and ring on context 4 x fsdp 2): the compiled temporaries were 3.99-4.18 (save_dots,
        full), 1.99 (none) and 4.0 (ring, full; 8.1-8.2 while the ring's forward loops were
        scans, whose per-hop intermediates JAX kept: kernels/attention/ring.py, forward_loop)
        score units beyond the stream's."""
        phases = super().working_set(remat, b, t, tp, vocab_ways, backend, context)
        u = self.units(b, t, tp, vocab_ways, context)
        ring = self.context_parallel == "ring" and context > 1
        arrays = self.RING_ATTENTION_ARRAYS if ring else self.ATTENTION_ARRAYS[remat]
        phases["attention_backward"] = (arrays * u["scores"] + self.STREAM_ARRAYS * u["stream"]
                                        + u["embed_grad"])
        return phases

    def keys_at_once(self, t: int, context: int) -> int:
        """Keys one query row's scores span at once: splash keeps its blocks in VMEM (none in
        HBM, alone or as ring attention's block computation); XLA's ring attention a chunk of
        its block; XLA's attention every key, the whole sequence under all-gather context
        parallelism."""
        if self.splash:
            return 0
        if self.context_parallel == "ring" and context > 1:
            return min(self.RING_KEY_CHUNK, t)
        return t * context

    def layer_working(self, remat: str, u: dict[str, float]) -> float:
        return (self.MLP_ARRAYS[remat] * u["mlp"] + u["scores"] + self.STREAM_ARRAYS * u["stream"]
                + (2 * self.dt + 4) * u["mlp_weight"])

    def context_collectives(self, b, t, ways, tp, remat, backend):
        """Per layer run with the length split `ways` ways (read from XLA:CPU HLO: context 4 x
        fsdp 2 with full remat in both modes and with none for all_gather, context 8 with
        save_dots; held-out checks in tests/test_planner.py). The forward runs twice under full
        remat.

        all_gather: GSPMD gathers the keys and values whole (b·T·kv/tp·hd each), for the
        forward pass and again for the backward whatever the remat policy, and sums their
        gradients back (a reduce-scatter; an all-reduce on CPU).
        ring: ways − 1 hops per forward run of the key and value blocks with their positions
        and segment ids (int32); `ways` hops backward of those and the float32 dK, dV; each hop
        overlaps with the attention of the block before it."""
        kv = b * t * self.kv / tp * self.hd
        forward_runs = 2 if remat == "full" else 1
        if self.context_parallel == "ring":
            ids = (1 if self.splash else 2) * b * t * 4   # segment ids (and XLA's positions)
            return [("collective-permute", 2 * kv * self.dt + ids, (ways - 1) * forward_runs, True),
                    ("collective-permute", 2 * kv * (self.dt + 4) + ids, ways, True)]
        whole = kv * ways * self.dt
        return [("all-gather", whole, 4, False),         # gathered again for the backward
                ("reduce-scatter", whole, 2, False)]

    def tensor_sums_per_layer(self, backend: str, remat: str) -> float:
        if backend == "cpu":
            return 7 + (2 if remat == "full" else 0)
        return 4 + (1 if remat == "full" else 0)

    def flops_per_token_extra(self, remat: str, seq_len: int, microbatches: int = 1) -> float:
        """FLOPs per token computed beyond the model FLOPs: the causally masked half of the
        attention matrix (computed by XLA, not counted; splash skips the blocks above the
        diagonal, so only the diagonal blocks' masked halves, which this neglects) and remat's
        recomputation."""
        d, hd, L = self.d, self.hd, self.layers
        matmul = L * (d * hd * (2 * self.h + 2 * self.kv) + 3 * d * self.mlp)
        attn = L * 4 * self.h * hd * seq_len        # the forward pass's whole T x T attention
        masked = 0.0 if self.splash else 1.5 * attn  # half of forward + backward (3 x forward)
        if remat == "full":
            return masked + 2 * matmul + attn
        if remat == "save_dots":
            return masked + attn
        return masked
