"""Micro-batch vs global-batch load balancing, at tiny scale: does the scope of the balancing loss
decide whether experts specialise by domain? ("Demons in the Detail", arXiv 2501.11873.)

    python benchmarks/moe_domains.py [--steps=200] [--microbatches=8] [--lbl_weight=0.01]
                                     [--seed=0] [--scopes=micro_batch,global_batch]

About 11-14 minutes on 2 CPU cores (two runs of ~5-7 min); results and commands in docs/moe.md.

The corpus has two domains, both read from this machine (nothing is downloaded):

  code   the standard library's own .py files (paxlike's built-in corpus, `sources.stdlib_files`),
         `pydoc_data/topics.py` excluded (it is prose in a string);
  prose  English prose: the help texts of `pydoc_data/topics.py` with every indented line (code
         examples, grammar rules) and every RST underline dropped, and the licence texts in
         /usr/share/common-licenses (near-duplicate versions left out).

Both are cut into documents (the first 8 kB of a code file, a ~3 kB run of prose paragraphs); a
stable hash of each document puts ~10% aside as held-out text, and code documents are taken until
the code domain has as many bytes as the prose one, so the mix is even. The training documents
are written as text files in a temporary directory and read by paxlike's own pipeline
(`data.source=text`, byte-level).

`experiments/moe.py:tiny` is trained once per load-balancing scope with everything else identical
(seed, steps, data order, `microbatches`): with 8 microbatches of a 16-sequence batch, a
microbatch is 2 sequences, so the micro-batch loss balances experts over ~256 tokens of one or two
documents, where the global-batch loss balances them over the whole batch. Each run is
`paxlike.loop.run` in this process; a hook keeps the final train state. The trained parameters are
then run on held-out rows of each domain separately: eval loss per domain (`Trainer.eval_step`),
and from `MoETransformer.forward` the tokens each expert received per domain per MoE layer, their
entropy and two specialisation scores:

  JS      Jensen-Shannon divergence (bits, 0..1) between the two domains' expert distributions;
  major   share of the routed assignments that went to an expert whose majority domain is the
          token's own (equal tokens per domain: 0.5 = no preference, 1 = every expert serves one
          domain only).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/gla.py's machine()

import numpy as np  # noqa: E402

from gla import machine  # noqa: E402

HELD_OUT = 0.10
PROSE_CHUNK = 3000          # bytes per prose document (cut at paragraph breaks)
CODE_FILE_CAP = 8000        # first bytes of each code file, so no one module dominates
LICENSES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "GPL-3", "LGPL-2.1",
            "MPL-2.0")


# ------------------------------------------------------------------------------------ corpus
def _held_out(text: str) -> bool:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < HELD_OUT


def prose_documents() -> list[str]:
    from pydoc_data.topics import topics
    underline = re.compile(r"[*=~^\-]{3,}")
    paragraphs = []
    for name in sorted(topics):
        lines = [l for l in topics[name].splitlines()
                 if not l.startswith("   ") and not underline.fullmatch(l.strip())
                 and ">>>" not in l]
        paragraphs += re.split(r"\n\s*\n", "\n".join(lines))
    for name in LICENSES:
        path = os.path.join("/usr/share/common-licenses", name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                paragraphs += re.split(r"\n\s*\n", f.read())
    docs, current = [], ""
    for p in (p.strip() for p in paragraphs):
        if not p:
            continue
        current = f"{current}\n\n{p}" if current else p
        if len(current) >= PROSE_CHUNK:
            docs.append(current)
            current = ""
    return docs + ([current] if current else [])


def code_documents(budget: dict[str, int]) -> dict[str, list[str]]:
    """Stdlib files in a fixed pseudo-random order, until each split has `budget[split]` bytes."""
    from paxlike.data import sources
    root = sources.stdlib_dir()
    rels = [r for r in sources.stdlib_files(root) if r != "pydoc_data/topics.py"]
    rels.sort(key=sources.split_score)
    out = {"train": [], "heldout": []}
    size = {"train": 0, "heldout": 0}
    for rel in rels:
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        if len(text) > CODE_FILE_CAP:
            text = text[:text.rfind("\n", 0, CODE_FILE_CAP) + 1] or text[:CODE_FILE_CAP]
        if not text.strip():
            continue
        split = "heldout" if _held_out(text) else "train"
        if size[split] < budget[split]:
            out[split].append(text)
            size[split] += len(text)
        if all(size[s] >= budget[s] for s in size):
            break
    return out


def build_corpus(root: str) -> dict[str, dict[str, list[str]]]:
    """{domain: {"train": [docs], "heldout": [docs]}}; training docs written under root/train."""
    prose = {"train": [], "heldout": []}
    for doc in prose_documents():
        prose["heldout" if _held_out(doc) else "train"].append(doc)
    budget = {s: sum(len(d) for d in docs) for s, docs in prose.items()}
    corpus = {"code": code_documents(budget), "prose": prose}
    for domain, splits in corpus.items():
        d = os.path.join(root, "train", domain)
        os.makedirs(d, exist_ok=True)
        for i, doc in enumerate(splits["train"]):
            with open(os.path.join(d, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
                f.write(doc)
    return corpus


# ------------------------------------------------------------------------------------ runs
class KeepFinalState:
    """A loop hook that keeps the train state after the last step."""

    def __init__(self, last_step: int):
        self.last_step, self.state = last_step, None

    def after_step(self, event) -> None:
        if event.step == self.last_step:
            self.state = event.state


def make_config(args, scope: str, train_dir: str):
    from paxlike.experiments import moe as experiment
    cfg = experiment.get_config("tiny")
    cfg.update(steps=args.steps, microbatches=args.microbatches, batch_size=args.batch_size,
               seq_len=args.seq_len, seed=args.seed, log_every=args.log_every, eval_every=0,
               checkpoint_every=0, keep_checkpoints=1)
    cfg.data.update(source="text", paths=train_dir, val_fraction=0.0, eval_batches=0)
    cfg.model.load_balance = scope
    if args.d_model:
        cfg.model.d_model = args.d_model
    if args.lbl_weight >= 0:
        cfg.model.aux_loss_weights.load_balance = args.lbl_weight
    return cfg


def train(args, scope: str, train_dir: str, workdir: str):
    from paxlike import loop
    cfg = make_config(args, scope, train_dir)
    keep = KeepFinalState(cfg.steps)
    start = time.perf_counter()
    loop.run(cfg, workdir, hooks=(*loop.DEFAULT_HOOKS, keep))
    return cfg, keep.state, time.perf_counter() - start


def domain_rows(texts: list[str], seq_len: int, rows: int) -> dict[str, np.ndarray]:
    """`rows` packed rows of the held-out documents, evenly spaced over them (whole rows only: the
    last, padded row is never taken)."""
    from paxlike.data import ByteTokenizer, PackedSplit
    stream, ends = ByteTokenizer().encode_docs(texts)
    split = PackedSplit(stream, ends, seq_len)
    n = min(rows, split.num_rows - 1)
    return split.rows(np.unique(np.linspace(0, split.num_rows - 2, n).round().astype(np.int64)))


def evaluate(cfg, state, heldout: dict[str, dict[str, np.ndarray]]) -> dict:
    """Per domain: eval loss, and expert counts [MoE layers, E] of the routed assignments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from paxlike import sharding
    from paxlike.data import BATCH_KEYS, ByteTokenizer
    from paxlike.mesh import build_mesh
    from paxlike.trainer import Trainer
    trainer = Trainer(cfg, build_mesh({"fsdp": -1}, devices=jax.devices()[:1]))
    token_bytes = jnp.asarray(np.asarray(ByteTokenizer().token_bytes, np.float32))

    @jax.jit
    def counts(params, batch):
        model = nnx.merge(trainer.graphdef, params)
        with sharding.use_rules(trainer.mesh, trainer.rules):
            _, out = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"])
        return out["counts"]

    result = {}
    for domain, rows in heldout.items():
        nll = tokens = 0.0
        total = None
        for lo in range(0, rows["inputs"].shape[0], cfg.batch_size):
            batch = {k: jax.device_put(rows[k][lo:lo + cfg.batch_size], trainer.batch_sharding)
                     for k in BATCH_KEYS}
            sums = jax.device_get(trainer.eval_step(state.params, batch, token_bytes))
            nll, tokens = nll + float(sums["nll"]), tokens + float(sums["tokens"])
            c = np.asarray(counts(state.params, batch), np.float64)
            total = c if total is None else total + c
        result[domain] = {"eval_loss": nll / tokens, "counts": total}
    return result


