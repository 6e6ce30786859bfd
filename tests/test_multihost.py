"""Multi-host training with real processes: two `jax.distributed` processes of 4 CPU devices each,
the data axis spanning the processes (DCN) and fsdp inside each, train exactly like one process
with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from configs import ROOT, cli_overrides, small_test_config, subprocess_env
from paxlike import loop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    settings = {"steps": 4, "mesh.data": 2, "mesh.fsdp": 4}
    reference = loop.run(small_test_config(**settings), str(tmp_path / "one_process"))

    workdir = tmp_path / "two_processes"
    port = _free_port()
    env = subprocess_env()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "paxlike.train", f"--workdir={workdir}", "--cpu_devices=4",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         *cli_overrides(steps=4, **{"mesh.data": 2, "mesh.dcn.data": 2, "mesh.fsdp": 4})],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    assert "step 4/4" in outputs[0] and "step 4/4" not in outputs[1]  # only process 0 reports
    assert (workdir / "checkpoints" / "4").is_dir()
