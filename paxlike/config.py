"""The trainer's configuration: defaults for every key, and validation with clear messages.

An experiment file (`experiments/<family>.py`) defines `get_config(size)`, starting from
`base_config()` and filling in its model section. The config is locked before command-line
overrides are applied, so a mistyped `--config.KEY=VALUE` fails before any work starts.
"""

from __future__ import annotations

import json

import ml_collections

from paxlike import family, health, optim, outer
from paxlike.data.pipeline import default_config as data_defaults
from paxlike.errors import UserError
from paxlike.mesh import MESH_AXES
from paxlike.sharding import PRESETS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.steps = 300
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.seed = 0
    c.batch_size = 16          # global, in sequences
    c.seq_len = 128
    c.microbatches = 1         # gradient accumulation: batch_size is split into this many parts
    # With mesh.pipeline > 1 the microbatches are the pipeline's, in flight together
    # (docs/pipeline.md): R circular repeats, and when FSDP-sharded weights are gathered.
    c.pipeline_repeats = 1
    c.pipeline_fsdp_gather = "per_iteration"   # per_iteration | per_step
    # Resuming a checkpoint on other devices with the same `microbatches` as the run that wrote
    # it: microbatches are raised (or lowered) so that each device's share of a microbatch stays
    # as planned. False: `microbatches` as given (paxlike/elastic.py).
    c.elastic_microbatches = True
    c.sharding = "fsdp_tp"     # rules preset, see paxlike/sharding.py
    # Peak FLOP/s per device for MFU; 0 = known figure for TPUs/GPUs, GEMM rate measured on CPU.
    c.peak_tflops_per_device = 0.0
    c.mesh = ml_collections.ConfigDict({axis: 1 for axis in MESH_AXES})
    c.mesh.fsdp = -1
    # The part of each axis that crosses slices / nodes (data-centre network).
    c.mesh.dcn = ml_collections.ConfigDict({axis: 1 for axis in MESH_AXES})
    # True: ignore the sizes above and use the planner's top plan for the devices present (it
    # also sets sharding, microbatches and model.remat); see docs/planner.md.
    c.mesh.auto = False
    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw",        # adamw | sgd (with an outer optimizer: each replica's inner rule)
        "learning_rate": 1e-3,
        "warmup_steps": 30,
        "min_lr_ratio": 0.1,    # cosine decays to learning_rate * min_lr_ratio at decay_steps
        # Length of the warmup + cosine schedule, after which the rate stays at the floor. 0: the
        # `steps` the run was started with; a resumed run keeps the length its checkpoint
        # recorded, so raising `steps` later continues at the floor (paxlike/optim.py).
        "decay_steps": 0,
        "weight_decay": 0.1,    # applied to matrices only (not norms)
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "clip_norm": 1.0,       # global-norm gradient clipping; 0 disables
        # Training across weak links (paxlike/outer.py, docs/lowcomm.md): each `data` index is a
        # replica with its own parameters and inner optimizer state, synchronised every
        # `outer_every` steps. none | diloco | noloco | co2
        "outer": "none",
        "outer_every": 50,      # H: inner steps per outer step
        "outer_lr": 0.7,
        "outer_momentum": 0.9,  # Nesterov (diloco, co2); heavy-ball (noloco)
        "outer_fragments": 1,   # diloco: > 1 = streaming, one fragment of the layers per sync
    })
    c.data = data_defaults()   # one source: paxlike/data/pipeline.py
    # Bad steps (non-finite or spiking loss) and what to do about them: paxlike/health.py.
    c.health = ml_collections.ConfigDict({
        "policy": "stop",       # stop | rollback (to the newest checkpoint, skipping the batch)
        "spike_zscore": 0.0,    # > 0: a loss this many standard deviations above the recent mean
        "spike_window": 32,     # recent good steps the mean and deviation are taken over
        "max_rollbacks": 3,     # per run; one more bad step then stops the run
    })
    # A jax.profiler trace of steps A to B ("A:B", inclusive) into <workdir>/tensorboard (its
    # Profile tab; XProf and Perfetto read the same files); "" traces nothing.
    c.profile_steps = ""
    # Where compiled programs are kept between runs (a restart skips most compiling): "auto" is
    # $JAX_COMPILATION_CACHE_DIR if set, else <user cache>/paxlike/jax; "off"; or a directory.
    c.compilation_cache = "auto"
    # Hang, straggler and program-mismatch detection across processes: paxlike/watchdog.py.
    c.watchdog = ml_collections.ConfigDict({
        "timeout_s": 300.0,        # a process silent this long is stuck; 0 disables the watchdog
        "step_timeout_s": 1800.0,  # no train step finished anywhere this long; 0 disables
        "straggler_ratio": 3.0,    # host time per step above this multiple of the others' median
        "straggler_min_s": 0.05,   # ... and at least this much above it, is a straggler
    })
    # Where metrics go besides metrics.jsonl (always written): paxlike/metrics.py.
    c.metrics = ml_collections.ConfigDict({
        "tensorboard": True,    # <workdir>/tensorboard event files
        "plot": True,           # <workdir>/loss.png at the end of a run
        "wandb": False,         # Weights & Biases; needs pip install 'paxlike[wandb]'
        "wandb_project": "paxlike",
        "wandb_entity": "",     # "": your default entity
        "wandb_name": "",       # "": the workdir's name (also the group of a run's launches)
        "wandb_mode": "",       # online | offline | disabled; "": $WANDB_MODE, else online
    })
    c.model = ml_collections.ConfigDict()  # filled in by the experiment file
    return c


