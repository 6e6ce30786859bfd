"""Text sources: the built-in standard-library corpus, text files, JSONL, Parquet and local Hugging
Face datasets, split train/val.

A source yields *documents* (strings), one at a time (`open_source(...)`: a pass reads one document
into memory, never the whole corpus). The train/val split is decided per document by a stable hash
of a key that does not depend on the seed, the machine's paths or the number of processes, so every
run (and every process of a run) sees the same two disjoint sets:
  * stdlib: key = the file's path relative to the stdlib directory;
  * text:   key = the file's content (identical files always land in the same split);
  * jsonl, parquet, hf: key = the record's text.
`Splitter` applies that rule document by document; `load_corpus` (the in-memory pipeline) and the
streaming `python -m paxlike.data prepare` (prepared.py) both use it, so they split alike.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import importlib
import json
import os
import sysconfig
from typing import Iterator

from absl import logging
from etils import epath

from paxlike.errors import UserError

SOURCES = ('stdlib', 'text', 'jsonl')   # data.source of the in-memory pipeline (plus 'prepared')
# `python -m paxlike.data prepare --source=...`: also Parquet files and a Hugging Face `datasets`
# directory (each only where its package is installed).
PREPARE_SOURCES = ('stdlib', 'text', 'jsonl', 'parquet', 'hf')

# Directories under the stdlib that are not "the standard library's source": installed packages,
# the (huge, repetitive) regression test suite, build configuration and compiled extensions.
_STDLIB_SKIP_DIRS = frozenset({
    'site-packages', 'dist-packages', '__pycache__', 'test', 'tests', 'idle_test', 'lib-dynload',
})


@dataclasses.dataclass(frozen=True)
class Document:
    key: str    # what the split hash is computed from (also a readable name for stdlib/text)
    name: str   # where it came from, for messages
    text: str


@dataclasses.dataclass
class Corpus:
    train: list[Document]
    val: list[Document]
    description: str


def split_score(key: str) -> float:
    """A stable number in [0, 1) for `key` (sha256, independent of PYTHONHASHSEED and platform)."""
    digest = hashlib.sha256(key.encode('utf-8', 'surrogatepass')).digest()
    return int.from_bytes(digest[:8], 'big') / 2.0**64


def is_val(key: str, val_fraction: float) -> bool:
    return split_score(key) < val_fraction


def stdlib_dir() -> str:
    return sysconfig.get_paths()['stdlib']


def stdlib_files(root: str | None = None) -> list[str]:
    """Relative paths (sorted, '/'-separated) of the stdlib's own *.py files."""
    root = root or stdlib_dir()
    if not os.path.isdir(root):
        raise UserError(f'the Python standard library was not found at {root!r}; '
                        "set data.source='text' or 'jsonl' and data.paths to your own files")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of the skipped trees; sorting is for readability only,
        # the final list is sorted anyway.
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _STDLIB_SKIP_DIRS and not d.startswith('config-'))
        rel_dir = os.path.relpath(dirpath, root)
        for f in filenames:
            # _sysconfigdata_* describes this machine's build, not the library.
            if f.endswith('.py') and not f.startswith('_sysconfigdata'):
                rel = f if rel_dir == '.' else os.path.join(rel_dir, f)
                out.append(rel.replace(os.sep, '/'))
    return sorted(out)


def select_stdlib_files(rels: list[str], stdlib_filter: str) -> list[str]:
    """The files of `rels` (stdlib-relative, '/'-separated) that `stdlib_filter` selects: comma-
    separated shell patterns matched against the whole relative path (`*` also crosses '/', so
    `email/*` is the email package and `[a-l]*` every module and package starting with a-l); a
    pattern starting with `!` excludes. A file is kept when it matches an including pattern (or
    there is none) and no excluding one. '' keeps every file. UserError when nothing is kept.

    Filtering happens before the train/val split, which is decided per file by its path: a file
    has the same split in every filtered corpus, so the val files of a domain are exactly the val
    files of the whole library that belong to it."""
    patterns = [p.strip() for p in (stdlib_filter or '').split(',') if p.strip()]
    if not patterns:
        return list(rels)
    include = [p for p in patterns if not p.startswith('!')]
    exclude = [p[1:] for p in patterns if p.startswith('!')]
    chosen = [r for r in rels
              if (not include or any(fnmatch.fnmatchcase(r, p) for p in include))
              and not any(fnmatch.fnmatchcase(r, p) for p in exclude)]
    if not chosen:
        raise UserError(f'data.stdlib_filter={stdlib_filter!r} selects none of the '
                        f'{len(rels)} standard-library files; patterns match paths such as '
                        f'{rels[0]!r} (e.g. "email/*,json/*", "!encodings/*")')
    return chosen


