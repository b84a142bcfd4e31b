"""Many `spartune-sweep` processes on one grid study, started together: against a real
PostgreSQL server (study.storage=postgresql://...) and against the default journal file.

Every grid point must be run exactly once: no duplicate, no lost trial, no FAIL but the ones
the sweep marks `surplus` (a trial created past the grid's end by a race between machines), no
storage error in any worker's stderr, every exit code 0.

The PostgreSQL tests skip where PostgreSQL is not installed (scripts/test.sh installs it with
apt-get when it runs as root) or cannot be started; under CI (CI=true) a missing server, one
that is installed but does not start, or a missing database driver, is a failure instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest

from conftest import ROOT
from pg_server import PgError, PgServer
from spartune import collect

pytestmark = pytest.mark.slow

LOW_EXP, HIGH_EXP = -14, -3  # the grid: log2(lr) = -14 .. -3, one octave apart: 12 points
GRID = [float(x) for x in range(LOW_EXP, HIGH_EXP + 1)]
CELL = "supar/w32/d1/s0"
PG_WORKERS = 3
JOURNAL_WORKERS = 4
TIMEOUT = 240  # seconds for all workers of one test together

# What a worker must never write to stderr: tracebacks, driver and storage errors, our one-line
# errors, and GridSampler's warning that it re-runs a point because the grid looked exhausted.
BAD_STDERR = re.compile(
    r"Traceback|Error\b|error:|Exception|psycopg|sqlalchemy|deadlock|could not connect|"
    r"connection refused|server closed|re-evaluating a configuration", re.IGNORECASE)


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing_driver() -> str | None:
    """Why a `postgresql://` URL cannot be opened here, or None. SQLAlchemy picks the driver of
    a bare postgresql:// URL itself (psycopg2 up to 2.0, psycopg 3 from 2.1): ask it."""
    import sqlalchemy

    try:
        sqlalchemy.create_engine("postgresql://nobody@127.0.0.1/none").dispose()  # no connect
    except ImportError as e:
        return (f"no driver for postgresql:// URLs: SQLAlchemy {sqlalchemy.__version__} wants "
                f"the module {e.name!r}, which is not installed (pip install -e "
                "'.[test,postgres]'; the postgres extra must provide this driver)")
    return None


def _say(capsys: pytest.CaptureFixture, line: str) -> None:
    """Show a line in the test log even when pytest captures output (CI's log keeps it)."""
    with capsys.disabled():
        print(f"\n[test_postgres] {line}", flush=True)


@pytest.fixture
def postgres(tmp_path: Path, capsys: pytest.CaptureFixture):
    """A fresh PostgreSQL server on 127.0.0.1 with an empty database `spartune`; yields its URL.
    Always stopped at the end, pass or fail; its log is kept as tmp_path/postgresql.log."""
    server = PgServer.find()
    if server is None:
        reason = ("PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb and no "
                  "initdb on PATH (scripts/test.sh installs it with apt-get when run as "
                  "root; or: apt-get install postgresql)")
        if _under_ci():  # CI promises the real server: its absence is a failure, as in faults
            pytest.fail(reason)
        pytest.skip(reason)
    missing = _missing_driver()
    if missing:
        if _under_ci():
            pytest.fail(f"{missing} (scripts/test.sh installs spartune[test,postgres])")
        pytest.skip(missing)
    t0 = time.monotonic()
    try:
        server.start()
        server.create_database("spartune")
    except PgError as e:
        server.stop(keep_log=tmp_path / "postgresql.log")
        reason = f"PostgreSQL in {server.bin_dir} is installed but could not be started: {e}"
        if _under_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        _say(capsys, f"PostgreSQL {server.version} started on 127.0.0.1:{server.port} "
                     f"({server.bin_dir}, as OS user {server.os_user or 'me'}) in "
                     f"{time.monotonic() - t0:.1f} s")
        yield server.url("spartune")
    finally:
        server.stop(keep_log=tmp_path / "postgresql.log")


def _sweep_args(name: str, storage: str | None) -> list[str]:
    args = ["-cn", "lr_stability", "data=synthetic", "train=smoke", "model.width=32",
            "model.head_size=16", "study.widths=[32]", "study.params=[supar]",
            "study.densities=[1.0]", f"study.name={name}",
            f"study.space.lr.low={2.0 ** LOW_EXP!r}", f"study.space.lr.high={2.0 ** HIGH_EXP!r}",
            "study.space.lr.step=1.0", "study.sampler=grid", "study.workers=1",
            "train.steps=10", "train.device=cpu", "train.threads=1"]
    return [*args, f"study.storage={storage}"] if storage else args


