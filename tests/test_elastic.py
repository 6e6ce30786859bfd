"""Elastic restart: a checkpoint written by 2 processes x 4 devices resumes on 2 processes x 2
devices with the same global batch and data order, microbatches raised so that each device holds
no more rows of a microbatch than before, and losses equal to a run on the new mesh resumed from
the same checkpoint; a newer checkpoint torn on one process only is set aside by both processes
alike. Plus the rule itself (paxlike/elastic.py) on its own."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import ROOT, cli_overrides, free_port, small_test_config, subprocess_env
from paxlike import elastic, loop
from paxlike.errors import UserError
from paxlike.sharding import PRESETS


def _train(workdir, num_processes: int, devices: int, **settings) -> list[str]:
    """Trains with `num_processes` real processes of `devices` CPU devices each; their outputs. A job
    still running after 240 s is stopped with its Python stacks in the failure message."""
    port = free_port()
    env = {**subprocess_env(), "PYTHONFAULTHANDLER": "1"}   # SIGABRT prints every thread's stack
    logs = [workdir.parent / f"{workdir.name}-{num_processes}x{devices}-{i}.log"
            for i in range(num_processes)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "paxlike.train", f"--workdir={workdir}", f"--cpu_devices={devices}",
         f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
         f"--process_id={i}", *cli_overrides(**settings)],
        cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        for i, log in enumerate(logs)]
    deadline = time.time() + 240
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    hung = [p for p in procs if p.poll() is None]
    for p in hung:
        p.send_signal(signal.SIGABRT)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    outputs = [log.read_text() for log in logs]
    assert not hung, "hung:\n" + "\n".join(out[-6000:] for out in outputs)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, f)) if "loss" in r}


def test_restart_on_half_the_devices_keeps_the_global_batch_and_data_order(tmp_path):
    settings = {"steps": 8, "checkpoint_every": 3}
    workdir = tmp_path / "elastic"
    # 6 steps on mesh fsdp=8: 16 rows, 2 per device, in 1 microbatch; checkpoints 3 and 6.
    _train(workdir, 2, 4, **{**settings, "steps": 6})
    ckpts = workdir / "checkpoints"
    # The pod is lost while step 6 is written: a torn write truncates the data files process 1
    # wrote. One new process reads those shards and fails, the other reads fine: both must
    # agree to set step 6 aside and resume from step 3 (continuing to step 8).
    torn = list((ckpts / "6" / "state" / "ocdbt.process_1" / "d").iterdir())
    assert torn
    for path in torn:
        os.truncate(path, path.stat().st_size // 2)
    reference_dir = tmp_path / "reference"
    shutil.copytree(workdir, reference_dir)

    outputs = _train(workdir, 2, 2, **settings)   # mesh fsdp=4: 4 rows per device in 1 microbatch
    out = outputs[0]
    assert ("elastic restart: checkpoints written on 2 processes x 4 devices, mesh fsdp=8, 1 "
            "microbatch of 2 rows per device -> now 2 processes x 2 devices, mesh fsdp=4, 2 "
            "microbatches of 2 rows per device (microbatches raised to keep at most 2 rows per "
            "device per microbatch); the global batch (16 sequences) and the data order are "
            "unchanged") in out, out[-3000:]
    assert all("resumed from step 3" in o for o in outputs)
    assert out.count("could not be restored") == 1 and "could not be restored" not in outputs[1]
    assert f"moved it to {ckpts}.damaged/6 and resuming from step 3" in out
    assert (ckpts.parent / "checkpoints.damaged" / "6" / "state").is_dir()
    with open(ckpts / "8" / "meta" / "metadata") as f:
        layout = json.load(f)["layout"]
    assert (layout["devices"], layout["processes"], layout["microbatches"]) == (4, 2, 2)

    # One process with 4 devices, microbatches=2 set by hand, resumed from the same checkpoint.
    reference = loop.run(small_test_config(**settings, microbatches=2, elastic_microbatches=False),
                         str(reference_dir), devices=jax.devices()[:4])
    resumed = _losses(workdir)
    assert sorted(resumed) == list(range(1, 9))
    np.testing.assert_allclose([resumed[s] for s in range(4, 9)], reference, rtol=1e-5)


# ---------------------------------------------------------------------------- the rule alone
FSDP = PRESETS["fsdp_tp"]


def _saved(devices, processes, mesh, microbatches, batch_size=16, planned=None):
    ways = elastic.batch_ways(mesh, FSDP)
    return elastic.layout(devices=devices, processes=processes, mesh_shape=mesh,
                          microbatches=microbatches, batch_size=batch_size, ways=ways,
                          planned_rows=planned)


def _resume(saved, devices, mesh, microbatches=1, batch_size=16, elastic_on=True, processes=1):
    return elastic.plan_resume(saved, step=3, devices=devices, processes=processes,
                               mesh_shape=mesh, batch_size=batch_size, microbatches=microbatches,
                               ways=elastic.batch_ways(mesh, FSDP), elastic=elastic_on)


def test_microbatches_follow_the_devices_and_come_back():
    eight = _saved(8, 4, {"fsdp": 8}, 1)
    assert eight["rows_per_device_microbatch"] == 2
    half = _resume(eight, 4, {"fsdp": 4})
    assert half.microbatches == 2 and "microbatches raised" in half.message
    quarter = _resume(half.layout, 2, {"fsdp": 2})           # the original command again
    assert quarter.microbatches == 4
    back = _resume(quarter.layout, 8, {"fsdp": 8})
    assert back.microbatches == 1 and "microbatches lowered" in back.message
    same = _resume(back.layout, 8, {"fsdp": 8})
    assert same.microbatches == 1 and same.message is None  # nothing changed: nothing said


def test_the_plan_does_not_drift_over_uneven_restarts():
    # 24 rows over 4 devices (6 each); on 3 devices 8 would not fit: 2 microbatches of 4.
    four = _saved(4, 1, {"fsdp": 4}, 1, batch_size=24)
    three = _resume(four, 3, {"fsdp": 3}, batch_size=24)
    assert three.microbatches == 2 and three.layout["rows_per_device_microbatch"] == 4
    # Back on 4 devices the plan is still 6 rows, so 1 microbatch again (not 2 of 3).
    assert _resume(three.layout, 4, {"fsdp": 4}, batch_size=24).microbatches == 1


def test_microbatches_set_by_hand_are_honoured_and_elastic_can_be_off():
    eight = _saved(8, 1, {"fsdp": 8}, 1)
    by_hand = _resume(eight, 8, {"fsdp": 8}, microbatches=2)
    assert by_hand.microbatches == 2 and by_hand.message is None
    # ... and is the new plan: the same command on half the devices doubles it.
    assert _resume(by_hand.layout, 4, {"fsdp": 4}, microbatches=2).microbatches == 4
    assert _resume(eight, 4, {"fsdp": 4}, microbatches=4).microbatches == 4
    # The same command again on the smaller fleet keeps the raised microbatches, and says so.
    half = _resume(eight, 4, {"fsdp": 4})
    again = _resume(half.layout, 4, {"fsdp": 4})
    assert again.microbatches == 2 and "microbatches=2, not the config's 1" in again.message
    off = _resume(eight, 4, {"fsdp": 4}, elastic_on=False)
    assert off.microbatches == 1 and "elastic_microbatches=False" in off.message
    # A new run, or a checkpoint written before layouts were recorded: the config as given.
    assert _resume(None, 4, {"fsdp": 4}).message is None


def test_impossible_split_and_stale_mesh_sizes_name_the_fix():
    with pytest.raises(UserError, match=r"no number of microbatches splits batch_size=16 evenly "
                                        r"over the 3 ways"):
        _resume(_saved(8, 1, {"fsdp": 8}, 1), 3, {"fsdp": 3})
    err = elastic.mesh_error(UserError("mesh sizes multiply to 8"),
                             _saved(8, 2, {"data": 2, "fsdp": 4}, 1), 3, 4)
    assert ("written on 8 devices (mesh.data=2 mesh.fsdp=4) and this run has 4: set mesh sizes "
            "whose product is 4") in str(err)
