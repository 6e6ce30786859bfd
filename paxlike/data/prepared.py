"""Prepared data: a corpus tokenized and packed ONCE into sharded ArrayRecord files: the format,
and reading it (writing it: paxlike/data/prepare.py).

    python -m paxlike.data prepare --source=text --paths='corpus/*.txt' --tokenizer=byte \\
        --seq_len=128 --out=DIR
    python -m paxlike.train ... --config.data.source=prepared --config.data.paths=DIR

Record unit: one packed row. Record r of a split is row r of the in-memory pipeline
(packing.PackedSplit): the window stream[r*L : r*L+L+1] of the split's token stream (its documents
in source order, each followed by EOS) plus where documents start inside the window. So the grain
order of the in-memory pipeline (`range(rows).shuffle(seed).repeat().batch(B)`) applies unchanged:
global batch k is still a fixed function of (data, seed, k), its row ids are record numbers, and a
process reads only the records of its own rows (`Dataset._local_train_batches`). The price: a
prepared directory is for one seq_len (the run checks it).

Record layout (fixed size for a given seq_len and token dtype; W = seq_len + 1):
    uint32 little-endian   number of valid tokens n (W, except in a split's last row)
    W tokens               token_dtype from the manifest ('<u2' or '<u4'), zero after n
    ceil(W / 8) bytes      bit c (little bit order) = a document starts at column c >= 1 (the
                           token before it was the previous document's EOS); bit 0 is always 0

Directory:
    manifest.json          written last: its presence marks a complete directory (fields below)
    train-00000.array_record ...  val-00000.array_record ...   (group_size:1, for random access)
    tokenizer.json, tokenizer_meta.json   for --tokenizer=bpe (the one trained on the train split)

The manifest's `splits.<name>.shards` is the index: shard i holds rows
[first_row, first_row + rows); `grain.sources.ArrayRecordDataSource` over the shards in order reads
row r as its record r. Everything here goes through `etils.epath`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from absl import logging
from etils import epath

from paxlike.data import packing
from paxlike.data import tokenizer as tokenizer_lib
from paxlike.errors import UserError

FORMAT = 'paxlike-prepared'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
SPLITS = ('train', 'val')
# ---------------------------------------------------------------------------- record layout

@dataclasses.dataclass(frozen=True)
class RecordLayout:
    seq_len: int
    token_dtype: str    # numpy dtype string, little-endian: '<u2' or '<u4'

    @property
    def width(self) -> int:
        return self.seq_len + 1

    @property
    def token_bytes(self) -> int:
        return self.width * np.dtype(self.token_dtype).itemsize

    @property
    def mask_bytes(self) -> int:
        return (self.width + 7) // 8

    @property
    def size(self) -> int:
        return 4 + self.token_bytes + self.mask_bytes

    def encode(self, tokens: np.ndarray, starts: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
        """[n, W] tokens, [n, W] bool document starts, [n] valid counts → [n, size] uint8."""
        n = tokens.shape[0]
        out = np.empty((n, self.size), np.uint8)
        out[:, :4] = np.asarray(n_tokens, '<u4').reshape(n, 1).view(np.uint8)
        out[:, 4:4 + self.token_bytes] = (np.ascontiguousarray(tokens, self.token_dtype)
                                          .view(np.uint8).reshape(n, -1))
        out[:, 4 + self.token_bytes:] = np.packbits(starts, axis=1, bitorder='little')
        return out

    def decode(self, records) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Records (bytes) → tokens int32 [n, W], valid bool [n, W], document number [n, W]
        (counted from 0 inside each row; -1 where not valid)."""
        n, W = len(records), self.width
        raw = np.frombuffer(b''.join(records), np.uint8)
        if raw.size != n * self.size:
            raise UserError(f'a prepared record is {raw.size // max(n, 1)} bytes, expected '
                            f'{self.size}: the prepared data is damaged or of another seq_len; '
                            're-run prepare')
        raw = raw.reshape(n, self.size)
        n_tok = raw[:, :4].copy().view('<u4')[:, 0].astype(np.int64)
        tok = raw[:, 4:4 + self.token_bytes].copy().view(self.token_dtype).astype(np.int32)
        bits = np.unpackbits(raw[:, 4 + self.token_bytes:], axis=1, count=W, bitorder='little')
        valid = np.arange(W)[None, :] < n_tok[:, None]
        doc = np.where(valid, np.cumsum(bits, axis=1, dtype=np.int32), -1)
        tok[~valid] = 0
        return tok, valid, doc


def token_dtype(vocab_size: int) -> str:
    return '<u2' if vocab_size <= 2**16 else '<u4'


