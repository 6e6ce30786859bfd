"""Writing prepared data: `python -m paxlike.data prepare` tokenizes a corpus once, streaming, and
packs it into the sharded ArrayRecord files and manifest that paxlike/data/prepared.py describes
and reads. Memory is bounded by one shard and one chunk of text, not by the corpus; new shards are
written into `--out/.incoming` and moved up at the end, the manifest last, so a prepare that fails
half way leaves `--out` as it was.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import logging
from etils import epath

from paxlike.data import sources
from paxlike.data import tokenizer as tokenizer_lib
from paxlike.data.prepared import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, RecordLayout, token_dtype
from paxlike.errors import UserError

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


