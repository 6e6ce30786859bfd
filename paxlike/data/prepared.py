"""Prepared data: a corpus tokenized and packed ONCE into sharded ArrayRecord files.

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
import logging as std_logging
import math
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import logging
from etils import epath

from paxlike.data import packing, sources
from paxlike.data import tokenizer as tokenizer_lib
from paxlike.errors import UserError

FORMAT = 'paxlike-prepared'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
SPLITS = ('train', 'val')
COMPRESSIONS = ('zstd:1', 'zstd:3', 'snappy', 'none')
DEFAULT_COMPRESSION = 'zstd:1'
DEFAULT_SHARD_MB = 256
# ArrayRecord's reader copies a shard's whole record index on every read call (measured: ~3 ns per
# record in the shard, 3.4 ms per call at 2**20 records), so shards also roll at this many rows.
MAX_ROWS_PER_SHARD = 2**16
# What prepare writes into --out; --overwrite removes only a directory made of these.
_OURS = re.compile(r'(manifest\.json(\.tmp)?|tokenizer\.json|tokenizer_meta\.json|'
                   r'(train|val)-\d{5}\.array_record|\.incoming)')
# New shards are written here first and moved up at the end, so that a prepare that fails half
# way (bad JSON on line 10**7, Ctrl-C) leaves the data already in --out as it was.
_INCOMING = '.incoming'
_CHUNK_CHARS = 4 << 20       # text tokenized at once: bounds the memory of a chunk
_CHUNK_DOCS = 8192


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


def finish_rows(tok: np.ndarray, valid: np.ndarray, doc: np.ndarray, L: int) -> dict:
    """The batch dict of packing.PackedSplit.rows from [n, L+1] tokens, validity and document
    numbers (only equality of neighbouring document numbers matters). Same rules as packing.py."""
    col = np.arange(L + 1, dtype=np.int64)
    inputs, targets = tok[:, :L], tok[:, 1:]
    d_in, d_tg = doc[:, :L], doc[:, 1:]
    v_in, v_tg = valid[:, :L], valid[:, 1:]
    weights = (v_tg & (d_in == d_tg)).astype(np.float32)
    c = col[None, :L]
    starts = v_in & ((c == 0) | (d_in != np.concatenate([d_in[:, :1], d_in[:, :-1]], axis=1)))
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32) * v_in
    seg_start_col = np.maximum.accumulate(np.where(starts, c, 0), axis=1)
    positions = ((c - seg_start_col) * v_in).astype(np.int32)
    return {
        'inputs': np.ascontiguousarray(inputs),
        'targets': np.ascontiguousarray(targets),
        'segment_ids': segment_ids.astype(np.int32),
        'positions': positions,
        'weights': weights,
    }


def token_dtype(vocab_size: int) -> str:
    return '<u2' if vocab_size <= 2**16 else '<u4'


# ---------------------------------------------------------------------------- writing

class _SplitWriter:
    """Packs one split's token stream into row records as it arrives and writes them to shards
    of at most `rows_per_shard` records. Holds at most one chunk of tokens plus one row."""

    def __init__(self, out: epath.Path, split: str, layout: RecordLayout, rows_per_shard: int,
                 options: str):
        self.out, self.split, self.layout = out, split, layout
        self.rows_per_shard, self.options = rows_per_shard, options
        self.shards: list[dict] = []
        self._writer = None
        self._buf = np.zeros(0, layout.token_dtype)   # tokens from absolute position _buf_start
        self._buf_start = 0
        self._ends = np.zeros(0, np.int64)            # pending absolute document ends
        self.tokens = 0          # tokens of the split so far (the stream length N)
        self.rows = 0            # records written
        self.documents = 0
        self.text_bytes = 0

    def add(self, stream: np.ndarray, ends: np.ndarray) -> None:
        """One tokenized chunk: its token stream and the cumulative ends of its documents."""
        self._buf = np.concatenate([self._buf, stream.astype(self.layout.token_dtype, copy=False)])
        self._ends = np.concatenate([self._ends, np.asarray(ends, np.int64) + self.tokens])
        self.tokens += int(stream.shape[0])
        self.documents += int(len(ends))
        self._emit(final=False)

    def _emit(self, final: bool) -> None:
        L, W = self.layout.seq_len, self.layout.width
        full = (self.tokens - W) // L + 1 if self.tokens >= W else 0   # rows with W tokens
        n_full = max(0, full - self.rows)
        # num_rows = ceil((N - 1) / L): the last row may hold fewer than W tokens (>= 2).
        total_rows = max(0, -(-(self.tokens - 1) // L))
        n = n_full + (1 if final and total_rows > self.rows + n_full else 0)
        if n == 0:
            return
        first = self.rows * L - self._buf_start           # buffer offset of the first row
        span = (n - 1) * L + W
        buf = self._buf[first:]
        is_start = np.zeros(span, bool)
        rel = self._ends - self._buf_start - first
        is_start[rel[(rel > 0) & (rel < min(span, buf.shape[0]))]] = True
        if buf.shape[0] < span:                           # the last, partial row
            buf = np.concatenate([buf, np.zeros(span - buf.shape[0], buf.dtype)])
        isz = buf.dtype.itemsize
        tokens = np.lib.stride_tricks.as_strided(buf, (n, W), (L * isz, isz), writeable=False)
        starts = np.lib.stride_tricks.as_strided(is_start, (n, W), (L, 1), writeable=False).copy()
        starts[:, 0] = False
        n_tok = np.minimum(self.tokens - (self.rows + np.arange(n)) * L, W)
        records = self.layout.encode(tokens, starts, n_tok)
        for i in range(n):
            if self._writer is None or self.shards[-1]['rows'] >= self.rows_per_shard:
                self._roll()
            self._writer.write(records[i].tobytes())
            self.shards[-1]['rows'] += 1
        self.rows += n
        keep = self.rows * L                              # the next row starts here
        self._buf = self._buf[keep - self._buf_start:].copy()
        self._buf_start = keep
        self._ends = self._ends[self._ends > keep]

    def _roll(self) -> None:
        self._close_shard()
        name = f'{self.split}-{len(self.shards):05d}.array_record'
        from array_record.python import array_record_module
        self._writer = array_record_module.ArrayRecordWriter(os.fspath(self.out / name),
                                                             self.options)
        self.shards.append({'file': name, 'first_row': self.rows, 'rows': 0})

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.shards[-1]['bytes'] = int((self.out / self.shards[-1]['file']).stat().length)

    def finish(self) -> dict:
        self._emit(final=True)
        self._close_shard()
        return {'documents': self.documents, 'tokens': self.tokens, 'rows': self.rows,
                'text_bytes': self.text_bytes, 'shards': self.shards}

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for s in self.shards:
            (self.out / s['file']).unlink(missing_ok=True)


class _Progress:
    """A progress line: tqdm on a terminal, else a log line every 10 s."""

    def __init__(self, total: int, unit: str, enabled: bool, what: str):
        self.t0 = time.time()
        self._last = self.t0
        self.total, self.unit, self.what = total, unit, what
        self._bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total or None, unit=unit, unit_scale=True, desc=what,
                             dynamic_ncols=True, file=sys.stderr)

    def update(self, consumed: int, tokens: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = consumed
            self._bar.set_postfix_str(f'{_si(tokens)} tokens', refresh=False)
            if time.time() - self._last > 0.5:
                self._bar.refresh()
                self._last = time.time()
            return
        now = time.time()
        if now - self._last >= 10:
            self._last = now
            pct = f' ({100 * consumed / self.total:.0f}%)' if self.total else ''
            print(f'{self.what}: {_si(consumed)}{self.unit} of {_si(self.total)}{self.unit}{pct}, '
                  f'{_si(tokens)} tokens, {tokens / (now - self.t0):,.0f} tokens/s',
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _si(x: float) -> str:
    for unit, div in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
        if abs(x) >= div:
            return f'{x / div:.1f}{unit}'
    return f'{x:.0f}'


class _TrainTexts:
    """The non-empty train documents' texts, streamed (a sized iterable for BPE training)."""

    def __init__(self, src: sources.DocumentSource, val_fraction: float, force_val, count: int):
        self.src, self.val_fraction, self.force_val = src, val_fraction, force_val
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        pairs, _ = self.src.split(self.val_fraction, self.force_val)
        for is_val, doc in pairs:
            if not is_val and doc.text:
                yield doc.text


