"""`python -m paxlike.train`, with this process's training data loading slowed by
PAXLIKE_TEST_DATA_DELAY_S seconds per batch: the straggler of tests/test_watchdog.py."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paxlike import train  # noqa: E402
from paxlike.data import packing  # noqa: E402

_DELAY_S = float(os.environ["PAXLIKE_TEST_DATA_DELAY_S"])
_rows = packing.PackedSplit.rows


def _slow_rows(self, row_ids):
    time.sleep(_DELAY_S)
    return _rows(self, row_ids)


packing.PackedSplit.rows = _slow_rows

if __name__ == "__main__":
    train.run_cli()
