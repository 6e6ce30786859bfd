"""Hugging Face interop for the Llama-style Transformer: export a run as a `transformers`
`LlamaForCausalLM` directory, import one as a paxlike checkpoint, compare the two's logits.

    python -m paxlike.hf export --workdir=DIR [--step=N] --out=HF_DIR [--dtype=bfloat16]
    python -m paxlike.hf import --hf=HF_DIR --workdir=DIR [--config=... --config.KEY=VALUE]
    python -m paxlike.hf compare --workdir=DIR --hf=HF_DIR [--prompt=TEXT | --tokens=N]

The mapping (`_MAPPING`, per layer i; paxlike stacks layers on a leading axis):

    embed [V, d]                         model.embed_tokens.weight [V, d]
    layers/attn/wq [L, d, H, hd]         model.layers.i.self_attn.q_proj.weight [H·hd, d]  (W.T)
    layers/attn/wk, wv [L, d, KV, hd]    ....k_proj, v_proj [KV·hd, d]: grouped-query heads,
                                         query head h reads KV head h // (H / KV) in both
    layers/attn/wo [L, H, hd, d]         ....o_proj.weight [d, H·hd]
    layers/mlp/w_gate, w_up [L, d, F]    ....mlp.gate_proj, up_proj [F, d]
    layers/mlp/w_down [L, F, d]          ....mlp.down_proj [d, F]
    layers/attn_norm/scale [L, d]        ....input_layernorm.weight
    layers/mlp_norm/scale [L, d]         ....post_attention_layernorm.weight
    final_norm/scale [d]                 model.norm.weight (× 1/sqrt(d) when tied, below)
    unembed [d, V]                       lm_head.weight [V, d] (absent when tied)

Rotary positions need no permutation: both rotate the two halves of each head (paxlike's `rope`
and transformers' `rotate_half`) with frequencies theta^(-2i/hd). Tied embeddings: paxlike divides
the tied logits by sqrt(d) (its embeddings have std 1), Llama does not, so the factor moves into
the final norm's weight on export and back on import (exact when sqrt(d) is a power of two).

Conversions go tensor by tensor: export reads one stacked parameter from the checkpoint (orbax
partial restore) and streams its layers into safetensors files whose header was written from the
shapes alone; import reads one tensor at a time and places each stacked parameter on the devices
as soon as it is whole. Peak host memory: one stacked parameter (all layers of one weight).
Import writes a step-0 checkpoint of a paxlike run (its optimizer state fresh) that
`python -m paxlike.train` with the same flags continues; nothing is written when a check fails.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types

import ml_collections
import numpy as np
from absl import flags, logging

from paxlike import cli, storage
from paxlike.errors import UserError
from paxlike.safetensors_io import DTYPES, Reader, write_sharded

COMMANDS = ("export", "import", "compare")

TRANSFORMER = "paxlike.models.transformer"
MAX_SHARD_BYTES = 5 * 1024 ** 3      # transformers' default shard size


# ------------------------------------------------------------------------- the tensor mapping
def _proj(w):            # [d, heads, hd] -> [heads·hd, d]
    return w.reshape(w.shape[0], -1).T


def _out(w):             # [heads, hd, d] -> [d, heads·hd]
    return w.reshape(-1, w.shape[-1]).T


def _transpose(w):
    return w.T


# (paxlike path, Hugging Face name ({i}: layer), paxlike -> HF, HF -> paxlike given the model cfg)
_MAPPING = [
    (("embed",), "model.embed_tokens.weight", lambda w: w, lambda w, c: w),
    (("layers", "attn", "wq"), "model.layers.{i}.self_attn.q_proj.weight", _proj,
     lambda w, c: w.T.reshape(c.d_model, c.num_heads, -1)),
    (("layers", "attn", "wk"), "model.layers.{i}.self_attn.k_proj.weight", _proj,
     lambda w, c: w.T.reshape(c.d_model, c.num_kv_heads, -1)),
    (("layers", "attn", "wv"), "model.layers.{i}.self_attn.v_proj.weight", _proj,
     lambda w, c: w.T.reshape(c.d_model, c.num_kv_heads, -1)),
    (("layers", "attn", "wo"), "model.layers.{i}.self_attn.o_proj.weight", _out,
     lambda w, c: w.T.reshape(c.num_heads, -1, c.d_model)),
    (("layers", "mlp", "w_gate"), "model.layers.{i}.mlp.gate_proj.weight", _transpose,
     lambda w, c: w.T),
    (("layers", "mlp", "w_up"), "model.layers.{i}.mlp.up_proj.weight", _transpose,
     lambda w, c: w.T),
    (("layers", "mlp", "w_down"), "model.layers.{i}.mlp.down_proj.weight", _transpose,
     lambda w, c: w.T),
    (("layers", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", lambda w: w,
     lambda w, c: w),
    (("layers", "mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight",
     lambda w: w, lambda w, c: w),
    (("final_norm", "scale"), "model.norm.weight", lambda w: w, lambda w, c: w),
    (("unembed",), "lm_head.weight", _transpose, lambda w, c: w.T),
]


def _tied_scale(cfg) -> float:
    """The factor between paxlike's and Llama's final norm weight for tied embeddings."""
    return 1.0 / math.sqrt(cfg.d_model) if cfg.tie_embeddings else 1.0


def _mapping(cfg):
    """The mapping entries this model has (no lm_head when the embeddings are tied)."""
    return [m for m in _MAPPING if not (cfg.tie_embeddings and m[0] == ("unembed",))]


def _layers(path, model_cfg):
    """The layer indices of a mapping entry: every layer for stacked ones, else [None]."""
    return range(model_cfg.num_layers) if path[0] == "layers" else [None]


def declared_tensors(model_cfg, abstract_params, dtype) -> list[tuple[str, tuple, np.dtype]]:
    """(Hugging Face name, shape, dtype) of every tensor of the model, from shapes alone."""
    import jax
    out = []
    for path, name, to_hf, _ in _mapping(model_cfg):
        stacked = _get(abstract_params, path).shape
        shape = jax.eval_shape(to_hf, jax.ShapeDtypeStruct(
            stacked[1:] if path[0] == "layers" else stacked, np.float32)).shape
        out += [(name.format(i=i), tuple(shape), dtype) for i in _layers(path, model_cfg)]
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ------------------------------------------------------------------------------------ configs
def llama_config(model_cfg, seq_len: int, tokenizer) -> dict:
    """transformers' LlamaConfig fields for a paxlike Transformer config."""
    head_dim = model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": model_cfg.vocab_size, "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.mlp_dim, "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads, "num_key_value_heads": model_cfg.num_kv_heads,
        "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": seq_len, "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": model_cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rope_theta},
        "tie_word_embeddings": bool(model_cfg.tie_embeddings), "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0,
        "eos_token_id": tokenizer.eos_id, "bos_token_id": getattr(tokenizer, "bos_id", None),
    }