# ---------------------------------------------------------------------------- reading

def read_manifest(path) -> dict:
    root = epath.Path(path)
    fix = f'run `python -m paxlike.data prepare ... --out={path}` first, or fix data.paths'
    if not root.exists():
        raise UserError(f'prepared data directory {str(path)!r} does not exist; {fix}')
    if not (root / MANIFEST).exists():
        raise UserError(f'{str(path)!r} has no {MANIFEST}: it is not prepared data, or prepare did '
                        'not finish there; (re)run `python -m paxlike.data prepare ... '
                        f'--out={path} --overwrite`')
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {root / MANIFEST}: {e}; re-run prepare with --overwrite') \
            from None
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
        raise UserError(f'{root / MANIFEST} is not a paxlike prepared-data manifest')
    if manifest.get('format_version') != FORMAT_VERSION:
        raise UserError(f'{root} was prepared in format version {manifest.get("format_version")}; '
                        f'this paxlike reads version {FORMAT_VERSION}: re-run prepare with '
                        'this version (--overwrite), or use the paxlike that wrote it')
    return manifest


class PreparedSplit:
    """One split of a prepared directory, with the interface of packing.PackedSplit that the
    pipeline uses (`num_rows`, `num_tokens`, `seq_len`, `rows(row_ids)`). `rows` reads exactly
    the records of the non-padding row ids asked for, in one batched `__getitems__` call."""

    def __init__(self, root: epath.Path, info: dict, layout: RecordLayout):
        import grain
        self.seq_len, self.layout = layout.seq_len, layout
        self.num_rows, self.num_tokens = int(info['rows']), int(info['tokens'])
        self.num_documents = int(info['documents'])
        paths = []
        for shard in info['shards']:
            path = root / shard['file']
            try:
                size = int(path.stat().length)
            except OSError:
                raise UserError(f'the prepared shard {path} is missing; the prepared data is '
                                'incomplete: re-run prepare with --overwrite') from None
            if size != shard['bytes']:
                raise UserError(f'the prepared shard {path} is {size} bytes, the manifest says '
                                f'{shard["bytes"]}: re-run prepare with --overwrite')
            # "file[0:n]": the record count from the manifest, so no shard is opened up front.
            paths.append(f'{os.fspath(path)}[0:{shard["rows"]}]')
        self.source = grain.sources.ArrayRecordDataSource(paths) if paths else None

    def rows(self, row_ids) -> dict[str, np.ndarray]:
        row_ids = np.asarray(row_ids, np.int64).reshape(-1)
        if np.any((row_ids < packing.PADDING_ROW) | (row_ids >= self.num_rows)):
            raise IndexError(f'row ids out of range [0, {self.num_rows}): {row_ids}')
        n, W = row_ids.shape[0], self.layout.width
        real = row_ids != packing.PADDING_ROW
        tok = np.zeros((n, W), np.int32)
        valid = np.zeros((n, W), bool)
        doc = np.full((n, W), -1, np.int32)
        if real.any():
            records = self.source.__getitems__(row_ids[real].tolist())
            tok[real], valid[real], doc[real] = self.layout.decode(records)
        return packing.rows_from_windows(tok, valid, doc, self.seq_len)


def _load_bpe(text: str):
    from tokenizers import Tokenizer
    return tokenizer_lib.BPETokenizer(Tokenizer.from_str(text))


def _tokenizer_flags(mt: dict, root: epath.Path) -> str:
    """The --config.data.* flags that select the tokenizer a prepared directory was made with."""
    if mt['argument'] in tokenizer_lib.TOKENIZERS:
        flags = f'--config.data.tokenizer={mt["argument"]}'
        if mt['argument'] == 'bpe':
            flags += f' --config.data.bpe_vocab_size={mt["bpe_vocab_size"]}'
        return flags
    flags = (f'--config.data.tokenizer={root / tokenizer_lib.TOKENIZER_FILE} '
             f'--config.data.eos_token={mt["eos_token"]}')
    if mt.get('bos_token'):
        flags += f' --config.data.bos_token={mt["bos_token"]}'
    return flags


