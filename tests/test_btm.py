"""Branch-Train-Merge (paxlike/btm.py, paxlike/ensemble.py; docs/btm.md): the ensemble's mixture
against an independent float64 reference, parameter averaging (exact for copies), the stdlib
domain filter, and one small branch -> train -> merge -> eval shared by the workflow tests
(two experts on the json and email packages of the standard library, 3 steps each)."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import ROOT, assert_one_line_error, small_test_config, snapshot, subprocess_env
from paxlike import btm, config, ensemble, hf, loop
from paxlike.data import pipeline, sources
from paxlike.errors import UserError

DOMAINS = [("json", "json/*"), ("email", "email/*")]


# ------------------------------------------------------------------------ the domain filter
def test_stdlib_filter_selects_and_excludes():
    files = sources.stdlib_files()
    json_files = sources.select_stdlib_files(files, "json/*")
    assert json_files and all(f.startswith("json/") for f in json_files)
    assert sources.select_stdlib_files(files, "") == files
    both = sources.select_stdlib_files(files, "json/*, email/*,!email/mime/*")
    assert set(json_files) < set(both)
    assert not any(f.startswith("email/mime/") for f in both)
    assert any(f.startswith("email/") for f in both)
    # The `halves` preset cuts the library (but pydoc_data) into two parts, each file in one.
    (_, first), (_, second) = btm.PRESETS["halves"]
    a, b = (set(sources.select_stdlib_files(files, p)) for p in (first, second))
    assert a and b and not a & b
    assert a | b == {f for f in files if not f.startswith("pydoc_data/")}
    with pytest.raises(UserError, match="selects none"):
        sources.select_stdlib_files(files, "no_such_package/*")
    with pytest.raises(UserError, match="data.source=text"):
        sources.open_source("text", paths=__file__, stdlib_filter="json/*")


def test_tokenizer_settings_record_the_filter_only_when_set():
    data = pipeline.default_config()
    assert "stdlib_filter" not in pipeline.tokenizer_settings(data)   # as saved before the key
    data.stdlib_filter = "json/*"
    assert pipeline.tokenizer_settings(data)["stdlib_filter"] == "json/*"


# ---------------------------------------------------------------------------- the mixture
def reference_mixture(expert_lp, segment_ids, weights, prior):
    """The ensemble, written out directly: per segment of a row, position by position, the
    posterior over experts from the product of the probabilities of the earlier targets."""
    K, B, T = expert_lp.shape
    out = np.zeros((B, T))
    for b in range(B):
        likelihood = None
        for t in range(T):
            if t == 0 or segment_ids[b, t] != segment_ids[b, t - 1]:
                likelihood = [1.0] * K          # a new sequence: nothing seen yet
            joint = [prior[k] * likelihood[k] for k in range(K)]
            posterior = [j / sum(joint) for j in joint]
            out[b, t] = math.log(sum(posterior[k] * math.exp(expert_lp[k, b, t])
                                     for k in range(K)))
            if weights[b, t] > 0:
                for k in range(K):
                    likelihood[k] *= math.exp(expert_lp[k, b, t])
    return out


def packed_rows():
    """Two rows: documents of 5 and 4 tokens then 3 of padding (segment 0, weight 0), and one
    document whose last target (the token after its end) has weight 0."""
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
    weights = (segments > 0).astype(np.float32)
    weights[1, -1] = 0
    return segments, weights


def test_mixture_matches_reference_and_is_the_bayesian_mixture():
    rng = np.random.default_rng(0)
    segments, weights = packed_rows()
    # Three experts with distinctly different per-token probabilities.
    lp = np.log(rng.uniform(0.05, 0.95, (3, 2, 12)))
    prior = np.array([0.5, 0.3, 0.2])
    got = ensemble.mixture_logprobs(lp, segments, weights, prior)
    np.testing.assert_allclose(got, reference_mixture(lp, segments, weights, prior), atol=1e-12)
    # Summed over a sequence: log Σ_k prior_k p_k(sequence).
    doc = (segments[0] == 2)
    total = np.log(np.sum(prior * np.exp(lp[:, 0, doc].sum(axis=-1))))
    np.testing.assert_allclose(got[0, doc].sum(), total, atol=1e-12)
    # A prior of 0 leaves that expert out entirely.
    no_third = ensemble.mixture_logprobs(lp, segments, weights, np.array([0.5, 0.5, 0.0]))
    np.testing.assert_allclose(no_third, ensemble.mixture_logprobs(
        lp[:2], segments, weights, np.array([0.5, 0.5])), atol=1e-12)


def test_mixture_of_one_expert_is_that_expert():
    segments, weights = packed_rows()
    lp = np.log(np.random.default_rng(1).uniform(0.05, 0.95, (1, 2, 12))).astype(np.float32)
    got = ensemble.mixture_logprobs(lp, segments, weights, np.array([1.0]))
    np.testing.assert_allclose(got, lp[0], atol=1e-6)


# ------------------------------------------------------------------------------ averaging
def test_average_of_copies_is_exact_and_of_others_the_weighted_mean():
    rng = np.random.default_rng(2)
    tree = {"w": rng.standard_normal((4, 3)).astype(np.float32),
            "b": {"scale": rng.standard_normal(5).astype(np.float32)}}
    copies = ensemble.average_params(lambda k: tree, ensemble.normalized_weights(None, 3))
    for got, want in zip(jax.tree.leaves(copies), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(np.asarray(got), want)     # bit for bit, not rounded
    others = [jax.tree.map(lambda x, i=i: (x * (i + 1) + i).astype(np.float32), tree)
              for i in range(3)]
    w = ensemble.normalized_weights([1, 2, 5], 3)
    mean = ensemble.average_params(lambda k: others[k], w)
    for got, *leaves in zip(jax.tree.leaves(mean), *map(jax.tree.leaves, others)):
        want = sum(wk * np.asarray(x, np.float64) for wk, x in zip(w, leaves))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    one_hot = ensemble.average_params(lambda k: others[k], np.array([0.0, 1.0, 0.0]))
    for got, want in zip(jax.tree.leaves(one_hot), jax.tree.leaves(others[1])):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("weights, message", [([1.0], "1 weight.* for 2 experts"),
                                              ([1.0, -1.0], ">= 0"), ([0.0, 0.0], "not all 0")])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(UserError, match=message):
        ensemble.normalized_weights(weights, 2)


# ------------------------------------------------------------------------------- workflow
def _params(workdir, step):
    cfg = config.load_saved(workdir)
    checkpoints = btm._checkpoints(workdir, cfg)
    scorer = ensemble.Scorer(cfg, jax.devices()[:1])
    return jax.tree.map(np.asarray, checkpoints.restore_params(step, scorer.abstract_params))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A seed run (3 steps on the json and email packages), two experts branched from it, each
    trained 3 steps on one package, and their average in BTM_DIR/merged."""
    root = tmp_path_factory.mktemp("btm")
    seed = str(root / "seed")
    cfg = small_test_config(steps=3, eval_every=3)
    cfg.data.stdlib_filter = "json/*,email/*"
    loop.run(cfg, seed)
    btm_dir = str(root / "btm")
    manifest = btm.branch(seed, btm_dir, DOMAINS, steps=3)
    btm.train(btm_dir)
    btm.merge(btm_dir)
    return {"root": root, "seed": seed, "btm_dir": btm_dir, "manifest": manifest,
            "report": btm.evaluate(btm_dir)}


