"""profile_steps writes a jax.profiler trace of the chosen steps where TensorBoard reads it, and
`compilation_cache` keeps the run's compiled programs in the chosen directory (start-up saving
measured in benchmarks/compile_cache.py, docs in README)."""

import glob
import os
import subprocess
import sys

import pytest

from configs import ROOT, cli_overrides, subprocess_env
from paxlike.config import profile_range
from paxlike.cli import compilation_cache_dir


def test_trace_of_the_chosen_steps_and_programs_cached_in_the_chosen_directory(tmp_path):
    cache = tmp_path / "cache"
    env = dict(subprocess_env(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    result = subprocess.run(
        [sys.executable, "-m", "paxlike.train", f"--workdir={tmp_path / 'run'}",
         *cli_overrides(steps=3, profile_steps="2:3", compilation_cache=str(cache))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "profile of steps 2-3 written to" in result.stderr
    traces = glob.glob(str(tmp_path / "run" / "tensorboard" / "plugins" / "profile" / "*" /
                           "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert f"compiled programs are cached in {cache}" in result.stderr
    assert len(os.listdir(cache)) >= 2          # at least the init and the train step


@pytest.mark.parametrize("text, expected", [("", None), ("5", (5, 5)), ("10:12", (10, 12))])
def test_profile_steps_accepted(text, expected):
    assert profile_range(text) == expected


@pytest.mark.parametrize("text", ["0:2", "3:2", "a:b", "2:"])
def test_profile_steps_refused(text):
    with pytest.raises(ValueError, match="profile_steps=.* must be A:B with 1 <= A <= B"):
        profile_range(text)


def test_cache_directory_choice():
    home = os.path.expanduser("~")
    assert compilation_cache_dir("off", {}) is None
    assert compilation_cache_dir("/data/cache", {}) == "/data/cache"
    assert compilation_cache_dir("auto", {"JAX_COMPILATION_CACHE_DIR": "/x"}) == "/x"
    assert compilation_cache_dir("auto", {"XDG_CACHE_HOME": "/c"}) == "/c/paxlike/jax"
    assert compilation_cache_dir("auto", {}) == os.path.join(home, ".cache", "paxlike", "jax")
