"""Tests of paxlike.data: sources and split, tokenizers, packing, order, state, process shares."""

import os

# tests/conftest.py sets 8 emulated devices; setdefault keeps this module runnable on its own.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')

import json
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import run_two_workers
from paxlike import data
from paxlike.data import packing, sources, tokenizer as tokenizer_lib
from paxlike.errors import UserError

AUTO = jax.sharding.AxisType.Auto


def _sharding(shape=(8,), names=('data',), spec=P('data'), devices=None):
    devices = jax.devices()[:int(np.prod(shape))] if devices is None else devices
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(shape), names, axis_types=(AUTO,) * len(names))
    return NamedSharding(mesh, spec)


def _cfg(**kw):
    cfg = data.default_config()
    cfg.update(kw)
    return cfg


def _build(cfg=None, *, seq_len=64, batch=8, seed=0, workdir=None, sharding=None):
    return data.build(cfg if cfg is not None else _cfg(), seq_len=seq_len,
                      global_batch_size=batch, seed=seed, workdir=workdir,
                      batch_sharding=sharding if sharding is not None else _sharding())


def _host(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def _write_text_corpus(d, n_files=12, lines=60):
    paths = []
    for i in range(n_files):
        p = d / f'doc{i:02d}.txt'
        p.write_text(''.join(f'file {i} line {j}: the quick brown fox {i * j % 7} jumps. héllo\n'
                             for j in range(lines)))
        paths.append(str(p))
    return paths


@pytest.fixture(scope='module')
def stdlib_ds():
    return _build()


# ---------------------------------------------------------------- sources and split

def test_stdlib_files_sorted_and_skip_tests_and_site_packages():
    files = sources.stdlib_files()
    assert files == sorted(files) and len(files) > 300
    assert 'os.py' in files and 'json/decoder.py' in files
    for f in files:
        parts = f.split('/')
        assert not {'site-packages', 'test', 'tests', '__pycache__'} & set(parts[:-1]), f
        assert not parts[-1].startswith('_sysconfigdata')


def test_stdlib_split_by_file_is_deterministic_and_disjoint():
    a = sources.load_corpus('stdlib', val_fraction=0.05)
    b = sources.load_corpus('stdlib', val_fraction=0.05)
    train, val = {d.key for d in a.train}, {d.key for d in a.val}
    assert train and val and not train & val
    assert [d.key for d in a.train] == [d.key for d in b.train]
    assert [d.key for d in a.val] == [d.key for d in b.val]
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.10
    # The split is a function of the file alone, not of the other files or of the order.
    assert all(sources.is_val(k, 0.05) for k in val)
    assert not any(sources.is_val(k, 0.05) for k in train)


def test_jsonl_split_by_record(tmp_path):
    recs = [{'text': f'record number {i} ' * 3, 'id': i} for i in range(200)]
    (tmp_path / 'a.jsonl').write_text('\n'.join(json.dumps(r) for r in recs[:100]) + '\n\n')
    (tmp_path / 'b.jsonl').write_text('\n'.join(json.dumps(r) for r in recs[100:]))
    c = sources.load_corpus('jsonl', paths=str(tmp_path / '*.jsonl'), val_fraction=0.2)
    train, val = {d.text for d in c.train}, {d.text for d in c.val}
    assert len(train) + len(val) == 200 and not train & val and val
    # Same records in another file layout → same split.
    (tmp_path / 'all').mkdir()
    (tmp_path / 'all' / 'x.jsonl').write_text('\n'.join(json.dumps(r) for r in reversed(recs)))
    c2 = sources.load_corpus('jsonl', paths=str(tmp_path / 'all'), val_fraction=0.2)
    assert {d.text for d in c2.val} == val


def test_single_text_file_holds_out_its_tail(tmp_path):
    p = tmp_path / 'book.txt'
    p.write_text(''.join(f'line {i}\n' for i in range(1000)))
    c = sources.load_corpus('text', paths=str(p), val_fraction=0.1)
    assert len(c.train) == len(c.val) == 1
    assert c.train[0].text + c.val[0].text == p.read_text()
    assert c.val[0].text.startswith('line ') and 80 <= c.val[0].text.count('\n') <= 101


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer():
    tok = tokenizer_lib.ByteTokenizer()
    s = 'héllo ✓\n'
    ids = tok.encode(s)
    assert ids == list(s.encode()) and tok.decode(ids) == s and tok.decode(ids + [256]) == s
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.token_bytes.dtype == np.int32 and tok.token_bytes.sum() == 256
    stream, ends = tok.encode_docs(['ab', '', 'é'])
    assert stream.tolist() == [97, 98, 256, 256, 0xC3, 0xA9, 256] and ends.tolist() == [3, 4, 7]


def test_bpe_round_trip_and_cache_reuse(tmp_path, monkeypatch):
    _write_text_corpus(tmp_path)
    cfg = _cfg(source='text', paths=str(tmp_path / '*.txt'), tokenizer='bpe', bpe_vocab_size=320)
    wd = tmp_path / 'run'
    ds = _build(cfg, seq_len=32, batch=8, workdir=str(wd))
    tok = ds.tokenizer
    assert (wd / 'tokenizer.json').exists() and 257 < tok.vocab_size <= 320
    s = 'file 3 line 7: the quick brown fox jumps. héllo ✓ unseen¿\n'
    ids = tok.encode(s)
    assert tok.decode(ids) == s and len(ids) < len(s.encode())
    assert sum(int(tok.token_bytes[i]) for i in ids) == len(s.encode())
    assert tok.token_bytes[tok.eos_id] == 0
    # With save_tokenizer=False nothing is written until the caller says so.
    wd_late = tmp_path / 'late'
    late = data.build(cfg, seq_len=32, global_batch_size=8, seed=0, workdir=str(wd_late),
                      batch_sharding=_sharding(), save_tokenizer=False)
    assert not wd_late.exists()
    late.save_tokenizer()
    assert (wd_late / 'tokenizer.json').read_text() == (wd / 'tokenizer.json').read_text()
    # A second build reuses the cached file: training is never called again.
    monkeypatch.setattr(tokenizer_lib, '_train_bpe', lambda *a: pytest.fail('retrained'))
    ds2 = _build(cfg, seq_len=32, batch=8, workdir=str(wd))
    assert ds2.tokenizer.fingerprint() == tok.fingerprint()
    _assert_batches_equal(ds.global_train_batch(0), ds2.global_train_batch(0))
    # Different settings in the same workdir are refused rather than silently retrained.
    with pytest.raises(UserError, match='different data settings.*new --workdir'):
        _build(_cfg(**{**cfg.to_dict(), 'bpe_vocab_size': 400}), seq_len=32, batch=8,
               workdir=str(wd))


# ---------------------------------------------------------------- packing

def _reference_rows(docs, eos, L):
    """Slow, obvious packing: a list of (token, doc) cut into rows that overlap by one token."""
    flat = [(t, i) for i, d in enumerate(docs) for t in list(d) + [eos]]
    rows = []
    for r in range(-(-(len(flat) - 1) // L)):
        chunk = flat[r * L:r * L + L + 1]
        row = {k: [0] * L for k in packing.BATCH_KEYS}
        seg, prev, pos = 0, None, 0
        for c in range(min(L, len(chunk))):
            tok, doc = chunk[c]
            if doc != prev:
                seg, pos, prev = seg + 1, 0, doc
            row['inputs'][c], row['segment_ids'][c], row['positions'][c] = tok, seg, pos
            pos += 1
            if c + 1 < len(chunk):
                row['targets'][c] = chunk[c + 1][0]
                row['weights'][c] = 1.0 if chunk[c + 1][1] == doc else 0.0
        rows.append(row)
    return rows


def test_packing_matches_reference_and_respects_segments():
    tok = tokenizer_lib.ByteTokenizer()
    docs = ['abc', 'defghijklmnopqrstu', '', 'v', 'wxyz0123456789ABCDEFGHIJKLMNOP', 'QR']
    stream, ends = tok.encode_docs(docs)
    L = 8
    split = packing.PackedSplit(stream, ends, L)
    got = split.rows(np.arange(split.num_rows))
    ref = _reference_rows([list(d.encode()) for d in docs], tok.eos_id, L)
    assert split.num_rows == len(ref)
    for k in packing.BATCH_KEYS:
        np.testing.assert_array_equal(got[k], np.array([r[k] for r in ref]), err_msg=k)
    assert got['weights'].dtype == np.float32 and got['inputs'].dtype == np.int32
    # Spot checks of the rules, independent of the reference.
    inp, tgt, seg, pos, w = (got[k] for k in packing.BATCH_KEYS)
    flat = stream.astype(np.int32)
    for r in range(split.num_rows):
        n = min(L, len(flat) - 1 - r * L)                       # real (input, target) pairs
        np.testing.assert_array_equal(inp[r, :n], flat[r * L:r * L + n])
        np.testing.assert_array_equal(tgt[r, :n], flat[r * L + 1:r * L + n + 1])
        assert seg[r, 0] == 1 and pos[r, 0] == 0                  # a row always starts a segment
        starts = np.flatnonzero(np.diff(seg[r]) > 0) + 1
        assert np.all(pos[r, starts] == 0)
        # No loss from an EOS input to the next document's first token.
        assert np.all(w[r][inp[r] == tok.eos_id] == 0)
    # Padding: the tail of the last row is segment 0, weight 0.
    last = len(flat) - 1 - (split.num_rows - 1) * L
    assert last < L and np.all(seg[-1, last + 1:] == 0) and np.all(w[-1, last:] == 0)
    # A long document continues in the next row as a new segment whose weights stay 1.
    assert inp[1, 0] == ord('h') and np.all(seg[1] == 1) and np.all(w[1] == 1)


def test_padding_row():
    split = packing.PackedSplit(np.arange(20, dtype=np.uint16), np.array([20]), 4)
    rows = split.rows([packing.PADDING_ROW, 0])
    assert all(np.all(rows[k][0] == 0) for k in packing.BATCH_KEYS)
    assert rows['weights'][1].tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------- order, state, eval

def test_batch_layout_and_types(stdlib_ds):
    b = next(stdlib_ds.train_iterator())
    assert set(b) == set(packing.BATCH_KEYS)
    for k, v in b.items():
        assert isinstance(v, jax.Array) and v.shape == (8, 64), k
        assert v.sharding == stdlib_ds.batch_sharding
        assert v.dtype == (np.float32 if k == 'weights' else np.int32)
    h = _host(b)
    np.testing.assert_array_equal(h['inputs'][:, 1:][h['weights'][:, :-1] > 0],
                                  h['targets'][:, :-1][h['weights'][:, :-1] > 0])
    assert h['weights'].mean() > 0.9   # code files are long: few boundaries per row


def test_order_is_deterministic_per_seed(stdlib_ds):
    again = _build()
    other = _build(seed=1)
    it_a, it_b, it_c = stdlib_ds.train_iterator(), again.train_iterator(), other.train_iterator()
    for _ in range(3):
        a, b, c = _host(next(it_a)), _host(next(it_b)), _host(next(it_c))
        _assert_batches_equal(a, b)
        assert not np.array_equal(a['inputs'], c['inputs'])


def test_read_threads_do_not_change_the_batches(stdlib_ds):
    threaded = _build(_cfg(read_threads=3))
    it_a, it_b = stdlib_ds.train_iterator(), threaded.train_iterator()
    for _ in range(5):
        _assert_batches_equal(_host(next(it_a)), _host(next(it_b)))
    with pytest.raises(UserError, match="data.read_threads must be an integer >= 1; got 0"):
        _build(_cfg(read_threads=0))


def test_epochs_are_reshuffled(tmp_path):
    _write_text_corpus(tmp_path, n_files=3, lines=8)
    ds = _build(_cfg(source='text', paths=str(tmp_path), val_fraction=0.0, eval_batches=0),
                seq_len=16, batch=8)
    n = ds.train.num_rows
    order = np.concatenate([ds._train_rows_dataset()[k] for k in range(2 * n // 8 + 1)])
    first, second = order[:n], order[n:2 * n]
    assert sorted(first) == list(range(n)) == sorted(second)
    assert first.tolist() != second.tolist()


def test_state_round_trip_reproduces_next_batch(stdlib_ds):
    it = stdlib_ds.train_iterator()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state['batch_index'] == 3
    expected = [_host(next(it)) for _ in range(2)]
    fresh = stdlib_ds.train_iterator()
    fresh.set_state(state)
    for e in expected:
        _assert_batches_equal(_host(next(fresh)), e)
    _assert_batches_equal(expected[0], stdlib_ds.global_train_batch(3))
    # Rewinding the same (prefetching) iterator works too.
    it.set_state(state)
    _assert_batches_equal(_host(next(it)), expected[0])


def test_state_after_batch_size_change_resumes_at_rows_consumed():
    ds8, ds4 = _build(batch=8), _build(batch=4, sharding=_sharding((4,)))
    it = ds8.train_iterator()
    next(it), next(it)
    it4 = ds4.train_iterator()
    it4.set_state(it.get_state())
    assert it4.get_state()['batch_index'] == 4
    # Same global row stream, so rows 16..19 under batch 4 = the first half of batch 2 under 8.
    _assert_batches_equal(_host(next(it4)),
                          {k: v[:4] for k, v in ds8.global_train_batch(2).items()})


def test_eval_batches_fixed_and_in_order(stdlib_ds):
    a, b = stdlib_ds.eval_batches(), stdlib_ds.eval_batches()
    assert len(a) == 4
    for x, y in zip(a, b):
        _assert_batches_equal(x, y)
    rows = stdlib_ds.val.rows(np.arange(8))
    _assert_batches_equal(_host(a[0]), rows)


def test_small_val_split_is_padded(tmp_path):
    _write_text_corpus(tmp_path, n_files=4, lines=40)
    ds = _build(_cfg(source='text', paths=str(tmp_path), val_fraction=0.3, eval_batches=10),
                seq_len=64, batch=8)
    ev = [_host(b) for b in ds.eval_batches()]
    assert len(ev) == -(-ds.val.num_rows // 8) < 10
    total = sum(b['weights'].sum() for b in ev)
    assert total == ds.val.num_tokens - 1 - (len(ds.val.doc_ends) - 1)   # all pairs, no crossings


# ---------------------------------------------------------------- sharding and processes

@pytest.mark.parametrize('layout', ['data8', 'data2_fsdp4', 'seq_sharded', 'one_device'])
def test_global_batch_does_not_depend_on_sharding(stdlib_ds, layout):
    sharding = {
        'data8': lambda: _sharding(),
        'data2_fsdp4': lambda: _sharding((2, 4), ('data', 'fsdp'), P(('data', 'fsdp'))),
        'seq_sharded': lambda: _sharding((4, 2), ('data', 'context'), P('data', 'context')),
        'one_device': lambda: _sharding((1,), ('data',), P('data')),
    }[layout]()
    ds = _build(sharding=sharding)
    it, ref = ds.train_iterator(), stdlib_ds.train_iterator()
    for _ in range(2):
        b = next(it)
        assert b['inputs'].sharding == sharding
        _assert_batches_equal(_host(b), _host(next(ref)))
    _assert_batches_equal(_host(ds.eval_batches()[1]), _host(stdlib_ds.eval_batches()[1]))


def test_process_rows_for_several_layouts():
    devs = jax.devices()
    B = 16
    # 2 "processes" of 4 devices each; mesh data=4 × tensor=2 in device order.
    s = _sharding((4, 2), ('data', 'tensor'), P('data'))
    assert data.process_row_range(s, (B, 8), devs[:4]) == (0, 8)
    assert data.process_row_range(s, (B, 8), devs[4:]) == (8, 16)
    # Pure FSDP over 8: each process owns half of the rows.
    s = _sharding((8,), ('fsdp',), P('fsdp'))
    assert data.process_row_range(s, (B, 8), devs[4:]) == (8, 16)
    # Batch replicated across the process boundary (tensor axis spans processes): both hold all.
    s = _sharding((2, 4), ('tensor', 'data'), P('data'))
    assert data.process_row_range(s, (B, 8), devs[:4]) == (0, 16)
    assert data.process_row_range(s, (B, 8), devs[4:]) == (0, 16)
    # Interleaved device order: process 0 holds rows 0-1, 4-5, 8-9, 12-13.
    inter = [devs[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]
    s = _sharding((8,), ('data',), P('data'), devices=inter)
    rows = data.process_rows(s, (B, 8), devs[:4])
    assert rows.tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    with pytest.raises(UserError, match='non-contiguous'):
        data.process_row_range(s, (B, 8), devs[:4])
    # The shares of all processes together cover every row exactly once.
    both = np.concatenate([data.process_rows(s, (B, 8), devs[:4]),
                           data.process_rows(s, (B, 8), devs[4:])])
    assert sorted(both.tolist()) == list(range(B))


_WORKER = textwrap.dedent('''
    import os, sys
    pid, port, out, corpus = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    import jax
    jax.config.update('jax_num_cpu_devices', 4)
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from paxlike import data
    devs = jax.devices()
    cfg = data.default_config()
    cfg.update(dict(source='text', paths=corpus, tokenizer='bpe', bpe_vocab_size=300))
    result = {}
    for name, order in [('contig', list(range(8))), ('interleaved', [0, 4, 1, 5, 2, 6, 3, 7])]:
        mesh = Mesh(np.array([devs[i] for i in order]), ('data',),
                    axis_types=(jax.sharding.AxisType.Auto,))
        ds = data.build(cfg, seq_len=16, global_batch_size=16, seed=3,
                        workdir=os.path.join(out, f'wd{pid}'),   # separate "local disks"
                        batch_sharding=NamedSharding(mesh, P('data')))
        it = ds.train_iterator()
        batches = [next(it), next(it), ds.eval_batches()[0]]
        for b, batch in enumerate(batches):
            for key, arr in batch.items():
                for shard in arr.addressable_shards:
                    lo = shard.index[0].start or 0
                    result[f'{name}/{b}/{key}/{lo}'] = np.asarray(shard.data)
        result[f'{name}/rows'] = ds.local_rows
    np.savez(os.path.join(out, f'p{pid}.npz'), **result)
''')


def test_two_real_processes_load_their_share_of_the_same_global_batch(tmp_path):
    """jax.distributed with 2 processes × 4 CPU devices: every shard equals the single-process
    global batch, for contiguous and interleaved device orders (and BPE trained per process)."""
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    _write_text_corpus(corpus)
    script = tmp_path / 'worker.py'
    script.write_text(_WORKER)
    run_two_workers(script, tmp_path, str(corpus))

    ref = _build(_cfg(source='text', paths=str(corpus), tokenizer='bpe', bpe_vocab_size=300),
                 seq_len=16, batch=16, seed=3, workdir=str(tmp_path / 'ref'))
    expected = [ref.global_train_batch(0), ref.global_train_batch(1), _host(ref.eval_batches()[0])]
    shards = [dict(np.load(tmp_path / f'p{i}.npz')) for i in range(2)]
    assert shards[0]['contig/rows'].tolist() == list(range(8))
    assert shards[1]['contig/rows'].tolist() == list(range(8, 16))
    assert shards[0]['interleaved/rows'].tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    checked = 0
    for got in shards:
        for name, arr in got.items():
            if name.endswith('/rows'):
                continue
            _, b, key, lo = name.split('/')
            want = expected[int(b)][key][int(lo):int(lo) + arr.shape[0]]
            np.testing.assert_array_equal(arr, want, err_msg=name)
            checked += 1
    assert checked == 2 * 2 * 3 * 5 * 4   # processes × layouts × batches × keys × local devices


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('case, match', [
    ('missing_path', r"data path '.*nope.txt' does not exist"),
    ('empty_glob', r"matched no files"),
    ('unreadable', r"cannot read data file"),
    ('empty_corpus', r"training split .* is empty"),
    ('jsonl_no_field', r":1: record has no field 'text' \(it has \['body'\]\).*jsonl_field"),
    ('jsonl_bad_json', r":2: not valid JSON"),
    ('bad_tokenizer', r"data.tokenizer must be one of byte, bpe; got 'wordpiece'"),
    ('bad_source', r"data.source must be one of stdlib, text, jsonl"),
    ('too_small', r"fewer than one global batch of 8 rows; add data"),
    ('no_val', r"val split .* is empty.*eval_batches=0"),
    ('bad_val_fraction', r"data.val_fraction must be a number in \[0, 1\)"),
    ('bad_bpe_vocab', r"data.bpe_vocab_size must be an integer"),
    ('empty_paths', r"data.paths is empty"),
    ('too_small_bpe', r"fewer than one global batch"),
    ('workdir_is_a_file', r"cannot write the tokenizer into the workdir .*writable directory"),
    ('indivisible_batch', r"batch shape \(12, 64\).*divisible"),
])
def test_bad_input_raises_user_error(tmp_path, case, match):
    f = tmp_path / 'a.txt'
    f.write_text('some text\n' * 100)
    jl = tmp_path / 'a.jsonl'
    kw, seq_len, workdir = {}, 64, tmp_path / 'wd'
    if case == 'missing_path':
        kw = dict(source='text', paths=f'{f},{tmp_path}/nope.txt')
    elif case == 'empty_glob':
        kw = dict(source='text', paths=str(tmp_path / '*.md'))
    elif case == 'unreadable':
        (tmp_path / 'd').mkdir()
        (tmp_path / 'd' / 'gone.txt').symlink_to(tmp_path / 'dangling')
        kw = dict(source='text', paths=str(tmp_path / 'd'))
    elif case == 'empty_corpus':
        (tmp_path / 'e').mkdir()
        (tmp_path / 'e' / 'x.txt').write_text('')
        kw = dict(source='text', paths=str(tmp_path / 'e'))
    elif case == 'jsonl_no_field':
        jl.write_text('{"body": "x"}\n')
        kw = dict(source='jsonl', paths=str(jl))
    elif case == 'jsonl_bad_json':
        jl.write_text('{"text": "x"}\n{"text": \n')
        kw = dict(source='jsonl', paths=str(jl))
    elif case == 'bad_tokenizer':
        kw = dict(tokenizer='wordpiece')
    elif case == 'bad_source':
        kw = dict(source='hf')
    elif case == 'too_small':
        f.write_text('tiny')
        kw = dict(source='text', paths=str(f), val_fraction=0.0, eval_batches=0)
    elif case == 'too_small_bpe':
        kw = dict(source='text', paths=str(f), tokenizer='bpe', bpe_vocab_size=300,
                  val_fraction=0.0, eval_batches=0)
        seq_len = 1000
    elif case == 'workdir_is_a_file':
        kw = dict(source='text', paths=str(f), tokenizer='bpe', bpe_vocab_size=300)
        workdir, seq_len = f, 16
    elif case == 'no_val':
        kw = dict(source='text', paths=str(f), val_fraction=0.0)
    elif case == 'bad_val_fraction':
        kw = dict(val_fraction=1.5)
    elif case == 'bad_bpe_vocab':
        kw = dict(source='text', paths=str(f), tokenizer='bpe', bpe_vocab_size=10)
    elif case == 'empty_paths':
        kw = dict(source='text', paths=' , ')
    batch = 12 if case == 'indivisible_batch' else 8
    with pytest.raises(UserError, match=match):
        _build(_cfg(**kw), batch=batch, seq_len=seq_len, workdir=str(workdir))
    assert not (tmp_path / 'wd').exists()   # nothing written for a bad input