def test_branch_makes_ordinary_runs_starting_from_the_seed(trained):
    btm_dir, seed = trained["btm_dir"], trained["seed"]
    assert [e["name"] for e in trained["manifest"]["experts"]] == ["json", "email"]
    seed_params = _params(seed, 3)
    for expert, spec in zip(trained["manifest"]["experts"], ("json/*", "email/*")):
        workdir = btm.expert_dir(btm_dir, expert)
        cfg = config.load_saved(workdir)
        assert cfg.data.stdlib_filter == spec and cfg.steps == 3
        assert cfg.optimizer.decay_steps == 3          # its own schedule, not the seed's
        checkpoints = btm._checkpoints(workdir, cfg)
        assert checkpoints.steps() == [0, 3]
        assert checkpoints.read_meta(0)["data_state"]["batch_index"] == 0
        start = _params(workdir, 0)
        for got, want in zip(jax.tree.leaves(start), jax.tree.leaves(seed_params)):
            np.testing.assert_array_equal(got, want)
        trained_leaves = jax.tree.leaves(_params(workdir, 3))
        assert any(not np.array_equal(a, b) for a, b in zip(trained_leaves,
                                                            jax.tree.leaves(seed_params)))


def test_merged_run_is_the_weighted_average_and_reads_like_any_run(trained):
    btm_dir = trained["btm_dir"]
    merged = os.path.join(btm_dir, "merged")
    experts = [_params(btm.expert_dir(btm_dir, e), 3) for e in trained["manifest"]["experts"]]
    got = _params(merged, 0)
    for leaf, a, b in zip(jax.tree.leaves(got), *map(jax.tree.leaves, experts)):
        want = 0.5 * a.astype(np.float64) + 0.5 * b.astype(np.float64)
        np.testing.assert_allclose(leaf, want, rtol=1e-6, atol=1e-7)
    # What `eval` scores as "average" is the same arithmetic: equal to the saved run bit for bit.
    again = ensemble.average_params(lambda k: jax.tree.map(jax.numpy.asarray, experts[k]),
                                    np.array([0.5, 0.5]))
    for leaf, same in zip(jax.tree.leaves(got), jax.tree.leaves(again)):
        np.testing.assert_array_equal(leaf, np.asarray(same))
    assert config.load_saved(merged).data.stdlib_filter == "json/*,email/*"   # the seed's data
    assert json.load(open(os.path.join(merged, "merge.json")))["weights"] == [0.5, 0.5]
    summary = hf.export_run(merged, str(trained["root"] / "hf"))
    assert summary["step"] == 0 and "model.safetensors" in summary["files"]


