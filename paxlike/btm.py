"""Branch-Train-Merge (Li et al. 2022, arXiv 2208.03306): experts branched from one seed run, each
trained on its own data domain with no communication, then averaged or ensembled.

    python -m paxlike.btm branch --seed_run=RUN --btm_dir=DIR (--domains=halves |
        --domain=NAME=SPEC ...) [--seed_step=N] [--steps=N]
    python -m paxlike.btm train --btm_dir=DIR [--expert=NAME]
    python -m paxlike.btm merge --btm_dir=DIR [--weights=0.5,0.5] [--out=DIR/merged]
    python -m paxlike.btm eval --btm_dir=DIR [--weights=...] [--compare=RUN,...] [--json=FILE]

`branch` makes every expert an ordinary run workdir, DIR/experts/NAME: the seed's config with its
own data domain, and a step-0 checkpoint holding the seed's parameters with a fresh optimizer
state (the learning-rate warmup and cosine start again over the expert's `steps`). A domain SPEC
is the data the expert reads: for a seed trained on the built-in corpus, `data.stdlib_filter`
patterns ("email/*,json/*"; "!" excludes); for any other source, its `data.paths`. Each expert
then trains alone, here (`train`) or anywhere with the `python -m paxlike.train` command `branch`
prints. `merge` writes the weighted parameter average as a new run (DIR/merged, a step-0
checkpoint that paxlike.generate, paxlike.hf export and paxlike.train read like any run).
`eval` reports each domain's eval loss and bits per byte for every expert, their average, their
ensemble (paxlike/ensemble.py `mixture_logprobs`) and the seed. docs/btm.md has the details.
Every problem with the input is one line, `paxlike: error: ...`, exit status 2; nothing that
exists is overwritten, and a refused or failed branch or merge leaves no directory behind.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
import types

import numpy as np
from absl import app, flags, logging

from paxlike import cli, storage
from paxlike.errors import UserError

COMMANDS = ("branch", "train", "merge", "eval")
MANIFEST = "btm.json"
EXPERTS = "experts"
MERGED = "merged"
MERGE_RECORD = "merge.json"
# Named domain sets of the built-in corpus: (name, data.stdlib_filter). `halves` cuts the library
# by the name of each top-level module or package: `_*` and a-l (asyncio, email, encodings,
# idlelib, importlib, lib2to3, logging ...: 6.5 MB of Python 3.12's), and the rest
# (multiprocessing, tkinter, unittest, urllib, xml ...: 4.2 MB). pydoc_data is in neither: its
# topics.py is 0.8 MB of English documentation in one string, a val file of the library's split,
# which would be four fifths of the second half's held-out text and trained on by no one.
PRESETS = {"halves": (("a_to_l", "_*,[a-l]*"), ("m_to_z", "!_*,![a-l]*,!pydoc_data/*"))}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------------ domains
def parse_domains(preset: str | None, specs: list[str] | None, source: str) -> list[tuple]:
    """[(name, spec)] from `--domains=PRESET` or repeated `--domain=NAME=SPEC`."""
    specs = list(specs or [])
    if preset and specs:
        raise UserError("give either --domains=PRESET or --domain=NAME=SPEC flags, not both")
    if preset:
        if preset not in PRESETS:
            raise UserError(f"--domains={preset!r} is not a preset; choose one of "
                            f"{', '.join(PRESETS)} or name domains with --domain=NAME=SPEC")
        if source != "stdlib":
            raise UserError(f"--domains={preset} splits the built-in corpus, but the seed run read "
                            f"data.source={source}; name domains with --domain=NAME=PATHS")
        return list(PRESETS[preset])
    domains = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not value.strip():
            raise UserError(f"--domain={spec!r} must be NAME=SPEC "
                            f"(e.g. --domain='web=email/*,http/*,urllib/*')")
        domains.append((name, value.strip()))
    check_domains(domains)
    return domains


def check_domains(domains: list[tuple]) -> None:
    """At least one domain; names that can be directory names, all different."""
    if not domains:
        raise UserError("no expert to branch (N = 0): give --domains=halves or at least one "
                        "--domain=NAME=SPEC (one expert per domain)")
    names = [n for n, _ in domains]
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise UserError(f"domain name {bad[0]!r}: use letters, digits and _.- (it names the "
                        f"expert's directory)")
    if len(set(names)) != len(names):
        raise UserError(f"domain names must differ; got {', '.join(names)}")


def expert_config(seed_cfg, spec: str, steps: int):
    """The seed's config reading only its domain, trained for `steps` with its own schedule."""
    cfg = copy.deepcopy(seed_cfg)
    if cfg.data.get("source", "stdlib") == "stdlib":
        cfg.data.stdlib_filter = spec
    else:
        cfg.data.paths = spec
    cfg.steps = steps
    cfg.optimizer.decay_steps = 0   # 0: the schedule spans this run's steps (paxlike/optim.py)
    return cfg


