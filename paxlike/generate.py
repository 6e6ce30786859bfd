"""Command line: sample text from a training run's checkpoint.

    python -m paxlike.generate --workdir=runs/transformer-tiny --prompt="def main(" \
        [--step=N] [--max_new_tokens=N] [--temperature=0.8 --top_k=50 --top_p=0.95 --seed=0] \
        [--prompts_file=FILE] [--data=1 --tensor=1] [--cpu_devices=N]

Reads the run's config.json, tokenizer and checkpoint (the newest, or --step), restores only the
parameters onto the devices asked for (`--data` x `--tensor` of those present, whatever mesh
wrote the checkpoint), and streams the continuation of --prompt to standard output token by
token. With --prompts_file (one prompt per line) the prompts are decoded as one batch and each
result is printed as a JSON line {"prompt": ..., "completion": ...}. Standard output carries
only the generated text; timings (prefill and decode tokens/s) and logs go to standard error.
Every problem with the input is one line, `paxlike: error: ...`, exit status 2.
"""

from __future__ import annotations

import json
import sys

import ml_collections
from absl import app, flags, logging

from paxlike import cli, storage
from paxlike.errors import UserError

DEFAULT_NEW_TOKENS = 128

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory (its config.json, "
                               "tokenizer and checkpoints).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to sample from (default: the newest).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line, "
                                    "decoded as one batch; prints one JSON line per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate after each prompt "
                                "(fewer where the model emits its end-of-document token). "
                                f"Default {DEFAULT_NEW_TOKENS}, or fewer for a Transformer so that "
                                "prompt and continuation stay within its training seq_len.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the smallest set of tokens whose "
                            "probability reaches p (nucleus sampling); 1: all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.")
_DATA = flags.DEFINE_integer("data", 1, "Devices splitting the batch of prompts.")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Devices splitting heads (and the cache) by the "
                               "run's sharding rules.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Emulate this many CPU devices.")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise UserError(f"--workdir={workdir} holds no training run (no config.json there); "
                        f"train into it first: python -m paxlike.train --workdir={workdir}")
    try:
        return ml_collections.ConfigDict(json.loads(storage.read_text(path)))
    except ValueError as e:
        raise UserError(f"cannot read {path}: {e}") from None


def pick_step(checkpoints, step: int | None, workdir: str) -> int:
    steps = checkpoints.steps()
    if not steps:
        raise UserError(f"no checkpoint in {checkpoints.directory}: the run in {workdir} saved "
                        f"none yet (it saves every checkpoint_every steps and at its end)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise UserError(f"--step={step} is not a checkpoint of {workdir}; its steps are "
                        f"{', '.join(map(str, steps))}")
    return step


def prompts_from_flags() -> list[str]:
    if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
        raise UserError("give exactly one of --prompt=TEXT or --prompts_file=FILE")
    if _PROMPT.value is not None:
        return [_PROMPT.value]
    try:
        with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --prompts_file={_PROMPTS_FILE.value}: "
                        f"{e.strerror or e}") from None
    if not prompts:
        raise UserError(f"--prompts_file={_PROMPTS_FILE.value} has no prompt (one per line)")
    return prompts


def new_tokens(model_type, encoded: list[list[int]], asked: int | None, seq_len: int) -> int:
    """How many tokens to generate: `asked`, or by default DEFAULT_NEW_TOKENS. A model whose
    family is `decode_length_limited` (the Transformer's rotary positions) is kept within the
    positions it was trained on: the default shrinks to fit, an explicit request that does not
    fit is refused."""
    longest = max(map(len, encoded))
    limited = getattr(model_type, "decode_length_limited", False)
    if limited and longest >= seq_len:
        raise UserError(f"a prompt of {longest} tokens leaves no room in the {seq_len} positions "
                        f"the model was trained on (seq_len); shorten the prompt")
    if asked is None:
        return min(DEFAULT_NEW_TOKENS, seq_len - longest) if limited else DEFAULT_NEW_TOKENS
    if limited and longest + asked > seq_len:
        raise UserError(
            f"a prompt of {longest} tokens plus --max_new_tokens={asked} is {longest + asked} "
            f"positions, more than the {seq_len} the model was trained on (seq_len); shorten the "
            f"prompt or lower --max_new_tokens")
    return asked


