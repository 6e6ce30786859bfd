"""Prepared data (paxlike/data/prepared.py, `python -m paxlike.data prepare`): the same batches as
the in-memory pipeline, each process reading only its rows' records, resumable across process
counts, and clear errors for bad input."""

import os

# tests/conftest.py sets 8 emulated devices; setdefault keeps this module runnable on its own.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import ROOT, assert_one_line_error, run_two_workers, snapshot
from paxlike import data
from paxlike.data import __main__ as data_cli
from paxlike.data import prepare
from paxlike.errors import UserError

AUTO = jax.sharding.AxisType.Auto
SEQ, BATCH, SEED = 32, 8, 3


def _sharding(devices=None, shape=None, names=('data',), spec=P('data')):
    devices = jax.devices() if devices is None else devices
    shape = shape or (len(devices),)
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(shape), names,
                             axis_types=(AUTO,) * len(names))
    return NamedSharding(mesh, spec)


def _cfg(**kw):
    cfg = data.default_config()
    cfg.update(kw)
    return cfg


def _build(cfg, *, workdir=None, sharding=None, batch=BATCH, seq_len=SEQ):
    return data.build(cfg, seq_len=seq_len, global_batch_size=batch, seed=SEED,
                      workdir=None if workdir is None else str(workdir),
                      batch_sharding=sharding or _sharding())


