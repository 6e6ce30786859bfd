"""Branch-Train-Merge at tiny scale (paxlike/btm.py, docs/btm.md): do experts trained apart on one
domain each beat one model trained on both with the same compute, once averaged or ensembled?

    python benchmarks/btm.py [--domains=halves|code_prose] [--seed_steps=100]
                             [--expert_steps=150] [--eval_batches=0] [--workdir=DIR]

Measured 9-11 minutes on the 2-core VM under another job's load (load average 6-7), about
6-7 expected on idle cores (four short `experiments/transformer.py:tiny` runs). Steps:

  seed     `tiny` trained --seed_steps on both domains;
  experts  `python -m paxlike.btm branch` + `train`: one expert per domain, each --expert_steps
           from the seed's parameters (fresh optimizer, warmup + cosine over its steps);
  dense    the same from the seed on both domains for 2 x --expert_steps (the experts' total
           steps x batch: the same compute), made as a one-expert branch whose domain is both;
  merge    the experts' parameter average (equal weights) and their ensemble, whose prior is
           the same weights;

then `btm.evaluate` scores every model on each domain's whole held-out split (or its first
--eval_batches batches of 16 x 128 tokens), so every row is measured on the same tokens.

Domains: `halves` (default) is paxlike's built-in corpus cut by module name (`--domains=halves`
of paxlike.btm: `_*` and a-l vs m-z, pydoc_data in neither); `code_prose` is
benchmarks/moe_domains.py's corpus, standard-library code against English prose (pydoc topics,
licence texts), written here as text files and read through `data.source=text` with one
directory per domain (user paths).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/gla.py's machine()

from gla import machine  # noqa: E402
from paxlike import btm, loop  # noqa: E402
from paxlike.experiments import transformer  # noqa: E402


def code_prose_corpus(root: str) -> tuple[str, list[tuple[str, str]]]:
    """moe_domains.py's two domains as text files, code as many bytes as prose: (paths of
    both, [(name, paths)])."""
    import moe_domains
    prose = moe_domains.prose_documents()
    budget = sum(map(len, prose))
    code = moe_domains.code_documents({"train": budget, "heldout": 0})["train"]
    domains = []
    for name, docs in (("code", code), ("prose", prose)):
        folder = os.path.join(root, "corpus", name)
        os.makedirs(folder)
        for i, doc in enumerate(docs):
            with open(os.path.join(folder, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
                f.write(doc)
        domains.append((name, folder))
    return os.path.join(root, "corpus"), domains


def eval_tokens(report) -> str:
    first = report["rows"][0]["scores"]
    return ", ".join(f"{d} {first[d]['tokens']:.0f} tokens" for d in report["domains"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", choices=("halves", "code_prose"), default="halves")
    parser.add_argument("--seed_steps", type=int, default=100)
    parser.add_argument("--expert_steps", type=int, default=150)
    parser.add_argument("--eval_batches", type=int, default=0,
                        help="batches per domain; 0 (default): the whole val split")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a "
                        "temporary directory, deleted at the end)")
    args = parser.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="paxlike-btm-")
    print(f"machine: {machine()}")
    times = {}

    cfg = transformer.get_config("tiny")
    cfg.update(steps=args.seed_steps, eval_every=0, checkpoint_every=0)
    cfg.metrics.plot = False
    if args.domains == "halves":
        domains, both = list(btm.PRESETS["halves"]), "*"
    else:
        both, domains = code_prose_corpus(root)
        cfg.data.update(source="text", paths=both)
    start = time.perf_counter()
    seed = os.path.join(root, "seed")
    loop.run(cfg, seed)
    times["seed"] = time.perf_counter() - start

    start = time.perf_counter()
    btm_dir = os.path.join(root, "btm")
    btm.branch(seed, btm_dir, domains, steps=args.expert_steps)
    btm.train(btm_dir)
    times["experts"] = time.perf_counter() - start

    start = time.perf_counter()
    dense_btm = os.path.join(root, "dense")
    btm.branch(seed, dense_btm, [("dense", both)], steps=2 * args.expert_steps)
    btm.train(dense_btm)
    times["dense"] = time.perf_counter() - start

    start = time.perf_counter()
    btm.merge(btm_dir)
    report = btm.evaluate(btm_dir, compare=(os.path.join(dense_btm, "experts", "dense"),),
                          eval_batches=args.eval_batches)
    times["merge+eval"] = time.perf_counter() - start

    names = report["domains"]
    print(f"\n{args.domains}: seed {args.seed_steps} steps; experts {args.expert_steps} steps "
          f"each; dense {2 * args.expert_steps} steps; batch 16 x 128 tokens; "
          f"held out: {eval_tokens(report)}")
    print(btm.format_report(report))
    rows = {row["model"]: row["scores"] for row in report["rows"]}
    own = [rows[n][n]["eval_loss"] for n in names]
    other = [rows[n][m]["eval_loss"] for n in names for m in names if m != n]
    print(f"experts: in-domain loss {sum(own) / len(own):.4f}, out-of-domain "
          f"{sum(other) / len(other):.4f} (means over experts)")
    for name in ("average", "ensemble", "dense", "seed"):
        if name in rows:
            mean = sum(rows[name][n]["eval_loss"] for n in names) / len(names)
            print(f"{name}: mean over domains {mean:.4f}")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    if not args.workdir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
