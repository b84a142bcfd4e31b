"""What every fault case uses: start real `spartune-*` processes, watch the storage, kill,
and check the invariants a rerun must restore.

The invariants (README, "Reliability"):
- no finished trial lost or changed: every COMPLETE trial seen before the fault is still there,
  with the same value and parameters;
- every grid point exactly once: one COMPLETE trial per point, nothing else but FAIL;
- nothing left RUNNING or WAITING;
- trials.csv and the figures regenerate (`spartune-plot` exits 0 and writes them);
- exit codes as documented (src/spartune/stops.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOW, HIGH = -11, -6  # the grid: log2(lr) = -11 .. -6, one octave apart: 6 points
GRID = [float(x) for x in range(LOW, HIGH + 1)]
CELL = "supar/w32/d1/s0"
WAIT = 600.0  # seconds any one wait may take (a loaded 2-core machine is slow)


class CaseFailed(AssertionError):
    pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise CaseFailed(message)


def sweep_args(name: str, *, workers: int = 2, storage: str | None = None, steps: int = 60,
               checkpoint_every: int = 20, extra: tuple[str, ...] = ()) -> list[str]:
    """A 6-point LR grid on one cell of a tiny model: a trial takes a few seconds."""
    args = ["-cn", "lr_stability", "data=synthetic", "train=smoke", "model.width=32",
            "model.head_size=16", "study.widths=[32]", "study.params=[supar]",
            "study.densities=[1.0]", f"study.name={name}", f"study.workers={workers}",
            f"study.space.lr.low={2.0 ** LOW!r}", f"study.space.lr.high={2.0 ** HIGH!r}",
            "study.space.lr.step=1.0", "study.sampler=grid", f"train.steps={steps}",
            "train.eval_every=10", f"train.checkpoint_every={checkpoint_every}",
            "train.device=cpu", "train.threads=1"]
    if storage:
        args.append(f"study.storage={storage}")
    return [*args, *extra]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    e.update(SPARTUNE_HOME=str(ROOT), MPLBACKEND="Agg", HYDRA_FULL_ERROR="0",
             OMP_NUM_THREADS="1")
    return e


def _preexec(fsize: int | None) -> Any:
    def setup() -> None:
        # Ctrl-C's disposition at a terminal (a shell without job control ignores SIGINT in
        # background children, and Python then installs no KeyboardInterrupt handler).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if fsize is not None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return setup


@dataclass
class Proc:
    """A command started in its own session (its own process group), its output in files."""

    popen: subprocess.Popen
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float = WAIT) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise CaseFailed(f"{self.popen.args[0]} did not end in {timeout:.0f} s") from None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stderr(self) -> str:
        return self.err.read_text() if self.err.exists() else ""

    def stdout(self) -> str:
        return self.out.read_text() if self.out.exists() else ""


_counter = Counter()


def start(cmd: str, args: list[str], cwd: Path, *, fsize: int | None = None) -> Proc:
    _counter[cmd] += 1
    tag = f"{cmd}.{_counter[cmd]}"
    out, err = cwd / f"{tag}.out", cwd / f"{tag}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        p = subprocess.Popen([str(BIN / cmd), *args], cwd=cwd, env=env(), stdout=fo, stderr=fe,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=_preexec(fsize))
    return Proc(p, out, err)


def run(cmd: str, args: list[str], cwd: Path, *, fsize: int | None = None,
        timeout: float = WAIT) -> tuple[int, str, str]:
    p = start(cmd, args, cwd, fsize=fsize)
    rc = p.wait(timeout)
    return rc, p.stdout(), p.stderr()


# -- the storage --------------------------------------------------------------------------------


def storage(cwd: Path, name: str, url: str | None = None) -> Any:
    if url:
        return optuna.storages.RDBStorage(url)
    path = cwd / "results" / name / "optuna.journal"
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def trials(cwd: Path, name: str, url: str | None = None) -> list[optuna.trial.FrozenTrial]:
    """The cell's trials now ([] before the sweep created it)."""
    path = cwd / "results" / name / "optuna.journal"
    if url is None and not path.exists():
        return []
    st = storage(cwd, name, url)
    try:
        study = optuna.load_study(study_name=f"{name}/{CELL}", storage=st)
    except KeyError:
        return []
    finally:
        if url:
            st.engine.dispose()
    return study.get_trials(deepcopy=False)


def states(ts: list[optuna.trial.FrozenTrial]) -> Counter:
    return Counter(t.state.name for t in ts)


