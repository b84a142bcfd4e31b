"""Is a process still running? For tests that kill a tree and check nothing of it survived.

A killed child whose parent died first is re-parented to PID 1; in a container whose PID 1
does not reap, it stays a zombie for ever. A zombie runs nothing, so it counts as ended.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (state read from /proc where it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def ends_within(pid: int, seconds: float) -> bool:
    """Wait up to `seconds` for `pid` to end; whether it did."""
    end = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not alive(pid)
