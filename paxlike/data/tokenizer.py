"""Tokenizers: byte level (default), byte-level BPE trained locally with `tokenizers`, and any
pretrained `tokenizers` JSON file (GPT-2's, Llama-3's, ...: `data.tokenizer=/path/to/tokenizer.json`).

All expose the same small interface the trainer needs: vocab_size, eos_id, encode/decode, and
`token_bytes` (UTF-8 bytes each id stands for, 0 for special tokens) so eval can report bits per byte
independently of the tokenizer. `encode_docs` turns a list of documents into one flat id stream with
an EOS after every document (and, for a pretrained file with `data.bos_token`, a BOS before it),
vectorised so the whole stdlib takes about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time

import numpy as np
from absl import logging

from paxlike import storage
from paxlike.errors import UserError

TOKENIZERS = ('byte', 'bpe')   # the names; any other value is a pretrained file's path
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
        return _encode_stream(self._tok, texts, self.vocab_size, self.eos_id)

    def fingerprint(self) -> str:
        return 'bpe-' + hashlib.sha256(self._json.encode()).hexdigest()[:16]


def _encode_stream(tok, texts: list[str], vocab_size: int, eos_id: int, bos_id: int | None = None,
                   what: str = 'BPE') -> tuple[np.ndarray, np.ndarray]:
    """[BOS] ids EOS of every document, concatenated, with the exclusive end of each document."""
    dtype = np.uint16 if vocab_size <= 2**16 else np.int32
    pieces, lengths = [], []
    eos = np.array([eos_id], dtype)
    bos = None if bos_id is None else np.array([bos_id], dtype)
    extra = 1 if bos is None else 2
    chunk = 2048   # bounds the memory of Encoding objects alive at once
    t0, last = time.time(), time.time()
    for start in range(0, len(texts), chunk):
        batch = tok.encode_batch_fast(texts[start:start + chunk], add_special_tokens=False)
        for enc in batch:
            if bos is not None:
                pieces.append(bos)
            pieces.append(np.asarray(enc.ids, dtype))
            pieces.append(eos)
            lengths.append(len(enc.ids) + extra)
        if time.time() - last > 10:
            last = time.time()
            logging.info('data: %s-encoded %d/%d documents (%.0f s)',
                         what, start + len(batch), len(texts), last - t0)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    return stream, np.cumsum(np.asarray(lengths, np.int64))


# ------------------------------------------------------------------ pretrained tokenizer files

def is_pretrained(name) -> bool:
    """Whether a data.tokenizer value names a pretrained tokenizer file (or a directory holding
    tokenizer.json) rather than one of TOKENIZERS: it ends in .json, holds a path separator, or
    exists."""
    return (isinstance(name, str) and name not in TOKENIZERS and bool(name.strip())
            and (name.endswith('.json') or '/' in name or os.sep in name
                 or os.path.exists(os.path.expanduser(name))))


def pretrained_file(name: str) -> str:
    """The JSON file a pretrained data.tokenizer value refers to."""
    path = os.path.expanduser(name)
    return os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path


def check_config(name, *, eos_token: str = '', bos_token: str = '') -> None:
    """The checks of data.tokenizer, data.eos_token and data.bos_token, run by the pipeline
    before it reads any data: for a pretrained file this loads it (a second or less, kept for
    `build_tokenizer`) so that a token name missing from it fails first."""
    if not (name in TOKENIZERS or is_pretrained(name)):
        raise UserError(f'data.tokenizer must be one of {", ".join(TOKENIZERS)}; got {name!r} '
                        '(or the path of a pretrained `tokenizers` JSON file such as '
                        '/path/to/tokenizer.json, or of a directory holding one)')
    for key, value in (('eos_token', eos_token), ('bos_token', bos_token)):
        if not isinstance(value, str):
            raise UserError(f'data.{key} must be a string (a token of the tokenizer file); '
                            f'got {value!r}')
    if name in TOKENIZERS:
        if eos_token or bos_token:
            raise UserError(
                f'data.eos_token / data.bos_token name tokens of a pretrained tokenizer file '
                f'(data.tokenizer=/path/to/tokenizer.json); the {name} tokenizer has its own EOS '
                'and no BOS: leave them empty')
        return
    path = pretrained_file(name)
    if not os.path.isfile(path):
        raise UserError(f'data.tokenizer={name!r}: no tokenizer file {path!r} (give the path of a '
                        '`tokenizers` JSON file such as tokenizer.json, or of a directory '
                        'holding one)')
    _load_pretrained(path, eos_token, bos_token)   # the token names, before any data is read


_last_loaded: dict = {}   # one entry: the file check_config loaded, for build_tokenizer to reuse


def _load_pretrained(path: str, eos_token: str, bos_token: str) -> 'PretrainedTokenizer':
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, eos_token, bos_token)
    if key not in _last_loaded:
        tok = PretrainedTokenizer(path, eos_token=eos_token, bos_token=bos_token)
        _last_loaded.clear()
        _last_loaded[key] = tok
    return _last_loaded[key]


def _special_tokens(tok) -> list[str]:
    return [t.content for _, t in sorted(tok.get_added_tokens_decoder().items()) if t.special]


def _components(spec, part: str) -> list[dict]:
    """Every component (dict with a "type") inside `spec[part]`, Sequences flattened."""
    found, todo = [], [spec.get(part)]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if 'type' in node:
                found.append(node)
            todo.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            todo.extend(node)
    return found


_BYTE_FALLBACK = re.compile(r'<0x[0-9A-Fa-f]{2}>\Z')


def pretrained_token_bytes(tok, spec: dict, vocab_size: int) -> tuple[np.ndarray, bool]:
    """UTF-8 bytes of text each id stands for, and whether that count is exact.

    Byte-level BPE (GPT-2, Llama-3, ...; a ByteLevel pre-tokenizer or decoder): each character of a
    vocabulary token is one byte, so the count is exact (up to an added prefix space, if the file
    asks for one). Otherwise (SentencePiece-style, WordPiece, Unigram) the token's text is measured
    after what its decoder would substitute: a Metaspace or `Replace` marker (e.g. "▁") counts as the
    text it stands for (a space), a byte-fallback token <0xAB> as one byte, a WordPiece continuation
    prefix ("##") as nothing; spaces a decoder inserts between words, a normalizer's changes and a
    prepended "▁" are not counted, so bits per byte is then approximate (`encode_docs` logs by how
    much on the actual data). Special tokens count 0 bytes, other added tokens their own text.
    """
    byte_level = any(c.get('type') == 'ByteLevel'
                     for part in ('pre_tokenizer', 'decoder') for c in _components(spec, part))
    model = spec.get('model') or {}
    subs = {}
    for c in _components(spec, 'pre_tokenizer') + _components(spec, 'decoder'):
        if c.get('type') == 'Metaspace':
            subs[c.get('replacement', '\u2581')] = ' '
    for c in _components(spec, 'decoder'):
        pattern = c.get('pattern')
        if c.get('type') == 'Replace' and isinstance(pattern, dict) and 'String' in pattern:
            subs[pattern['String']] = c.get('content', '')
    prefix = model.get('continuing_subword_prefix') if model.get('type') == 'WordPiece' else None
    byte_fallback = bool(model.get('byte_fallback'))
    alphabet = set()
    if byte_level:
        from tokenizers import pre_tokenizers
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    counts = np.zeros(vocab_size, np.int32)
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        if byte_level and alphabet.issuperset(token):
            counts[i] = len(token)
        elif byte_fallback and _BYTE_FALLBACK.match(token):
            counts[i] = 1
        else:
            if prefix and token.startswith(prefix) and len(token) > len(prefix):
                token = token[len(prefix):]
            for marker, text in subs.items():
                token = token.replace(marker, text)
            counts[i] = len(token.encode('utf-8'))
    # Added tokens are matched in the raw text: special ones stand for no text, others for theirs.
    for i, added in tok.get_added_tokens_decoder().items():
        if i < vocab_size:
            counts[i] = 0 if added.special else len(added.content.encode('utf-8'))
    return counts, byte_level


class PretrainedTokenizer:
    """A pretrained `tokenizers` JSON file (GPT-2's, Llama-3's, SentencePiece conversions, ...),
    with the document-end token (`data.eos_token`) and optional document-start token
    (`data.bos_token`) named by the config.

    Documents are encoded without the file's post-processor (`add_special_tokens=False`: a
    template's BOS is added, if asked, by `encode_docs`), and a special token's text inside a
    document (e.g. a literal "<|endoftext|>") is encoded as ordinary text: only the pipeline
    places document boundaries. The fingerprint is a hash of the file's bytes and the two names,
    not of its path.
    """

    name = 'pretrained'
    unsaved = None   # nothing to write to the workdir: the file is read from its path each run

    def __init__(self, path: str, *, eos_token: str, bos_token: str = ''):
        from tokenizers import Tokenizer
        try:
            with open(path, 'rb') as f:
                raw = f.read()
            spec = json.loads(raw)
            tok = Tokenizer.from_str(raw.decode('utf-8'))
        except OSError as e:
            raise UserError(f'cannot read the tokenizer file {path}: {e.strerror or e}') from None
        except Exception as e:  # JSON errors; tokenizers raises a plain Exception for bad files
            raise UserError(f'cannot load the tokenizer file {path}: {str(e)[:300]} (data.tokenizer '
                            'must be a JSON file of the `tokenizers` library, e.g. a model\'s '
                            'tokenizer.json)') from None
        tok.encode_special_tokens = True
        self._tok, self.path = tok, path
        ids = tok.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        self.eos_id = self._token_id('eos_token', eos_token)
        self.bos_id = self._token_id('bos_token', bos_token) if bos_token else None
        self.token_bytes, self.exact_bytes = pretrained_token_bytes(tok, spec, self.vocab_size)
        self.token_bytes[self.eos_id] = 0
        if self.bos_id is not None:
            self.token_bytes[self.bos_id] = 0
        self.bytes_ratio = None   # counted / actual UTF-8 bytes of the last encode_docs input
        self._fingerprint = 'pretrained-' + hashlib.sha256(
            raw + b'\0' + eos_token.encode() + b'\0' + bos_token.encode()).hexdigest()[:16]

    def _token_id(self, key: str, token: str) -> int:
        i = self._tok.token_to_id(token) if token else None
        if i is not None:
            return i
        specials = _special_tokens(self._tok)
        shown = ', '.join(repr(t) for t in specials[:8])
        if len(specials) > 8:
            shown += f' (and {len(specials) - 8} more)'
        have = f'its special tokens: {shown}' if specials else 'it has no special tokens'
        example = specials[0] if specials else '<|endoftext|>'
        if not token:
            raise UserError(f'a pretrained tokenizer needs data.eos_token: the token of {self.path} '
                            f'that ends each document, e.g. --config.data.eos_token=\'{example}\'; '
                            f'{have}')
        raise UserError(f'data.{key}={token!r} is not in the vocabulary of {self.path}; {have}')

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        stream, ends = _encode_stream(self._tok, texts, self.vocab_size, self.eos_id, self.bos_id,
                                      'pretrained-tokenizer')
        # How well token_bytes counts the text: bits per byte is exact only when it does.
        actual = sum(len(t.encode('utf-8')) for t in texts)
        counted = int(np.bincount(stream, minlength=self.vocab_size)[:self.vocab_size]
                      .astype(np.int64) @ self.token_bytes.astype(np.int64))
        if actual:
            self.bytes_ratio = counted / actual
            if abs(self.bytes_ratio - 1) > 0.01:
                logging.warning('data: the tokens of %s count %.3fx the UTF-8 bytes of the text '
                                '(a normalizer, prefix spaces or word joins its decoder adds): '
                                'bits_per_byte is approximate by that factor', self.path,
                                self.bytes_ratio)
        return stream, ends

    def fingerprint(self) -> str:
        return self._fingerprint


def check_vocab_size(tok, model_vocab_size: int) -> None:
    """Refuses a tokenizer with more ids than the model's embedding has rows."""
    if tok.vocab_size <= model_vocab_size:
        return
    what = (f'the tokenizer file {tok.path}' if getattr(tok, 'path', None)
            else f'the {tok.name} tokenizer')
    rounded = -(-tok.vocab_size // 128) * 128
    hint = ' (or lower data.bpe_vocab_size)' if tok.name == 'bpe' else ''
    raise UserError(f'{what} has {tok.vocab_size} tokens but model.vocab_size={model_vocab_size}: '
                    f'set --config.model.vocab_size={tok.vocab_size} or more{hint}, e.g. '
                    f'{rounded} (a multiple of 128 shards evenly)')


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
    # several processes writing the same file to a shared workdir is also safe. An object store
    # (gs://) writes an object whole.
    if not storage.is_local(path):
        storage.write_atomically(path, text)
        return
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
                    train_texts_fn, settings: dict, eos_token: str = '', bos_token: str = ''):
    """Returns a tokenizer. For BPE, loads `<workdir>/tokenizer.json` when it was trained with the same
    `settings` (data source and vocab size), else trains on `train_texts_fn()`; `save_if_new`
    then writes it there. Any other name than byte / bpe is a pretrained file's path (or a
    directory holding tokenizer.json), loaded with `eos_token` / `bos_token` as its document
    end / start.
    """
    check_config(name, eos_token=eos_token, bos_token=bos_token)
    if name == 'byte':
        return ByteTokenizer()
    if name != 'bpe':
        return _load_pretrained(pretrained_file(name), eos_token, bos_token)
    if not isinstance(bpe_vocab_size, int) or not 257 <= bpe_vocab_size <= 1_000_000:
        raise UserError(f'data.bpe_vocab_size must be an integer in [257, 1000000]; '
                        f'got {bpe_vocab_size!r} (257 = the byte alphabet plus EOS)')
    from tokenizers import Tokenizer
    settings = dict(settings, bpe_vocab_size=bpe_vocab_size)
    path = storage.join(workdir, TOKENIZER_FILE) if workdir else None
    meta_path = storage.join(workdir, TOKENIZER_META_FILE) if workdir else None
    if path and storage.exists(path):
        try:
            saved = json.loads(storage.read_text(meta_path))
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
            tok = Tokenizer.from_str(storage.read_text(path))
        except Exception as e:  # tokenizers raises a plain Exception for bad files
            raise UserError(f'cannot load the cached tokenizer {path}: {e}; delete it to retrain') \
                from None
        logging.info('data: reusing the BPE tokenizer cached in %s', path)
        return BPETokenizer(tok)
    tok = BPETokenizer(_train_bpe(train_texts_fn(), bpe_vocab_size))
    if path:
        tok.unsaved = (path, meta_path, settings)
    return tok


