"""Data: corpora, tokenizers, packing and the sharded grain pipeline (see pipeline.build)."""

from paxlike.data.packing import BATCH_KEYS, PackedSplit
from paxlike.data.pipeline import (DEFAULTS, Dataset, TrainIterator, build, default_config,
                                   process_row_range, process_rows)
from paxlike.data.tokenizer import BPETokenizer, ByteTokenizer

__all__ = ['BATCH_KEYS', 'BPETokenizer', 'ByteTokenizer', 'DEFAULTS', 'Dataset', 'PackedSplit',
           'TrainIterator', 'build', 'default_config', 'process_row_range', 'process_rows']