def test_eval_scores_like_the_training_loop_and_mixes_as_the_reference(trained):
    report = trained["report"]
    rows = {row["model"]: row["scores"] for row in report["rows"]}
    assert list(rows) == ["json", "email", "average", "ensemble", "seed"]
    btm_dir = trained["btm_dir"]
    for expert in trained["manifest"]["experts"]:
        metrics = [json.loads(line) for line in
                   open(os.path.join(btm.expert_dir(btm_dir, expert), "metrics.jsonl"))]
        last_eval = [m for m in metrics if "eval_loss" in m][-1]
        own = rows[expert["name"]][expert["name"]]
        assert last_eval["step"] == 3
        np.testing.assert_allclose(own["eval_loss"], last_eval["eval_loss"], rtol=1e-5)
        np.testing.assert_allclose(own["bits_per_byte"], last_eval["bits_per_byte"], rtol=1e-5)
    for domain, batches in report["batches"].items():
        for i, batch in enumerate(batches):
            lp = np.stack([report["logprobs"][n][domain][i] for n in ("json", "email")])
            want = reference_mixture(lp.astype(np.float64), batch["segment_ids"],
                                     batch["weights"], [0.5, 0.5])
            np.testing.assert_allclose(report["logprobs"]["ensemble"][domain][i], want,
                                       atol=1e-9)


def test_ensemble_and_average_with_one_hot_weights_are_that_expert(trained):
    # On the whole val split (--eval_batches=0): more than the first batch the default scores.
    report = btm.evaluate(trained["btm_dir"], weights=[1.0, 0.0], eval_batches=0)
    first = {row["model"]: row["scores"] for row in trained["report"]["rows"]}["json"]
    assert len(report["batches"]["email"]) > 1 == len(trained["report"]["batches"]["email"])
    assert report["rows"][0]["scores"]["email"]["tokens"] > first["email"]["tokens"]
    for domain in ("json", "email"):
        for expert_lp, ens, avg in zip(report["logprobs"]["json"][domain],
                                       report["logprobs"]["ensemble"][domain],
                                       report["logprobs"]["average"][domain]):
            np.testing.assert_allclose(ens, expert_lp, atol=1e-6)
            np.testing.assert_array_equal(avg, expert_lp)


def test_merging_copies_returns_the_model_and_untrained_experts_are_refused(trained):
    """Three experts branched and not trained are three copies of the seed: merged (allowed
    explicitly) they give the seed back bit for bit."""
    btm_dir = str(trained["root"] / "copies")
    btm.branch(trained["seed"], btm_dir, [("a", "json/*"), ("b", "json/*"), ("c", "json/*")],
               steps=3)
    before = snapshot(btm_dir)
    for attempt in (lambda: btm.merge(btm_dir), lambda: btm.evaluate(btm_dir)):
        with pytest.raises(UserError, match="expert a is not trained yet .*btm train"):
            attempt()
    assert snapshot(btm_dir) == before and not os.path.exists(os.path.join(btm_dir, "merged"))
    btm.merge(btm_dir, allow_unfinished=True)
    merged = _params(os.path.join(btm_dir, "merged"), 0)
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(_params(trained["seed"], 3))):
        np.testing.assert_array_equal(got, want)


