"""The fault matrix, one function per case: inject the fault into a real sweep, rerun the same
command, check the invariants (harness.py). Each returns a short line of what it saw, or
raises CaseFailed saying what broke.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from procs import alive

from .harness import (
    GRID,
    CaseFailed,
    check,
    clear_outputs,
    finished,
    invariants,
    last_line,
    leftovers,
    mid_grid,
    no_traceback,
    run,
    start,
    states,
    storage,
    sweep_args,
    trials,
    wait_for,
    worker_pids,
)

Case = Callable[[Path], str]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn
    return register


def _rerun(cwd: Path, args: list[str], n: int = 1) -> None:
    """Run the same command again (n copies at once, as n machines would) to completion.

    The study's old trials.csv and figures go first: one rerun's own must appear (the
    invariants read them unless they regenerate them with `spartune-plot`, as after n > 1)."""
    clear_outputs(cwd, _name(args))
    procs = [start("spartune-sweep", args, cwd) for _ in range(n)]
    for p in procs:
        rc = p.wait()
        no_traceback(p.stderr())
        check(rc == 0, f"the rerun exited {rc}: {last_line(p.stderr())}")


def _name(args: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith("study.name="))


def _retries(ts) -> int:
    return sum(1 for t in ts if "retry_of" in t.user_attrs and t.state.name == "COMPLETE")


# -- process death ------------------------------------------------------------------------------


def _kill_rerun(cwd: Path, workers: int, url: str | None = None, machines: int = 1) -> str:
    name = "kill"
    # Machines start one by one (each imports torch afresh; on a loaded 2-core CI the first
    # may run the whole grid before the last has imported), so two trials running at once is
    # no fault point to wait for: one is. What the case tests, n machines recovering the
    # killed points at once, is the rerun's.
    args = sweep_args(name, workers=workers, storage=url)
    procs = [start("spartune-sweep", args, cwd) for _ in range(machines)]
    running = min(2, workers)
    point = mid_grid(1, running, more=machines * workers < 4)
    before = finished(wait_for(cwd, name, point, procs, url=url))
    for p in procs:
        p.kill_group()
        p.wait()
    killed = states(trials(cwd, name, url))["RUNNING"]
    _rerun(cwd, args, machines)
    out = invariants(cwd, name, before, url=url, plot=machines > 1)
    ts = trials(cwd, name, url)
    check(_retries(ts) <= killed, f"{_retries(ts)} retries ran for {killed} killed trials")
    return f"{killed} killed at {len(before)} done; after rerun {out.line()}"


for _w in (1, 2, 4):
    CASES[f"sigkill_group_journal_w{_w}"] = (
        lambda cwd, w=_w: _kill_rerun(cwd, workers=w))


@case("sigkill_one_worker")
def sigkill_one_worker(cwd: Path) -> str:
    """A forked worker dies; the parent goes on; the rerun retries the dead worker's trial."""
    name = "kill"
    args = sweep_args(name, workers=2)
    p = start("spartune-sweep", args, cwd)
    ts = wait_for(cwd, name, mid_grid(1, 2), [p])
    children = worker_pids(ts) - {p.pid}
    check(bool(children), f"no worker process besides the parent in {worker_pids(ts)}")
    before = finished(ts)
    os.kill(children.pop(), signal.SIGKILL)
    rc = p.wait()
    no_traceback(p.stderr())
    check(rc == 0, f"the parent exited {rc} after losing a worker: {last_line(p.stderr())}")
    check("run the same command again" in p.stderr(), "no line saying to run it again")
    _rerun(cwd, args)
    return invariants(cwd, name, before, plot=False).line()


@case("sigkill_parent")
def sigkill_parent(cwd: Path) -> str:
    """The parent dies; its orphaned worker finishes its trials; a rerun at once must not take
    the orphan's running trial, and completes what the parent left."""
    name = "kill"
    args = sweep_args(name, workers=2)
    p = start("spartune-sweep", args, cwd)
    ts = wait_for(cwd, name, mid_grid(1, 2), [p])
    orphans = worker_pids(ts) - {p.pid}
    before = finished(ts)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    _rerun(cwd, args)  # while the orphan may still run
    end = time.monotonic() + 240
    while any(alive(pid) for pid in orphans) and time.monotonic() < end:
        time.sleep(0.2)
    check(not any(alive(pid) for pid in orphans), "the orphaned worker never ended")
    _rerun(cwd, args)  # picks up anything the orphan's end left to retry
    return invariants(cwd, name, before, plot=False).line()