def model_config_from_llama(hf: dict, base) -> ml_collections.ConfigDict:
    """The paxlike Transformer model section for a Llama config.json (UserError for what the
    Transformer does not implement); compute dtype, remat and dropout stay as in `base`."""
    problems = []
    if hf.get("model_type") != "llama":
        problems.append(f"model_type is {hf.get('model_type')!r}; only 'llama' (LlamaForCausalLM) "
                        f"maps onto paxlike's Transformer")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (paxlike's MLP is SwiGLU: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true (paxlike's Transformer has no biases)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r} (paxlike "
                        f"implements the default rotary embedding only)")
    if problems:
        raise UserError("cannot import this model: " + "; ".join(problems))
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    cfg = ml_collections.ConfigDict(base.to_dict())
    cfg.update(module=TRANSFORMER, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
               num_layers=hf["num_hidden_layers"], num_heads=heads,
               num_kv_heads=hf.get("num_key_value_heads") or heads,
               head_dim=0 if head_dim * heads == hf["hidden_size"] else head_dim,
               mlp_dim=hf["intermediate_size"], tie_embeddings=bool(hf.get("tie_word_embeddings")),
               rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
               norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    return cfg


def _require_transformer(model_cfg, where: str) -> None:
    if model_cfg.get("module") != TRANSFORMER:
        raise UserError(f"{where} is a {model_cfg.get('module')} run; Hugging Face conversion "
                        f"covers the Llama-style Transformer ({TRANSFORMER}) only")


# ------------------------------------------------------------------------------------- export
def export_run(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
               max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Writes the run's checkpoint as a LlamaForCausalLM directory. Returns a summary."""
    import jax
    from paxlike import checkpoint, config, decode, sharding
    from paxlike.data import tokenizer as tokenizer_lib
    from paxlike.mesh import build_mesh

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype={dtype!r}; choose float32 or bfloat16")
    cfg = config.load_saved(workdir)
    _require_transformer(cfg.model, f"--workdir={workdir}")
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"--out={out} exists and is not empty; choose a new directory (nothing "
                        f"is overwritten)")
    tokenizer = tokenizer_lib.for_run(cfg.data, workdir)
    checkpoints = checkpoint.Checkpoints(storage.join(workdir, "checkpoints"),
                                         keep=cfg.keep_checkpoints, async_save=False)
    step = checkpoints.step_to_read(step, workdir)
    mesh = build_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    abstract = decode.Decoder(cfg.model, mesh, sharding.get_rules(cfg.sharding, mesh)
                              ).abstract_params
    out_dtype = DTYPES["BF16" if dtype == "bfloat16" else "F32"]

    declared = declared_tensors(cfg.model, abstract, out_dtype)

    def produce():
        for path, name, to_hf, _ in _mapping(cfg.model):
            part = {}
            _set(part, path, _get(abstract, path))
            value = np.asarray(_get(checkpoints.restore_params(step, part), path))
            if path == ("final_norm", "scale"):
                value = value * np.float32(_tied_scale(cfg.model))
            for i in _layers(path, cfg.model):
                array = to_hf(value[i] if i is not None else value)
                yield name.format(i=i), np.ascontiguousarray(array).astype(out_dtype)

    os.makedirs(out, exist_ok=True)
    files = write_sharded(out, declared, produce(), max_shard_bytes, {"format": "pt"})
    config = dict(llama_config(cfg.model, cfg.seq_len, tokenizer), dtype=dtype)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    files.append("config.json")
    files += _export_tokenizer(tokenizer, workdir, out)
    return {"step": step, "files": files, "tensors": len(declared),
            "bytes": sum(math.prod(s) * d.itemsize for _, s, d in declared)}


def _export_tokenizer(tokenizer, workdir: str, out: str) -> list[str]:
    """tokenizer.json and tokenizer_config.json for a BPE or pretrained tokenizer; a byte-level
    run has no Hugging Face tokenizer file (its ids are the UTF-8 bytes, EOS = 256)."""
    from paxlike.data import tokenizer as tokenizer_lib
    if tokenizer.name == "byte":
        return []
    source = (tokenizer.path if tokenizer.name == "pretrained"
              else storage.join(workdir, tokenizer_lib.TOKENIZER_FILE))
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        f.write(storage.read_text(source))
    eos = tokenizer._tok.id_to_token(tokenizer.eos_id)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                   "model_max_length": 1 << 30}, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json"]


