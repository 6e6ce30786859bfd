"""A pretrained `tokenizers` JSON file as data.tokenizer: loading, special tokens named by the
config, token bytes for bits per byte, the fingerprint, the errors, and a short training run.

The "pretrained" file is built here with the `tokenizers` library (a small byte-level BPE in the
style of GPT-2, with its own <|endoftext|>), never downloaded.
"""

import json
import math
import os
import shutil

import numpy as np
import pytest

from configs import small_test_config
from paxlike import loop
from paxlike.data import sources
from paxlike.data import tokenizer as tokenizer_lib
from paxlike.errors import UserError

EOT, BOS = "<|endoftext|>", "<|begin|>"
VOCAB = 600


@pytest.fixture(scope="module")
def gpt2_style_file(tmp_path_factory):
    """A byte-level BPE tokenizer.json with special tokens <|endoftext|>, <|begin|>, <|pad|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT, BOS, "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [d.text for d in sources.load_corpus("stdlib", val_fraction=0.05).train[:150]]
    tok.train_from_iterator(texts, trainer=trainer)
    path = tmp_path_factory.mktemp("pretrained") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_round_trip_token_bytes_and_fingerprint(gpt2_style_file, tmp_path):
    tok = tokenizer_lib.PretrainedTokenizer(gpt2_style_file, eos_token=EOT)
    assert tok.vocab_size == VOCAB and tok.name == "pretrained"
    assert tok.eos_id == 0 and tok.bos_id is None          # the first special token of the file
    s = "def héllo(x):\n    return x  # ✓ unseen¿ 漢字 <|endoftext|> inside a document\n"
    ids = tok.encode(s)
    assert tok.decode(ids) == s and len(ids) < len(s.encode())
    # A special token's text inside a document is text, not the document end.
    assert tok.eos_id not in ids
    # Byte-level BPE: every id's byte count is exact, so the ids of a text count its UTF-8 bytes.
    assert tok.exact_bytes
    assert sum(int(tok.token_bytes[i]) for i in ids) == len(s.encode())
    assert tok.token_bytes[tok.eos_id] == 0 and tok.token_bytes.dtype == np.int32
    # The fingerprint is the content's (and the token names'), not the path's.
    copy = tmp_path / "elsewhere.json"
    shutil.copy(gpt2_style_file, copy)
    assert tokenizer_lib.PretrainedTokenizer(str(copy), eos_token=EOT).fingerprint() \
        == tok.fingerprint()
    assert tokenizer_lib.PretrainedTokenizer(str(copy), eos_token=EOT, bos_token=BOS) \
        .fingerprint() != tok.fingerprint()
    spec = json.loads(copy.read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    copy.write_text(json.dumps(spec))
    assert tokenizer_lib.PretrainedTokenizer(str(copy), eos_token=EOT).fingerprint() \
        != tok.fingerprint()


def test_llama3_style_file_sequence_pre_tokenizer_and_bos_template(gpt2_style_file, tmp_path):
    """ByteLevel inside a Sequence (as Llama-3's file has it) is still exact, and the file's own
    post-processor (a template adding a BOS) is not applied: only data.bos_token adds one."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    tok = Tokenizer.from_file(gpt2_style_file)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                       special_tokens=[(BOS, 1)])
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    ours = tokenizer_lib.PretrainedTokenizer(path, eos_token=EOT)
    s = "for x in range(10):\n\tprint(f'{x}é✓')\n"
    ids = ours.encode(s)
    assert tok.encode(s).ids[0] == 1 and ids[0] != 1 and ours.decode(ids) == s
    assert ours.exact_bytes and sum(int(ours.token_bytes[i]) for i in ids) == len(s.encode())


def test_sentencepiece_style_file_counts_bytes_approximately(tmp_path):
    """Metaspace ("▁" for a space) with byte-fallback tokens <0xAB>: not byte level, so the count
    is approximate (a prepended "▁" per document); encode_docs measures it on the data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(),
                                     decoders.Fuse()])
    texts = [d.text for d in sources.load_corpus("stdlib", val_fraction=0.05).train[:40]]
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    path = str(tmp_path / "sp.json")
    tok.save(path)
    ours = tokenizer_lib.PretrainedTokenizer(path, eos_token="</s>", bos_token="<s>")
    assert not ours.exact_bytes
    assert ours.token_bytes[tok.token_to_id("\u2581")] == 1    # "▁" stands for one space
    ours.encode_docs(texts[:20])
    assert 1.0 < ours.bytes_ratio < 1.01                       # one "▁" too many per document


def test_encode_docs_places_bos_and_eos(gpt2_style_file):
    tok = tokenizer_lib.build_tokenizer(os.path.dirname(gpt2_style_file), bpe_vocab_size=0,
                                        workdir=None, train_texts_fn=None, settings={},
                                        eos_token=EOT, bos_token=BOS)   # a directory works too
    docs = ["import os\n", "", "x = 1 ✓", f"a literal {EOT} {BOS} is text"]
    stream, ends = tok.encode_docs(docs)
    bos, eos = tok.bos_id, tok.eos_id
    assert ends.tolist()[-1] == len(stream) and len(ends) == len(docs)
    assert np.count_nonzero(stream == eos) == np.count_nonzero(stream == bos) == len(docs)
    starts = [0] + ends.tolist()[:-1]
    for doc, lo, hi in zip(docs, starts, ends.tolist()):
        assert stream[lo] == bos and stream[hi - 1] == eos
        assert stream[lo + 1:hi - 1].tolist() == tok.encode(doc)
    assert tok.token_bytes[bos] == 0 and tok.bytes_ratio == 1.0


def test_missing_special_token_and_other_bad_settings(gpt2_style_file, tmp_path):
    specials = r"its special tokens: '<\|endoftext\|>', '<\|begin\|>', '<\|pad\|>'"
    with pytest.raises(UserError, match=r"data.eos_token='</s>' is not in the vocabulary of "
                                        rf".*tokenizer.json; {specials}"):
        tokenizer_lib.PretrainedTokenizer(gpt2_style_file, eos_token="</s>")
    with pytest.raises(UserError, match=r"data.bos_token='<s>' is not in the vocabulary"):
        tokenizer_lib.PretrainedTokenizer(gpt2_style_file, eos_token=EOT, bos_token="<s>")
    with pytest.raises(UserError, match=r"needs data.eos_token.*"
                                        r"--config.data.eos_token='<\|endoftext\|>'"):
        tokenizer_lib.PretrainedTokenizer(gpt2_style_file, eos_token="")
    check = tokenizer_lib.check_config
    with pytest.raises(UserError, match=r"must be one of byte, bpe; got 'wordpiece' \(or the path"):
        check("wordpiece")
    with pytest.raises(UserError, match=r"no tokenizer file '.*nope.json'"):
        check(str(tmp_path / "nope.json"), eos_token=EOT)
    with pytest.raises(UserError, match=r"the byte tokenizer has its own EOS"):
        check("byte", eos_token=EOT)
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match=r"cannot load the tokenizer file .*bad.json"):
        tokenizer_lib.PretrainedTokenizer(str(bad), eos_token=EOT)
    check("byte"), check("bpe"), check(gpt2_style_file, eos_token=EOT)   # accepted


def _cfg(path, **overrides):
    return small_test_config(**{"data.tokenizer": path, "data.eos_token": EOT, **overrides})


def test_vocab_larger_than_the_model_is_refused(gpt2_style_file, tmp_path):
    tok = tokenizer_lib.PretrainedTokenizer(gpt2_style_file, eos_token=EOT)
    with pytest.raises(UserError, match=r"the tokenizer file .*tokenizer.json has 600 tokens but "
                                        r"model.vocab_size=512: set "
                                        r"--config.model.vocab_size=600 or more, e.g. 640"):
        tokenizer_lib.check_vocab_size(tok, 512)
    tokenizer_lib.check_vocab_size(tok, 600)
    # The same through the run's checks (model.vocab_size is 512 in the small config; a small
    # text corpus keeps it quick); nothing is written.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=r"600 tokens but model.vocab_size=512.*"
                                        r"--config.model.vocab_size=600"):
        loop.prepare(_cfg(gpt2_style_file, **{"data.source": "text", "data.paths": str(corpus)}),
                     str(workdir))
    assert not workdir.exists()


def test_short_training_run_with_the_pretrained_file(gpt2_style_file, tmp_path):
    workdir = str(tmp_path / "run")
    cfg = _cfg(gpt2_style_file, steps=12, eval_every=6, checkpoint_every=0,
               **{"model.vocab_size": 640, "data.bos_token": BOS,
                  "optimizer.learning_rate": 3e-3})
    run = loop.prepare(cfg, workdir)
    assert run.dataset.tokenizer.fingerprint() == tokenizer_lib.PretrainedTokenizer(
        gpt2_style_file, eos_token=EOT, bos_token=BOS).fingerprint()
    losses = loop.train(run, loop.restore(run))
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r.get("split") == "val"]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]   # it learns
    # bits per byte = eval NLL in bits over the UTF-8 bytes the targets stand for; with exact
    # byte-level counts that is eval_loss / ln 2 / (text bytes per target token of the val rows).
    tb = run.dataset.tokenizer.token_bytes
    tokens = nbytes = 0.0
    for batch in run.dataset.eval_batches():
        w, t = np.asarray(batch["weights"]), np.asarray(batch["targets"])
        tokens, nbytes = tokens + w.sum(), nbytes + (w * tb[t]).sum()
    assert 1.5 < nbytes / tokens < 6          # a 600-token BPE on Python source
    last = evals[-1]
    assert math.isfinite(last["bits_per_byte"]) and 0.3 < last["bits_per_byte"] < 8
    np.testing.assert_allclose(last["bits_per_byte"],
                               last["eval_loss"] * tokens / nbytes / math.log(2), rtol=1e-4)
    # A pretrained file is read from its path: nothing is cached in the workdir.
    assert not os.path.exists(os.path.join(workdir, "tokenizer.json"))