def _read_bytes(path: str) -> bytes:
    try:
        return epath.Path(path).read_bytes()
    except OSError as e:
        raise UserError(f'cannot read data file {path!r}: {e.strerror or e}; '
                        'check that the path in data.paths exists and is readable') from None


def _read_text(path: str) -> str:
    # Invalid UTF-8 is kept (as U+FFFD) rather than failing a long run over one stray byte.
    return _read_bytes(path).decode('utf-8', errors='replace')


class Splitter:
    """The train/val rule applied one document at a time, in the source's order.

    A document is val when `is_val(key)`. When that puts no document at all in val although
    val_fraction > 0 and there are at least two documents, the first train document with the lowest
    score is held out instead (still independent of the order of the inputs); `fallback()` names it
    after a pass, and a second pass with `force_val=` that ordinal splits exactly as reading
    everything first would have.
    """

    def __init__(self, val_fraction: float, force_val: int | None = None):
        self.val_fraction, self.force_val = val_fraction, force_val
        self.count = 0           # documents routed so far (empty ones included)
        self.num_val = 0
        self._best = None        # (score, ordinal) of the lowest-scoring train document

    def is_val(self, doc: Document) -> bool:
        ordinal = self.count
        self.count += 1
        if ordinal == self.force_val:
            val = True
        else:
            score = split_score(doc.key)
            val = score < self.val_fraction
            if not val and (self._best is None or score < self._best[0]):
                self._best = (score, ordinal)
        self.num_val += val
        return val

    def fallback(self) -> int | None:
        """Ordinal of the document to hold out when the hash put none in val, else None."""
        if self.val_fraction > 0 and self.num_val == 0 and self.count >= 2:
            return self._best[1]
        return None


def _tail_split(doc: Document, val_fraction: float) -> tuple[Document, Document]:
    """Split one document into a head (train) and its last `val_fraction` (val) at a line break."""
    cut = int(len(doc.text) * (1.0 - val_fraction))
    nl = doc.text.rfind('\n', 0, cut)
    cut = nl + 1 if nl > 0 else cut
    return (Document(doc.key + '#train', doc.name, doc.text[:cut]),
            Document(doc.key + '#val', doc.name + ' (tail)', doc.text[cut:]))


def expand_paths(paths: str) -> list[str]:
    """Comma-separated files, directories (all files below, recursively) and globs → sorted files.
    A URL-like entry (gs://bucket/file) is taken as one file (no globbing or listing there yet)."""
    specs = [p.strip() for p in (paths or '').split(',') if p.strip()]
    if not specs:
        raise UserError("data.paths is empty; set --config.data.paths=FILE_OR_GLOB[,...] "
                        "(or use data.source='stdlib' for the built-in corpus)")
    files: list[str] = []
    remote: list[str] = []
    for spec in specs:
        if '://' in spec:
            if not epath.Path(spec).exists():
                raise UserError(f'data path {spec!r} does not exist; fix data.paths '
                                '(comma-separated files, directories or globs)')
            remote.append(spec)
            continue
        spec_x = os.path.expanduser(os.path.expandvars(spec))
        if glob.has_magic(spec_x):
            matched = [m for m in glob.glob(spec_x, recursive=True) if os.path.isfile(m)]
            if not matched:
                raise UserError(f'data.paths entry {spec!r} matched no files; check the pattern '
                                '(use ** with a recursive glob for subdirectories)')
            files.extend(matched)
        elif os.path.isdir(spec_x):
            found = []
            for dirpath, dirnames, filenames in os.walk(spec_x):
                dirnames[:] = [d for d in dirnames if not d.startswith('.')]
                found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith('.'))
            if not found:
                raise UserError(f'data.paths directory {spec!r} contains no files')
            files.extend(found)
        elif os.path.exists(spec_x):
            files.append(spec_x)
        else:
            raise UserError(f'data path {spec!r} does not exist; fix data.paths '
                            '(comma-separated files, directories or globs)')
    # Sorted and de-duplicated so the document order never depends on the shell or the filesystem.
    return sorted(set(os.path.normpath(f) for f in files) | set(remote))