# ------------------------------------------------------------------------------------ statistics
def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def js_bits(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2
    return entropy_bits(m) - (entropy_bits(p) + entropy_bits(q)) / 2


def layer_stats(code: np.ndarray, prose: np.ndarray) -> dict:
    """code, prose: [E] counts of one layer (over equal token counts)."""
    p, q = code / code.sum(), prose / prose.sum()
    both = np.stack([p, q])          # per domain, shares: equal weight per domain
    major = float(both.max(axis=0).sum() / both.sum())
    return {"p_code": p, "p_prose": q, "H_code": entropy_bits(p), "H_prose": entropy_bits(q),
            "H_mix": entropy_bits((p + q) / 2), "JS": js_bits(p, q), "major": major}


def metrics_tail(workdir: str, keys, last: int) -> dict:
    from paxlike.metrics import read_records
    records = [r for r in read_records(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    tail = records[-last:]
    return {k: float(np.mean([r[k] for r in tail])) for k in keys if all(k in r for r in tail)}


# ------------------------------------------------------------------------------------ main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--d_model", type=int, default=0, help="0: tiny's (128)")
    parser.add_argument("--lbl_weight", type=float, default=-1.0,
                        help="load-balancing loss weight; < 0: tiny's (0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=20)
    parser.add_argument("--eval_rows", type=int, default=128, help="held-out rows per domain")
    parser.add_argument("--scopes", default="micro_batch,global_batch")
    parser.add_argument("--workdir", default="", help="default: a temporary directory")
    args = parser.parse_args()
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]

    import jax
    jax.config.update("jax_platforms", "cpu")
    from absl import logging
    logging.set_verbosity(logging.WARNING)

    root = args.workdir or tempfile.mkdtemp(prefix="moe_domains_")
    t0 = time.perf_counter()
    corpus = build_corpus(root)
    where = machine()
    print(f"machine: {where}")
    for domain, splits in corpus.items():
        print(f"corpus {domain}: " + ", ".join(
            f"{s} {len(docs)} docs / {sum(len(d) for d in docs) / 1e3:.0f} kB"
            for s, docs in splits.items()))
    heldout = {d: domain_rows(s["heldout"], args.seq_len, args.eval_rows)
               for d, s in corpus.items()}
    print("held-out eval: " + ", ".join(f"{d} {r['inputs'].shape[0]} rows x {args.seq_len}"
                                        for d, r in heldout.items()))
    print(f"corpus written to {root}/train ({time.perf_counter() - t0:.1f} s)", flush=True)

    results = {}
    for scope in scopes:
        workdir = os.path.join(root, f"run-{scope}")
        print(f"\n=== training experiments/moe.py:tiny, model.load_balance={scope}, "
              f"{args.microbatches} microbatches, {args.steps} steps -> {workdir}", flush=True)
        cfg, state, seconds = train(args, scope, os.path.join(root, "train"), workdir)
        print(f"trained in {seconds:.0f} s; evaluating held-out rows per domain", flush=True)
        ev = evaluate(cfg, state, heldout)
        tail = metrics_tail(workdir, ("loss", "load_balance", "moe_load_max", "router_entropy"),
                            last=max(1, 100 // args.log_every))
        layers = [layer_stats(ev["code"]["counts"][i], ev["prose"]["counts"][i])
                  for i in range(ev["code"]["counts"].shape[0])]
        results[scope] = {"cfg": cfg, "eval": ev, "tail": tail, "layers": layers,
                          "seconds": seconds}

    cfg = results[scopes[0]]["cfg"]
    m = cfg.model
    E = m.num_experts
    print(f"\nmachine: {where}")
    print(f"model: experiments/moe.py:tiny (d_model={m.d_model}, {m.num_layers} layers, "
          f"{E} experts top-{m.experts_per_token}, expert mlp {m.expert_mlp_dim}, "
          f"load-balance weight {m.aux_loss_weights['load_balance']}); batch "
          f"{cfg.batch_size} x {cfg.seq_len} in {cfg.microbatches} microbatches "
          f"({cfg.batch_size // cfg.microbatches} sequences each); {cfg.steps} steps; seed "
          f"{cfg.seed}; held-out rows per domain: "
          + ", ".join(f"{d} {r['inputs'].shape[0]}" for d, r in heldout.items()))
    print()
    print("Train figures: mean of the logged steps of the last 100 (LBL at its own scope; load "
          "max: busiest expert over the mean, global batch, mean over layers).")
    print()
    print("| load_balance | train loss | LBL | load max | eval loss code | eval loss prose | "
          "mean JS (bits) | mean major | train time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for scope, r in results.items():
        js = np.mean([l["JS"] for l in r["layers"]])
        major = np.mean([l["major"] for l in r["layers"]])
        print(f"| {scope} | {r['tail'].get('loss', float('nan')):.4f} | "
              f"{r['tail'].get('load_balance', float('nan')):.4f} | "
              f"{r['tail'].get('moe_load_max', float('nan')):.3f} | "
              f"{r['eval']['code']['eval_loss']:.4f} | {r['eval']['prose']['eval_loss']:.4f} | "
              f"{js:.3f} | {major:.3f} | {r['seconds']:.0f} s |")
    print()
    print("Per MoE layer (entropy in bits, max log2 E = %.2f):" % math.log2(E))
    print()
    print("| load_balance | layer | H code | H prose | H mix | JS (bits) | major |")
    print("|---|---|---|---|---|---|---|")
    for scope, r in results.items():
        for i, l in enumerate(r["layers"]):
            layer = (i + 1) * m.moe_every - 1
            print(f"| {scope} | {layer} | {l['H_code']:.3f} | {l['H_prose']:.3f} | "
                  f"{l['H_mix']:.3f} | {l['JS']:.3f} | {l['major']:.3f} |")
    print()
    print("Share of each domain's routed assignments per expert (%):")
    print()
    print("| load_balance | layer | domain | " + " | ".join(f"e{e}" for e in range(E)) + " |")
    print("|---|---|---|" + "---|" * E)
    for scope, r in results.items():
        for i, l in enumerate(r["layers"]):
            layer = (i + 1) * m.moe_every - 1
            for domain in ("code", "prose"):
                shares = " | ".join(f"{100 * x:.1f}" for x in l[f"p_{domain}"])
                print(f"| {scope} | {layer} | {domain} | {shares} |")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s; runs kept in {root}")


if __name__ == "__main__":
    main()
