"""The command line: every bad input exits with status 2 and one clear line, `paxlike: error: ...`,
and leaves the workdir exactly as it was; `--config.KEY` overrides may come before `--config`; the
bundled experiment files are found from any directory."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import ROOT, assert_one_line_error, cli_overrides, snapshot, subprocess_env
from paxlike import cli

ENV = subprocess_env()


def _cli(*args, tool="paxlike.train", cwd=ROOT):
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A workdir holding a finished 3-step run, to check bad commands leave it untouched."""
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    result = _cli(f"--workdir={workdir}", "--cpu_devices=8",
                  *cli_overrides(steps=3, **{"metrics.plot": True}))
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"config.json", "metrics.jsonl", "loss.png"} <= set(os.listdir(workdir))
    return workdir


BAD_INPUTS = {
    "mistyped key": (["--config.stepz=5"], 'unknown config key.*Did you mean "steps"'),
    "unknown nested key": (["--config.model.d_modl=5"], "unknown config key.*d_model"),
    "wrong type": (["--config.steps=many"], "--config.steps=many: invalid literal for int"),
    "missing config file": (["--config=experiments/nope.py:tiny"], "No such file.*experiments/nope.py"),
    "unknown size": (["--config=experiments/transformer.py:huge"], "unknown size 'huge'.*tiny, small"),
    "mesh product": (["--config.mesh.fsdp=3"], "mesh sizes multiply to 3 .* 8 device"),
    "not divisible": (["--config.mesh.fsdp=1", "--config.mesh.tensor=8"],
                      "layers/attn/wk: dimension 'kv_heads' of size 2 is not divisible by mesh.tensor=8"),
    "unreadable data": (["--config.data.source=text", "--config.data.paths=/no/such/dir/*.txt"],
                        "/no/such/dir"),
    "changed model shape": (["--config.model.d_model=64", "--config.steps=6"],
                            "different shape .*model.d_model: 32 in the checkpoint, 64 now"),
    "bad config value": (["--config.microbatches=3"], "batch_size=16 is not divisible by microbatches=3"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_fails_cleanly(trained_workdir, name):
    flags, message = BAD_INPUTS[name]
    before = snapshot(trained_workdir)
    args = [f"--workdir={trained_workdir}", "--cpu_devices=8"]
    if not flags[0].startswith("--config="):
        args += cli_overrides(steps=3)
    result = _cli(*args, *flags)
    assert_one_line_error(result, message)
    assert snapshot(trained_workdir) == before


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("keep me")
    result = _cli(f"--workdir={path}", *cli_overrides(steps=3))
    assert_one_line_error(result, "is a file, not a directory")
    assert path.read_text() == "keep me"


def test_positional_arguments_fail_cleanly(tmp_path):
    result = _cli(f"--workdir={tmp_path / 'run'}", "steps=3")
    assert_one_line_error(result, r"unexpected arguments \['steps=3'\]; flags look like --name=value")
    assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------------- argument order
@pytest.mark.parametrize("argv,expected,given", [
    (["--config.steps=5", "--config=a.py:tiny", "--workdir=w"],
     ["--config=a.py:tiny", "--config.steps=5", "--workdir=w"], "a.py:tiny"),
    (["--config.steps", "5", "--config", "a.py:tiny", "--workdir", "w"],
     ["--config=a.py:tiny", "--config.steps", "5", "--workdir", "w"], "a.py:tiny"),
    (["-config.steps=5", "-config=a.py"], ["-config=a.py", "-config.steps=5"], "a.py"),
    (["--config=a.py:tiny", "--config.steps=5"], ["--config=a.py:tiny", "--config.steps=5"],
     "a.py:tiny"),
    (["--configs=x", "--config.steps=5", "--config"], ["--configs=x", "--config.steps=5", "--config"],
     None),
    (["--fleet=v5e-4", "--", "--config=a.py"], ["--fleet=v5e-4", "--", "--config=a.py"], None),
])
def test_config_moves_in_front_of_its_overrides(argv, expected, given):
    assert cli.config_first(["prog", *argv]) == (["prog", *expected], given)


def test_override_before_config_takes_effect(tmp_path):
    """`--config.steps=2 ... --config=FILE:SIZE`: ml_collections alone refuses an override before
    the config flag; the tools accept overrides in any order."""
    workdir = tmp_path / "run"
    result = _cli(*cli_overrides(steps=2), "--config=experiments/transformer.py:tiny",
                  f"--workdir={workdir}", "--cpu_devices=8")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["steps"] == 2 and saved["model"]["d_model"] == 32 and saved["seq_len"] == 32


# ----------------------------------------------------------- bundled experiments, any directory
def test_bundled_experiments_are_found_from_any_directory(tmp_path, monkeypatch):
    """`--config=experiments/<file>.py:<size>` names the experiment bundled with paxlike when no
    such file exists relative to the current directory (and the default config is bundled)."""
    plan = ("--fleet=v5e-4", "--top=1")
    given = _cli("--config=experiments/transformer.py:tiny", "--config.seq_len=64", *plan,
                 tool="paxlike.plan", cwd=tmp_path)
    assert given.returncode == 0, given.stderr[-3000:]
    assert given.stdout.startswith("experiments/transformer.py:tiny on v5e-4")
    default = _cli("--config.seq_len=64", *plan, "--json", tool="paxlike.plan", cwd=tmp_path)
    assert default.returncode == 0, default.stderr[-3000:]
    assert json.loads(default.stdout)["plans"]
    missing = _cli("--config=experiments/nope.py:tiny", *plan, tool="paxlike.plan", cwd=tmp_path)
    assert_one_line_error(missing, "No such file.*experiments/nope.py")
    monkeypatch.chdir(tmp_path)
    bundled = cli.bundled_config("experiments/gla.py")
    assert os.path.isabs(bundled) and os.path.isfile(bundled) and bundled.endswith("gla.py")
    assert cli.bundled_config("experiments/nope.py") == "experiments/nope.py"
    assert cli.bundled_config("gla.py") == "gla.py"


# ---------------------------------------------------------------- sampling (paxlike.generate)
def _greedy_in_process(workdir, prompts, new):
    """The run's newest checkpoint decoded greedily in this process, on one device."""
    import jax
    from paxlike import checkpoint, config, decode, sharding
    from paxlike.data.tokenizer import ByteTokenizer
    from paxlike.mesh import build_mesh
    cfg = config.load_saved(workdir)
    mesh = build_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    decoder = decode.Decoder(cfg.model, mesh, sharding.get_rules(cfg.sharding, mesh),
                             decode.Sampling(temperature=0))
    ckpt = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), keep=3, async_save=False)
    params = ckpt.restore_params(ckpt.steps()[-1], decoder.abstract_params)
    tok = ByteTokenizer()
    out = decoder.generate(params, [tok.encode(p) for p in prompts], new, eos_id=tok.eos_id)
    return [tok.decode(ids) for ids in out.tokens]


