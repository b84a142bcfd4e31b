"""How a command stops: the signals it obeys, the exit codes it returns, the causes it names.

Every spartune command ends in one of these ways (README, "Sweeps that survive"):

| exit | meaning |
|---|---|
| 0 | done |
| 1 | the job ran but its verdict failed (a coordinate check outside its tolerance) |
| 2 | bad input: one line naming the field and the fix; nothing was written |
| 3 | the environment failed: the storage went away, or a disk (quota, file-size limit) |
|   | is full; one line names it; finished trials are kept |
| 4 | the objective kept failing: a cell's failure budget ran out (failures.py); one line |
|   | names the cell, the count and the last error; finished trials are kept |
| 130 | Ctrl-C (SIGINT): the running trials are marked FAIL, run the same command again |
| 143 | SIGTERM (a scheduler's stop, `kill`): the same clean stop as Ctrl-C |

A stop is clean once it has begun: the first SIGINT or SIGTERM makes the process ignore both
for the rest of its life (`shield`), so a second Ctrl-C during the cleanup cannot interrupt the
write that marks the trial FAIL and leave it RUNNING. The command's own process says so on
its first shield, in one `spartune: stopping: ...` line: the cleanup has begun.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

EXIT_VERDICT, EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_OBJECTIVE = 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python raises KeyboardInterrupt for SIGINT, so that one cleanup
    path serves both and only the exit code tells them apart."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def obey_sigterm() -> None:
    """Turn SIGTERM into `Terminated` in this process (main thread only: signals go there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


_ANNOUNCED: list[bool] = []


def shield() -> None:
    """Ignore SIGINT and SIGTERM from now on: the process is stopping, let it finish cleanly.

    The first call in the command's own process (not a local worker's) prints one line that
    the cleanup has begun: a user (or a test) knows a second Ctrl-C now lands in it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        import multiprocessing

        if not _ANNOUNCED and multiprocessing.parent_process() is None:
            _ANNOUNCED.append(True)
            print("spartune: stopping: marking the running trials FAIL; further Ctrl-C and "
                  "SIGTERM are ignored until that is done", file=sys.stderr, flush=True)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then deliver them.

    For the few storage writes that must not be cut in half: the `tell` that records a
    finished trial, the `ask` that creates one. A Ctrl-C there would leave a finished run
    RUNNING (so re-run) or a fresh trial RUNNING under no process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)  # now, to whatever handles it outside the block


def exit_code(stop: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED


def storage_gone(e: BaseException) -> str | None:
    """A one-line cause when `e` (or what it wraps) is a database driver's error, else None.

    SQLAlchemy and the PostgreSQL drivers raise their own classes when a server stops or the
    network drops; they are recognised by module so that this never imports a driver.
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        module = type(cur).__module__ or ""
        if module.split(".")[0] in ("sqlalchemy", "psycopg", "psycopg2", "pymysql", "sqlite3"):
            text = str(cur).strip().splitlines()
            first = next((line.strip() for line in text if line.strip()), type(cur).__name__)
            return first[:200]
        cur = cur.__cause__ or cur.__context__
    return None


def quiet_storage_threads() -> None:
    """A helper thread (Optuna's heartbeat) that loses the storage says so in one line, not a
    traceback; the main thread meets the same error at its next write and stops the command."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        cause = storage_gone(args.exc_value) if args.exc_value is not None else None
        if cause is None:
            default(args)
            return
        name = args.thread.name if args.thread is not None else "a thread"
        print(f"spartune: warning: study.storage: {cause} (in {name})", file=sys.stderr)

    threading.excepthook = hook