def _host(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def _write_corpus(d):
    """12 text files of different lengths (some shorter than a row, one empty) and a JSONL file."""
    d.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        lines = [5, 60, 1, 0, 120, 33, 7, 90, 2, 45, 70, 15][i]
        (d / f'doc{i:02d}.txt').write_text(''.join(
            f'file {i} line {j}: the quick brown fox {i * j % 7} jumps. héllo ✓\n'
            for j in range(lines)))
    recs = [{'text': f'record {i}: ' + 'lorem ipsum dolor ' * (i % 9 + 1)} for i in range(150)]
    (d.parent / 'corpus.jsonl').write_text('\n'.join(json.dumps(r) for r in recs) + '\n')


def _prepare(out, **kw):
    kw = {'source': 'text', 'seq_len': SEQ, 'progress': False, 'shard_mb': 0.002, **kw}
    return prepare.prepare(out=str(out), **kw)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp('prepared')
    _write_corpus(root / 'text')
    # A "pretrained" tokenizer file with its own end-of-text token, as a model hub ships them.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>'],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted((root / 'text').iterdir())], trainer)
    tok.save(str(root / 'pretrained.json'))
    # Tiny shards (0.002 MiB ≈ 27 rows) so the global row index spans many files.
    _prepare(root / 'byte', paths=str(root / 'text'))
    return root


CASES = {
    'text-byte': dict(source='text', paths='text'),
    'text-bpe': dict(source='text', paths='text', tokenizer='bpe', bpe_vocab_size=300),
    'jsonl-byte': dict(source='jsonl', paths='corpus.jsonl', val_fraction=0.2),
    'one-file': dict(source='text', paths='text/doc04.txt', val_fraction=0.1),
    'pretrained': dict(source='text', paths='text', tokenizer='pretrained.json',
                       eos_token='<|endoftext|>'),
}


# ---------------------------------------------------------------- (a) same batches as in memory

@pytest.mark.parametrize('case', CASES)
def test_prepared_batches_equal_the_in_memory_pipeline(corpus, tmp_path, case):
    kw = dict(CASES[case])
    kw['paths'] = str(corpus / kw['paths'])
    if case == 'pretrained':
        kw['tokenizer'] = str(corpus / kw['tokenizer'])
    out = tmp_path / 'prepared'
    m = _prepare(out, **kw)
    tok_cfg = {k: kw[k] for k in ('tokenizer', 'bpe_vocab_size', 'val_fraction', 'eos_token')
               if k in kw}
    field = {'jsonl_field': 'text'} if kw['source'] == 'jsonl' else {}
    mem = _build(_cfg(source=kw['source'], paths=kw['paths'], **tok_cfg, **field),
                 workdir=tmp_path / 'mem')
    if case == 'pretrained':   # the copy beside the data is the same tokenizer (same bytes)
        tok_cfg['tokenizer'] = str(out / 'tokenizer.json')
    prep = _build(_cfg(source='prepared', paths=str(out), **tok_cfg), workdir=tmp_path / 'prep')

    assert len(m['splits']['train']['shards']) > 1   # the row index spans shards
    assert prep.train.num_rows == mem.train.num_rows
    assert prep.train.num_tokens == mem.train.num_tokens
    assert (prep.val.num_rows, prep.val.num_tokens) == (mem.val.num_rows, mem.val.num_tokens)
    assert m['splits']['train']['tokens'] == mem.train.num_tokens
    fingerprint = m['tokenizer']['fingerprint']
    assert prep.tokenizer.fingerprint() == mem.tokenizer.fingerprint() == fingerprint
    epoch = mem.train.num_rows // BATCH
    for k in (0, 1, 2, epoch - 1, epoch, epoch + 1, 3 * epoch + 2):   # across reshuffled epochs
        _assert_equal(prep.global_train_batch(k), mem.global_train_batch(k))
    # Every row, in order (the last one is partial and padded).
    every = np.arange(mem.train.num_rows)
    _assert_equal(prep.train.rows(every), mem.train.rows(every))
    it_p, it_m = prep.train_iterator(), mem.train_iterator()
    for _ in range(3):
        _assert_equal(_host(next(it_p)), _host(next(it_m)))
    # The data position means the same in both: a checkpoint moves between them.
    assert it_p.get_state() == it_m.get_state()
    ev_p, ev_m = prep.eval_batches(), mem.eval_batches()
    assert len(ev_p) == len(ev_m) >= 1
    for a, b in zip(ev_p, ev_m):
        _assert_equal(_host(a), _host(b))
    if kw.get('tokenizer') == 'bpe':
        # The run's workdir gets the tokenizer the data was made with, as with in-memory BPE.
        prep.save_tokenizer()
        mem.save_tokenizer()
        assert ((tmp_path / 'prep' / 'tokenizer.json').read_text()
                == (tmp_path / 'mem' / 'tokenizer.json').read_text()
                == (out / 'tokenizer.json').read_text())


def test_small_corpus_holds_out_one_document_like_the_in_memory_split(tmp_path):
    """No document hashes into val: both paths hold out the same one (prepare writes twice)."""
    import hashlib
    from paxlike.data import sources
    d = tmp_path / 'few'
    d.mkdir()
    texts = [t for t in (f'document {i}\n' * (20 + 7 * i) for i in range(40))
             if not sources.is_val('sha256:' + hashlib.sha256(t.encode()).hexdigest(), 0.05)][:4]
    for i, t in enumerate(texts):
        (d / f'f{i}.txt').write_text(t)
    m = _prepare(tmp_path / 'out', paths=str(d), seq_len=16)
    assert m['split']['held_out_document'] is not None and m['splits']['val']['documents'] == 1
    one = _sharding(jax.devices()[:1])
    mem = _build(_cfg(source='text', paths=str(d)), seq_len=16, batch=2, sharding=one)
    prep = _build(_cfg(source='prepared', paths=str(tmp_path / 'out')), seq_len=16, batch=2,
                  sharding=one)
    _assert_equal(prep.train.rows(np.arange(mem.train.num_rows)),
                  mem.train.rows(np.arange(mem.train.num_rows)))
    _assert_equal(prep.val.rows(np.arange(mem.val.num_rows)),
                  mem.val.rows(np.arange(mem.val.num_rows)))
    # Nothing of the first pass is left: exactly the manifest's shards.
    listed = [sh['file'] for sp in m['splits'].values() for sh in sp['shards']]
    names = sorted(p.name for p in (tmp_path / 'out').iterdir())
    assert names == sorted(listed + ['manifest.json'])


# ---------------------------------------------------------------- (b) each process reads its rows

class _CountingSource:
    """Wraps a grain data source; records the record keys of every batched read."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, key):
        self.calls.append([int(key)])
        return self.inner[key]

    def __getitems__(self, keys):
        self.calls.append([int(k) for k in keys])
        return self.inner.__getitems__(keys)


def _as_process(ds, devices):
    """`ds` as the process that owns `devices` would see it: its rows only, batches left on the
    host (jax.make_array_from_process_local_data needs the real other process)."""
    ds.local_rows = data.process_rows(ds.batch_sharding, ds.global_shape, devices)
    ds._to_global = lambda local: local
    ds.train.source = _CountingSource(ds.train.source)
    ds.val.source = _CountingSource(ds.val.source)
    return ds


@pytest.mark.parametrize('order', ['contiguous', 'interleaved'])
def test_each_process_reads_only_its_rows_records(corpus, order):
    devs = jax.devices()
    mesh_devs = devs if order == 'contiguous' else [devs[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]
    cfg = _cfg(source='prepared', paths=str(corpus / 'byte'))
    ref = _build(cfg)
    reads = []
    for proc in (devs[:4], devs[4:]):
        ds = _as_process(_build(cfg, sharding=_sharding(mesh_devs)), proc)
        local = ds.local_rows
        assert len(local) == BATCH // 2
        it = ds.train_iterator()
        got = [next(it) for _ in range(3)]
        evals = ds.eval_batches()
        calls = ds.train.source.calls
        # One batched read per global batch (more were prefetched in the background), and each
        # asked for exactly the records of this process's rows of that batch: nothing else.
        assert len(calls) >= 3
        for k, call in enumerate(calls):
            assert call == ref._train_rows_dataset()[k][local].tolist(), k
        for k in range(3):
            _assert_equal(got[k], {n: v[local] for n, v in ref.global_train_batch(k).items()})
        for ids, call, ev, full in zip(ref.eval_row_ids(), ds.val.source.calls, evals,
                                       ref.eval_batches()):
            assert call == [i for i in ids[local].tolist() if i >= 0]
            _assert_equal(ev, {n: np.asarray(v)[local] for n, v in full.items()})
        reads.append([set(c) for c in calls[:3]])
    # The two processes together read each row of a batch once: disjoint halves.
    for k in range(3):
        a, b = reads[0][k], reads[1][k]
        assert not a & b and a | b == set(ref._train_rows_dataset()[k].tolist())


_WORKER = textwrap.dedent('''
    import os, sys
    pid, port, out, prepared_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    import jax
    jax.config.update('jax_num_cpu_devices', 4)
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from paxlike import data
    cfg = data.default_config()
    cfg.update(dict(source='prepared', paths=prepared_dir))
    mesh = Mesh(np.array(jax.devices()), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    ds = data.build(cfg, seq_len=32, global_batch_size=8, seed=3, workdir=None,
                    batch_sharding=NamedSharding(mesh, P('data')))
    reads = []
    inner = ds.train.source
    class Counting:
        def __len__(self):
            return len(inner)
        def __getitems__(self, keys):
            reads.append(list(keys))
            return inner.__getitems__(keys)
    ds.train.source = Counting()
    it = ds.train_iterator()
    result = {}
    for b in range(3):
        batch = next(it)
        for key, arr in batch.items():
            for shard in arr.addressable_shards:
                result[f'{b}/{key}/{shard.index[0].start or 0}'] = np.asarray(shard.data)
    result['rows'] = ds.local_rows
    result['reads'] = np.array(reads[:3])
    np.savez(os.path.join(out, f'p{pid}.npz'), **result)
''')


def test_two_real_processes_read_only_their_records(corpus, tmp_path):
    """jax.distributed, 2 processes × 4 CPU devices over prepared data: each process's reads are
    exactly its half of each global batch's rows, and its shards equal the global batch."""
    script = tmp_path / 'worker.py'
    script.write_text(_WORKER)
    run_two_workers(script, tmp_path, str(corpus / 'byte'))
    ref = _build(_cfg(source='prepared', paths=str(corpus / 'byte')))
    got = [dict(np.load(tmp_path / f'p{i}.npz')) for i in range(2)]
    assert got[0]['rows'].tolist() == [0, 1, 2, 3] and got[1]['rows'].tolist() == [4, 5, 6, 7]
    for k in range(3):
        ids = ref._train_rows_dataset()[k]
        assert got[0]['reads'][k].tolist() == ids[:4].tolist()
        assert got[1]['reads'][k].tolist() == ids[4:].tolist()
        full = ref.global_train_batch(k)
        for g in got:
            for name, arr in g.items():
                if name.startswith(f'{k}/'):
                    _, key, lo = name.split('/')
                    np.testing.assert_array_equal(arr, full[key][int(lo):int(lo) + len(arr)])


# ---------------------------------------------------------------- (c) resume on another layout

def test_resume_on_another_process_count_keeps_the_order(corpus):
    cfg = _cfg(source='prepared', paths=str(corpus / 'byte'))
    one = _build(cfg)                                   # 1 process, 8 devices
    it = one.train_iterator()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))      # what a checkpoint stores
    expected = [_host(next(it)) for _ in range(2)]      # batches 3 and 4
    # 2 processes of 4 devices each, data=2 × fsdp=4: each resumes at batch 3 with its rows.
    devs = jax.devices()
    for proc in (devs[:4], devs[4:]):
        ds = _as_process(_build(cfg, sharding=_sharding(devs, (2, 4), ('data', 'fsdp'),
                                                        P(('data', 'fsdp')))), proc)
        it2 = ds.train_iterator()
        it2.set_state(state)
        for e in expected:
            _assert_equal(next(it2), {k: v[ds.local_rows] for k, v in e.items()})
        assert it2.get_state()['batch_index'] == 5
    # 1 process with 2 devices: the same global batches.
    small = _build(cfg, sharding=_sharding(devs[:2]))
    it3 = small.train_iterator()
    it3.set_state(state)
    for e in expected:
        _assert_equal(_host(next(it3)), e)


