"""Packing a flat token stream into fixed-length rows with segment ids, positions and loss weights.

The stream is every document's tokens followed by EOS, concatenated. Row r holds inputs
stream[r*L : r*L+L] and targets stream[r*L+1 : r*L+L+1], so consecutive rows overlap by one token
and every token after the first is a target exactly once. A document that does not fit continues in
the next row as a new segment (positions restart at 0 there: the model cannot attend across rows
anyway). The EOS belongs to the document it ends, so predicting EOS is trained but predicting the
first token of the next document from the EOS is not (weight 0). The last row is padded.

All of it is vectorised over a whole batch of rows: no per-row Python work.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')
PADDING_ROW = -1   # a row id that yields an all-padding row (segment 0, weight 0)


@dataclasses.dataclass
class PackedSplit:
    stream: np.ndarray     # [N] token ids (uint16 when the vocab fits, else int32)
    doc_ends: np.ndarray   # [num_docs] int64, exclusive end of each document (its EOS included)
    seq_len: int

    @property
    def num_tokens(self) -> int:
        return int(self.stream.shape[0])

    @property
    def num_rows(self) -> int:
        # A row needs at least one (input, target) pair, hence N - 1 predictable tokens.
        return max(0, -(-(self.num_tokens - 1) // self.seq_len))

    def rows(self, row_ids) -> dict[str, np.ndarray]:
        """The packed rows `row_ids` (PADDING_ROW for an empty row): dict of [len(row_ids), L]."""
        row_ids = np.asarray(row_ids, np.int64).reshape(-1)
        L, N = self.seq_len, self.num_tokens
        if np.any((row_ids < PADDING_ROW) | (row_ids >= self.num_rows)):
            raise IndexError(f'row ids out of range [0, {self.num_rows}): {row_ids}')
        col = np.arange(L + 1, dtype=np.int64)
        idx = row_ids[:, None] * L + col[None, :]                # [n, L+1] stream positions
        valid = (idx < N) & (row_ids[:, None] != PADDING_ROW)
        safe = np.where(valid, idx, 0)
        tok = self.stream[safe].astype(np.int32)
        tok[~valid] = 0
        # Document number of each position; -1 on padding so it never equals a real document.
        doc = np.where(valid, np.searchsorted(self.doc_ends, safe, side='right'), -1)

        return rows_from_windows(tok, valid, doc, L)


def rows_from_windows(tok: np.ndarray, valid: np.ndarray, doc: np.ndarray, L: int) -> dict:
    """The batch dict of rows from [n, L+1] token windows, their validity and the document number
    of each position (only equality of neighbouring numbers matters; never equal on padding):
    inputs / targets shifted by one, loss weights 0 where the target starts another document or
    is padding, segment ids and positions restarting at each document. Shared by the in-memory
    rows above and the prepared records (paxlike/data/prepared.py)."""
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