def train_command(workdir: str) -> str:
    return shlex.join(["python", "-m", "paxlike.train",
                       f"--config=experiments/saved.py:{storage.join(workdir, 'config.json')}",
                       f"--workdir={workdir}"])


# ---------------------------------------------------------------------------------- manifest
def read_manifest(btm_dir: str) -> dict:
    path = storage.join(btm_dir, MANIFEST)
    if not storage.exists(path):
        raise UserError(f"--btm_dir={btm_dir} is not a BTM directory (no {MANIFEST}); make one "
                        f"with: python -m paxlike.btm branch --seed_run=RUN --btm_dir={btm_dir} "
                        f"--domains=halves")
    try:
        return json.loads(storage.read_text(path))
    except ValueError as e:
        raise UserError(f"cannot read {path}: {e}") from None


def expert_dir(btm_dir: str, expert: dict) -> str:
    return storage.join(btm_dir, expert["workdir"])


def _checkpoints(workdir: str, cfg):
    from paxlike.checkpoint import Checkpoints
    return Checkpoints(storage.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                       async_save=False)


def trained_experts(btm_dir: str, manifest: dict, allow_unfinished: bool = False) -> list[tuple]:
    """[(expert, workdir, config, checkpoint step)] of every expert, refusing one whose run has
    not reached its `steps` (unless allow_unfinished: then its newest checkpoint)."""
    from paxlike import config
    out = []
    for expert in manifest["experts"]:
        workdir = expert_dir(btm_dir, expert)
        cfg = config.load_saved(workdir)
        steps = _checkpoints(workdir, cfg).steps()
        latest = steps[-1] if steps else None
        if latest is None or (latest < cfg.steps and not allow_unfinished):
            raise UserError(
                f"expert {expert['name']} is not trained yet (step {latest} of {cfg.steps}); "
                f"train it: python -m paxlike.btm train --btm_dir={btm_dir} "
                f"--expert={expert['name']} (or pass --allow_unfinished to use its newest "
                f"checkpoint)")
        out.append((expert, workdir, cfg, latest))
    return out


def _new_directory(path: str, flag: str, given: bool = True) -> None:
    if storage.exists(path) and (not storage.isdir(path) or storage.listdir(path)):
        what = f"{flag}={path}" if given else f"{path} (the default {flag})"
        raise UserError(f"{what} already exists and is not empty; choose a new directory with "
                        f"{flag}=DIR (nothing there is overwritten)")


def _adopt_tokenizer(cfg, source_dir: str, workdir: str) -> None:
    """A BPE run's tokenizer.json copied from `source_dir`, recorded with this run's data settings
    so that the run reuses it instead of training its own: every model of a BTM directory must
    give a token id the same meaning. Byte and pretrained tokenizers need nothing."""
    from paxlike.data import pipeline, tokenizer
    if cfg.data.get("tokenizer", "byte") != "bpe":
        return
    storage.makedirs(workdir)
    storage.write_atomically(storage.join(workdir, tokenizer.TOKENIZER_FILE),
                             storage.read_text(storage.join(source_dir, tokenizer.TOKENIZER_FILE)))
    settings = dict(pipeline.tokenizer_settings(cfg.data), bpe_vocab_size=cfg.data.bpe_vocab_size)
    storage.write_atomically(storage.join(workdir, tokenizer.TOKENIZER_META_FILE),
                             json.dumps(settings, sort_keys=True))


