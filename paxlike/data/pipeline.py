"""The training data pipeline: corpus → tokens → packed rows → shuffled global batches → jax.Arrays.

Global batch k is a fixed function of (data, tokenizer, seq_len, global batch size, seed, k): the
rows of an infinite, per-epoch reshuffled sequence of packed rows (grain `shuffle` + `repeat`),
positions [k*B, (k+1)*B). Each process builds only the rows its devices hold and assembles the
global array with `jax.make_array_from_process_local_data`; nothing depends on the number of
processes or devices, so a run resumed on another mesh sees the same batches.
"""

from __future__ import annotations

import math
import time

import grain
import jax
import numpy as np
from absl import logging

from paxlike.data import packing, sources
from paxlike.data import tokenizer as tokenizer_lib
from paxlike.errors import UserError

STATE_VERSION = 1

DEFAULTS = {
    'source': 'stdlib',        # 'stdlib' | 'text' | 'jsonl' | 'prepared'
    # comma-separated files, directories or globs (text / jsonl); for 'prepared', the directory
    # written by `python -m paxlike.data prepare --out=DIR` (paxlike/data/prepared.py)
    'paths': '',
    'jsonl_field': 'text',     # JSONL field holding the document text
    # source 'stdlib' only: comma-separated shell patterns over the library's relative paths
    # choosing its files ('email/*,json/*'; '!' excludes: '!encodings/*'); '' = every file. A
    # domain of the built-in corpus (Branch-Train-Merge experts, docs/btm.md).
    'stdlib_filter': '',
    'val_fraction': 0.05,      # share of documents (files / records) held out for eval
    'tokenizer': 'byte',       # 'byte' | 'bpe' | path of a pretrained tokenizer.json
    'bpe_vocab_size': 4096,    # BPE vocabulary size including the EOS token
    'eos_token': '',           # pretrained file only: the token ending each document (required)
    'bos_token': '',           # pretrained file only: a token starting each document ('' = none)
    'eval_batches': 4,         # global batches per eval (fewer if the val split is smaller)
    # Threads building the next training batches while the device runs the current step (the
    # batch order does not depend on it): raise it when the host cannot keep up (docs/data.md).
    'read_threads': 1,
    # Global batch positions never trained on, comma-separated ("120,121"): batches known to be
    # bad. A loss-spike rollback (health.policy=rollback) adds to this list in the checkpoint.
    'skip_batches': '',
}


def default_config():
    import ml_collections
    return ml_collections.ConfigDict(dict(DEFAULTS))


def _get(cfg, key):
    try:
        return cfg[key]
    except (KeyError, AttributeError, TypeError):
        return DEFAULTS[key]


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...],
                 devices=None) -> np.ndarray:
    """Global row (batch) indices this process must supply, in the order that
    `jax.make_array_from_process_local_data` expects them: the sorted union of the row ranges of
    its addressable shards. `devices` overrides the addressable set (used to test other layouts).
    """
    try:
        index_map = sharding.devices_indices_map(tuple(global_shape))
    except ValueError as e:   # jax's IndivisibleError: batch or seq_len not divisible by the mesh
        raise UserError(f'batch shape {tuple(global_shape)} (batch_size, seq_len) cannot be split '
                        f'over {sharding.spec} of the mesh {dict(sharding.mesh.shape)}: make '
                        'batch_size (and seq_len, if sharded) divisible by those mesh axes') from None
    devices = sharding.addressable_devices if devices is None else devices
    starts, size = set(), None
    for d in devices:
        lo, hi, step = index_map[d][0].indices(global_shape[0])
        if step != 1:
            raise ValueError(f'unsupported strided batch sharding {index_map[d]}')
        starts.add(lo)
        if size not in (None, hi - lo):
            raise UserError(f'the batch sharding {sharding} splits the batch unevenly')
        size = hi - lo
    if not starts:
        raise ValueError('this process holds no device of the batch sharding')
    rows = np.concatenate([np.arange(s, s + size) for s in sorted(starts)])
    if len(np.unique(rows)) != len(rows):
        # Overlapping but unequal shards: make_array_from_process_local_data could not place them.
        raise UserError(f'the batch sharding {sharding} gives this process overlapping row ranges')
    return rows


def process_row_range(sharding, global_shape, devices=None) -> tuple[int, int]:
    """[lo, hi) when this process's rows are contiguous (the usual data-parallel layout)."""
    rows = process_rows(sharding, global_shape, devices)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo != len(rows):
        raise UserError(f'this process holds non-contiguous batch rows under {sharding}')
    return lo, hi