def wait_for(cwd: Path, name: str, pred, procs: list[Proc], *, url: str | None = None,
             timeout: float = WAIT) -> list[optuna.trial.FrozenTrial]:
    """Poll the storage until `pred(trials)`; fail if every process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ts = trials(cwd, name, url)
        if pred(ts):
            return ts
        if procs and all(p.popen.poll() is not None for p in procs):
            ts = trials(cwd, name, url)
            if pred(ts):
                return ts
            raise CaseFailed(f"the sweep ended before the fault point: {dict(states(ts))}; "
                             f"stderr: {procs[0].stderr()[-500:]}")
        time.sleep(0.2)
    for p in procs:
        p.kill_group()
    raise CaseFailed(f"timed out waiting: {dict(states(trials(cwd, name, url)))}")


def mid_grid(min_complete: int = 1, running: int = 1, more: bool = True):
    """A fault point: some trials done, `running` of them running, and (`more`) points not
    yet started. Four machines on a 6-point grid take the last points the instant one trial
    ends: there `more=False`, and the killed trials are the points left to do."""
    def pred(ts: list[optuna.trial.FrozenTrial]) -> bool:
        s = states(ts)
        return (s["COMPLETE"] >= min_complete and s["RUNNING"] >= running
                and (not more or s["COMPLETE"] + s["RUNNING"] < len(GRID)))
    return pred


def finished(ts: list[optuna.trial.FrozenTrial]) -> dict[int, tuple[float, dict]]:
    return {t.number: (t.value, dict(t.params)) for t in ts if t.state.name == "COMPLETE"}


def worker_pids(ts: list[optuna.trial.FrozenTrial]) -> set[int]:
    """The processes running trials now (their `worker` tag is host:pid:start)."""
    return {int(t.user_attrs["worker"].rsplit(":", 2)[1]) for t in ts
            if t.state.name == "RUNNING" and "worker" in t.user_attrs}


# -- the invariants -----------------------------------------------------------------------------


@dataclass
class Outcome:
    counts: Counter = field(default_factory=Counter)

    def line(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))


def invariants(cwd: Path, name: str, before: dict[int, tuple[float, dict]], *,
               url: str | None = None, plot: bool = True) -> Outcome:
    """Check the storage and the study's outputs after a fault and its rerun.

    `plot=True` regenerates trials.csv and the figures with `spartune-plot`; `plot=False`
    checks the ones the last sweep wrote at its end (`rerun` removes the old ones first, so
    they cannot be stale): one process start less per case."""
    ts = trials(cwd, name, url)
    counts = Counter("FAIL(surplus)" if t.user_attrs.get("surplus") else t.state.name
                     for t in ts)
    after = finished(ts)
    lost = {n for n in before if n not in after}
    check(not lost, f"finished trials lost: {sorted(lost)}")
    changed = {n for n, v in before.items() if after.get(n) != v}
    check(not changed, f"finished trials changed: {sorted(changed)}")
    points = Counter(t.params.get("log2_lr") for t in ts if t.state.name == "COMPLETE")
    twice = sorted(p for p, c in points.items() if c > 1)
    check(not twice, f"grid points run more than once: {twice} ({dict(counts)})")
    check(sorted(points) == GRID, f"grid incomplete: {sorted(points)} ({dict(counts)})")
    live = [t.number for t in ts if t.state.name in ("RUNNING", "WAITING")]
    check(not live, f"trials left RUNNING/WAITING: {live}")
    if plot:
        args = [f"study.name={name}"] + ([f"study.storage={url}"] if url else [])
        rc, out, err = run("spartune-plot", args, cwd)
        check(rc == 0, f"spartune-plot exited {rc}: {err[-400:]}")
    table = cwd / "results" / name / "trials.csv"
    check(table.exists(), f"{table} was not written")
    import pandas as pd

    rows = len(pd.read_csv(table))
    check(rows == len(ts), f"trials.csv has {rows} rows for {len(ts)} trials")
    figs = list((cwd / "results" / name / "figures").glob("*.png"))
    check(bool(figs), "no figure regenerated")
    return Outcome(counts)


def clear_outputs(cwd: Path, name: str) -> None:
    """Remove the study's trials.csv and figures, so the next command must write them."""
    folder = cwd / "results" / name
    (folder / "trials.csv").unlink(missing_ok=True)
    for fig in (folder / "figures").glob("*.png"):
        fig.unlink()


def no_traceback(*texts: str) -> None:
    for text in texts:
        check("Traceback" not in text, f"a traceback was printed:\n{text[-1500:]}")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def leftovers(folder: Path) -> list[Path]:
    """Temporary files a write left behind (atomic.replacing names them .<name>.*.tmp)."""
    return [p for p in folder.rglob(".*.tmp")]