@case("sigkill_random_10_rounds")
def sigkill_random_10_rounds(cwd: Path) -> str:
    """Ten kills of the whole group at seeded random times (startup included) on one study;
    no finished trial may be lost or changed by any later round."""
    rng = random.Random(12)
    name = "kill"
    args = sweep_args(name, workers=2)
    seen: dict[int, tuple] = {}
    for _ in range(10):
        n_before = len(trials(cwd, name))
        p = start("spartune-sweep", args, cwd)
        if rng.random() < 0.3:  # during startup: imports, storage open, recovery
            delay = rng.uniform(0.2, 3.0)
        else:  # mid-trial: once a trial of this run is running, at a random point of it

            def own_running(ts, n=n_before) -> bool:
                return any(t.state.name == "RUNNING" and t.number >= n for t in ts)
            with contextlib.suppress(CaseFailed):  # this run may find nothing left to do
                wait_for(cwd, name, own_running, [p])
            delay = rng.uniform(0.0, 4.0)  # about two trials' time: some finish, most die
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and p.popen.poll() is None:
            time.sleep(0.05)
        p.kill_group()
        p.wait()
        now = finished(trials(cwd, name))
        lost = [n for n, v in seen.items() if now.get(n) != v]
        check(not lost, f"finished trials lost or changed by a kill: {lost}")
        seen.update(now)
    done = len(seen)
    _rerun(cwd, args)
    out = invariants(cwd, name, seen, plot=False)
    return f"{done}/{len(GRID)} points done over 10 kills; after rerun {out.line()}"


# -- clean stops --------------------------------------------------------------------------------


def _clean_stop(cwd: Path, sig: int, code: int, word: str, twice: bool = False) -> str:
    name = "stop"
    args = sweep_args(name, workers=2)
    p = start("spartune-sweep", args, cwd)
    before = finished(wait_for(cwd, name, mid_grid(1, 2), [p]))
    p.kill_group(sig)  # a terminal's Ctrl-C (or a scheduler's stop) reaches the whole group
    second = ""
    if twice:  # into the cleanup: once its first line is out, while the process still runs
        end = time.monotonic() + 60
        while "spartune: stopping:" not in p.stderr() and time.monotonic() < end:
            check(p.popen.poll() is None, "the sweep ended without saying it was stopping")
            time.sleep(0.005)
        check(p.popen.poll() is None, "the cleanup ended before the second signal")
        p.kill_group(sig)
        second = ", the second signal during the cleanup"
    rc = p.wait()
    err = p.stderr()
    no_traceback(err)
    check(rc == code, f"exit code {rc}, documented {code}: {last_line(err)}")
    check(last_line(err).startswith(f"spartune: {word}"), f"last line: {last_line(err)!r}")
    left = states(trials(cwd, name))
    check(left["RUNNING"] == 0, f"a clean stop left trials RUNNING: {dict(left)}")
    _rerun(cwd, args)
    out = invariants(cwd, name, before, plot=False)
    return f"exit {rc}{second}, {dict(left)}; after rerun {out.line()}"


CASES["sigint"] = lambda cwd: _clean_stop(cwd, signal.SIGINT, 130, "interrupted")
CASES["sigint_twice"] = lambda cwd: _clean_stop(cwd, signal.SIGINT, 130, "interrupted",
                                                twice=True)
CASES["sigterm"] = lambda cwd: _clean_stop(cwd, signal.SIGTERM, 143, "terminated")


# -- the database -------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres(cwd: Path) -> Iterator[tuple[object, str]]:
    from pg_server import PgServer

    server = PgServer.find()
    check(server is not None, "PostgreSQL is not installed (scripts/test.sh installs it)")
    server.start()
    try:
        server.create_database("spartune")
        yield server, server.url("spartune")
    finally:
        server.stop(keep_log=cwd / "postgresql.log")