def parse_skip_batches(text) -> set[int]:
    """data.skip_batches ("120,121") as a set of global batch positions."""
    try:
        positions = {int(p) for p in str(text).replace(' ', '').split(',') if p}
    except ValueError:
        positions = {-1}
    if any(p < 0 for p in positions):
        raise UserError(f'data.skip_batches={text!r} must be comma-separated batch positions '
                        f'>= 0, e.g. "120,121"')
    return positions


class TrainIterator:
    """Infinite iterator of global training batches with a small JSON-able position. Positions
    in `skipped` are passed over (they stay part of the position: batch k is still batch k)."""

    def __init__(self, ds: 'Dataset', skipped=()):
        self._ds = ds
        self._it = iter(ds._local_train_batches())
        self.skipped = set(skipped)

    def __iter__(self):
        return self

    @property
    def position(self) -> int:
        """The global batch position the next batch is read from (skipped ones passed over)."""
        index = int(self._it.get_state()['next_index'])
        while index in self.skipped:
            index += 1
        return index

    def skip(self, position: int) -> None:
        self.skipped.add(int(position))

    def __next__(self) -> dict[str, jax.Array]:
        index = self.position
        if index != self._it.get_state()['next_index']:
            inner = self._it.get_state()
            inner['next_index'] = index
            self._it.set_state(inner)
        return self._ds._to_global(next(self._it))

    def get_state(self) -> dict:
        ds = self._ds
        return {
            'version': STATE_VERSION,
            'batch_index': int(self._it.get_state()['next_index']),
            'global_batch_size': ds.global_batch_size,
            'seq_len': ds.seq_len,
            'seed': ds.seed,
            'train_rows': ds.train.num_rows,
            'tokenizer': ds.tokenizer.fingerprint(),
            'skipped': sorted(self.skipped),
        }

    def set_state(self, state: dict) -> None:
        ds = self._ds
        try:
            index, old_batch = int(state['batch_index']), int(state['global_batch_size'])
        except (KeyError, TypeError, ValueError):
            raise UserError(f'the data position in the checkpoint is not valid: {state!r}') from None
        changed = [k for k in ('seq_len', 'seed', 'train_rows', 'tokenizer')
                   if k in state and state[k] != self.get_state()[k]]
        if changed:
            # Continuing on changed data is legitimate (e.g. new data in an old workdir); the old
            # position is then only approximate, so say so instead of refusing.
            logging.warning('data: %s changed since the checkpoint; continuing at batch %d of the '
                            'new data order', ', '.join(changed), index)
        if old_batch != ds.global_batch_size:
            rows = index * old_batch
            index = -(-rows // ds.global_batch_size)
            logging.warning('data: global batch size changed %d → %d; %d rows were consumed, '
                            'continuing at batch %d (skipping %d rows)', old_batch,
                            ds.global_batch_size, rows, index, index * ds.global_batch_size - rows)
            if state.get('skipped'):
                logging.warning('data: the skipped batch positions %s of the checkpoint count '
                                'batches of %d rows; they are not carried over', state['skipped'],
                                old_batch)
        else:
            self.skipped |= {int(p) for p in state.get('skipped', ())}
        inner = self._it.get_state()
        inner['next_index'] = index
        self._it.set_state(inner)


class Dataset:
    """What `build` returns: the tokenizer, a train iterator factory and the eval batches."""

    def __init__(self, *, tokenizer, train: packing.PackedSplit, val: packing.PackedSplit | None,
                 seq_len: int, global_batch_size: int, seed: int, eval_batches: int,
                 read_threads: int = 1,
                 batch_sharding, description: str = '', workdir: str | None = None,
                 skip_batches=(), length_order=None):
        self.tokenizer = tokenizer
        self.train, self.val = train, val
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.num_eval_batches = eval_batches
        self.read_threads = read_threads
        self.batch_sharding = batch_sharding
        self.global_shape = (global_batch_size, seq_len)
        self.local_rows = process_rows(batch_sharding, self.global_shape)
        self.description = description
        self.workdir = workdir
        self.skip_batches = set(skip_batches)
        # The order the model sees each row's tokens in (None: as packed), e.g. the zigzag
        # order of ring attention. Applied on the host, so the devices exchange nothing for it.
        self.length_order = length_order

    # ---- host-side views (also what tests compare across process layouts) ----
    def _train_rows_dataset(self) -> grain.MapDataset:
        # repeat() reseeds the shuffle each epoch, so every epoch has its own order.
        return (grain.MapDataset.range(self.train.num_rows)
                .shuffle(seed=self.seed % 2**32).repeat().batch(self.global_batch_size))

    def global_train_batch(self, k: int) -> dict[str, np.ndarray]:
        """Global batch k on the host (all rows): for tests and debugging, not for training."""
        return self.train.rows(self._train_rows_dataset()[k])

    def _local_train_batches(self) -> grain.IterDataset:
        local = self.local_rows
        ds = self._train_rows_dataset().map(lambda row_ids: self.train.rows(row_ids[local]))
        # Background threads build the next batches while the device runs the current step.
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                                    prefetch_buffer_size=max(2, self.read_threads)))

    def _to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        order = self.length_order
        return {k: jax.make_array_from_process_local_data(
                    self.batch_sharding, v if order is None else v[:, order], self.global_shape)
                for k, v in local.items()}

    # ---- the interface the trainer uses ----
    def save_tokenizer(self) -> None:
        """Writes a newly trained BPE tokenizer to the workdir (no-op if already saved / byte)."""
        tokenizer_lib.save_if_new(self.tokenizer, self.workdir)

    def train_iterator(self) -> TrainIterator:
        return TrainIterator(self, self.skip_batches)

    def eval_row_ids(self) -> list[np.ndarray]:
        """Global row ids of each eval batch: the val split in order, the last batch padded."""
        if self.val is None or self.num_eval_batches == 0:
            return []
        B = self.global_batch_size
        n = min(self.num_eval_batches, math.ceil(self.val.num_rows / B))
        ids = np.arange(n * B)
        ids[ids >= self.val.num_rows] = packing.PADDING_ROW
        return [ids[i * B:(i + 1) * B] for i in range(n)]

    def eval_batches(self) -> list[dict[str, jax.Array]]:
        return [self._to_global(self.val.rows(ids[self.local_rows])) for ids in self.eval_row_ids()]