def sized_config(family: str, sizes: dict, size: str, model_defaults) -> ml_collections.ConfigDict:
    """One size of an experiment family: `base_config()` plus `sizes[size]`.

    A size gives `model` (overrides of `model_defaults`), `batch_size`, `seq_len` and `steps`, and
    optionally `tokenizer="bpe"` (accelerator sizes: a BPE vocabulary as large as the model's,
    learning rate 3e-4 with 2000 warmup steps unless `optimizer` overrides them, logging every 50
    steps) and `optimizer` (overrides of the optimizer section).
    """
    if size not in sizes:
        raise ValueError(f"unknown size {size!r} for {family}; choose one of {', '.join(sizes)}")
    spec = sizes[size]
    cfg = base_config()
    cfg.model = model_defaults
    cfg.model.update(spec["model"])
    cfg.batch_size, cfg.seq_len, cfg.steps = spec["batch_size"], spec["seq_len"], spec["steps"]
    if spec.get("tokenizer") == "bpe":
        cfg.data.tokenizer = "bpe"
        cfg.data.bpe_vocab_size = cfg.model.vocab_size
        cfg.optimizer.update(learning_rate=3e-4, warmup_steps=2000)
        cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 50, 1000, 1000
    cfg.optimizer.update(spec.get("optimizer", {}))
    return cfg


def validate(cfg) -> None:
    """Raises UserError listing every problem found in the config."""
    problems = []
    for key in ("steps", "log_every", "batch_size", "seq_len", "microbatches", "keep_checkpoints"):
        if cfg[key] < 1:
            problems.append(f"{key}={cfg[key]} must be >= 1")
    for key in ("eval_every", "checkpoint_every"):
        if cfg[key] < 0:
            problems.append(f"{key}={cfg[key]} must be >= 0 (0 disables it)")
    if cfg.microbatches >= 1 and cfg.batch_size % cfg.microbatches:
        problems.append(f"batch_size={cfg.batch_size} is not divisible by microbatches={cfg.microbatches}")
    if cfg.sharding not in PRESETS:
        problems.append(f"sharding={cfg.sharding!r}; choose one of {', '.join(PRESETS)}")
    if not isinstance(cfg.get("elastic_microbatches", True), bool):
        problems.append(f"elastic_microbatches={cfg.elastic_microbatches!r} must be true or false")
    opt = cfg.optimizer
    if opt.learning_rate <= 0:
        problems.append(f"optimizer.learning_rate={opt.learning_rate} must be > 0")
    if opt.get("name", "adamw") not in optim.OPTIMIZERS:
        problems.append(f"optimizer.name={opt.name!r}; choose one of {', '.join(optim.OPTIMIZERS)}")
    problems += outer.validate(opt)
    if opt.warmup_steps < 0 or not 0 <= opt.min_lr_ratio <= 1:
        problems.append("optimizer.warmup_steps must be >= 0 and optimizer.min_lr_ratio in [0, 1]")
    decay_steps = opt.get("decay_steps", 0)
    if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 0:
        problems.append(f"optimizer.decay_steps={decay_steps!r} must be an integer >= 0 "
                        "(0 = the run's steps)")
    try:
        profile_range(cfg.profile_steps)
    except ValueError as e:
        problems.append(str(e))
    problems += health.validate(cfg.health)
    dog = cfg.watchdog
    if dog.timeout_s < 0 or dog.step_timeout_s < 0:
        problems.append("watchdog.timeout_s and watchdog.step_timeout_s must be >= 0 (0 disables)")
    if dog.straggler_ratio < 1 or dog.straggler_min_s < 0:
        problems.append("watchdog.straggler_ratio must be >= 1 and watchdog.straggler_min_s >= 0")
    problems += family.validate(cfg.model)
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def profile_range(text: str) -> tuple[int, int] | None:
    """profile_steps "A:B" as (A, B); None for ""."""
    if not text:
        return None
    first, sep, last = str(text).partition(":")
    try:
        a, b = int(first), int(last if sep else first)
    except ValueError:
        a = b = 0
    if not 1 <= a <= b:
        raise ValueError(f"profile_steps={text!r} must be A:B with 1 <= A <= B (steps to trace, "
                         f"e.g. 10:12), or empty")
    return a, b


def to_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def load_saved(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run saved in its workdir (config.json), for tools that read a run."""
    from paxlike import storage
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise UserError(f"--workdir={workdir} holds no training run (no config.json there); "
                        f"train into it first: python -m paxlike.train --workdir={workdir}")
    try:
        return ml_collections.ConfigDict(json.loads(storage.read_text(path)))
    except ValueError as e:
        raise UserError(f"cannot read {path}: {e}") from None