def _start_run(cfg, workdir: str, params_for, source_dir: str) -> None:
    """Makes `workdir` an ordinary run of `cfg` whose step-0 checkpoint holds the parameters
    `params_for(run)` returns (placed like the run's), with a fresh optimizer state."""
    from paxlike import loop
    _adopt_tokenizer(cfg, source_dir, workdir)
    run = loop.prepare(cfg, workdir)
    params = params_for(run)
    start = loop.restore(run)
    state = run.trainer.init_state(params)   # a fresh optimizer state around them
    run.checkpoints.save(0, state, loop.checkpoint_meta(run, 0, start.train_iter))
    run.checkpoints.close()


def _undo_on_failure(path: str, work):
    """Runs `work()`; if it fails, removes `path`, which the caller made for it."""
    try:
        return work()
    except BaseException:
        if storage.exists(path):
            storage.rmtree(path)
        raise


# ------------------------------------------------------------------------------------- branch
def branch(seed_run: str, btm_dir: str, domains: list[tuple], *, seed_step: int | None = None,
           steps: int | None = None) -> dict:
    """Makes the BTM directory: one expert run per (name, spec) domain. Returns the manifest."""
    from paxlike import config
    check_domains(domains)
    if not storage.exists(storage.join(seed_run, "config.json")):
        raise UserError(f"--seed_run={seed_run} holds no training run (no config.json); train the "
                        f"seed first: python -m paxlike.train --workdir={seed_run}")
    seed_cfg = config.load_saved(seed_run)
    step = _checkpoints(seed_run, seed_cfg).step_to_read(seed_step, seed_run)
    steps = seed_cfg.steps if steps is None else steps
    if steps < 1:
        raise UserError(f"--steps={steps} must be >= 1 (each expert's training steps)")
    _new_directory(btm_dir, "--btm_dir")
    seed_checkpoints = _checkpoints(seed_run, seed_cfg)
    experts = [{"name": name, "workdir": storage.join(EXPERTS, name), "domain": spec}
               for name, spec in domains]

    def make():
        for expert in experts:
            cfg = expert_config(seed_cfg, expert["domain"], steps)
            logging.info("branching expert %s (domain %r) from step %d of %s", expert["name"],
                         expert["domain"], step, seed_run)
            _start_run(cfg, expert_dir(btm_dir, expert),
                       lambda run: seed_checkpoints.restore_params(
                           step, run.trainer.abstract_state().params), seed_run)
        manifest = {"version": 1, "seed": {"workdir": storage.absolute(seed_run), "step": step,
                                           "data": seed_cfg.data.to_dict()},
                    "steps": steps, "experts": experts}
        storage.write_atomically(storage.join(btm_dir, MANIFEST), json.dumps(manifest, indent=2))
        return manifest
    return _undo_on_failure(btm_dir, make)


# -------------------------------------------------------------------------------------- train
def select_experts(manifest: dict, which: str | None) -> list[dict]:
    experts = manifest["experts"]
    if which is None:
        return experts
    names = [e["name"] for e in experts]
    if which in names:
        return [experts[names.index(which)]]
    if which.isdigit() and int(which) < len(experts):
        return [experts[int(which)]]
    raise UserError(f"--expert={which!r} is none of the experts: {', '.join(names)} (or their "
                    f"index 0-{len(experts) - 1})")


def train(btm_dir: str, which: str | None = None) -> None:
    """Trains the experts one after another, each as an ordinary run (resuming if it was)."""
    from paxlike import config, loop
    manifest = read_manifest(btm_dir)
    for expert in select_experts(manifest, which):
        workdir = expert_dir(btm_dir, expert)
        logging.info("training expert %s in %s", expert["name"], workdir)
        loop.run(config.load_saved(workdir), workdir)


# -------------------------------------------------------------------------------------- merge
def merge_weights(btm_dir: str, manifest: dict, weights) -> np.ndarray:
    """The weights given, else those of an earlier merge into DIR/merged, else equal ones."""
    from paxlike.ensemble import normalized_weights
    count = len(manifest["experts"])
    if weights is None:
        record = storage.join(btm_dir, MERGED, MERGE_RECORD)
        if storage.exists(record):
            weights = json.loads(storage.read_text(record))["weights"]
    return normalized_weights(weights, count)


