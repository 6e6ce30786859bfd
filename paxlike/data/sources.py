"""Text sources: the built-in standard-library corpus, text files and JSONL, split train/val.

A source yields *documents* (strings). The train/val split is decided per document by a stable hash
of a key that does not depend on the seed, the machine's paths or the number of processes, so every
run (and every process of a run) sees the same two disjoint sets:
  * stdlib: key = the file's path relative to the stdlib directory;
  * text:   key = the file's content (identical files always land in the same split);
  * jsonl:  key = the record's text.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig

from absl import logging

from paxlike.errors import UserError

SOURCES = ('stdlib', 'text', 'jsonl')

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


def _read_text(path: str) -> str:
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f'cannot read data file {path!r}: {e.strerror or e}; '
                        'check that the path in data.paths exists and is readable') from None
    # Invalid UTF-8 is kept (as U+FFFD) rather than failing a long run over one stray byte.
    return raw.decode('utf-8', errors='replace')


def _split(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if not is_val(d.key, val_fraction)]
    val = [d for d in docs if is_val(d.key, val_fraction)]
    if val_fraction > 0 and not val and len(docs) >= 2:
        # Too few documents for the hash to put any in val: take the one with the lowest score, which
        # is still a deterministic choice that does not depend on the order of the inputs.
        pick = min(train, key=lambda d: split_score(d.key))
        train = [d for d in train if d is not pick]
        val = [pick]
    return train, val


def _tail_split(doc: Document, val_fraction: float) -> tuple[Document, Document]:
    """Split one document into a head (train) and its last `val_fraction` (val) at a line break."""
    cut = int(len(doc.text) * (1.0 - val_fraction))
    nl = doc.text.rfind('\n', 0, cut)
    cut = nl + 1 if nl > 0 else cut
    return (Document(doc.key + '#train', doc.name, doc.text[:cut]),
            Document(doc.key + '#val', doc.name + ' (tail)', doc.text[cut:]))


def expand_paths(paths: str) -> list[str]:
    """Comma-separated files, directories (all files below, recursively) and globs → sorted files."""
    specs = [p.strip() for p in (paths or '').split(',') if p.strip()]
    if not specs:
        raise UserError("data.paths is empty; set --config.data.paths=FILE_OR_GLOB[,...] "
                        "(or use data.source='stdlib' for the built-in corpus)")
    files: list[str] = []
    for spec in specs:
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
    return sorted(set(os.path.normpath(f) for f in files))


def _stdlib_corpus(val_fraction: float) -> Corpus:
    root = stdlib_dir()
    rels = stdlib_files(root)
    logging.info('data: reading %d standard-library files from %s', len(rels), root)
    docs = [Document(rel, rel, _read_text(os.path.join(root, rel))) for rel in rels]
    train, val = _split(docs, val_fraction)
    return Corpus(train, val, f'Python standard library at {root} ({len(rels)} files)')


def _text_corpus(paths: str, val_fraction: float) -> Corpus:
    files = expand_paths(paths)
    logging.info('data: reading %d text files', len(files))
    docs = []
    for f in files:
        text = _read_text(f)
        docs.append(Document('sha256:' + hashlib.sha256(text.encode('utf-8', 'surrogatepass'))
                             .hexdigest(), f, text))
    if len(docs) == 1 and val_fraction > 0:
        # One file cannot be split by file; hold out its tail instead so val is still unseen text.
        head, tail = _tail_split(docs[0], val_fraction)
        logging.info('data: a single text file; its last %.1f%% is the val split', 100 * val_fraction)
        return Corpus([head], [tail], f'text file {files[0]}')
    train, val = _split(docs, val_fraction)
    return Corpus(train, val, f'{len(files)} text files')


def _jsonl_corpus(paths: str, field: str, val_fraction: float) -> Corpus:
    files = expand_paths(paths)
    logging.info('data: reading %d JSONL files (field %r)', len(files), field)
    docs = []
    for f in files:
        text = _read_text(f)
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f'{f}:{lineno}'
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f'{where}: not valid JSON ({e.msg}); each line of a JSONL file must '
                                'be one JSON object') from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f'{where}: record has no field {field!r} (it has {keys}); set '
                                '--config.data.jsonl_field to the field that holds the text')
            value = record[field]
            if not isinstance(value, str):
                raise UserError(f'{where}: field {field!r} is a {type(value).__name__}, not a string')
            docs.append(Document(value, where, value))
    train, val = _split(docs, val_fraction)
    return Corpus(train, val, f'{len(files)} JSONL files ({len(docs)} records)')


def load_corpus(source: str, *, paths: str = '', jsonl_field: str = 'text',
                val_fraction: float = 0.05) -> Corpus:
    """Reads a whole source and splits it. Raises UserError for anything the user can fix."""
    if source not in SOURCES:
        raise UserError(f'data.source must be one of {", ".join(SOURCES)}; got {source!r}')
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f'data.val_fraction must be in [0, 1); got {val_fraction}')
    if source == 'stdlib':
        corpus = _stdlib_corpus(val_fraction)
    elif source == 'text':
        corpus = _text_corpus(paths, val_fraction)
    else:
        corpus = _jsonl_corpus(paths, jsonl_field, val_fraction)
    corpus.train = [d for d in corpus.train if d.text]
    corpus.val = [d for d in corpus.val if d.text]
    if not corpus.train:
        raise UserError(f'the training split of {corpus.description} is empty (no non-empty '
                        'documents); add data to data.paths or lower data.val_fraction')
    logging.info('data: %s: %d train / %d val documents', corpus.description,
                 len(corpus.train), len(corpus.val))
    return corpus
