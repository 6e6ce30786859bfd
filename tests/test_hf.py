"""Hugging Face interop (paxlike/hf.py) against `transformers` itself, on CPU, no download: a
randomly initialised LlamaForCausalLM built here → import → paxlike logits equal transformers'
(float32, 1e-4) on a 600-token sequence (long enough for RoPE mistakes to show); the imported run →
export → transformers logits equal paxlike's; HF → paxlike → HF is bitwise; the comparison command
measures what bfloat16 costs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ROOT, assert_one_line_error, small_test_config, subprocess_env
from paxlike import checkpoint, decode, hf, loop, sharding
from paxlike.errors import UserError
from paxlike.mesh import build_mesh
from paxlike.safetensors_io import Reader

torch, transformers = hf.import_transformers()   # installed by the test command: never skipped
SEQUENCE = np.random.default_rng(1).integers(0, 320, 600).tolist()


def _llama(directory, tie: bool):
    """A small random Llama, saved in shards of 100 kB (so the index is read too). Weights drawn
    wider than transformers' default, and norm weights away from 1, so that a wrong mapping
    changes the logits visibly."""
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=tie, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory, max_shard_size="100KB")
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def _run_params(workdir, step=0):
    cfg = json.loads(open(os.path.join(workdir, "config.json")).read())
    import ml_collections
    model_cfg = ml_collections.ConfigDict(cfg["model"])
    mesh = build_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    decoder = decode.Decoder(model_cfg, mesh, sharding.get_rules("fsdp_tp", mesh))
    ckpt = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), keep=3, async_save=False)
    params = ckpt.restore_params(step, decoder.abstract_params)
    return decoder, jax.tree.map(np.asarray, params)


def _paxlike_logits(decoder, params, tokens):
    model = nnx.merge(decoder.graphdef, params)
    ids = jnp.asarray([tokens])
    return np.asarray(model(ids, jnp.arange(len(tokens))[None], jnp.ones_like(ids))[0])


def _import(hf_dir, workdir):
    cfg = small_test_config(steps=2, **{"mesh.fsdp": 4, "mesh.tensor": 2})
    return hf.import_run(str(hf_dir), cfg, str(workdir))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "paxlike.hf", *args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_import_export_logit_parity_and_bitwise_round_trip(tmp_path, tie):
    original = _llama(tmp_path / "hf", tie)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    expected = _hf_logits(original, SEQUENCE)

    # HF -> paxlike (placed on fsdp 4 x tensor 2, as the run's config says): same logits.
    _import(tmp_path / "hf", tmp_path / "run")
    decoder, params = _run_params(tmp_path / "run")
    ours = _paxlike_logits(decoder, params, SEQUENCE)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)

    # paxlike -> HF (the untied model through the command line, in 100 kB shards): transformers
    # loads it and computes paxlike's logits.
    if tie:
        hf.export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    else:
        result = _cli("export", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}",
                      "--max_shard_gb=0.0001")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "exported step 0" in result.stdout
        assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(_hf_logits(exported, SEQUENCE), ours, rtol=0, atol=1e-4)

    # HF -> paxlike -> HF is bitwise, tensor by tensor; so is paxlike -> HF -> paxlike.
    before, after = Reader(str(tmp_path / "hf")), Reader(str(tmp_path / "out"))
    names = [n for n in before.names() if not (tie and n == "lm_head.weight")]
    assert sorted(names) == sorted(after.names())
    for name in names:
        assert np.array_equal(before.read(name), after.read(name)), name
    _import(tmp_path / "out", tmp_path / "again")
    _, again = _run_params(tmp_path / "again")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, again)


def test_imported_run_trains_and_the_comparison_measures_bfloat16(tmp_path):
    """The imported checkpoint continues under `paxlike.train`'s loop; `compare` finds the
    float32 export identical and the bfloat16 export close (its rounding only)."""
    _llama(tmp_path / "hf", tie=False)
    _import(tmp_path / "hf", tmp_path / "run")
    cfg = small_test_config(steps=2, **{"mesh.fsdp": 4, "mesh.tensor": 2})
    cfg.model = hf.model_config_from_llama(hf.read_llama_config(str(tmp_path / "hf")), cfg.model)
    losses = loop.run(cfg, str(tmp_path / "run"))
    assert len(losses) == 2 and all(np.isfinite(losses))

    exact = hf.compare(str(tmp_path / "run"), str(tmp_path / "hf"), SEQUENCE, step=0)
    assert exact["top1_agreement"] == 1.0 and exact["max_abs_logit_diff"] < 1e-4
    assert exact["kl_mean"] < 1e-8
    hf.export_run(str(tmp_path / "run"), str(tmp_path / "bf16"), step=0, dtype="bfloat16")
    rounded = hf.compare(str(tmp_path / "run"), str(tmp_path / "bf16"), SEQUENCE, step=0)
    assert rounded["hf_dtype"] == "bfloat16"
    assert 1e-8 < rounded["kl_mean"] < 1e-2 and rounded["top1_agreement"] > 0.9


def test_bad_conversions_are_refused_and_write_nothing(tmp_path):
    _llama(tmp_path / "hf", tie=False)
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    config["hidden_act"] = "gelu"
    os.makedirs(tmp_path / "gelu")
    for name in os.listdir(tmp_path / "hf"):
        if name != "config.json":
            os.link(tmp_path / "hf" / name, tmp_path / "gelu" / name)
    with open(tmp_path / "gelu" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(UserError, match="hidden_act='gelu'"):
        _import(tmp_path / "gelu", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    os.remove(tmp_path / "gelu" / "config.json")
    config.update(hidden_act="silu", intermediate_size=128)      # the tensors say 160
    with open(tmp_path / "gelu" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(UserError, match="other shape .*mlp.down_proj.weight"):
        _import(tmp_path / "gelu", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    no_command = _cli("--workdir=x")
    assert_one_line_error(no_command, r"give a command first: python -m paxlike.hf "
                                      r"\{export\|import\|compare\}")


def test_a_bpe_run_exports_a_tokenizer_transformers_loads(tmp_path):
    """The run's BPE tokenizer.json goes along with its EOS; transformers' fast tokenizer reads
    the same ids paxlike writes."""
    from paxlike.data import tokenizer as tokenizer_lib
    texts = ["def main():\n    return 42\n", "import os, sys\nprint(os.getcwd())\n"] * 20
    tok = tokenizer_lib.BPETokenizer(tokenizer_lib._train_bpe(texts, 300))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / tokenizer_lib.TOKENIZER_FILE).write_text(tok._json)
    (tmp_path / "out").mkdir()
    written = hf._export_tokenizer(tok, str(tmp_path / "run"), str(tmp_path / "out"))
    assert written == ["tokenizer.json", "tokenizer_config.json"]
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "def main():\n    print(sys.argv)  # é\n"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text)
    assert loaded.eos_token_id == tok.eos_id
