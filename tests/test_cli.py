"""The command line: every bad input exits with status 2 and one clear line, `paxlike: error: ...`,
and leaves the workdir exactly as it was; `--config.KEY` overrides may come before `--config`; the
bundled experiment files are found from any directory."""

import json
import os
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
