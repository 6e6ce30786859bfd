"""`python -m paxlike.train` with this process's training data loading made faulty: slowed by
PAXLIKE_TEST_DATA_DELAY_S seconds per batch (the straggler of tests/test_watchdog.py), or failing
with an error at batch PAXLIKE_TEST_DATA_FAIL_AT (counting from 1)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paxlike import train  # noqa: E402
from paxlike.data import packing  # noqa: E402

_DELAY_S = float(os.environ.get("PAXLIKE_TEST_DATA_DELAY_S", "0"))
_FAIL_AT = int(os.environ.get("PAXLIKE_TEST_DATA_FAIL_AT", "0"))
_rows = packing.PackedSplit.rows
_calls = []


def _faulty_rows(self, row_ids):
    _calls.append(1)
    if len(_calls) == _FAIL_AT:
        raise OSError(f"test: reading batch {_FAIL_AT} failed")
    time.sleep(_DELAY_S)
    return _rows(self, row_ids)


packing.PackedSplit.rows = _faulty_rows

if __name__ == "__main__":
    train.run_cli()