# ------------------------------------------------------------------------------------- import
def read_llama_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e} (--hf must be a Hugging Face "
                        f"model directory)") from None
    except ValueError as e:
        raise UserError(f"{path} is not JSON: {e}") from None


def import_run(hf_dir: str, cfg, workdir: str) -> dict:
    """Makes `workdir` a paxlike run of `cfg` (its model section taken from the Llama config)
    whose step-0 checkpoint holds the Hugging Face weights. Returns a summary."""
    import jax
    from paxlike import loop

    hf_config = read_llama_config(hf_dir)
    model = model_config_from_llama(hf_config, cfg.model)
    with cfg.unlocked():          # the command line's config is locked against new keys
        cfg.model = model
    reader = Reader(hf_dir)
    if storage.exists(storage.join(workdir, "checkpoints")):
        raise UserError(f"--workdir={workdir} already holds checkpoints; import into a new "
                        f"directory (nothing was changed)")
    run = loop.prepare(cfg, workdir)           # every check of the run; writes nothing
    declared = {name: shape for name, shape, _ in declared_tensors(
        cfg.model, run.trainer.abstract_state().params, np.float32)}
    found = {name: tuple(reader.entries[name][1]["shape"]) for name in reader.names()
             if not name.endswith("rotary_emb.inv_freq")}
    if cfg.model.tie_embeddings:
        found.pop("lm_head.weight", None)       # some savers write the tied head too
    if found != declared:
        missing = sorted(set(declared) - set(found))
        extra = sorted(set(found) - set(declared))
        shapes = sorted(n for n in set(found) & set(declared) if found[n] != declared[n])
        raise UserError(
            f"{hf_dir} does not hold the tensors of its config.json: missing {missing[:3]}, "
            f"unexpected {extra[:3]}, other shape "
            f"{[(n, found[n], declared[n]) for n in shapes[:2]]} (nothing was written)")
    start = loop.restore(run)                   # takes the workdir: config.json, tokenizer
    shardings = run.trainer.param_shardings
    params = jax.tree.map(lambda x: x, start.state.params)
    for path, name, _, from_hf in _mapping(cfg.model):
        value = np.stack([from_hf(reader.read(name.format(i=i)).astype(np.float32), cfg.model)
                          for i in _layers(path, cfg.model)])
        value = value if path[0] == "layers" else value[0]
        if path == ("final_norm", "scale"):
            value = value / np.float32(_tied_scale(cfg.model))
        _set(params, path, jax.device_put(value, _get(shardings, path)))
    state = run.trainer.init_state(params)   # a fresh optimizer state around them
    run.checkpoints.save(0, state, loop.checkpoint_meta(run, 0, start.train_iter))
    run.checkpoints.close()
    return {"tensors": len(declared), "workdir": workdir}