def test_generate_streams_only_the_text_and_equals_in_process_decoding(trained_workdir):
    """A checkpoint written on 8 devices (fsdp) sampled on 2 (tensor): standard output is the
    continuation alone, the same text as greedy decoding on one device in this process; the
    timings are on standard error. With a prompts file, one JSON line per prompt."""
    before = snapshot(trained_workdir)
    prompts = ["def main(", "import"]
    expected = _greedy_in_process(trained_workdir, prompts, 12)
    one = _cli(f"--workdir={trained_workdir}", f"--prompt={prompts[0]}", "--max_new_tokens=12",
               "--temperature=0", "--cpu_devices=8", "--tensor=2", tool="paxlike.generate")
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout == expected[0] + "\n"
    assert re.search(r"prefill: \d+ tokens .* tokens/s\); decode: 11 steps x 1 rows", one.stderr)
    prompts_file = os.path.join(os.path.dirname(trained_workdir), "prompts.txt")
    with open(prompts_file, "w") as f:
        f.write("\n".join(prompts) + "\n")
    batch = _cli(f"--workdir={trained_workdir}", f"--prompts_file={prompts_file}",
                 "--max_new_tokens=12", "--temperature=0", tool="paxlike.generate")
    assert batch.returncode == 0, batch.stderr[-3000:]
    lines = [json.loads(line) for line in batch.stdout.splitlines()]
    assert lines == [{"prompt": p, "completion": c} for p, c in zip(prompts, expected)]
    assert snapshot(trained_workdir) == before


GENERATE_BAD_INPUTS = {
    "no run": (["--workdir={empty}", "--prompt=x"], "holds no training run .*no config.json"),
    "unknown step": (["--workdir={run}", "--prompt=x", "--step=2"],
                     "--step=2 is not a checkpoint of .*; its steps are 3"),
    "too long": (["--workdir={run}", "--prompt=" + "x" * 30, "--max_new_tokens=8"],
                 "a prompt of 30 tokens plus --max_new_tokens=8 is 38 positions, more than the "
                 "32 the model was trained on"),
}


def test_a_run_without_checkpoints_is_named(tmp_path):
    from paxlike.checkpoint import Checkpoints
    from paxlike.errors import UserError
    with pytest.raises(UserError, match="no checkpoint in .*: the run in .* saved none yet"):
        Checkpoints(str(tmp_path / "checkpoints"), keep=3, async_save=False).step_to_read(
            None, str(tmp_path))


def test_new_tokens_stay_within_the_trained_positions():
    """The Transformer's default shrinks to fit its training seq_len; recurrent families have no
    such limit; a request that does not fit is refused (the CLI's case is above)."""
    from paxlike.generate import DEFAULT_NEW_TOKENS, new_tokens
    from paxlike.models import gla, transformer
    from paxlike.errors import UserError
    prompts = [[1] * 30, [2] * 5]
    assert new_tokens(transformer.Transformer, prompts, None, 32) == 2
    assert new_tokens(transformer.Transformer, prompts, None, 1024) == DEFAULT_NEW_TOKENS
    assert new_tokens(gla.GLALanguageModel, prompts, None, 32) == DEFAULT_NEW_TOKENS
    assert new_tokens(gla.GLALanguageModel, prompts, 500, 32) == 500
    with pytest.raises(UserError, match="a prompt of 32 tokens leaves no room in the 32 positions"):
        new_tokens(transformer.Transformer, [[1] * 32], None, 32)


@pytest.mark.parametrize("name", GENERATE_BAD_INPUTS)
def test_generate_bad_input_fails_cleanly(trained_workdir, tmp_path, name):
    flags, message = GENERATE_BAD_INPUTS[name]
    before = snapshot(trained_workdir)
    flags = [f.format(run=trained_workdir, empty=tmp_path) for f in flags]
    assert_one_line_error(_cli(*flags, tool="paxlike.generate"), message)
    assert snapshot(trained_workdir) == before


def test_stream_holds_back_a_partial_character():
    """A byte-level model emits a multi-byte character one byte at a time: nothing half-made is
    printed, and the finished text is exact."""
    import io
    from paxlike.data.tokenizer import ByteTokenizer
    from paxlike.generate import Stream
    out = io.StringIO()
    stream = Stream(ByteTokenizer(), out)
    shown = []
    for byte in "a€b".encode():
        stream([byte])
        shown.append(out.getvalue())
    assert shown == ["a", "a", "a", "a€", "a€b"]
    stream([-1])                # a finished row reports -1
    stream.finish()
    assert out.getvalue() == "a€b\n"
