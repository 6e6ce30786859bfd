"""Prepared data vs the in-memory pipeline: prepare throughput, peak memory, and the reader's rate
against what a training step consumes.

    python benchmarks/data_prepare.py [--mb=512] [--bpe_mb=32] [--dir=/tmp/paxlike-data-bench]

1. Writes a JSONL corpus of >= --mb MB to --dir (the Python standard library's source, each file
   one record, repeated with a copy marker and shuffled per copy; reused when already there).
2. Byte tokenizer, the whole corpus: `prepare` (seq_len 2048 and 128) and the in-memory pipeline
   (`data.build`, which every run and every process repeats at start) on the same data; each in
   its own process, wall time and peak RSS (`os.wait4`'s ru_maxrss).
3. BPE (vocab 32768, as the 125m config), on the first --bpe_mb MB: the same two paths (BPE
   training dominates both, so the full corpus would take tens of minutes on 2 cores).
4. Reader: global batches of the 125m shape (256 x 2048) and of tiny (16 x 128) through the real
   `Dataset._local_train_batches` path (grain, one background thread) from the prepared
   directories, tokens/s; beside it the in-memory `PackedSplit.rows` at the same shape.
5. Consumption: a measured train step of the `tiny` config on this machine, and the planner's
   predicted step of `125m` on one 8xH100 node (no accelerator here), both in tokens/s per host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------------- children

def _cpu_sharding():
    import jax
    import numpy as np
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def child_prepare(a) -> dict:
    from paxlike.data import prepare
    m = prepare.prepare(source='jsonl', paths=a.paths, tokenizer=a.tokenizer, seq_len=a.seq_len,
                         out=a.out, bpe_vocab_size=a.bpe_vocab_size, overwrite=True,
                         progress=False, compression=a.compression)
    return {**m['prepare'], 'rows': m['splits']['train']['rows']}


def _repeat_for(seconds: float, step) -> tuple[int, float]:
    """Calls step(0), step(1), ... for about `seconds`: (calls, seconds taken)."""
    t0, n = time.time(), 0
    while time.time() - t0 < seconds:
        step(n)
        n += 1
    return n, time.time() - t0


def child_inmemory(a) -> dict:
    from paxlike import data
    cfg = data.default_config()
    cfg.update(source='jsonl', paths=a.paths, tokenizer=a.tokenizer,
               bpe_vocab_size=a.bpe_vocab_size, eval_batches=0)
    t0 = time.time()
    ds = data.build(cfg, seq_len=a.seq_len, global_batch_size=a.batch, seed=0, workdir=None,
                    batch_sharding=_cpu_sharding())
    seconds = time.time() - t0
    tokens = ds.train.num_tokens + (ds.val.num_tokens if ds.val else 0)
    rows = ds._train_rows_dataset()
    ds.train.rows(rows[0])
    n, elapsed = _repeat_for(3, lambda i: ds.train.rows(rows[i]))
    return {'seconds': seconds, 'tokens': tokens, 'tokens_per_s': tokens / seconds,
            'reader_tokens_per_s': n * a.batch * a.seq_len / elapsed, 'rows': ds.train.num_rows}


def child_reader(a) -> dict:
    from paxlike import data
    cfg = data.default_config()
    cfg.update(source='prepared', paths=a.out, tokenizer=a.tokenizer,
               bpe_vocab_size=a.bpe_vocab_size, eval_batches=0)
    t0 = time.time()
    ds = data.build(cfg, seq_len=a.seq_len, global_batch_size=a.batch, seed=0, workdir=None,
                    batch_sharding=_cpu_sharding())
    open_s = time.time() - t0
    it = iter(ds._local_train_batches())
    next(it)
    n, elapsed = _repeat_for(5, lambda i: next(it))
    return {'open_s': open_s, 'batches': n, 'tokens_per_s': n * a.batch * a.seq_len / elapsed}


def child_trainstep(a) -> dict:
    import jax
    import numpy as np
    from paxlike.experiments import transformer
    from paxlike.mesh import build_mesh
    from paxlike.trainer import Trainer
    cfg = transformer.get_config('tiny')
    trainer = Trainer(cfg, build_mesh({'fsdp': -1}))
    rng = np.random.default_rng(0)
    shape = (cfg.batch_size, cfg.seq_len)
    host = {'inputs': rng.integers(0, 256, shape, dtype=np.int32),
            'targets': rng.integers(0, 256, shape, dtype=np.int32),
            'segment_ids': np.ones(shape, np.int32),
            'positions': np.broadcast_to(np.arange(cfg.seq_len, dtype=np.int32), shape).copy(),
            'weights': np.ones(shape, np.float32)}
    batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()}
    state = trainer.init_state()
    trainer.compile(state)
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step = sorted(times[2:])[len(times[2:]) // 2]
    return {'step_s': step, 'tokens_per_s': cfg.batch_size * cfg.seq_len / step,
            'batch': cfg.batch_size, 'seq_len': cfg.seq_len}


CHILDREN = {'prepare': child_prepare, 'inmemory': child_inmemory, 'reader': child_reader,
            'trainstep': child_trainstep}


def run_child(phase: str, **kw) -> dict:
    """Runs one phase in a fresh process; its result plus wall time and peak RSS."""
    args = [sys.executable, os.path.abspath(__file__), f'--child={phase}']
    args += [f'--{k}={v}' for k, v in kw.items()]
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
    t0 = time.time()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f'{phase} failed:\n{err[-3000:]}')
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall_s=time.time() - t0, peak_rss_mb=usage.ru_maxrss / 1024)
    return result


# ---------------------------------------------------------------------------- corpus

def make_corpus(directory: str, mb: float, file_mb: float = 64) -> tuple[str, int]:
    """JSONL files of >= mb MB: every stdlib file is a record; copies carry a marker line (so
    their split keys differ) and are shuffled per copy. Returns (glob, bytes)."""
    from paxlike.data import sources
    os.makedirs(directory, exist_ok=True)
    stamp = os.path.join(directory, f'done-{mb:g}')
    pattern = os.path.join(directory, 'part-*.jsonl')
    if os.path.exists(stamp):
        return pattern, int(open(stamp).read())
    for f in os.listdir(directory):
        os.unlink(os.path.join(directory, f))
    root = sources.stdlib_dir()
    texts = []
    for rel in sources.stdlib_files(root):
        with open(os.path.join(root, rel), 'rb') as f:
            texts.append((rel, f.read().decode('utf-8', errors='replace')))
    rng = random.Random(0)
    total, part, copy, handle = 0, 0, 0, None
    while total < mb * 1e6:
        order = list(range(len(texts)))
        rng.shuffle(order)
        for i in order:
            if handle is None or handle.tell() >= file_mb * 1e6:
                if handle:
                    handle.close()
                handle = open(os.path.join(directory, f'part-{part:04d}.jsonl'), 'w')
                part += 1
            rel, text = texts[i]
            line = json.dumps({'text': f'# copy {copy} of {rel}\n{text}'}) + '\n'
            handle.write(line)
            total += len(line)
        copy += 1
    handle.close()
    with open(stamp, 'w') as f:
        f.write(str(total))
    return pattern, total


def first_mb(pattern: str, directory: str, mb: float) -> str:
    """A JSONL file with the first `mb` MB of records of the corpus."""
    import glob
    path = os.path.join(directory, f'first-{mb:g}MB.jsonl')
    if not os.path.exists(path):
        with open(path, 'w') as out:
            written = 0
            for f in sorted(glob.glob(pattern)):
                for line in open(f):
                    if written >= mb * 1e6:
                        break
                    out.write(line)
                    written += len(line)
    return path


# ---------------------------------------------------------------------------- report

def machine() -> str:
    mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}'


def planner_125m() -> dict:
    out = subprocess.run([sys.executable, '-m', 'paxlike.plan',
                          '--config=experiments/transformer.py:125m', '--fleet=8xH100', '--json'],
                         cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True,
                         text=True, check=True)
    top = json.loads(out.stdout)['plans'][0]
    tokens = 256 * 2048
    return {'step_s': top['step_time_s'], 'tokens_per_s': tokens / top['step_time_s'],
            'mfu': top['mfu']}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--paths', default='')
    p.add_argument('--out', default='')
    p.add_argument('--tokenizer', default='byte')
    p.add_argument('--seq_len', type=int, default=2048)
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--bpe_vocab_size', type=int, default=32768)
    p.add_argument('--compression', default='zstd:1')
    p.add_argument('--mb', type=float, default=512, help='corpus size (MB of JSONL)')
    p.add_argument('--bpe_mb', type=float, default=32, help='corpus size for the BPE rows')
    p.add_argument('--dir', default='/tmp/paxlike-data-bench')
    a = p.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return

    t_all = time.time()
    pattern, size = make_corpus(os.path.join(a.dir, 'corpus'), a.mb)
    mb = size / 1e6
    print(f'corpus: {pattern}, {mb:.0f} MB of JSONL', flush=True)
    rows = []   # (what, data, wall s, tokens/s, MB/s, peak RSS MB, output MB)

    def add(what, data_mb, r):
        written = f'{r["output_bytes"] / 1e6:,.0f}' if 'output_bytes' in r else '-'
        rows.append((what, f'{data_mb:.0f} MB', r['wall_s'], r['tokens'] / r['seconds'],
                     data_mb / r['seconds'], r['peak_rss_mb'], written))
        print(f'  {what}: {r["seconds"]:.1f} s ({r["wall_s"]:.1f} s with the process start), '
              f'{r["tokens"] / r["seconds"] / 1e6:.2f}M tokens/s, peak RSS '
              f'{r["peak_rss_mb"]:,.0f} MB', flush=True)
        return r

    out = {L: os.path.join(a.dir, f'byte-{L}') for L in (2048, 128)}
    prep = {L: add(f'prepare, byte, seq_len {L}', mb,
                   run_child('prepare', paths=pattern, out=out[L], seq_len=L))
            for L in (2048, 128)}
    add('prepare, byte, seq_len 2048, --compression=none', mb,
        run_child('prepare', paths=pattern, out=os.path.join(a.dir, 'byte-2048-none'),
                  seq_len=2048, compression='none'))
    tokens = prep[2048]['tokens']
    mem = add('in-memory data.build, byte', mb,
              run_child('inmemory', paths=pattern, seq_len=2048, batch=256))
    small = first_mb(pattern, a.dir, a.bpe_mb)
    bpe_out = os.path.join(a.dir, 'bpe-2048')
    bp = add(f'prepare, BPE {a.bpe_vocab_size}, seq_len 2048', a.bpe_mb,
             run_child('prepare', paths=small, out=bpe_out, seq_len=2048, tokenizer='bpe',
                       bpe_vocab_size=a.bpe_vocab_size))
    print(f'    (of which BPE training {bp["tokenizer_seconds"]:.1f} s)', flush=True)
    add(f'in-memory data.build, BPE {a.bpe_vocab_size}', a.bpe_mb,
        run_child('inmemory', paths=small, seq_len=2048, batch=256, tokenizer='bpe',
                  bpe_vocab_size=a.bpe_vocab_size))

    readers = {
        '125m shape (256 x 2048), byte': run_child('reader', out=out[2048], seq_len=2048,
                                                   batch=256),
        '125m shape (256 x 2048), BPE': run_child('reader', out=bpe_out, seq_len=2048, batch=256,
                                                  tokenizer='bpe',
                                                  bpe_vocab_size=a.bpe_vocab_size),
        'tiny shape (16 x 128), byte': run_child('reader', out=out[128], seq_len=128, batch=16),
    }
    step_tiny = run_child('trainstep')
    step_125m = planner_125m()

    print()
    print(f'machine: {machine()}; no accelerator')
    print(f'corpus: {mb:.0f} MB of JSONL (stdlib source, {tokens / 1e6:.0f}M byte tokens); '
          f'BPE rows: the first {a.bpe_mb:.0f} MB')
    print()
    print('| path | data | wall s (process) | tokens/s | MB/s | peak RSS MB | written MB |')
    print('|---|---|---|---|---|---|---|')
    for what, d, wall, tps, mbs, rss, written in rows:
        print(f'| {what} | {d} | {wall:.1f} | {tps / 1e6:.2f}M | {mbs:.1f} | {rss:,.0f} | '
              f'{written} |')
    print()
    print('| reader (prepared, one process holding every row) | tokens/s | peak RSS MB | '
          'open s |')
    print('|---|---|---|---|')
    for what, r in readers.items():
        print(f'| {what} | {r["tokens_per_s"] / 1e6:.1f}M | {r["peak_rss_mb"]:,.0f} | '
              f'{r["open_s"]:.2f} |')
    print(f'| in-memory PackedSplit.rows, 125m shape, byte | '
          f'{mem["reader_tokens_per_s"] / 1e6:.1f}M | (above) | |')
    print()
    r125 = readers['125m shape (256 x 2048), BPE']['tokens_per_s']
    rtiny = readers['tiny shape (16 x 128), byte']['tokens_per_s']
    print('| consumer | tokens/s per host | reader headroom |')
    print('|---|---|---|')
    print(f'| tiny train step, measured here ({step_tiny["step_s"] * 1e3:.0f} ms/step) | '
          f'{step_tiny["tokens_per_s"] / 1e3:.1f}k | {rtiny / step_tiny["tokens_per_s"]:,.0f}x |')
    print(f'| 125m on one 8xH100 node, planner prediction ({step_125m["step_s"] * 1e3:.0f} '
          f'ms/step, MFU {100 * step_125m["mfu"]:.0f}%) | {step_125m["tokens_per_s"] / 1e6:.1f}M | '
          f'{r125 / step_125m["tokens_per_s"]:.1f}x (one read thread, this 2-core VM) |')
    print(f'\nrun start: the in-memory pipeline reads and tokenizes the corpus again at every '
          f'start, in every process ({mem["seconds"]:.1f} s, {mem["peak_rss_mb"]:,.0f} MB here); '
          f'opening prepared data takes '
          f'{readers["125m shape (256 x 2048), byte"]["open_s"]:.2f} s.')
    print(f'total {time.time() - t_all:.0f} s')


if __name__ == '__main__':
    main()
