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
import types

from absl import app, flags, logging

from paxlike import cli, storage
from paxlike.errors import UserError

DEFAULT_NEW_TOKENS = 128


def define_flags() -> types.SimpleNamespace:
    """The command's flags, defined when it runs: paxlike.train defines some of the same names,
    and one process (a test session) may import both modules."""
    d = flags
    return types.SimpleNamespace(
        workdir=d.DEFINE_string("workdir", None, "The training run's directory (its config.json, "
                                "tokenizer and checkpoints)."),
        step=d.DEFINE_integer("step", None, "Checkpoint step to sample from (default: newest)."),
        prompt=d.DEFINE_string("prompt", None, "Text to continue."),
        prompts_file=d.DEFINE_string("prompts_file", None, "A file with one prompt per line, "
                                     "decoded as one batch; prints one JSON line per prompt."),
        max_new_tokens=d.DEFINE_integer(
            "max_new_tokens", None, "Tokens to generate after each prompt (fewer where the model "
            f"emits its end-of-document token). Default {DEFAULT_NEW_TOKENS}, or fewer for a "
            "Transformer so that prompt and continuation stay within its training seq_len."),
        temperature=d.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy."),
        top_k=d.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all."),
        top_p=d.DEFINE_float("top_p", 1.0, "Sample among the smallest set of tokens whose "
                             "probability reaches p (nucleus sampling); 1: all."),
        seed=d.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text."),
        data=d.DEFINE_integer("data", 1, "Devices splitting the batch of prompts."),
        tensor=d.DEFINE_integer("tensor", 1, "Devices splitting heads (and the cache) by the "
                                "run's sharding rules."),
        cpu_devices=d.DEFINE_integer("cpu_devices", None, "Emulate this many CPU devices."))


def prompts_from_flags(f) -> list[str]:
    if (f.prompt.value is None) == (f.prompts_file.value is None):
        raise UserError("give exactly one of --prompt=TEXT or --prompts_file=FILE")
    if f.prompt.value is not None:
        return [f.prompt.value]
    try:
        with open(f.prompts_file.value, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --prompts_file={f.prompts_file.value}: "
                        f"{e.strerror or e}") from None
    if not prompts:
        raise UserError(f"--prompts_file={f.prompts_file.value} has no prompt (one per line)")
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


def main(f: types.SimpleNamespace) -> None:
    import jax
    cli.emulate_cpu_devices(f.cpu_devices.value)
    from paxlike import checkpoint, config, decode, family, sharding
    from paxlike.data import tokenizer as tokenizer_lib
    from paxlike.mesh import build_mesh

    workdir = f.workdir.value
    if not workdir:
        raise UserError("--workdir is required: the training run to sample from")
    how = decode.Sampling(f.temperature.value, f.top_k.value, f.top_p.value)
    how.check()
    prompts = prompts_from_flags(f)
    cfg = config.load_saved(workdir)
    problems = family.validate(cfg.model)
    if problems:
        raise UserError(f"{workdir}/config.json: {'; '.join(problems)}")
    tokenizer = tokenizer_lib.for_run(cfg.data, workdir)
    encoded = [tokenizer.encode(p) for p in prompts]
    empty = [i + 1 for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise UserError(f"prompt {empty[0]} is empty; give some text to continue")

    wanted = f.data.value * f.tensor.value
    devices = jax.devices()
    if f.data.value < 1 or f.tensor.value < 1 or wanted > len(devices):
        raise UserError(f"--data={f.data.value} x --tensor={f.tensor.value} devices asked for, "
                        f"{len(devices)} present; each must be >= 1 and their product at most "
                        f"{len(devices)}")
    mesh = build_mesh({"data": f.data.value, "fsdp": 1, "tensor": f.tensor.value},
                      devices=devices[:wanted])
    checkpoints = checkpoint.Checkpoints(storage.join(workdir, "checkpoints"),
                                         keep=cfg.keep_checkpoints, async_save=False)
    step = checkpoints.step_to_read(f.step.value, workdir)
    decoder = decode.Decoder(cfg.model, mesh, sharding.get_rules(cfg.sharding, mesh), how)
    max_new_tokens = new_tokens(decoder.model_type, encoded, f.max_new_tokens.value, cfg.seq_len)
    params = checkpoints.restore_params(step, decoder.abstract_params)
    logging.info("sampling from step %d of %s on %d device(s)", step, workdir, mesh.size)

    stream = Stream(tokenizer) if len(prompts) == 1 else None
    out = decoder.generate(params, encoded, max_new_tokens, seed=f.seed.value,
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
    given = define_flags()

    def checked(argv):
        if len(argv) > 1:
            cli.fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
        try:
            main(given)
        except UserError as e:
            cli.fail(str(e))
    app.run(checked)


if __name__ == "__main__":
    run_cli()
