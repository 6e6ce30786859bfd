"""`python -m paxlike.data prepare ...`: tokenize a corpus once into sharded ArrayRecord files.

    python -m paxlike.data prepare --source=text --paths='corpus/*.txt' --tokenizer=byte \\
        --seq_len=128 --out=data/corpus-128
    python -m paxlike.train --config=experiments/transformer.py:tiny \\
        --config.data.source=prepared --config.data.paths=data/corpus-128

Bad input (missing paths, an empty corpus, a non-empty --out without --overwrite, ...) is
reported as one line `paxlike: error: ...` with exit status 2. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from paxlike.data import prepare, sources


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line and exit status 2, like the other paxlike tools
        from paxlike import cli
        cli.fail(f'{message} (see python -m paxlike.data prepare --help)')


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog='python -m paxlike.data',
                     description='Data tools: `prepare` tokenizes a corpus once into sharded '
                                 'ArrayRecord files that training reads with '
                                 '--config.data.source=prepared --config.data.paths=DIR.')
    sub = parser.add_subparsers(dest='command', parser_class=_Parser, metavar='prepare')
    p = sub.add_parser('prepare', help='tokenize and pack a corpus into DIR',
                       description='Tokenize a corpus once and pack it into rows of seq_len + 1 '
                                   'tokens, written as sharded ArrayRecord files with a '
                                   'manifest.json (docs/data.md).')
    p.add_argument('--source', required=True, choices=sources.PREPARE_SOURCES,
                   help='stdlib (no paths), text files, JSONL, Parquet (needs pyarrow), or a '
                        'Hugging Face datasets directory written by save_to_disk (needs datasets)')
    p.add_argument('--paths', default='',
                   help='comma-separated files, directories or globs (hf: one directory)')
    p.add_argument('--out', required=True, help='directory to write (local path or gs://...)')
    p.add_argument('--tokenizer', default='byte',
                   help='byte, bpe (trained here on the train split), or the path of a '
                        'pretrained tokenizer.json (with --eos_token)')
    p.add_argument('--seq_len', type=int, default=128,
                   help='row length of the run that will read it (default 128, as the tiny '
                        'config); each row is stored with its one-token overlap')
    p.add_argument('--val_fraction', type=float, default=0.05,
                   help='share of documents held out for eval, as data.val_fraction')
    p.add_argument('--field', default='text',
                   help='JSONL field / Parquet or datasets column holding the text')
    p.add_argument('--hf_split', default=None,
                   help='split of a saved DatasetDict (default: train)')
    p.add_argument('--bpe_vocab_size', type=int, default=4096)
    p.add_argument('--eos_token', default='', help='pretrained tokenizer: the document-end token')
    p.add_argument('--bos_token', default='',
                   help='pretrained tokenizer: a document-start token (default none)')
    p.add_argument('--shard_mb', type=float, default=prepare.DEFAULT_SHARD_MB,
                   help='shards roll at this size (MiB of records)')
    p.add_argument('--compression', default=prepare.DEFAULT_COMPRESSION,
                   choices=prepare.COMPRESSIONS, help='ArrayRecord compression of each record')
    p.add_argument('--overwrite', action='store_true',
                   help='replace prepared data already in --out (never anything else)')
    p.add_argument('--quiet', action='store_true', help='no progress line')
    return parser


def main(argv=None) -> int:
    from paxlike import cli
    from paxlike.errors import UserError
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command != 'prepare':
        _parser().print_help()
        return 2
    try:
        m = prepare.prepare(
            source=args.source, paths=args.paths, tokenizer=args.tokenizer,
            seq_len=args.seq_len, out=args.out, val_fraction=args.val_fraction,
            field=args.field, bpe_vocab_size=args.bpe_vocab_size, eos_token=args.eos_token,
            bos_token=args.bos_token, hf_split=args.hf_split, shard_mb=args.shard_mb,
            compression=args.compression, overwrite=args.overwrite, progress=not args.quiet)
    except UserError as e:
        cli.fail(str(e))
    except KeyboardInterrupt:
        cli.fail(f'interrupted; {args.out} is incomplete (no manifest.json): rerun with '
                 '--overwrite')
    print(summary(m, args.out))
    return 0


def summary(m: dict, out: str) -> str:
    """The closing lines: what was written and how fast."""
    tr, va, p = m['splits']['train'], m['splits']['val'], m['prepare']
    shards = len(tr['shards']) + len(va['shards'])
    return (f'prepared {m["source"]["description"]} → {out}\n'
            f'  train: {tr["documents"]:,} documents, {tr["tokens"]:,} tokens, {tr["rows"]:,} rows '
            f'of seq_len {m["seq_len"]}\n'
            f'  val:   {va["documents"]:,} documents, {va["tokens"]:,} tokens, '
            f'{va["rows"]:,} rows\n'
            f'  tokenizer {m["tokenizer"]["argument"]} ({m["tokenizer"]["fingerprint"]}, vocab '
            f'{m["tokenizer"]["vocab_size"]}); {shards} shards, '
            f'{p["output_bytes"] / 2**20:,.1f} MiB\n'
            f'  {p["seconds"]:.1f} s: {p["tokens_per_s"]:,.0f} tokens/s, '
            f'{p["text_mb_per_s"]:.1f} MB/s of text (tokenizer {p["tokenizer_seconds"]:.1f} s)\n'
            f'  train with: --config.data.source=prepared --config.data.paths={out} '
            f'--config.seq_len={m["seq_len"]}')


if __name__ == '__main__':
    sys.exit(main())