def merge(btm_dir: str, weights=None, out: str | None = None,
          allow_unfinished: bool = False) -> dict:
    """Writes the weighted average of the experts as a new run `out` (default DIR/merged)."""
    import ml_collections
    from paxlike.ensemble import average_params, normalized_weights
    manifest = read_manifest(btm_dir)
    given = out is not None
    out = out or storage.join(btm_dir, MERGED)
    w = normalized_weights(weights, len(manifest["experts"]))
    experts = trained_experts(btm_dir, manifest, allow_unfinished)
    _new_directory(out, "--out", given)
    # The experts' shared config, reading the seed's data (all domains), with a schedule of its
    # own should the merged model be trained further.
    cfg = copy.deepcopy(experts[0][2])
    cfg.data = ml_collections.ConfigDict(manifest["seed"]["data"])
    cfg.optimizer.decay_steps = 0

    def averaged(run):
        abstract = run.trainer.abstract_state().params
        for _, workdir, _, step in experts:
            _checkpoints(workdir, cfg).check_compatible(step, cfg.model.to_dict(),
                                                        run.param_shapes)
        return average_params(lambda k: _checkpoints(experts[k][1], cfg).restore_params(
            experts[k][3], abstract), w)

    def make():
        _start_run(cfg, out, averaged, experts[0][1])
        record = {"btm_dir": storage.absolute(btm_dir), "weights": w.tolist(),
                  "experts": [{"name": e["name"], "step": step} for e, _, _, step in experts]}
        storage.write_atomically(storage.join(out, MERGE_RECORD), json.dumps(record, indent=2))
        return record
    return _undo_on_failure(out, make)


# --------------------------------------------------------------------------------------- eval
def evaluate(btm_dir: str, weights=None, compare: tuple[str, ...] = (),
             eval_batches: int | None = None, allow_unfinished: bool = False,
             devices=None) -> dict:
    """Eval loss and bits per byte on each expert's domain (val split) of every expert, their
    parameter average, their ensemble, the seed (while its checkpoint exists) and the `compare`
    runs. `weights` are the average's and the ensemble's prior (default: merge_weights)."""
    from paxlike import config
    from paxlike.checkpoint import param_shapes
    from paxlike.ensemble import Scorer, average_params, mixture_logprobs, token_metrics
    manifest = read_manifest(btm_dir)
    w = merge_weights(btm_dir, manifest, weights)
    experts = trained_experts(btm_dir, manifest, allow_unfinished)
    others = []
    taken = {e["name"] for e in manifest["experts"]} | {"average", "ensemble", "seed"}
    for run in compare:
        name = storage.basename(run.rstrip("/"))
        if name in taken:
            raise UserError(f"--compare run {run} is named like another row ({name}); copy or "
                            f"link it under another directory name")
        taken.add(name)
        run_cfg = config.load_saved(run)
        others.append((name, run, run_cfg, _checkpoints(run, run_cfg).step_to_read(None, run)))
    cfg = experts[0][2]
    scorer = Scorer(cfg, devices)
    shapes = param_shapes(scorer.abstract_params)

    def restore(workdir, run_cfg, step):
        checkpoints = _checkpoints(workdir, run_cfg)
        checkpoints.check_compatible(step, cfg.model.to_dict(), shapes)
        return checkpoints.restore_params(step, scorer.abstract_params)

    models = [(e["name"], "expert", lambda a=(wd, c, s): restore(*a))
              for e, wd, c, s in experts]
    models.append(("average", "average",
                   lambda: average_params(lambda k: models[k][2](), w)))
    seed = manifest["seed"]
    if storage.exists(storage.join(seed["workdir"], "config.json")):
        seed_cfg = config.load_saved(seed["workdir"])
        if seed["step"] in _checkpoints(seed["workdir"], seed_cfg).steps():
            models.append(("seed", "seed", lambda: restore(seed["workdir"], seed_cfg,
                                                           seed["step"])))
    models += [(name, "run", lambda a=(run, c, s): restore(*a)) for name, run, c, s in others]

    domains = [(e["name"], *scorer.eval_batches(c, wd, eval_batches)) for e, wd, c, _ in experts]
    logprobs = {}
    for name, _, load in models:
        logging.info("scoring %s on %d domains", name, len(domains))
        params = load()
        logprobs[name] = {d: [scorer.logprobs(params, b) for b in batches]
                          for d, batches, _ in domains}
        del params
    names = [e["name"] for e, *_ in experts]
    logprobs["ensemble"] = {
        d: [mixture_logprobs(np.stack([logprobs[n][d][i] for n in names]), h["segment_ids"],
                             h["weights"], w) for i, h in enumerate(host)]
        for d, _, host in domains}
    def scores(lps, hosts):
        return token_metrics(np.concatenate(lps), np.concatenate([h["weights"] for h in hosts]),
                             np.concatenate([h["bytes"] for h in hosts]))
    rows = []
    order = ([(n, k) for n, k, _ in models if k in ("expert", "average")]
             + [("ensemble", "ensemble")] + [(n, k) for n, k, _ in models if k in ("seed", "run")])
    for name, kind in order:
        row = {d: scores(logprobs[name][d], host) for d, _, host in domains}
        row["all"] = scores([lp for d, _, _ in domains for lp in logprobs[name][d]],
                            [h for _, _, host in domains for h in host])
        rows.append({"model": name, "kind": kind, "scores": row})
    return {"btm_dir": storage.absolute(btm_dir), "domains": names, "weights": w.tolist(),
            "expert_steps": {e["name"]: s for e, _, _, s in experts}, "rows": rows,
            # Per-token detail (not written by --json): {model: {domain: [[B, T] per batch]}},
            # and per domain the batches' host-side targets, weights, segment ids, bytes.
            "logprobs": logprobs, "batches": {d: host for d, _, host in domains}}