def _run_tokenizer(manifest: dict, root: epath.Path, tok_name, *, bpe_vocab_size, eos_token,
                   bos_token, workdir):
    """The run's tokenizer, checked against the one the data was prepared with (fingerprint)."""
    mt = manifest['tokenizer']
    made_with = (f'the prepared data at {root} was tokenized with --tokenizer={mt["argument"]} '
                 f'(fingerprint {mt["fingerprint"]})')
    fix = (f'set {_tokenizer_flags(mt, root)}, or re-run `python -m paxlike.data prepare ... '
           f'--tokenizer={tok_name}` into another --out')
    if tok_name == 'bpe':
        if mt['argument'] != 'bpe' or bpe_vocab_size != mt['bpe_vocab_size']:
            raise UserError(f'{made_with}, but this run has data.tokenizer=bpe with '
                            f'data.bpe_vocab_size={bpe_vocab_size}: {fix}')
        # The BPE prepare trained is stored beside the data; it becomes the run's.
        try:
            tok = _load_bpe((root / tokenizer_lib.TOKENIZER_FILE).read_text())
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise UserError(f'cannot load {root / tokenizer_lib.TOKENIZER_FILE}: {e}; re-run '
                            'prepare with --overwrite') from None
        if tok.fingerprint() != mt['fingerprint']:
            raise UserError(f'{root / tokenizer_lib.TOKENIZER_FILE} is not the tokenizer of '
                            f'{root / MANIFEST} (fingerprint {tok.fingerprint()} vs '
                            f'{mt["fingerprint"]}); re-run prepare with --overwrite')
        if workdir:
            cached = os.path.join(workdir, tokenizer_lib.TOKENIZER_FILE)
            if os.path.exists(cached):
                try:
                    with open(cached) as f:
                        mine = _load_bpe(f.read())
                except Exception as e:  # noqa: BLE001
                    raise UserError(f'cannot load the cached tokenizer {cached}: {e}') from None
                if mine.fingerprint() != tok.fingerprint():
                    raise UserError(f'the workdir holds another tokenizer ({cached}, fingerprint '
                                    f'{mine.fingerprint()}) than {made_with}: its checkpoints '
                                    'use other token ids; use a new --workdir for this data')
                return mine
            # Written to the workdir (save_if_new) once the run's checks passed, like a newly
            # trained one, so the run's tokenizer.json is there as with in-memory BPE.
            tok.unsaved = (cached, os.path.join(workdir, tokenizer_lib.TOKENIZER_META_FILE),
                           {'source': 'prepared', 'paths': str(root),
                            'fingerprint': tok.fingerprint(), 'bpe_vocab_size': bpe_vocab_size})
        return tok

    def no_training():
        raise UserError(f'{made_with}: {fix}')
    tok = tokenizer_lib.build_tokenizer(tok_name, bpe_vocab_size=bpe_vocab_size, workdir=workdir,
                                        train_texts_fn=no_training, settings={},
                                        eos_token=eos_token, bos_token=bos_token)
    if tok.fingerprint() != mt['fingerprint']:
        raise UserError(f'{made_with}, but this run\'s data.tokenizer={tok_name} has fingerprint '
                        f'{tok.fingerprint()}: {fix}')
    return tok


def open_prepared(path: str, *, seq_len: int, tokenizer: str, bpe_vocab_size: int,
                  val_fraction: float, workdir: str | None, eos_token: str = '',
                  bos_token: str = ''):
    """(train split, val split or None, tokenizer, description) of a prepared directory, after
    checking that it fits the run (seq_len, tokenizer). Used by pipeline.build."""
    specs = [p.strip() for p in (path or '').split(',') if p.strip()]
    if len(specs) != 1:
        raise UserError("data.source='prepared' takes one directory in data.paths (written by "
                        f'`python -m paxlike.data prepare --out=DIR`); got {path!r}')
    path = os.path.expanduser(specs[0]) if '://' not in specs[0] else specs[0]
    manifest = read_manifest(path)
    root = epath.Path(path)
    if manifest['seq_len'] != seq_len:
        raise UserError(f'the prepared data at {path} has rows of seq_len {manifest["seq_len"]}, '
                        f'but this run has seq_len={seq_len}: set --config.seq_len='
                        f'{manifest["seq_len"]}, or re-run `python -m paxlike.data prepare ... '
                        f'--seq_len={seq_len}` into another --out')
    tok = _run_tokenizer(manifest, root, tokenizer, bpe_vocab_size=bpe_vocab_size,
                         eos_token=eos_token, bos_token=bos_token, workdir=workdir)
    held_out = manifest['split']['val_fraction']
    if not math.isclose(float(val_fraction), held_out):
        logging.info('data: data.val_fraction=%s does not apply: the prepared data at %s holds out '
                     '%s (fixed by prepare)', val_fraction, path, held_out)
    layout = RecordLayout(seq_len, manifest['record']['token_dtype'])
    train = PreparedSplit(root, manifest['splits']['train'], layout)
    val_info = manifest['splits'].get('val')
    val = PreparedSplit(root, val_info, layout) if val_info and val_info['rows'] else None
    description = f'{manifest["source"]["description"]} (prepared at {path})'
    return train, val, tok, description