def _file_size(path: str) -> int:
    try:
        return int(epath.Path(path).stat().length)
    except (OSError, AttributeError):
        return 0


class DocumentSource:
    """A corpus read one document at a time. Iterating makes one pass over it, in a fixed order
    (sorted files, records in file order); `consumed` counts the input read so far (bytes of files,
    or rows for Parquet / Hugging Face), out of `total`, for progress lines."""

    def __init__(self, kind: str, inputs: list[str], reader, *, total: int = 0, unit: str = 'B',
                 describe, tail_split: bool = False):
        self.kind, self.inputs, self._reader = kind, inputs, reader
        self.total, self.unit = total, unit
        self._describe = describe
        # One text file cannot be split by file: its last val_fraction (at a line break) is val.
        self.tail_split = tail_split
        self.consumed = 0
        self.num_documents = 0   # documents of the last complete pass

    def description(self, val_fraction: float) -> str:
        return self._describe(self, val_fraction)

    def __iter__(self) -> Iterator[Document]:
        self.consumed, count = 0, 0
        for doc in self._reader(self):
            count += 1
            yield doc
        self.num_documents = count

    def split(self, val_fraction: float, force_val: int | None = None):
        """One pass as (is_val, document) pairs, empty documents included (callers drop them).
        Returns (pairs iterator, the Splitter): after the pass, `splitter.fallback()` says whether
        a second pass with force_val is needed to hold out one document."""
        splitter = Splitter(val_fraction, force_val)

        def pairs():
            if self.tail_split and val_fraction > 0:
                splitter.num_val = 1   # the tail is the val split: no fallback
                for doc in self:
                    head, tail = _tail_split(doc, val_fraction)
                    yield False, head
                    yield True, tail
            else:
                for doc in self:
                    yield splitter.is_val(doc), doc
        return pairs(), splitter


def _stdlib_reader(src):
    root = stdlib_dir()
    for rel in src.inputs:
        raw = _read_bytes(os.path.join(root, rel))
        src.consumed += len(raw)
        yield Document(rel, rel, raw.decode('utf-8', errors='replace'))


def _text_reader(src):
    for f in src.inputs:
        raw = _read_bytes(f)
        src.consumed += len(raw)
        text = raw.decode('utf-8', errors='replace')
        digest = hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()
        yield Document('sha256:' + digest, f, text)


def _jsonl_reader(src, field: str):
    for f in src.inputs:
        try:
            handle = epath.Path(f).open('rb')
        except OSError as e:
            raise UserError(f'cannot read data file {f!r}: {e.strerror or e}; '
                            'check that the path in data.paths exists and is readable') from None
        with handle:
            # Lines end at b'\n' only: a JSON string may hold U+2028 or U+0085 unescaped.
            for lineno, raw in enumerate(handle, 1):
                src.consumed += len(raw)
                line = raw.decode('utf-8', errors='replace')
                if not line.strip():
                    continue
                where = f'{f}:{lineno}'
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f'{where}: not valid JSON ({e.msg}); each line of a JSONL file '
                                    'must be one JSON object') from None
                if not isinstance(record, dict) or field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise UserError(f'{where}: record has no field {field!r} (it has {keys}); set '
                                    '--config.data.jsonl_field (prepare: --field) to the field '
                                    'that holds the text')
                value = record[field]
                if not isinstance(value, str):
                    raise UserError(f'{where}: field {field!r} is a {type(value).__name__}, '
                                    'not a string')
                yield Document(value, where, value)