for _w in (1, 2, 4):
    def _pg_kill(cwd: Path, w: int = _w) -> str:
        with postgres(cwd) as (_, url):
            return _kill_rerun(cwd, workers=1, url=url, machines=w)
    CASES[f"sigkill_machines_postgres_m{_w}"] = _pg_kill


@case("postgres_outage")
def postgres_outage(cwd: Path) -> str:
    """The server stops mid-sweep: every worker ends with one line saying the storage went
    away (exit 3); the server comes back; the rerun finishes with nothing left RUNNING."""
    name = "pg"
    with postgres(cwd) as (server, url):
        args = sweep_args(name, workers=2, storage=url)
        p = start("spartune-sweep", args, cwd)
        before = finished(wait_for(cwd, name, mid_grid(1, 1), [p], url=url))
        server.pause()
        rc = p.wait()
        err = p.stderr()
        no_traceback(err)
        check(rc == 3, f"exit code {rc} when the storage went away, documented 3: "
                       f"{last_line(err)}")
        check("storage went away" in last_line(err), f"last line: {last_line(err)!r}")
        server.resume()
        _rerun(cwd, args)
        out = invariants(cwd, name, before, url=url, plot=False)
        return f"exit {rc}: {last_line(err)[:90]}...; after rerun {out.line()}"


# -- files --------------------------------------------------------------------------------------