def for_run(cfg_data, workdir: str):
    """The tokenizer a finished or running training run used (for sampling from it): bytes, the
    BPE saved in its workdir, or its pretrained file."""
    name = cfg_data.get('tokenizer', 'byte')
    if name == 'byte':
        return ByteTokenizer()
    if name != 'bpe':
        return _load_pretrained(pretrained_file(name), cfg_data.get('eos_token', ''),
                                cfg_data.get('bos_token', ''))
    path = storage.join(workdir, TOKENIZER_FILE)
    if not storage.exists(path):
        raise UserError(f'the run in {workdir} used a BPE tokenizer, but {path} is missing '
                        '(it is written when the run starts); the run cannot be decoded without it')
    from tokenizers import Tokenizer
    try:
        return BPETokenizer(Tokenizer.from_str(storage.read_text(path)))
    except Exception as e:  # tokenizers raises a plain Exception for bad files
        raise UserError(f'cannot load the run\'s tokenizer {path}: {e}') from None


def save_if_new(tok, workdir: str | None) -> None:
    """Writes a freshly trained BPE tokenizer to the workdir. Separate from `build_tokenizer` so the
    caller can finish validating its input first: a bad input must leave the workdir untouched."""
    pending = getattr(tok, 'unsaved', None)
    if not pending:
        return
    path, meta_path, settings = pending
    try:
        storage.makedirs(workdir)
        _atomic_write(meta_path, json.dumps(settings, sort_keys=True))
        _atomic_write(path, tok._json)
    except OSError as e:
        raise UserError(f'cannot write the tokenizer into the workdir {workdir!r}: '
                        f'{e.strerror or e}; check that --workdir is a writable directory') from None
    tok.unsaved = None
    logging.info('data: saved the BPE tokenizer to %s', path)