class Stream:
    """Prints one row's text as its tokens arrive. A token may end inside a UTF-8 character, so
    the text is decoded whole and printed up to its last complete character."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, ids) -> None:
        if ids[0] >= 0:
            self.ids.append(int(ids[0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        self.out.write(self.tokenizer.decode(self.ids)[self.printed:] + "\n")
        self.out.flush()


def main(_):
    import jax
    if _CPU_DEVICES.value is not None:
        if _CPU_DEVICES.value < 1:
            raise UserError(f"--cpu_devices={_CPU_DEVICES.value} must be >= 1")
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
        jax.config.update("jax_platforms", "cpu")
    from paxlike import checkpoint, decode, family, sharding
    from paxlike.data import tokenizer as tokenizer_lib
    from paxlike.mesh import build_mesh

    workdir = _WORKDIR.value
    if not workdir:
        raise UserError("--workdir is required: the training run to sample from")
    how = decode.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    how.check()
    prompts = prompts_from_flags()
    cfg = load_run_config(workdir)
    problems = family.validate(cfg.model)
    if problems:
        raise UserError(f"{workdir}/config.json: {'; '.join(problems)}")
    tokenizer = tokenizer_lib.for_run(cfg.data, workdir)
    encoded = [tokenizer.encode(p) for p in prompts]
    empty = [i + 1 for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise UserError(f"prompt {empty[0]} is empty; give some text to continue")

    wanted = _DATA.value * _TENSOR.value
    devices = jax.devices()
    if _DATA.value < 1 or _TENSOR.value < 1 or wanted > len(devices):
        raise UserError(f"--data={_DATA.value} x --tensor={_TENSOR.value} devices asked for, "
                        f"{len(devices)} present; each must be >= 1 and their product at most "
                        f"{len(devices)}")
    mesh = build_mesh({"data": _DATA.value, "fsdp": 1, "tensor": _TENSOR.value},
                      devices=devices[:wanted])
    checkpoints = checkpoint.Checkpoints(storage.join(workdir, "checkpoints"),
                                         keep=cfg.keep_checkpoints, async_save=False)
    step = pick_step(checkpoints, _STEP.value, workdir)
    decoder = decode.Decoder(cfg.model, mesh, sharding.get_rules(cfg.sharding, mesh), how)
    max_new_tokens = new_tokens(decoder.model_type, encoded, _MAX_NEW.value, cfg.seq_len)
    params = checkpoints.restore_params(step, decoder.abstract_params)
    logging.info("sampling from step %d of %s on %d device(s)", step, workdir, mesh.size)

    stream = Stream(tokenizer) if len(prompts) == 1 else None
    out = decoder.generate(params, encoded, max_new_tokens, seed=_SEED.value,
                           eos_id=tokenizer.eos_id, on_tokens=stream)
    if stream is not None:
        stream.finish()
    else:
        for prompt, ids in zip(prompts, out.tokens):
            print(json.dumps({"prompt": prompt, "completion": tokenizer.decode(ids)}))
    rows = len(prompts)
    logging.info("prefill: %d tokens in %.3f s (%.0f tokens/s); decode: %d steps x %d rows in "
                 "%.3f s (%.0f tokens/s, %.2f ms per step); compiling %.1f s",
                 out.prompt_tokens, out.prefill_s, out.prompt_tokens / max(out.prefill_s, 1e-9),
                 out.decode_steps, rows, out.decode_s,
                 out.decode_steps * rows / max(out.decode_s, 1e-9),
                 1e3 * out.decode_s / max(out.decode_steps, 1), out.compile_s)


def run_cli():
    cli.log_info_quietly()

    def checked(argv):
        if len(argv) > 1:
            cli.fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
        try:
            main(argv)
        except UserError as e:
            cli.fail(str(e))
    app.run(checked)


if __name__ == "__main__":
    run_cli()