def _require(module: str, source: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f'--source={source} needs the {package!r} package, which is not '
                        f'installed: pip install {package}') from None


def _check_text_column(where: str, names, field: str, kind_of) -> None:
    """`field` must be a column of strings (`kind_of(name)` describes a column's type)."""
    if field not in names:
        raise UserError(f'{where} has no column {field!r} (it has {sorted(names)}); set --field to '
                        'the column that holds the text')
    kind = str(kind_of(field))
    if kind not in ('string', 'large_string', 'string_view'):
        raise UserError(f'{where}: column {field!r} holds {kind}, not strings; set --field to the '
                        'column that holds the text')


def _parquet_reader(src, field: str):
    pq = _require('pyarrow.parquet', 'parquet', 'pyarrow')
    for f in src.inputs:
        try:
            handle = epath.Path(f).open('rb')
            pf = pq.ParquetFile(handle)
        except OSError as e:
            raise UserError(f'cannot read Parquet file {f!r}: {e}') from None
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid for a non-Parquet file
            raise UserError(f'{f!r} is not a readable Parquet file: {e}') from None
        with handle:
            schema = pf.schema_arrow
            _check_text_column(f, schema.names, field, lambda n: schema.field(n).type)
            row = 0
            for batch in pf.iter_batches(batch_size=1024, columns=[field]):
                for value in batch.column(0).to_pylist():
                    src.consumed += 1
                    row += 1
                    text = value or ''   # a null text is an empty document (dropped)
                    yield Document(text, f'{f}:row {row}', text)


def _hf_reader(src, field: str, split: str | None):
    datasets = _require('datasets', 'hf', 'datasets')
    (path,) = src.inputs
    ds = _load_hf(datasets, path, split)
    for row, batch in enumerate(ds.iter(batch_size=1024)):
        for i, value in enumerate(batch[field]):
            src.consumed += 1
            text = value or ''
            yield Document(text, f'{path}:row {row * 1024 + i + 1}', text)


def _load_hf(datasets, path: str, split: str | None):
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise UserError(f'{path!r} is not a dataset saved with datasets save_to_disk: '
                        f'{e}') from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        name = split or ('train' if 'train' in ds else None)
        if name not in ds:
            raise UserError(f'the Hugging Face dataset at {path!r} has splits {splits}; choose one '
                            'with --hf_split=NAME')
        ds = ds[name]
    elif split:
        raise UserError(f'the Hugging Face dataset at {path!r} has no splits; drop --hf_split')
    return ds


