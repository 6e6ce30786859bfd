"""Bad steps: a loss spike rolls the run back to its last checkpoint and skips the batch that
caused it, leaving exactly the run that never saw that batch; under the stop policy (the default)
it ends the run with its checkpoints intact. The spike is a batch of garbage tokens (ids the byte
tokenizer never produces) injected at a known data position."""

import os

import jax
import numpy as np
import pytest

from configs import small_test_config
from paxlike import loop, metrics
from paxlike.errors import UserError

BAD_POSITION = 13       # read by step 14 (step s reads position s - 1 when nothing is skipped)
# A learning rate high enough that 13 steps teach the model which tokens occur: the garbage
# batch's loss (7.4) then stands 8 standard deviations above the previous 8 steps' (4.0).
SETTINGS = {"steps": 20, "checkpoint_every": 4, "optimizer.learning_rate": 1e-2,
            "health.spike_zscore": 4.0, "health.spike_window": 8}


class _GarbageAt:
    """The packed training split, except that the rows of one global batch are replaced by
    random tokens from 300..511 (never produced by the byte-level tokenizer)."""

    def __init__(self, split, row_ids):
        self._split, self._bad = split, frozenset(int(i) for i in row_ids)

    def __getattr__(self, name):
        return getattr(self._split, name)

    def rows(self, ids):
        out = self._split.rows(ids)
        if frozenset(int(i) for i in ids) != self._bad:
            return out
        rng = np.random.default_rng(0)
        return {**out, **{k: rng.integers(300, 512, out[k].shape).astype(out[k].dtype)
                          for k in ("inputs", "targets")}}


def _run_with_garbage(cfg, workdir):
    prepared = loop.prepare(cfg, workdir)
    ds = prepared.dataset
    ds.train = _GarbageAt(ds.train, ds._train_rows_dataset()[BAD_POSITION])
    return loop.train(prepared, loop.restore(prepared))


def _final_params(cfg, workdir):
    prepared = loop.prepare(cfg, workdir)
    state, meta = prepared.checkpoints.restore(cfg.steps, prepared.trainer.abstract_state())
    prepared.checkpoints.close()
    return state.params, meta


def test_spike_rolls_back_skips_the_batch_and_equals_a_run_without_it(tmp_path):
    cfg = small_test_config(**SETTINGS, **{"health.policy": "rollback"})
    rolled = str(tmp_path / "rolled_back")
    losses = _run_with_garbage(cfg, rolled)

    records = metrics.read_records(os.path.join(rolled, metrics.METRICS_FILE))
    events = [r for r in records if r.get("event") == "rollback"]
    assert [(e["step"], e["to_step"], e["skipped_batch"]) for e in events] == [(14, 12, BAD_POSITION)]
    assert events[0]["bad_loss"] > 7
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))

    never_saw = str(tmp_path / "never_saw_it")
    reference = loop.run(small_test_config(**SETTINGS, **{"data.skip_batches": str(BAD_POSITION)}),
                         never_saw)
    np.testing.assert_allclose(losses, reference, rtol=1e-6)
    params, meta = _final_params(cfg, rolled)
    reference_params, _ = _final_params(cfg, never_saw)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert meta["data_state"]["skipped"] == [BAD_POSITION]   # a resumed run keeps skipping it


@pytest.mark.parametrize("policy, max_rollbacks, message", [
    ("stop", 3, "loss spike at step 14 .*set health.policy=rollback"),
    ("rollback", 0, "loss spike at step 14 .*0 rollbacks already"),
])
def test_spike_stops_the_run_under_stop_policy_or_when_rollbacks_run_out(
        tmp_path, policy, max_rollbacks, message):
    cfg = small_test_config(**SETTINGS, **{"health.policy": policy,
                                           "health.max_rollbacks": max_rollbacks})
    with pytest.raises(UserError, match=message):
        _run_with_garbage(cfg, str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"), key=int) == ["4", "8", "12"]