def test_experts_of_a_bpe_seed_share_its_tokenizer(tmp_path):
    """An expert trains on less text than its seed; its tokenizer must still be the seed's,
    not one trained on its own domain (token ids would change meaning)."""
    cfg = small_test_config(steps=1)
    cfg.data.update(tokenizer="bpe", bpe_vocab_size=300, stdlib_filter="json/*,email/*")
    loop.run(cfg, str(tmp_path / "seed"))
    btm.branch(str(tmp_path / "seed"), str(tmp_path / "btm"), [("json", "json/*")], steps=1)
    seed_tokenizer = (tmp_path / "seed" / "tokenizer.json").read_text()
    assert (tmp_path / "btm" / "experts" / "json" / "tokenizer.json").read_text() == seed_tokenizer


def test_bad_input_is_refused_and_changes_nothing(trained, tmp_path):
    root, btm_dir, seed = trained["root"], trained["btm_dir"], trained["seed"]
    before = snapshot(btm_dir)
    with pytest.raises(UserError, match="holds no training run.*train the seed first"):
        btm.branch(str(tmp_path / "nothing"), str(tmp_path / "new"), DOMAINS)
    with pytest.raises(UserError, match="N = 0"):
        btm.parse_domains(None, [], "stdlib")
    with pytest.raises(UserError, match="already exists and is not empty"):
        btm.branch(seed, btm_dir, DOMAINS)
    with pytest.raises(UserError, match="already exists and is not empty.*--out=DIR"):
        btm.merge(btm_dir)
    with pytest.raises(UserError, match="3 weight"):
        btm.merge(btm_dir, weights=[1, 1, 1], out=str(tmp_path / "m"))
    with pytest.raises(UserError, match="not a BTM directory.*branch"):
        btm.evaluate(str(root))
    # A domain that selects nothing fails after the directory was begun: it is removed again.
    with pytest.raises(UserError, match="selects none"):
        btm.branch(seed, str(tmp_path / "new"), [("x", "no_such_package/*")])
    assert not os.path.exists(tmp_path / "new") and not os.path.exists(tmp_path / "m")
    assert snapshot(btm_dir) == before


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "paxlike.btm", *args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)


def test_command_line_errors_are_one_line(trained):
    btm_dir = trained["btm_dir"]
    before = snapshot(btm_dir)
    assert_one_line_error(_cli("merge", f"--btm_dir={btm_dir}", "--weights=1,-2",
                               f"--out={btm_dir}-other"), r"--weights=1,-2: .*>= 0")
    assert_one_line_error(_cli("branch", f"--seed_run={trained['seed']}", f"--btm_dir={btm_dir}",
                               "--domain=json=json/*"), "already exists")
    assert snapshot(btm_dir) == before and not os.path.exists(f"{btm_dir}-other")


def test_experts_of_a_diloco_seed_start_every_replica_from_its_model(tmp_path):
    # The seed's model is its outer parameters; each expert gets a fresh optimizer state
    # around them (Trainer.init_state(params)), so every replica starts there too.
    from paxlike.checkpoint import Checkpoints
    from paxlike.mesh import build_mesh
    from paxlike.trainer import Trainer
    seed = str(tmp_path / "seed")
    cfg = small_test_config(steps=2, **{"optimizer.outer": "diloco", "optimizer.outer_every": 2,
                                        "mesh.data": 2, "mesh.fsdp": 4})
    loop.run(cfg, seed)
    manifest = btm.branch(seed, str(tmp_path / "btm"), DOMAINS[:1], steps=2)
    workdir = btm.expert_dir(str(tmp_path / "btm"), manifest["experts"][0])
    expert_cfg = config.load_saved(workdir)
    assert expert_cfg.optimizer.outer == "diloco"
    abstract = Trainer(expert_cfg, build_mesh({"data": 2, "fsdp": 4})).abstract_state()
    state, _ = Checkpoints(os.path.join(workdir, "checkpoints"), keep=3,
                           async_save=False).restore(0, abstract)
    seed_params = _params(seed, 2)
    for got, replicas, want in zip(jax.tree.leaves(state.params),
                                   jax.tree.leaves(state.opt_state["replicas"]),
                                   jax.tree.leaves(seed_params)):
        np.testing.assert_array_equal(np.asarray(got), want)
        for replica in np.asarray(replicas):
            np.testing.assert_array_equal(replica, want)