# ---------------------------------------------------------------- (d) bad input

def test_run_side_mismatches_are_refused(corpus, tmp_path):
    byte_dir = str(corpus / 'byte')
    with pytest.raises(UserError, match=r'rows of seq_len 32, but this run has seq_len=64: set '
                                        r'--config.seq_len=32, or re-run .*--seq_len=64'):
        _build(_cfg(source='prepared', paths=byte_dir), seq_len=64)
    with pytest.raises(UserError, match=r'tokenized with --tokenizer=byte \(fingerprint '
                                        r'byte-257\), but this run has data.tokenizer=bpe.*set '
                                        r'--config.data.tokenizer=byte'):
        _build(_cfg(source='prepared', paths=byte_dir, tokenizer='bpe'), workdir=tmp_path / 'w')
    assert not (tmp_path / 'w').exists()
    bpe_dir = tmp_path / 'bpe'
    _prepare(bpe_dir, paths=str(corpus / 'text'), tokenizer='bpe', bpe_vocab_size=300)
    with pytest.raises(UserError, match=r'data.bpe_vocab_size=4096: set --config.data.tokenizer'
                                        r'=bpe --config.data.bpe_vocab_size=300'):
        _build(_cfg(source='prepared', paths=str(bpe_dir), tokenizer='bpe'))
    with pytest.raises(UserError, match=r'fingerprint bpe-.*this run\'s data.tokenizer=byte has '
                                        r'fingerprint byte-257: set --config.data.tokenizer=bpe'):
        _build(_cfg(source='prepared', paths=str(bpe_dir)))
    # A workdir whose tokenizer.json is another one (its checkpoints mean other ids).
    other = tmp_path / 'other'
    _build(_cfg(source='text', paths=str(corpus / 'text'), tokenizer='bpe', bpe_vocab_size=290),
           workdir=other)
    with pytest.raises(UserError, match=r'the workdir holds another tokenizer.*new --workdir'):
        _build(_cfg(source='prepared', paths=str(bpe_dir), tokenizer='bpe', bpe_vocab_size=300),
               workdir=other)
    pre = tmp_path / 'pre'
    _prepare(pre, paths=str(corpus / 'text'), tokenizer=str(corpus / 'pretrained.json'),
             eos_token='<|endoftext|>')
    with pytest.raises(UserError, match=r'fingerprint pretrained-.*set --config.data.tokenizer='
                                        r'.*pre/tokenizer.json '
                                        r'--config.data.eos_token=<\|endoftext'):
        _build(_cfg(source='prepared', paths=str(pre)))
    with pytest.raises(UserError, match=r'fingerprint pretrained-.*set --config.data.tokenizer='):
        _build(_cfg(source='prepared', paths=str(pre), tokenizer=str(pre / 'tokenizer.json'),
                    eos_token='<|endoftext|>', bos_token='<|endoftext|>'))
    with pytest.raises(UserError, match=r"prepared data directory '.*nope' does not exist; run "
                                        r"`python -m paxlike.data prepare"):
        _build(_cfg(source='prepared', paths=str(tmp_path / 'nope')))
    (tmp_path / 'half').mkdir()
    (tmp_path / 'half' / 'train-00000.array_record').write_bytes(b'x')
    with pytest.raises(UserError, match=r'has no manifest.json: .*prepare did not finish'):
        _build(_cfg(source='prepared', paths=str(tmp_path / 'half')))
    # A damaged (truncated) shard is named before anything is read from it.
    damaged = tmp_path / 'damaged'
    _prepare(damaged, paths=str(corpus / 'text'))
    shard = damaged / 'train-00001.array_record'
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match=r'train-00001.array_record is 100 bytes, the manifest '
                                        r'says \d+: re-run prepare with --overwrite'):
        _build(_cfg(source='prepared', paths=str(damaged)))
    with pytest.raises(UserError, match=r'fewer than one global batch of 4096 rows'):
        _build(_cfg(source='prepared', paths=byte_dir), batch=4096)


