"""Tokenizers: byte level (default) and byte-level BPE trained locally with `tokenizers`.

Both expose the same small interface the trainer needs: vocab_size, eos_id, encode/decode, and
`token_bytes` (UTF-8 bytes each id stands for, 0 for special tokens) so eval can report bits per byte
independently of the tokenizer. `encode_docs` turns a list of documents into one flat id stream with
an EOS after every document, vectorised so the whole stdlib takes about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import numpy as np
from absl import logging

from paxlike.errors import UserError

TOKENIZERS = ('byte', 'bpe')
EOS_TOKEN = '<|eos|>'
TOKENIZER_FILE = 'tokenizer.json'
# Written next to tokenizer.json: the settings it was trained with, so a rerun in the same workdir
# can tell "reuse" from "this workdir was made for different data".
TOKENIZER_META_FILE = 'tokenizer_meta.json'


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; EOS is 256."""

    name = 'byte'
    vocab_size = 257
    eos_id = 256

    def __init__(self):
        self.token_bytes = np.ones(self.vocab_size, np.int32)
        self.token_bytes[self.eos_id] = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode('utf-8'))

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode('utf-8', errors='replace')

    def encode_docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = [t.encode('utf-8') for t in texts]
        lengths = np.fromiter((len(b) + 1 for b in encoded), np.int64, len(encoded))
        ends = np.cumsum(lengths)
        stream = np.full(int(ends[-1]) if len(ends) else 0, self.eos_id, np.uint16)
        is_byte = np.ones(stream.shape, bool)
        is_byte[ends - 1] = False   # the slot after each document holds its EOS
        stream[is_byte] = np.frombuffer(b''.join(encoded), np.uint8)
        return stream, ends

    def fingerprint(self) -> str:
        return 'byte-257'


class BPETokenizer:
    """A `tokenizers.Tokenizer` with a ByteLevel pre-tokenizer/decoder and one EOS special token."""

    name = 'bpe'
    unsaved = None   # (path, meta_path, settings) while a freshly trained tokenizer awaits saving

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eos = tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise UserError(f'the cached BPE tokenizer has no {EOS_TOKEN} token; delete it and rerun')
        self.eos_id = eos
        # ByteLevel maps each byte to one printable character, so a token's byte length is its
        # string length (special tokens stand for no text: 0).
        self.token_bytes = np.zeros(self.vocab_size, np.int32)
        specials = {t.content for t in tok.get_added_tokens_decoder().values()}
        for token, i in tok.get_vocab(with_added_tokens=True).items():
            self.token_bytes[i] = 0 if token in specials else len(token)
        self._json = tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        dtype = np.uint16 if self.vocab_size <= 2**16 else np.int32
        pieces, lengths = [], []
        eos = np.array([self.eos_id], dtype)
        chunk = 2048   # bounds the memory of Encoding objects alive at once
        t0, last = time.time(), time.time()
        for start in range(0, len(texts), chunk):
            batch = self._tok.encode_batch_fast(texts[start:start + chunk], add_special_tokens=False)
            for enc in batch:
                pieces.append(np.asarray(enc.ids, dtype))
                pieces.append(eos)
                lengths.append(len(enc.ids) + 1)
            if time.time() - last > 10:
                last = time.time()
                logging.info('data: BPE-encoded %d/%d documents (%.0f s)',
                             start + len(batch), len(texts), last - t0)
        stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
        return stream, np.cumsum(np.asarray(lengths, np.int64))

    def fingerprint(self) -> str:
        return 'bpe-' + hashlib.sha256(self._json.encode()).hexdigest()[:16]


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
        # The full byte alphabet keeps every input encodable, even bytes absent from training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.time()
    logging.info('data: training a BPE tokenizer (vocab %d) on %d documents...', vocab_size, len(texts))
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    logging.info('data: BPE tokenizer trained in %.1f s (vocab %d)', time.time() - t0,
                 tok.get_vocab_size(with_added_tokens=True))
    return tok


def _atomic_write(path: str, text: str) -> None:
    # tmp + rename: a run killed mid-write never leaves a truncated tokenizer that a rerun would load;
    # several processes writing the same file to a shared workdir is also safe.
    d = os.path.dirname(path) or '.'
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.' + os.path.basename(path) + '.')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        os.chmod(tmp, 0o644)   # mkstemp makes it private; it is an ordinary output of the run
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_tokenizer(name: str, *, bpe_vocab_size: int, workdir: str | None,
                    train_texts_fn, settings: dict):
    """Returns a tokenizer. For BPE, loads `<workdir>/tokenizer.json` when it was trained with the same
    `settings` (data source and vocab size), else trains on `train_texts_fn()`; `save_if_new`
    then writes it there.
    """
    if name not in TOKENIZERS:
        raise UserError(f'data.tokenizer must be one of {", ".join(TOKENIZERS)}; got {name!r}')
    if name == 'byte':
        return ByteTokenizer()
    if not isinstance(bpe_vocab_size, int) or not 257 <= bpe_vocab_size <= 1_000_000:
        raise UserError(f'data.bpe_vocab_size must be an integer in [257, 1000000]; '
                        f'got {bpe_vocab_size!r} (257 = the byte alphabet plus EOS)')
    from tokenizers import Tokenizer
    settings = dict(settings, bpe_vocab_size=bpe_vocab_size)
    path = os.path.join(workdir, TOKENIZER_FILE) if workdir else None
    meta_path = os.path.join(workdir, TOKENIZER_META_FILE) if workdir else None
    if path and os.path.exists(path):
        try:
            with open(meta_path) as f:
                saved = json.load(f)
        except FileNotFoundError:
            saved = settings   # a tokenizer.json put there by hand: use it as given
            logging.warning('data: %s has no %s; using it as given', path, TOKENIZER_META_FILE)
        except (OSError, ValueError):
            saved = None
        if saved != settings:
            # Retraining would silently change the meaning of every token id of a run that may
            # already have checkpoints in this workdir, so refuse instead.
            raise UserError(
                f'{path} was trained with different data settings ({saved} vs now {settings}); '
                'use a new --workdir, or delete tokenizer.json there to retrain it')
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a plain Exception for bad files
            raise UserError(f'cannot load the cached tokenizer {path}: {e}; delete it to retrain') \
                from None
        logging.info('data: reusing the BPE tokenizer cached in %s', path)
        return BPETokenizer(tok)
    tok = BPETokenizer(_train_bpe(train_texts_fn(), bpe_vocab_size))
    if path:
        tok.unsaved = (path, meta_path, settings)
    return tok


def save_if_new(tok, workdir: str | None) -> None:
    """Writes a freshly trained BPE tokenizer to the workdir. Separate from `build_tokenizer` so the
    caller can finish validating its input first: a bad input must leave the workdir untouched."""
    pending = getattr(tok, 'unsaved', None)
    if not pending:
        return
    path, meta_path, settings = pending
    try:
        os.makedirs(workdir, exist_ok=True)
        _atomic_write(meta_path, json.dumps(settings, sort_keys=True))
        _atomic_write(path, tok._json)
    except OSError as e:
        raise UserError(f'cannot write the tokenizer into the workdir {workdir!r}: '
                        f'{e.strerror or e}; check that --workdir is a writable directory') from None
    tok.unsaved = None
    logging.info('data: saved the BPE tokenizer to %s', path)
