"""The fault matrix: inject a fault into a real `spartune-sweep`, rerun the same command, check
the invariants. `python -m tests.faults` runs every case and prints one line each, then
`faults: N/M pass`; `pytest tests/faults` runs the same cases as (slow) tests.

The cases and what they promise are listed in README.md, "Reliability".
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # pg_server.py lives in tests/, beside this package
    sys.path.insert(0, _TESTS)