def test_prepare_refuses_bad_input_and_never_overwrites_silently(corpus, tmp_path):
    text = str(corpus / 'text')
    out = tmp_path / 'out'
    _prepare(out, paths=text)
    before = snapshot(out)
    with pytest.raises(UserError, match=r'--out .*out is not empty \(\d+ entries\); pass '
                                        r'--overwrite'):
        _prepare(out, paths=text, seq_len=16)
    assert snapshot(out) == before
    # --overwrite replaces prepared data...
    m = _prepare(out, paths=text, seq_len=16, overwrite=True)
    assert m['seq_len'] == 16 and json.loads((out / 'manifest.json').read_text())['seq_len'] == 16
    # ...but never a directory that holds anything else.
    (tmp_path / 'home').mkdir()
    (tmp_path / 'home' / 'notes.txt').write_text('precious')
    with pytest.raises(UserError, match=r'holds files prepare did not write \(notes.txt\)'):
        _prepare(tmp_path / 'home', paths=text, overwrite=True)
    assert (tmp_path / 'home' / 'notes.txt').read_text() == 'precious'
    # Bad input fails before --out is touched (or created).
    for kw, match in [
        (dict(paths=f'{text},{tmp_path}/nope.txt'), r"data path '.*nope.txt' does not exist"),
        (dict(paths=str(corpus / 'text' / 'doc03.txt')), r'training split .* is empty'),
        (dict(paths=text, tokenizer='wordpiece'), r'--tokenizer must be one of byte, bpe'),
        (dict(paths=text, tokenizer='bpe', bpe_vocab_size=10), r'--bpe_vocab_size must be'),
        (dict(paths=text, seq_len=0), r'--seq_len must be an integer >= 1'),
        (dict(source='jsonl', paths=text), r'doc00.txt:1: not valid JSON'),
    ]:
        with pytest.raises(UserError, match=match):
            _prepare(tmp_path / 'fresh', **kw)
        assert not (tmp_path / 'fresh').exists(), kw
        with pytest.raises(UserError, match=match):
            _prepare(out, overwrite=True, **kw)
        assert json.loads((out / 'manifest.json').read_text())['seq_len'] == 16, kw