def format_report(report: dict) -> str:
    """The eval table: one row per model, eval loss (bits per byte) per domain; '*' marks an
    expert on its own domain."""
    columns = report["domains"] + ["all"]
    width = max(12, *(len(c) + 2 for c in columns))
    head = f"{'model':<14}{'kind':<10}" + "".join(f"{c:>{width + 8}}" for c in columns)
    lines = [f"eval loss, nats per token (bits per byte); weights "
             f"{', '.join(f'{x:.3g}' for x in report['weights'])}", head]
    for row in report["rows"]:
        cells = []
        for c in columns:
            s = row["scores"][c]
            own = "*" if row["kind"] == "expert" and row["model"] == c else " "
            cells.append(f"{s['eval_loss']:.4f}{own}({s['bits_per_byte']:.3f})".rjust(width + 8))
        lines.append(f"{row['model']:<14}{row['kind']:<10}" + "".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def define_flags() -> types.SimpleNamespace:
    """The command's flags, defined when it runs (other paxlike tools define some of the same
    names, and one process may import several of them)."""
    d = flags
    return types.SimpleNamespace(
        btm_dir=d.DEFINE_string("btm_dir", None, "The BTM directory (btm.json, experts/, "
                                "merged/)."),
        seed_run=d.DEFINE_string("seed_run", None, "branch: the training run to branch from."),
        seed_step=d.DEFINE_integer("seed_step", None, "branch: its checkpoint step (default: "
                                   "the newest)."),
        domains=d.DEFINE_string("domains", None, f"branch: a preset set of domains of the "
                                f"built-in corpus: {', '.join(PRESETS)}."),
        domain=d.DEFINE_multi_string("domain", [], "branch: NAME=SPEC, one expert per flag; SPEC "
                                     "is data.stdlib_filter (stdlib seed) or data.paths."),
        steps=d.DEFINE_integer("steps", None, "branch: training steps of each expert (default: "
                               "the seed's steps)."),
        expert=d.DEFINE_string("expert", None, "train: only this expert (name or index)."),
        weights=d.DEFINE_string("weights", None, "merge, eval: one weight per expert, e.g. "
                                "0.7,0.3 (scaled to sum to 1; default equal, or eval: the "
                                "merge's)."),
        out=d.DEFINE_string("out", None, "merge: the new run directory (default BTM_DIR/merged)."),
        allow_unfinished=d.DEFINE_bool("allow_unfinished", False, "merge, eval: use experts' "
                                       "newest checkpoints before they reach their steps."),
        compare=d.DEFINE_string("compare", "", "eval: other runs of the same model to score "
                                "beside the experts, comma-separated workdirs."),
        eval_batches=d.DEFINE_integer("eval_batches", None, "eval: batches per domain, the "
                                      "first of its val split (default the experts' "
                                      "data.eval_batches); 0: the whole val split."),
        json=d.DEFINE_string("json", None, "eval: also write the report (without per-token "
                             "log-probabilities) to this JSON file."),
        cpu_devices=d.DEFINE_integer("cpu_devices", None, "Emulate this many CPU devices."))


_APPLIES = {"branch": {"seed_run", "seed_step", "domains", "domain", "steps"},
            "train": {"expert"}, "merge": {"weights", "out", "allow_unfinished"},
            "eval": {"weights", "allow_unfinished", "compare", "eval_batches", "json"}}


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--weights={text!r} must be comma-separated numbers, one per expert "
                        f"(e.g. 0.5,0.5)") from None