def _check_out(out: epath.Path, overwrite: bool) -> list[epath.Path]:
    """The entries to delete before writing (only with --overwrite). Refuses a non-empty --out
    without --overwrite, and with it one that holds anything prepare did not write."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise UserError(f'--out {out} exists and is not a directory; choose another --out')
    entries = sorted(out.iterdir())
    if not entries:
        return []
    if not overwrite:
        raise UserError(f'--out {out} is not empty ({len(entries)} entries); pass --overwrite to '
                        'replace the prepared data there, or choose another --out')
    foreign = [e.name for e in entries if not _OURS.fullmatch(e.name)]
    if foreign:
        raise UserError(f'--out {out} holds files prepare did not write ({", ".join(foreign[:3])}'
                        f'{", ..." if len(foreign) > 3 else ""}); --overwrite only replaces '
                        'prepared data: choose another --out')
    return entries


# The shared readers (sources.py, tokenizer.py) name config keys; prepare's user types flags.
_AS_FLAGS = [
    (re.compile(r'--config\.data\.jsonl_field \(prepare: --field\)'), '--field'),
    (re.compile(r"data\.source='(\w+)'"), r'--source=\1'),
    (re.compile(r'(--config\.)?data\.jsonl_field\b'), '--field'),
    (re.compile(r'(--config\.)?data\.(paths|val_fraction|tokenizer|bpe_vocab_size|eos_token|'
                r'bos_token|source)\b'), r'--\2'),
]


def prepare(**kwargs) -> dict:
    """Tokenizes and packs a source into `out`; returns the manifest (also written there).

    Streaming: documents are read one by one, tokenized in chunks of a few MB and written as row
    records; shards roll at `shard_mb` (or MAX_ROWS_PER_SHARD rows). Memory is bounded by a chunk
    plus the largest document, not by the corpus. BPE is trained first (a counting pass, then a
    pass over the train split; tokenizers' trainer keeps word counts, not text). The split is the
    in-memory pipeline's (sources.Splitter). Keyword arguments: see `_prepare`.
    """
    try:
        return _prepare(**kwargs)
    except UserError as e:
        message = str(e)
        for pattern, flag in _AS_FLAGS:
            message = pattern.sub(flag, message)
        raise UserError(message) from None


def _prepare(*, source: str, paths: str = '', tokenizer: str = 'byte', seq_len: int = 128,
            out: str, val_fraction: float = 0.05, field: str = 'text',
            bpe_vocab_size: int = 4096, eos_token: str = '', bos_token: str = '',
            hf_split: str | None = None,
            shard_mb: float = DEFAULT_SHARD_MB, compression: str = DEFAULT_COMPRESSION,
            overwrite: bool = False, progress: bool = True) -> dict:
    t_start = time.time()
    if source not in sources.PREPARE_SOURCES:
        raise UserError(f'--source must be one of {", ".join(sources.PREPARE_SOURCES)}; '
                        f'got {source!r}')
    if not isinstance(seq_len, int) or seq_len < 1:
        raise UserError(f'--seq_len must be an integer >= 1; got {seq_len!r}')
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise UserError(f'--val_fraction must be a number in [0, 1); got {val_fraction!r}')
    if compression not in COMPRESSIONS:
        raise UserError(f'--compression must be one of {", ".join(COMPRESSIONS)}; '
                        f'got {compression!r}')
    if not shard_mb > 0:
        raise UserError(f'--shard_mb must be > 0; got {shard_mb!r}')
    if not out:
        raise UserError('--out is empty; name the directory to write the prepared data to')
    val_fraction = float(val_fraction)
    out_path = epath.Path(out)
    stale = _check_out(out_path, overwrite)
    src = sources.open_source(source, paths=paths, field=field, hf_split=hf_split)
    what = f'prepare {source}'

    # The tokenizer; BPE is trained on the train split, streamed (after a counting pass that also
    # settles the split's fallback, so that training sees exactly the in-memory train split).
    force_val = None
    t_tok = time.time()
    staging = tempfile.mkdtemp(prefix='paxlike-prepare-')
    try:
        if tokenizer == 'bpe':
            pairs, splitter = src.split(val_fraction)
            count = sum(1 for is_val, d in pairs if not is_val and d.text)
            force_val = splitter.fallback()
            if force_val is not None:
                pairs, splitter = src.split(val_fraction, force_val)
                count = sum(1 for is_val, d in pairs if not is_val and d.text)
            if count == 0:
                raise UserError(f'the training split of {src.description(val_fraction)} is empty '
                                '(no non-empty documents); add data or lower --val_fraction')
            texts = _TrainTexts(src, val_fraction, force_val, count)
            if progress:
                print(f'{what}: training a BPE tokenizer (vocab {bpe_vocab_size}) on {count:,} '
                      'train documents...', file=sys.stderr, flush=True)
            train_texts_fn = lambda: texts   # noqa: E731
        else:
            def train_texts_fn():
                raise UserError(f'--tokenizer={tokenizer} cannot be trained')
        settings = {'source': source, 'paths': paths if source != 'stdlib' else '',
                    'jsonl_field': field if source == 'jsonl' else '',
                    'val_fraction': val_fraction}
        tok = tokenizer_lib.build_tokenizer(
            tokenizer, bpe_vocab_size=bpe_vocab_size, workdir=staging,
            train_texts_fn=train_texts_fn, settings=settings, eos_token=eos_token,
            bos_token=bos_token)
        tokenizer_lib.save_if_new(tok, staging)
        tok_files = [n for n in (tokenizer_lib.TOKENIZER_FILE, tokenizer_lib.TOKENIZER_META_FILE)
                     if os.path.exists(os.path.join(staging, n))]
        if not tok_files and tokenizer_lib.is_pretrained(tokenizer):
            # A pretrained tokenizer.json: a copy travels with the data (the fingerprint is of
            # its bytes, not its path, so a run may name this copy).
            shutil.copyfile(tokenizer_lib.pretrained_file(tokenizer),
                            os.path.join(staging, tokenizer_lib.TOKENIZER_FILE))
            tok_files = [tokenizer_lib.TOKENIZER_FILE]
        tokenizer_seconds = time.time() - t_tok

        # Inputs are valid and the tokenizer is ready: write into --out/.incoming.
        created = not out_path.exists()
        work = out_path / _INCOMING
        if work.exists():
            work.rmtree()        # left by a prepare that was killed
        work.mkdir(parents=True)
        layout = RecordLayout(seq_len, token_dtype(tok.vocab_size))
        options = 'group_size:1,' + ('uncompressed' if compression == 'none' else compression)
        rows_per_shard = max(1, min(int(shard_mb * 2**20) // layout.size, MAX_ROWS_PER_SHARD))

        t_write = time.time()
        while True:
            writers = {s: _SplitWriter(work, s, layout, rows_per_shard, options)
                       for s in SPLITS}
            report = _Progress(src.total, src.unit, progress, what)
            pairs, splitter = src.split(val_fraction, force_val)
            try:
                _write_pass(pairs, tok, writers, report, src)
            except BaseException:
                for w in writers.values():
                    w.discard()
                _abandon(work, created)
                raise
            finally:
                report.close()
            fallback = splitter.fallback() if force_val is None else None
            if fallback is None:
                break
            # No document hashed into val (a small corpus): hold out one, write again.
            logging.info('data: no document fell into val; holding out document %d, rewriting',
                         fallback)
            for w in writers.values():
                w.discard()
            force_val = fallback
        splits = {s: w.finish() for s, w in writers.items()}
        write_seconds = time.time() - t_write
        description = src.description(val_fraction)
        if splits['train']['documents'] == 0:
            _abandon(work, created)
            raise UserError(f'the training split of {description} is empty (no non-empty '
                            'documents); add data or lower --val_fraction')
        for name in tok_files:
            (work / name).write_text(epath.Path(staging, name).read_text())
        # Everything is written: replace what --out held (the manifest goes first and comes last).
        for entry in sorted(stale, key=lambda e: e.name != MANIFEST):
            if entry.name != _INCOMING:
                entry.unlink()
        for entry in work.iterdir():
            entry.rename(out_path / entry.name)
        work.rmdir()
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    seconds = time.time() - t_start
    tokens = sum(s['tokens'] for s in splits.values())
    text_bytes = sum(s['text_bytes'] for s in splits.values())
    manifest = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        'seq_len': seq_len,
        'record': {
            'unit': 'packed row: tokens [r*seq_len, r*seq_len + seq_len + 1) of the split stream',
            'layout': 'uint32 n_tokens | (seq_len+1) tokens | ceil((seq_len+1)/8) bytes of '
                      'document-start bits (little bit order)',
            'token_dtype': layout.token_dtype,
            'bytes': layout.size,
            'writer_options': options,
        },
        'tokenizer': {
            'name': tok.name,
            'argument': tokenizer,
            'fingerprint': tok.fingerprint(),
            'vocab_size': int(tok.vocab_size),
            'eos_id': int(tok.eos_id),
            'bpe_vocab_size': bpe_vocab_size if tokenizer == 'bpe' else None,
            'eos_token': eos_token or None,
            'bos_token': bos_token or None,
            'bos_id': getattr(tok, 'bos_id', None),
            'file': tokenizer_lib.TOKENIZER_FILE if tok_files else None,
        },
        'source': {
            'kind': source,
            'paths': paths if source != 'stdlib' else '',
            'field': field if source in ('jsonl', 'parquet', 'hf') else None,
            'hf_split': hf_split if source == 'hf' else None,
            'inputs': len(src.inputs),
            'documents_read': src.num_documents,
            'description': description,
        },
        'split': {
            'val_fraction': val_fraction,
            'rule': ('single text file: its last val_fraction (cut at a line break) is val'
                     if src.tail_split and val_fraction > 0 else
                     'document is val when sha256(key)[:8] / 2**64 < val_fraction; key = '
                     + {'stdlib': 'path relative to the stdlib', 'text': 'file content'}
                     .get(source, "record's text")),
            'held_out_document': force_val,
        },
        'splits': splits,
        'prepare': {
            'seconds': round(seconds, 3),
            'tokenizer_seconds': round(tokenizer_seconds, 3),
            'write_seconds': round(write_seconds, 3),
            'tokens': tokens,
            'text_bytes': text_bytes,
            'tokens_per_s': round(tokens / max(seconds, 1e-9), 1),
            'text_mb_per_s': round(text_bytes / 1e6 / max(seconds, 1e-9), 3),
            'output_bytes': sum(sh['bytes'] for s in splits.values() for sh in s['shards']),
        },
    }
    tmp = out_path / (MANIFEST + '.tmp')
    tmp.write_text(json.dumps(manifest, indent=1) + '\n')
    tmp.rename(out_path / MANIFEST)
    return manifest


class _Once(std_logging.Filter):
    """Lets each log message through once: the tokenizer logs per encode_docs call (a chunk)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record) -> bool:
        if record.msg in self.seen:
            return False
        self.seen.add(record.msg)
        return True