@case("checkpoint_spoilt")
def checkpoint_spoilt(cwd: Path) -> str:
    """Two running trials' checkpoints, one cut in half, one overwritten with noise: one warning
    line per file, each trial restarts from step 0, the grid completes."""
    name = "ckpt"
    args = sweep_args(name, workers=2, steps=120, checkpoint_every=20)
    p = start("spartune-sweep", args, cwd)
    folder = cwd / "results" / name / "checkpoints"

    def has_checkpoints(ts) -> bool:
        return mid_grid(1, 2)(ts) and len(list(folder.rglob("*.pt"))) >= 2
    before = finished(wait_for(cwd, name, has_checkpoints, [p]))
    p.kill_group()
    p.wait()
    spoilt = sorted(folder.rglob("*.pt"))
    os.truncate(spoilt[0], spoilt[0].stat().st_size // 2)
    for path in spoilt[1:]:
        path.write_bytes(random.Random(3).randbytes(path.stat().st_size))
    clear_outputs(cwd, name)
    r = start("spartune-sweep", args, cwd)
    rc = r.wait()
    err = r.stderr()
    no_traceback(err)
    check(rc == 0, f"the rerun exited {rc}: {last_line(err)}")
    warnings = [line for line in err.splitlines() if "unreadable checkpoint" in line]
    check(len(warnings) == len(spoilt), f"{len(warnings)} warning lines for {len(spoilt)} "
                                        f"spoilt checkpoints:\n{err[-800:]}")
    return f"{warnings[0][:100]}...; {invariants(cwd, name, before, plot=False).line()}"


def _done_study(cwd: Path, name: str) -> list[str]:
    args = sweep_args(name, workers=2, checkpoint_every=0)
    _rerun(cwd, args)
    return args


@case("disk_full_checkpoint")
def disk_full_checkpoint(cwd: Path) -> str:
    """A file-size limit (ulimit -f) below a checkpoint's size, above the journal's: the sweep
    ends in one line naming the checkpoint, exit 3, no half file, the storage intact."""
    name = "full"
    args = sweep_args(name, workers=1, steps=60, checkpoint_every=20)
    rc, _, err = run("spartune-sweep", args, cwd, fsize=200_000)  # a checkpoint: ~350 kB
    no_traceback(err)
    check(rc == 3, f"exit code {rc}, documented 3: {last_line(err)}")
    line = last_line(err)
    check(line.startswith("spartune: error: ") and ".pt:" in line and "no space" in line,
          f"last line does not name the checkpoint: {line!r}")
    check(not leftovers(cwd / "results"), f"half-written files left: {leftovers(cwd)}")
    _rerun(cwd, args)
    return f"{line[:110]}...; after rerun {invariants(cwd, name, {}, plot=False).line()}"


@case("disk_full_tables_figures")
def disk_full_tables_figures(cwd: Path) -> str:
    """The file-size limit while `spartune-plot` writes trials.csv, then while it writes a
    figure: each time one line naming the file, exit 3, the previous files unchanged, no
    temporary file left; then the tables and figures regenerate."""
    name = "full"
    _done_study(cwd, name)
    folder = cwd / "results" / name
    files = [folder / "trials.csv", folder / "curves.csv", *folder.glob("figures/*")]
    old = {p: p.read_bytes() for p in files}
    lines = []
    for limit, what in ((1_000, "trials.csv"), (12_000, ".png")):
        # hydra.output_subdir=null: Hydra's own .hydra/ files are written before spartune runs
        rc, _, err = run("spartune-plot", [f"study.name={name}", "hydra.output_subdir=null"],
                         cwd, fsize=limit)
        no_traceback(err)
        line = last_line(err)
        check(rc == 3, f"exit code {rc}, documented 3: {line}")
        check(what in line and "no space" in line, f"last line does not name {what}: {line!r}")
        changed = [p.name for p, b in old.items() if not p.exists() or p.read_bytes() != b]
        check(not changed, f"files left changed or half-written: {changed}")
        check(not leftovers(folder), f"temporary files left: {leftovers(folder)}")
        lines.append(line[:70])
    before = finished(trials(cwd, name))
    return f"{' / '.join(lines)}...; {invariants(cwd, name, before).line()}"


@case("journal_torn_last_record")
def journal_torn_last_record(cwd: Path) -> str:
    """A power cut during an append leaves half a record at the end of the journal."""
    name = "torn"
    args = sweep_args(name, workers=2, checkpoint_every=0)
    p = start("spartune-sweep", args, cwd)
    before = finished(wait_for(cwd, name, mid_grid(1, 1), [p]))
    p.kill_group()
    p.wait()
    journal = cwd / "results" / name / "optuna.journal"
    with open(journal, "ab") as f:
        f.write(b'{"op_code":6,"worker_id":"torn","trial_id":0,"user_attr":{"x"')
    clear_outputs(cwd, name)
    r = start("spartune-sweep", args, cwd)
    rc = r.wait()
    err = r.stderr()
    no_traceback(err)
    check(rc == 0, f"the rerun exited {rc}: {last_line(err)}")
    warns = [line for line in err.splitlines() if "torn last record" in line]
    check(len(warns) == 1, f"{len(warns)} warning lines about the torn record:\n{err[-600:]}")
    return f"{warns[0][:90]}...; {invariants(cwd, name, before, plot=False).line()}"


@case("readers_during_sweep")
def readers_during_sweep(cwd: Path) -> str:
    """`spartune-plot` and `spartune-transfer` while the sweep writes: each reads a consistent
    snapshot (exit 0, whole tables), and the sweep is not disturbed."""
    import pandas as pd

    name = "live"
    args = sweep_args(name, workers=2, checkpoint_every=0, steps=100)
    p = start("spartune-sweep", args, cwd)
    wait_for(cwd, name, mid_grid(1, 1), [p])
    rows = []
    while p.popen.poll() is None and len(rows) < 3:
        rc, _, err = run("spartune-plot", [f"study.name={name}"], cwd)
        no_traceback(err)
        check(rc == 0, f"spartune-plot during the sweep exited {rc}: {last_line(err)}")
        rows.append(len(pd.read_csv(cwd / "results" / name / "trials.csv")))
    rc, _, err = run("spartune-transfer", [
        "-cn", "transfer", "data=synthetic", "train=smoke", "model.head_size=16",
        f"transfer.source={name}", "transfer.params=[supar]", "transfer.widths=[64]",
        "transfer.densities=[0.5]", "transfer.seeds=[0]", "transfer.hps=[lr]",
        "study.name=live_targets", "train.device=cpu", "train.threads=1"], cwd)
    no_traceback(err)
    check(rc == 0, f"spartune-transfer during the sweep exited {rc}: {last_line(err)}")
    rc = p.wait()
    check(rc == 0, f"the sweep exited {rc}: {last_line(p.stderr())}")
    check(rows == sorted(rows), f"trials.csv shrank between snapshots: {rows}")
    out = invariants(cwd, name, {}, plot=False)  # the sweep's own, written at its end
    return f"trials.csv rows {rows} while running; {out.line()}"


# -- one study, one experiment ------------------------------------------------------------------


def _journal_bytes(cwd: Path, name: str) -> bytes:
    return (cwd / "results" / name / "optuna.journal").read_bytes()


def _refused(cwd: Path, cmd: str, args: list[str], code: int, field: str) -> str:
    """The command ends in one `spartune: error: FIELD: ...` line and exit `code`."""
    rc, _, err = run(cmd, args, cwd, timeout=240)
    no_traceback(err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    check(rc == code, f"exit code {rc}, expected {code}: {last_line(err)}")
    check(bool(lines) and lines[-1].startswith(f"spartune: error: {field}"),
          f"last line: {last_line(err)!r}")
    return lines[-1]


@case("rerun_changed_config")
def rerun_changed_config(cwd: Path) -> str:
    """A finished grid rerun with another train.steps, then other data: each refused before any
    trial, one line naming the field, exit 2, the journal byte for byte unchanged; a rerun that
    changes only the workers is the same experiment and exits 0."""
    name = "fp"
    args = _done_study(cwd, name)
    before, stored = finished(trials(cwd, name)), _journal_bytes(cwd, name)
    lines = []
    for change, field in (("train.steps=40", "train.steps"), ("data=pystdlib", "data.name")):
        line = _refused(cwd, "spartune-sweep", [*args, change], 2, field)
        check("study.allow_changes" in line and "study.name" in line, f"no fix named: {line}")
        check(_journal_bytes(cwd, name) == stored, f"{change}: the journal changed")
        lines.append(line[:60])
    _rerun(cwd, [*args, "study.workers=1"])
    out = invariants(cwd, name, before, plot=False)
    return f"{' / '.join(lines)}...; workers=1 accepted; {out.line()}"


FAILING = "{python} -c 'import sys; sys.exit(5)' {lr}"


@case("failing_objective")
def failing_objective(cwd: Path) -> str:
    """`-cn proxy study.n_trials=1` whose command always fails, on 2 workers: at most
    max_failures (3) FAIL trials, exit 4 with one line; a missing binary is refused before any
    trial (exit 2, no storage written)."""
    name = "failing"
    base = ["-cn", "proxy", "data=synthetic", "train=smoke", "train.device=cpu",
            "train.threads=1", "study.n_trials=1", f"study.name={name}"]
    line = _refused(cwd, "spartune-sweep",
                    [*base, "study.command='no_such_binary {lr}'"], 2, "study.command")
    check("PATH" in line, f"the line does not say PATH: {line}")
    check(not (cwd / "results" / name / "optuna.journal").exists(), "a storage was written")
    t0 = time.monotonic()
    line4 = _refused(cwd, "spartune-sweep", [*base, "study.workers=2",
                                             f"study.command=\"{FAILING}\""], 4,
                     "study.command")
    took = time.monotonic() - t0
    check("fix the objective" in line4 and "exited 5" in line4, f"last line: {line4}")
    st = storage(cwd, name)
    import optuna

    counts: dict[str, int] = {}
    for s in optuna.get_all_study_summaries(st, include_best_trial=False):
        for t in optuna.load_study(study_name=s.study_name, storage=st).trials:
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
    check(counts.get("FAIL", 0) <= 3 and not counts.get("RUNNING"),
          f"trials after the stop: {counts}")
    return f"{line[:60]}...; {line4[:80]}... ({counts}, {took:.0f} s)"


@case("transfer_into_source")
def transfer_into_source(cwd: Path) -> str:
    """`spartune-transfer -cn proxy` would write its targets into the proxy's own study:
    refused in one line naming study.name, exit 2, the proxy's journal unchanged."""
    name = "proxy"
    _done_study(cwd, name)
    stored = _journal_bytes(cwd, name)
    line = _refused(cwd, "spartune-transfer", [
        "-cn", "proxy", "data=synthetic", "train=smoke", "model.head_size=16",
        "transfer.params=[supar]", "transfer.widths=[64]", "transfer.densities=[0.5]",
        "transfer.hps=[lr]", "train.device=cpu", "train.threads=1"], 2, "study.name")
    check(_journal_bytes(cwd, name) == stored, "the proxy's journal changed")
    return f"{line[:100]}..."