def main(command: str, f: types.SimpleNamespace) -> None:
    misplaced = [name for name in sorted(set().union(*_APPLIES.values()) - _APPLIES[command])
                 if getattr(f, name).present]
    if misplaced:
        raise UserError(f"--{misplaced[0]} does not apply to `{command}`; see python -m "
                        f"paxlike.btm {command} --help")
    cli.emulate_cpu_devices(f.cpu_devices.value)
    btm_dir = f.btm_dir.value
    if not btm_dir:
        raise UserError("--btm_dir is required: the BTM directory (branch makes it)")
    if command == "branch":
        from paxlike import config
        if not f.seed_run.value:
            raise UserError("--seed_run is required: the training run the experts start from")
        source = (config.load_saved(f.seed_run.value).data.get("source", "stdlib")
                  if storage.exists(storage.join(f.seed_run.value, "config.json")) else "stdlib")
        domains = parse_domains(f.domains.value, f.domain.value, source)
        manifest = branch(f.seed_run.value, btm_dir, domains, seed_step=f.seed_step.value,
                          steps=f.steps.value)
        print(f"branched {len(manifest['experts'])} experts from step {manifest['seed']['step']} "
              f"of {f.seed_run.value} into {btm_dir} ({manifest['steps']} steps each); each is "
              f"an ordinary run:")
        for expert in manifest["experts"]:
            print(f"  {expert['name']} (domain {expert['domain']!r}): "
                  f"{train_command(expert_dir(btm_dir, expert))}")
        print(f"or train them all here: python -m paxlike.btm train --btm_dir={btm_dir}")
    elif command == "train":
        from paxlike import config
        chosen = select_experts(read_manifest(btm_dir), f.expert.value)
        cli.setup_compilation_cache(
            config.load_saved(expert_dir(btm_dir, chosen[0])).compilation_cache)
        train(btm_dir, f.expert.value)
    elif command == "merge":
        record = merge(btm_dir, parse_weights(f.weights.value), f.out.value,
                       f.allow_unfinished.value)
        out = f.out.value or storage.join(btm_dir, MERGED)
        print(f"merged {', '.join(e['name'] for e in record['experts'])} with weights "
              f"{', '.join(f'{x:.4g}' for x in record['weights'])} into {out} (step 0); sample: "
              f"python -m paxlike.generate --workdir={out} --prompt='def '")
    else:
        compare = tuple(p for p in f.compare.value.split(",") if p)
        if f.json.value and storage.exists(f.json.value):
            raise UserError(f"--json={f.json.value} exists; choose a new file (nothing is "
                            f"overwritten)")
        report = evaluate(btm_dir, parse_weights(f.weights.value), compare,
                          f.eval_batches.value, f.allow_unfinished.value)
        print(format_report(report))
        if f.json.value:
            report = {k: v for k, v in report.items() if k not in ("logprobs", "batches")}
            storage.write_atomically(f.json.value, json.dumps(report, indent=2))


def run_cli():
    cli.log_info_quietly()
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        cli.fail(f"give a command first: python -m paxlike.btm {{{'|'.join(COMMANDS)}}} --flags "
                 f"(e.g. python -m paxlike.btm branch --seed_run=RUN --btm_dir=DIR "
                 f"--domains=halves)")
    command = sys.argv.pop(1)
    given = define_flags()

    def checked(argv):
        if len(argv) > 1:
            cli.fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
        try:
            main(command, given)
        except UserError as e:
            cli.fail(str(e))
    app.run(checked)


if __name__ == "__main__":
    run_cli()