def open_source(source: str, *, paths: str = '', field: str = 'text',
                hf_split: str | None = None, stdlib_filter: str = '') -> DocumentSource:
    """The documents of a source, to be read one at a time. Raises UserError for a missing input
    (paths that match nothing, a missing package) before any document is read. `stdlib_filter`
    (data.stdlib_filter, `select_stdlib_files`) narrows the stdlib source to some of its files."""
    if source not in PREPARE_SOURCES:
        raise UserError(f'the source must be one of {", ".join(PREPARE_SOURCES)}; got {source!r}')
    if stdlib_filter and source != 'stdlib':
        raise UserError(f'data.stdlib_filter={stdlib_filter!r} selects files of the built-in '
                        f'corpus (data.source=stdlib), not of data.source={source}; choose the '
                        'files with data.paths instead')
    if source == 'stdlib':
        root = stdlib_dir()
        rels = select_stdlib_files(stdlib_files(root), stdlib_filter)
        chosen = f', data.stdlib_filter={stdlib_filter!r}' if stdlib_filter else ''
        logging.info('data: reading %d standard-library files from %s%s', len(rels), root, chosen)
        return DocumentSource(
            'stdlib', rels, _stdlib_reader,
            total=sum(_file_size(os.path.join(root, r)) for r in rels),
            describe=lambda s, f: f'Python standard library at {root} ({len(rels)} files{chosen})')
    if source == 'hf':
        _require('datasets', 'hf', 'datasets')
        specs = [p.strip() for p in (paths or '').split(',') if p.strip()]
        if len(specs) != 1:
            raise UserError('--source=hf takes one directory written by datasets save_to_disk in '
                            f'--paths; got {paths!r}')
        if '://' not in specs[0] and not os.path.isdir(os.path.expanduser(specs[0])):
            raise UserError(f'data path {specs[0]!r} does not exist or is not a directory; '
                            '--source=hf reads a directory written by datasets save_to_disk')
        path = os.path.expanduser(specs[0])
        import datasets
        ds = _load_hf(datasets, path, hf_split)
        _check_text_column(path, ds.column_names, field,
                           lambda n: getattr(ds.features[n], 'dtype',
                                             type(ds.features[n]).__name__))
        return DocumentSource('hf', [path], lambda s: _hf_reader(s, field, hf_split),
                              total=len(ds), unit='rows',
                              describe=lambda s, f: f'Hugging Face dataset {path} '
                                                    f'({s.num_documents} records)')
    if source == 'parquet':
        _require('pyarrow.parquet', 'parquet', 'pyarrow')
    files = expand_paths(paths)
    if source == 'text':
        logging.info('data: reading %d text files', len(files))
        return DocumentSource(
            'text', files, _text_reader, total=sum(_file_size(f) for f in files),
            tail_split=len(files) == 1,
            describe=lambda s, f: (f'text file {files[0]}' if len(files) == 1 and f > 0
                                   else f'{len(files)} text files'))
    if source == 'jsonl':
        logging.info('data: reading %d JSONL files (field %r)', len(files), field)
        return DocumentSource(
            'jsonl', files, lambda s: _jsonl_reader(s, field),
            total=sum(_file_size(f) for f in files),
            describe=lambda s, f: f'{len(files)} JSONL files ({s.num_documents} records)')
    import pyarrow.parquet as pq
    rows = 0
    for f in files:
        try:
            with epath.Path(f).open('rb') as handle:
                rows += pq.ParquetFile(handle).metadata.num_rows
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid for a non-Parquet file
            raise UserError(f'{f!r} is not a readable Parquet file: {e}') from None
    logging.info('data: reading %d Parquet files (column %r, %d rows)', len(files), field, rows)
    return DocumentSource('parquet', files, lambda s: _parquet_reader(s, field), total=rows,
                          unit='rows',
                          describe=lambda s, f: f'{len(files)} Parquet files ({rows} rows)')


def load_corpus(source: str, *, paths: str = '', jsonl_field: str = 'text',
                val_fraction: float = 0.05, stdlib_filter: str = '') -> Corpus:
    """Reads a whole source into memory and splits it. Raises UserError for anything the user can
    fix. (The streaming `prepare` splits the same way, document by document.)"""
    if source not in SOURCES:
        raise UserError(f'data.source must be one of {", ".join(SOURCES)}; got {source!r}')
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f'data.val_fraction must be in [0, 1); got {val_fraction}')
    src = open_source(source, paths=paths, field=jsonl_field, stdlib_filter=stdlib_filter)
    pairs, splitter = src.split(val_fraction)
    train, val = [], []
    for ordinal, (is_v, doc) in enumerate(pairs):
        (val if is_v else train).append((ordinal, doc))
    pick = splitter.fallback()
    if pick is not None:
        # Too few documents for the hash to put any in val: hold out the lowest-scoring one.
        val = [x for x in train if x[0] == pick]
        train = [x for x in train if x[0] != pick]
    if src.tail_split and val_fraction > 0:
        logging.info('data: a single text file; its last %.1f%% is the val split',
                     100 * val_fraction)
    corpus = Corpus([d for _, d in train if d.text], [d for _, d in val if d.text],
                    src.description(val_fraction))
    if not corpus.train:
        raise UserError(f'the training split of {corpus.description} is empty (no non-empty '
                        'documents); add data to data.paths or lower data.val_fraction')
    logging.info('data: %s: %d train / %d val documents', corpus.description,
                 len(corpus.train), len(corpus.val))
    return corpus