def _run_together(n: int, args: list[str], cwd: Path) -> list[tuple[int, str, str]]:
    """Start n `spartune-sweep` processes at once; (exit code, stdout, stderr) of each.
    None survives this call: on a timeout or an error every one is killed (its group too)."""
    exe = Path(sys.executable).with_name("spartune-sweep")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(SPARTUNE_HOME=str(ROOT), MPLBACKEND="Agg", HYDRA_FULL_ERROR="1",
               OMP_NUM_THREADS="1")
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for i in range(n):
            out, err = (open(cwd / f"worker{i}.{s}", "w+") for s in ("out", "err"))
            logs.append((out, err))
            procs.append(subprocess.Popen([str(exe), *args], cwd=cwd, env=env, stdout=out,
                                          stderr=err, stdin=subprocess.DEVNULL, text=True,
                                          start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
    results = []
    for p, (out, err) in zip(procs, logs, strict=True):
        out.seek(0)
        err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results


def _check_workers(results: list[tuple[int, str, str]]) -> None:
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, f"worker {i} exited with {rc}:\n{err[-3000:]}\n{out[-1000:]}"
        bad = [line for line in err.splitlines() if BAD_STDERR.search(line)]
        assert not bad, f"worker {i} reported errors on stderr:\n" + "\n".join(bad[:20])


def _check_grid(storage, name: str) -> Counter:
    """Every grid point COMPLETE exactly once, nothing unfinished, FAIL only `surplus`.
    Returns the trial counts per state (surplus FAILs counted as FAIL(surplus))."""
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    cells = sorted(s.study_name for s in summaries if s.study_name.startswith(f"{name}/"))
    assert cells == [f"{name}/{CELL}"]
    trials = optuna.load_study(study_name=f"{name}/{CELL}", storage=storage).get_trials(
        deepcopy=False)
    counts = Counter(
        "FAIL(surplus)" if t.user_attrs.get("surplus") and t.state.name == "FAIL"
        else t.state.name for t in trials)
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers), f"duplicate trial numbers: {sorted(numbers)}"
    complete = sorted(t.params["log2_lr"] for t in trials if t.state.name == "COMPLETE")
    dup = sorted(v for v, c in Counter(complete).items() if c > 1)
    assert not dup, f"grid points run more than once: {dup}; counts {dict(counts)}"
    assert complete == GRID, (f"COMPLETE log2_lr {complete} != grid {GRID} "
                              f"(missing {sorted(set(GRID) - set(complete))}); {dict(counts)}")
    assert set(counts) <= {"COMPLETE", "FAIL(surplus)"}, (
        f"trials neither COMPLETE nor surplus FAIL: {dict(counts)}; "
        + "; ".join(f"#{t.number} {t.state.name} {t.user_attrs.get('error', '')}"
                    for t in trials if t.state.name != "COMPLETE"
                    and not t.user_attrs.get("surplus")))
    # the tidy table sees the same trials (collect is how every later step reads a sweep)
    table, _ = collect.load_trials(storage, name)
    assert len(table) == len(trials)
    assert sorted(table.loc[table["state"] == "COMPLETE", "log2_lr"]) == GRID
    return counts


def _counts_line(counts: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def test_postgres_workers_share_one_grid_study(postgres: str, tmp_path: Path, capsys):
    t0 = time.monotonic()
    results = _run_together(PG_WORKERS, _sweep_args("pg", postgres), tmp_path)
    seconds = time.monotonic() - t0
    _check_workers(results)
    storage = optuna.storages.RDBStorage(postgres)
    try:
        counts = _check_grid(storage, "pg")
    finally:
        storage.engine.dispose()  # close our connections before the server stops
    _say(capsys, f"PostgreSQL, {PG_WORKERS} workers, {len(GRID)}-point grid: "
                 f"{sum(counts.values())} trials ({_counts_line(counts)}) in {seconds:.1f} s")


def test_journal_workers_share_one_grid_study(tmp_path: Path, capsys):
    t0 = time.monotonic()
    results = _run_together(JOURNAL_WORKERS, _sweep_args("journal", None), tmp_path)
    seconds = time.monotonic() - t0
    _check_workers(results)
    storage = collect.storage_for(tmp_path / "results" / "journal")
    counts = _check_grid(storage, "journal")
    _say(capsys, f"journal file, {JOURNAL_WORKERS} workers, {len(GRID)}-point grid: "
                 f"{sum(counts.values())} trials ({_counts_line(counts)}) in {seconds:.1f} s")


def test_the_study_fingerprint_on_postgresql(postgres, tmp_path):
    """Every field class of test_fingerprint.py, on the real server: the fingerprint is study
    user attrs, read back from the database as from the journal file."""
    from test_fingerprint import check_field_classes

    check_field_classes(tmp_path, postgres)