def _pack(tok, docs, seq_len, split):
    t0 = time.time()
    stream, ends = tok.encode_docs([d.text for d in docs])
    logging.info('data: %s split: %d documents → %d tokens (%.1f s)', split, len(docs),
                 stream.shape[0], time.time() - t0)
    return packing.PackedSplit(stream, ends, seq_len)


def tokenizer_settings(cfg_data) -> dict:
    """The data settings a BPE tokenizer trained in a workdir is recorded with (and must match to
    be reused there): what decides the text it was trained on. A stdlib filter is recorded only
    when set, so tokenizers saved before the key existed still match."""
    source = _get(cfg_data, 'source')
    settings = {'source': source, 'paths': _get(cfg_data, 'paths') if source != 'stdlib' else '',
                'jsonl_field': _get(cfg_data, 'jsonl_field') if source == 'jsonl' else '',
                'val_fraction': float(_get(cfg_data, 'val_fraction'))}
    if source == 'stdlib' and _get(cfg_data, 'stdlib_filter'):
        settings['stdlib_filter'] = _get(cfg_data, 'stdlib_filter')
    return settings


def build(cfg_data, *, seq_len: int, global_batch_size: int, seed: int, workdir: str | None,
          batch_sharding: jax.sharding.NamedSharding, save_tokenizer: bool = True,
          length_order=None) -> Dataset:
    """Reads, splits, tokenizes and packs the configured corpus (see DEFAULTS for the keys).

    A newly trained BPE tokenizer is written to `<workdir>/tokenizer.json` at the end, after every
    check here passed; with save_tokenizer=False the caller does it with `ds.save_tokenizer()` once
    its own checks passed too, so a rejected run leaves the workdir untouched.
    """
    source, tok_name = _get(cfg_data, 'source'), _get(cfg_data, 'tokenizer')
    paths, field = _get(cfg_data, 'paths'), _get(cfg_data, 'jsonl_field')
    val_fraction, n_eval = _get(cfg_data, 'val_fraction'), _get(cfg_data, 'eval_batches')
    # Cheap checks first, so a typo fails before minutes of reading and tokenizing.
    if source not in sources.SOURCES + ('prepared',):
        raise UserError(f'data.source must be one of {", ".join(sources.SOURCES)}, prepared; '
                        f'got {source!r}')
    tokenizer_lib.check_config(tok_name, eos_token=_get(cfg_data, 'eos_token'),
                               bos_token=_get(cfg_data, 'bos_token'))
    if not isinstance(n_eval, int) or n_eval < 0:
        raise UserError(f'data.eval_batches must be an integer >= 0; got {n_eval!r}')
    read_threads = _get(cfg_data, 'read_threads')
    if isinstance(read_threads, bool) or not isinstance(read_threads, int) or read_threads < 1:
        raise UserError(f'data.read_threads must be an integer >= 1; got {read_threads!r}')
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise UserError(f'data.val_fraction must be a number in [0, 1); got {val_fraction!r}')
    if seq_len < 1 or global_batch_size < 1:
        raise UserError(f'seq_len and batch_size must be >= 1; got {seq_len}, {global_batch_size}')
    stdlib_filter = _get(cfg_data, 'stdlib_filter')
    if not isinstance(stdlib_filter, str) or (stdlib_filter and source != 'stdlib'):
        raise UserError(f'data.stdlib_filter={stdlib_filter!r} selects files of the built-in '
                        f'corpus (data.source=stdlib), not of data.source={source}; choose files '
                        'with data.paths instead')
    skip_batches = parse_skip_batches(_get(cfg_data, 'skip_batches'))
    process_rows(batch_sharding, (global_batch_size, seq_len))   # fails early on a bad split

    if source == 'prepared':
        # Tokenized and packed once by `python -m paxlike.data prepare`: the same rows, read
        # record by record (each process reads only its own rows' records).
        from paxlike.data import prepared
        train, val, tok, description = prepared.open_prepared(
            paths, seq_len=seq_len, tokenizer=tok_name,
            bpe_vocab_size=_get(cfg_data, 'bpe_vocab_size'), val_fraction=float(val_fraction),
            eos_token=_get(cfg_data, 'eos_token'), bos_token=_get(cfg_data, 'bos_token'),
            workdir=workdir)
    else:
        corpus = sources.load_corpus(source, paths=paths, jsonl_field=field,
                                     val_fraction=float(val_fraction),
                                     stdlib_filter=_get(cfg_data, 'stdlib_filter'))
        description = corpus.description
        tok = tokenizer_lib.build_tokenizer(
            tok_name, bpe_vocab_size=_get(cfg_data, 'bpe_vocab_size'), workdir=workdir,
            train_texts_fn=lambda: [d.text for d in corpus.train],
            settings=tokenizer_settings(cfg_data),
            eos_token=_get(cfg_data, 'eos_token'), bos_token=_get(cfg_data, 'bos_token'))
    if jax.process_count() > 1:
        # Each process trains or loads its own BPE; training is deterministic, but a stale
        # tokenizer.json on one host's local disk would silently scramble the data: check.
        from jax.experimental import multihost_utils
        fp = np.frombuffer(tok.fingerprint().encode().ljust(32)[:32], np.uint8)
        multihost_utils.assert_equal(fp, 'the tokenizer differs between processes (a stale '
                                     'tokenizer.json in one workdir?)')

    if source != 'prepared':
        train = _pack(tok, corpus.train, seq_len, 'train')
        val = _pack(tok, corpus.val, seq_len, 'val') if corpus.val else None
    if train.num_rows < global_batch_size:
        raise UserError(
            f'the training split of {description} has {train.num_tokens} tokens = '
            f'{train.num_rows} rows of seq_len {seq_len}, fewer than one global batch of '
            f'{global_batch_size} rows; add data (data.paths) or lower batch_size / seq_len')
    if n_eval > 0 and (val is None or val.num_rows == 0):
        raise UserError(f'the val split of {description} is empty; raise data.val_fraction '
                        '(or set data.eval_batches=0 to train without eval)')
    if save_tokenizer:
        tokenizer_lib.save_if_new(tok, workdir)
    logging.info('data: %d train rows, %d val rows of %d tokens; %s tokenizer, vocab %d',
                 train.num_rows, val.num_rows if val else 0, seq_len, tok.name, tok.vocab_size)
    return Dataset(tokenizer=tok, train=train, val=val, seq_len=seq_len,
                   global_batch_size=global_batch_size, seed=seed, eval_batches=n_eval,
                   read_threads=read_threads,
                   batch_sharding=batch_sharding, description=description,
                   workdir=workdir, skip_batches=skip_batches, length_order=length_order)