def _abandon(work: epath.Path, created: bool) -> None:
    """A failed prepare: its new files go; --out is left as it was (not created, if it was not
    there before)."""
    try:
        work.rmtree()
        if created and not any(work.parent.iterdir()):
            work.parent.rmdir()
    except OSError:
        pass


def _write_pass(pairs, tok, writers: dict, report: _Progress, src) -> None:
    once = _Once()
    logging.get_absl_logger().addFilter(once)
    try:
        _write_docs(pairs, tok, writers, report, src)
    finally:
        logging.get_absl_logger().removeFilter(once)


def _write_docs(pairs, tok, writers: dict, report: _Progress, src) -> None:
    pending = {s: [] for s in SPLITS}
    chars = {s: 0 for s in SPLITS}

    def flush(split):
        texts = pending[split]
        if not texts:
            return
        stream, ends = tok.encode_docs(texts)
        w = writers[split]
        if tok.name == 'byte':
            w.text_bytes += int(ends[-1]) - len(texts)      # one EOS per document
        else:
            w.text_bytes += sum(len(t.encode('utf-8', 'surrogatepass')) for t in texts)
        w.add(stream, ends)
        pending[split], chars[split] = [], 0
        report.update(src.consumed, sum(x.tokens for x in writers.values()))

    for is_val, doc in pairs:
        if not doc.text:
            continue
        split = 'val' if is_val else 'train'
        pending[split].append(doc.text)
        chars[split] += len(doc.text)
        if chars[split] >= _CHUNK_CHARS or len(pending[split]) >= _CHUNK_DOCS:
            flush(split)
    for split in SPLITS:
        flush(split)


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
        return finish_rows(tok, valid, doc, self.seq_len)


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