@pytest.mark.parametrize('source, package, module', [('parquet', 'pyarrow', 'pyarrow.parquet'),
                                                     ('hf', 'datasets', 'datasets')])
def test_optional_sources_name_their_package(corpus, tmp_path, monkeypatch, source, package,
                                             module):
    monkeypatch.setitem(sys.modules, module, None)   # as if not installed: importing it fails
    with pytest.raises(UserError, match=rf'--source={source} needs the {package!r} package, '
                                        rf'which is not installed: pip install {package}'):
        _prepare(tmp_path / 'out', source=source, paths=str(corpus / 'text'))
    assert not (tmp_path / 'out').exists()


def test_parquet_source_splits_like_jsonl(corpus, tmp_path):
    pq = pytest.importorskip('pyarrow.parquet')
    import pyarrow as pa
    recs = [json.loads(line)['text'] for line in (corpus / 'corpus.jsonl').read_text().splitlines()]
    pq.write_table(pa.table({'text': recs[:70]}), tmp_path / 'a.parquet')
    pq.write_table(pa.table({'text': recs[70:]}), tmp_path / 'b.parquet')
    pm = _prepare(tmp_path / 'pq', source='parquet', paths=str(tmp_path / '*.parquet'),
                  val_fraction=0.2)
    jm = _prepare(tmp_path / 'jl', source='jsonl', paths=str(corpus / 'corpus.jsonl'),
                  val_fraction=0.2)
    for split in ('train', 'val'):
        for key in ('documents', 'tokens', 'rows'):
            assert pm['splits'][split][key] == jm['splits'][split][key]


