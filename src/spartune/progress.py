"""A sweep's progress for logs: a line at least every 30 s when stdout is not a terminal.

tqdm's bar draws only on a terminal, so a sweep whose output goes to a log file or a batch
job's spool was silent for minutes between its stage lines. `Ticker` prints
`study NAME: D/T trials done (F failed), 3m10s elapsed, ~5m left` from a daemon thread, read
from the storage, so it counts every worker's trials, not only the parent's. `tally` also
gives what this command's own processes ran (the `(N run now)` of the closing line).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

EVERY_S = 30.0  # SPARTUNE_PROGRESS_SECONDS changes it (tests use a fraction of a second)


@dataclass(frozen=True)
class Tally:
    done: int  # complete or pruned: what the budget counts (a failed trial is run again)
    failed: int
    ran_here: int  # finished since `since` by one of the given local processes
    best: float = math.inf  # lowest value of a COMPLETE trial that did not diverge


def tally(storage: Any, study: str, pids: Iterable[int] = (), since: float = 0.0) -> Tally:
    """Count the trials of every cell of `study` (cells are `study/...` in the storage)."""
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    mine = tuple(f"{host}:{pid}:" for pid in pids)
    done = failed = ran = 0
    best = math.inf
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if not s.study_name.startswith(f"{study}/"):
            continue
        cell = optuna.load_study(study_name=s.study_name, storage=storage)
        for t in cell.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                         TrialState.PRUNED, TrialState.FAIL)):
            if t.user_attrs.get("surplus"):
                continue
            done += t.state != TrialState.FAIL
            failed += t.state == TrialState.FAIL
            owner = str(t.user_attrs.get("worker", ""))
            ended = t.datetime_complete.timestamp() if t.datetime_complete else 0.0
            ran += bool(mine) and owner.startswith(mine) and ended >= since
            if t.state == TrialState.COMPLETE and not t.user_attrs.get("diverged"):
                best = min(best, t.value if t.value is not None else math.inf)
    return Tally(done, failed, ran, best)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def line(name: str, done: int, total: int, failed: int, elapsed: float, done0: int) -> str:
    """The progress line; what is left is estimated from this command's rate so far."""
    rate = (done - done0) / elapsed if elapsed > 0 else 0.0
    left = max(total - done, 0)
    if left == 0:
        eta = "none left"
    elif rate > 0:
        eta = f"~{_clock(left / rate)} left"
    else:
        eta = "time left unknown until a trial finishes"
    return (f"study {name}: {done}/{total} trials done ({failed} failed), "
            f"{_clock(elapsed)} elapsed, {eta}")


class Ticker:
    """Print `line(...)` every `every` seconds from a daemon thread, while the sweep runs.

    Only when `stream` is not a terminal (on one, tqdm's bar says the same) unless `force`.
    `count()` returns a Tally; an error while counting (a storage hiccup) skips that line:
    the sweep itself meets the error and reports it."""

    def __init__(self, name: str, total: int, done0: int, count: Callable[[], Tally],
                 every: float | None = None, stream: TextIO | None = None,
                 force: bool = False) -> None:
        self.name, self.total, self.done0, self.count = name, total, done0, count
        env = os.environ.get("SPARTUNE_PROGRESS_SECONDS")
        self.every = every if every is not None else float(env) if env else EVERY_S
        self.stream = stream if stream is not None else sys.stdout
        self.active = force or not _isatty(self.stream)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    def start(self) -> Ticker:
        if self.active and math.isfinite(self.every) and self.every > 0:
            self._thread = threading.Thread(target=self._run, name="spartune-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                t = self.count()
            except Exception:  # noqa: BLE001 - the sweep's own next write reports it
                continue
            if self._stop.is_set():
                return
            print(line(self.name, t.done, self.total, t.failed, time.monotonic() - self._t0,
                       self.done0), file=self.stream, flush=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