# ------------------------------------------------------------------------------------ compare
def import_transformers():
    """(torch, transformers), imported so that transformers finds the `kernels` distribution it
    depends on: run from a paxlike checkout (`python -m` puts the current directory first on
    sys.path), the checkout's own top-level `kernels/` folder, which installs as
    paxlike.kernels, would shadow it. UserError when they are not installed."""
    from paxlike import kernels as paxlike_kernels
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(paxlike_kernels.__file__)))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    try:
        import torch
        import transformers
        import transformers.integrations.hub_kernels  # noqa: F401 (imports `kernels` now)
    except ImportError as e:
        raise UserError(f"this needs torch and transformers ({e}); pip install "
                        f"'paxlike[hf]'") from None
    finally:
        sys.path[:] = saved
    return torch, transformers


def compare(workdir: str, hf_dir: str, tokens: list[int], *, step: int | None = None,
            top_k: int = 5) -> dict:
    """How close a paxlike run's next-token distributions are to a transformers model's on
    `tokens` (one sequence): KL(paxlike || hf) per position (mean, max), the share of positions
    whose top-1 token agrees, the mean overlap of the top-k sets, and the largest logit
    difference. Each model computes in its own dtype (a bfloat16 export against the float32 run
    shows what bfloat16 costs). Needs torch and transformers (pip install 'paxlike[hf]')."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from paxlike import checkpoint, config, decode, sharding
    from paxlike.mesh import build_mesh
    torch, transformers = import_transformers()

    cfg = config.load_saved(workdir)
    _require_transformer(cfg.model, f"--workdir={workdir}")
    checkpoints = checkpoint.Checkpoints(storage.join(workdir, "checkpoints"),
                                         keep=cfg.keep_checkpoints, async_save=False)
    step = checkpoints.step_to_read(step, workdir)
    mesh = build_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    decoder = decode.Decoder(cfg.model, mesh, sharding.get_rules(cfg.sharding, mesh))
    params = checkpoints.restore_params(step, decoder.abstract_params)
    model = nnx.merge(decoder.graphdef, params)
    ids = jnp.asarray([tokens], jnp.int32)
    ours = np.asarray(model(ids, jnp.arange(len(tokens))[None], jnp.ones_like(ids))[0])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([tokens])).logits[0].float().numpy()
    log_p = jax.nn.log_softmax(ours, -1)
    log_q = jax.nn.log_softmax(theirs, -1)
    kl = np.asarray(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))
    top_ours, top_theirs = np.argsort(-ours, -1)[:, :top_k], np.argsort(-theirs, -1)[:, :top_k]
    overlap = np.mean([len(set(a) & set(b)) / top_k for a, b in zip(top_ours, top_theirs)])
    return {"step": step, "positions": len(tokens), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "top1_agreement": float(np.mean(top_ours[:, 0] == top_theirs[:, 0])),
            f"top{top_k}_overlap": float(overlap),
            "max_abs_logit_diff": float(np.max(np.abs(ours - theirs))),
            "hf_dtype": str(next(hf_model.parameters()).dtype).replace("torch.", "")}


# ---------------------------------------------------------------------------- command line
def define_flags() -> types.SimpleNamespace:
    """The command's flags, defined when it runs: paxlike.train and paxlike.generate define some
    of the same names, and one process (a test session) may import all of them."""
    d = flags
    return types.SimpleNamespace(
        workdir=d.DEFINE_string("workdir", None, "The paxlike run (export, compare: read; "
                                "import: a new directory)."),
        hf=d.DEFINE_string("hf", None, "A Hugging Face LlamaForCausalLM directory (import, "
                           "compare)."),
        out=d.DEFINE_string("out", None, "export: the new Hugging Face directory."),
        step=d.DEFINE_integer("step", None, "Checkpoint step (default: the newest)."),
        dtype=d.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "export: tensor dtype."),
        max_shard_gb=d.DEFINE_float("max_shard_gb", 5.0, "export: largest safetensors file."),
        prompt=d.DEFINE_string("prompt", None, "compare: text to run both models on."),
        tokens=d.DEFINE_integer("tokens", 512, "compare: without --prompt, this many random "
                                "token ids (seeded)."),
        cpu_devices=d.DEFINE_integer("cpu_devices", None, "Emulate this many CPU devices."))


def _required(flag, what: str) -> str:
    if not flag.value:
        raise UserError(f"--{flag.name} is required: {what}")
    return flag.value


def main(cfg, command: str, f: types.SimpleNamespace) -> None:
    cli.emulate_cpu_devices(f.cpu_devices.value)
    workdir = _required(f.workdir, "the paxlike run's directory")
    if command == "export":
        out = _required(f.out, "the Hugging Face directory to write")
        if f.max_shard_gb.value <= 0:
            raise UserError(f"--max_shard_gb={f.max_shard_gb.value} must be > 0")
        summary = export_run(workdir, out, step=f.step.value, dtype=f.dtype.value,
                             max_shard_bytes=int(f.max_shard_gb.value * 1024 ** 3))
        print(f"exported step {summary['step']} of {workdir} to {out}: {summary['tensors']} "
              f"tensors, {summary['bytes'] / 1e6:.1f} MB ({', '.join(summary['files'])})")
    elif command == "import":
        hf_dir = _required(f.hf, "the Hugging Face model directory to read")
        summary = import_run(hf_dir, cfg, workdir)
        print(f"imported {summary['tensors']} tensors of {hf_dir} into {workdir} as step 0; "
              f"continue with: python -m paxlike.train --workdir={workdir} and the same --config "
              f"flags")
    else:
        from paxlike import config
        from paxlike.data import tokenizer as tokenizer_lib
        hf_dir = _required(f.hf, "the Hugging Face model directory to compare with")
        run_cfg = config.load_saved(workdir)
        if f.prompt.value is not None:
            tokens = tokenizer_lib.for_run(run_cfg.data, workdir).encode(f.prompt.value)
        else:
            rng = np.random.default_rng(0)
            tokens = rng.integers(0, run_cfg.model.vocab_size, f.tokens.value).tolist()
        if not tokens:
            raise UserError("--prompt is empty; give text, or leave it out for random tokens"
                            if f.prompt.value is not None else
                            f"--tokens={f.tokens.value} must be >= 1")
        print(json.dumps(compare(workdir, hf_dir, tokens, step=f.step.value), indent=2))


def run_cli():
    cli.log_info_quietly()
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        cli.fail(f"give a command first: python -m paxlike.hf {{{'|'.join(COMMANDS)}}} --flags "
                 f"(e.g. python -m paxlike.hf export --workdir=DIR --out=HF_DIR)")
    command = sys.argv.pop(1)
    given = define_flags()
    logging.info("paxlike.hf %s", command)
    cli.run(lambda cfg: main(cfg, command, given))


if __name__ == "__main__":
    run_cli()