def test_cli_prepares_and_reports_errors_in_one_line(corpus, tmp_path, capsys):
    out = tmp_path / 'cli'
    assert data_cli.main(['prepare', '--source=text', f'--paths={corpus / "text"}',
                          '--seq_len=32', f'--out={out}', '--quiet']) == 0
    printed = capsys.readouterr().out
    assert 'tokens/s' in printed and f'--config.data.paths={out}' in printed
    m = json.loads((out / 'manifest.json').read_text())
    assert m['format'] == 'paxlike-prepared' and m['format_version'] == 1
    assert m['splits']['train']['rows'] == sum(s['rows'] for s in m['splits']['train']['shards'])
    env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
    for args, message in [
        ([f'--paths={corpus / "text"}', f'--out={out}'], r'--out .* is not empty.*--overwrite'),
        ([f'--paths={corpus / "text"}'], r'the following arguments are required: --out'),
    ]:
        result = subprocess.run([sys.executable, '-m', 'paxlike.data', 'prepare', '--source=text',
                                 *args], env=env, capture_output=True, text=True, timeout=60)
        assert_one_line_error(result, message)


def test_hf_source_reads_a_saved_dataset(corpus, tmp_path):
    datasets = pytest.importorskip('datasets')
    import pyarrow as pa
    recs = [json.loads(line)['text'] for line in (corpus / 'corpus.jsonl').read_text().splitlines()]
    table = pa.table({'text': recs, 'n': list(range(len(recs)))})
    datasets.DatasetDict({'train': datasets.Dataset(table, fingerprint='t'),
                          'test': datasets.Dataset(table.slice(0, 3), fingerprint='u')}
                         ).save_to_disk(str(tmp_path / 'hf'))
    hm = _prepare(tmp_path / 'h', source='hf', paths=str(tmp_path / 'hf'), val_fraction=0.2)
    jm = _prepare(tmp_path / 'jl', source='jsonl', paths=str(corpus / 'corpus.jsonl'),
                  val_fraction=0.2)
    for split in ('train', 'val'):   # the 'train' split of the DatasetDict, split like JSONL
        for key in ('documents', 'tokens', 'rows'):
            assert hm['splits'][split][key] == jm['splits'][split][key]
    with pytest.raises(UserError, match=r"has no column 'body' \(it has \['n', 'text'\]\)"):
        _prepare(tmp_path / 'x', source='hf', paths=str(tmp_path / 'hf'), field='body')
    with pytest.raises(UserError, match=r"splits \['train', 'test'\]; choose one with --hf_split"):
        _prepare(tmp_path / 'x', source='hf', paths=str(tmp_path / 'hf'), hf_split='dev')
