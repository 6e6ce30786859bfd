"""The command line: every bad input exits non-zero with one clear message and leaves the workdir
exactly as it was."""

import os
import re
import subprocess
import sys

import pytest

from configs import ROOT, cli_overrides, snapshot, subprocess_env

ENV = subprocess_env()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "paxlike.train", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A workdir holding a finished 3-step run, to check bad commands leave it untouched."""
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    result = _cli(f"--workdir={workdir}", "--cpu_devices=8", *cli_overrides(steps=3))
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
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("paxlike: error:"), result.stderr[-3000:]
    assert re.search(message, last_line), last_line
    assert "Traceback" not in result.stderr
    assert snapshot(trained_workdir) == before


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("keep me")
    result = _cli(f"--workdir={path}", *cli_overrides(steps=3))
    assert result.returncode != 0
    assert "is a file, not a directory" in result.stderr.strip().splitlines()[-1]
    assert path.read_text() == "keep me"
