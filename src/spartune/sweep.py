"""Optuna studies over training runs: one study per cell, every run a trial, resumable.

A sweep (a YAML file in `sweeps/`) declares cells (param x width x density x seed), a search
space over config fields (log2 scale by default), a sampler, a pruner and a storage. Each
worker process walks the cells in order and, per cell, asks Optuna for trials until the cell's
budget is spent: the grid's size for `grid`, `n_trials` otherwise; `bracket` (bracket.py)
walks each cell's axis towards its optimum instead. Budgets are counted in the
storage, so re-running the command resumes (finished trials are kept, exhausted cells skipped)
and a second process or machine running the same command joins the same studies.

Optuna is called directly (DESIGN.md: the Hydra Optuna sweeper pins optuna<3 and cannot
prune). `train.run` knows nothing of Optuna: the objective hands it a `report` callback that
becomes `trial.report` + pruning.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from spartune import atomic, failures, fingerprint, launch, stops
from spartune.columns import HP_FIELDS
from spartune.config import (
    Config,
    ConfigError,
    SearchDim,
    StudyConfig,
    check_axes,
    check_name,
    validate,
)

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "grid", "bracket", "random", "gp", "cmaes")
PRUNERS = ("none", "median", "hyperband")
JOURNAL = "optuna.journal"
HEARTBEAT_INTERVAL, HEARTBEAT_GRACE = 60, 180  # seconds (RDB storages)
# A live worker tags its trial within two storage round trips of `ask`; an untagged
# RUNNING trial older than this was left by a worker that died (or lost the storage) in
# between. A worker whose trial was failed while it was that slow drops it (`run_next`).
UNTAGGED_GRACE = 45  # seconds (RDB storages)
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@dataclass(frozen=True)
class Cell:
    param: str
    width: int
    density: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.param}/w{self.width}/d{self.density:g}/s{self.seed}"


def cells(study: StudyConfig) -> list[Cell]:
    return [Cell(p, w, d, s) for p in study.params for w in study.widths
            for d in study.densities for s in study.seeds]


def study_dir(cfg: Config) -> Path:
    return Path(cfg.results_dir) / cfg.study.name


# -- validation -------------------------------------------------------------------------------


def _dim_field(name: str, dim: SearchDim) -> str:
    return dim.field or HP_FIELDS.get(name, "")


def grid_values(name: str, dim: SearchDim) -> list[float]:
    """Grid points of one dimension, in the units Optuna sees (log2 when `dim.log`)."""
    if dim.values:
        vals = [float(v) for v in dim.values]
        return [math.log2(v) for v in vals] if dim.log else vals
    lo, hi = _bounds(name, dim)
    if dim.step is None:
        raise ConfigError(f"study.space.{name}.step",
                          "a grid needs `values` or `step` (in octaves when log)")
    n = int(round((hi - lo) / dim.step))
    return [lo + i * dim.step for i in range(n + 1)]


def _bounds(name: str, dim: SearchDim) -> tuple[float, float]:
    """(low, high) in Optuna's units (log2 when `dim.log`)."""
    if dim.values:
        pts = grid_values(name, dim)
        return min(pts), max(pts)
    lo, hi = dim.low, dim.high
    if lo is None or hi is None:
        raise ConfigError(f"study.space.{name}", "needs low and high (or values)")
    if dim.log:
        return math.log2(lo), math.log2(hi)
    return float(lo), float(hi)


def validate_study(cfg: Config) -> None:
    """Check the study's fields before any storage is opened or written."""
    s = cfg.study
    check_name(s.name, "study.name")
    check_axes(s, "study", cfg.model.head_size)
    if s.sampler not in SAMPLERS:
        raise ConfigError("study.sampler", f"unknown sampler {s.sampler!r}; choose one of "
                          f"{', '.join(SAMPLERS)}")
    if s.pruner not in PRUNERS:
        raise ConfigError("study.pruner", f"unknown pruner {s.pruner!r}; choose one of "
                          f"{', '.join(PRUNERS)}")
    if s.n_trials <= 0:
        raise ConfigError("study.n_trials", f"must be > 0, got {s.n_trials}")
    if s.workers <= 0:
        raise ConfigError("study.workers", f"must be >= 1, got {s.workers}")
    if s.timeout is not None and s.timeout <= 0:
        raise ConfigError("study.timeout", "must be > 0 seconds (or null for none)")
    if not s.space:
        raise ConfigError("study.space", "is empty: search at least one field, "
                          "e.g. study.space.lr={low:1e-4,high:1e-1}")
    for name, dim in s.space.items():
        f = f"study.space.{name}"
        target = _dim_field(name, dim)
        if not target:
            raise ConfigError(f"{f}.field", f"{name!r} is not one of {', '.join(HP_FIELDS)}; "
                              "say which config field it sets, e.g. field: optim.beta2")
        _get_field(cfg, target, f"{f}.field")
        pts = [v for v in (dim.values or []) if v is not None]
        bounds = pts or [b for b in (dim.low, dim.high) if b is not None]
        if dim.log and any(v <= 0 for v in bounds):
            raise ConfigError(f, "log-scale bounds must be > 0; use log: false for a linear "
                              "range that includes 0")
        lo, hi = _bounds(name, dim)
        if lo > hi:
            raise ConfigError(f, f"low ({dim.low}) is above high ({dim.high}); swap them")
        if dim.step is not None and dim.step <= 0:
            raise ConfigError(f"{f}.step", "must be > 0")
        if s.sampler == "grid":
            grid_values(name, dim)
    failures.validate(s)
    launch.check_devices(cfg, launch.visible_gpus())
    if s.sampler == "bracket":
        from spartune import bracket  # the search strategy built on this module's storage

        bracket.validate(cfg)
    validate(cfg)
    from spartune import objectives

    objectives.check_ready(cfg)  # the command's executable, the function's import: now


def check_overrides(cfg: Config, overrides: list[str], *, axes: str = "study") -> None:
    """A command-line value that the sweep's axes replace is an error, never silently dropped.

    Every trial takes its param, width, density and seed from its cell (`study.params`,
    `.widths`, `.densities`, `.seeds`; `transfer.*` for a transfer), so `model.width=512` on a
    sweep whose axis is `study.widths=[128]` would change nothing. An override equal to the
    axis's only value (`model.width=32 study.widths=[32]`) changes nothing either: allowed.
    """
    src = cfg.study if axes == "study" else cfg.transfer
    replaced = {"model.width": "widths", "model.density": "densities", "param": "params",
                "param.name": "params", "seed": "seeds"}
    for arg in overrides:
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in replaced:
            continue
        axis = f"{axes}.{replaced[key]}"
        values = list(getattr(src, replaced[key]))
        if len(values) == 1 and _same(values[0], value):
            continue
        raise ConfigError(key, f"every trial takes it from {axis} (now {values}), so "
                          f"{key}={value} would be ignored: set {axis}=[{value}] instead")


def _same(axis_value: Any, value: str) -> bool:
    if str(axis_value) == value:
        return True
    try:
        return float(axis_value) == float(value)
    except (TypeError, ValueError):
        return False


def _get_field(cfg: Config, path: str, field: str) -> Any:
    obj: Any = cfg
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(field, f"no config field {path!r}")
        obj = getattr(obj, part)
    return obj


def _set_field(cfg: Config, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    obj: Any = cfg
    for part in parents:
        obj = getattr(obj, part)
    current = getattr(obj, last)
    setattr(obj, last, type(current)(value) if isinstance(current, int | float) else value)


def cell_config(cfg: Config, cell: Cell, values: dict[str, float]) -> Config:
    """The run config of one trial: the base config, the cell's axes, the trial's HPs."""
    out = copy.deepcopy(cfg)
    out.param.name, out.model.width = cell.param, cell.width
    out.model.density, out.seed = cell.density, cell.seed
    for name, value in values.items():
        _set_field(out, _dim_field(name, cfg.study.space[name]), value)
    out.train.progress = False
    return out


# -- storage, sampler, pruner -------------------------------------------------------------------


def storage_url(cfg: Config) -> str:
    """The storage as a user would pass it: a URL, or the journal file's path."""
    return cfg.study.storage or str(study_dir(cfg) / JOURNAL)


def open_storage(cfg: Config, *, create: bool = True) -> optuna.storages.BaseStorage | str:
    """The journal file in results/<study>/ (created), or the URL the user gave."""
    url = cfg.study.storage
    if url:
        if "://" not in url:
            raise ConfigError("study.storage", f"{url!r} is not a storage URL; use e.g. "
                              "postgresql://user@host/db or sqlite:///path.db, or leave it null")
        try:
            return _open_rdb(url)
        except Exception as e:  # any driver or connection error: one line, the URL named
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if "DB access module" in msg:
                msg += " (for PostgreSQL: pip install 'spartune[postgres]')"
            raise ConfigError("study.storage", f"cannot open {url!r}: {msg}") from None
    path = study_dir(cfg) / JOURNAL
    if not create and not path.exists():
        raise ConfigError("study.name", f"no study at {path}: run the sweep first")
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    try:
        # An absolute path: the lock is a symlink to the journal, and a relative one dangles
        # (it resolves from the link's own folder), so Optuna's grace period, which stats the
        # link's target, never frees a lock left by a process killed mid-append: every later
        # run would wait forever. With the target found, such a lock is freed after 30 s.
        absolute = str(path.resolve())
        lock = JournalFileSymlinkLock(absolute)  # the lock Optuna's appends take
        repair_journal(path, lock)
        return optuna.storages.JournalStorage(JournalFileBackend(absolute, lock_obj=lock))
    except Exception as e:
        raise ConfigError("study.storage", f"cannot read {path}: {str(e).splitlines()[0][:200]}"
                          "; move the file away to start afresh") from None


def repair_journal(path: Path, lock: Any) -> int:
    """Cut a torn last record (a power cut or a full disk during an append) off the journal.

    Optuna skips a last line without its newline while reading, but the next append would
    glue a whole record onto it, and from then on the file fails to load. Cutting the torn
    bytes (after the last newline, and only when the line before them is a whole record)
    keeps every complete record; any other damage is left as it is for the one-line error.
    Runs under the journal's own lock (`lock`, the one Optuna's appends take), so a record
    another process is appending right now is never mistaken for a torn one. Returns the
    number of bytes cut.
    """
    if not path.exists() or path.stat().st_size == 0:
        return 0
    lock.acquire()
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - (1 << 20))  # a record is far shorter than 1 MiB
            f.seek(start)
            tail = f.read()
            keep = tail.rfind(b"\n") + 1  # up to the last newline
            cut = len(tail) - keep
            if cut and keep:
                # Only a torn append, after a whole record: a file whose complete lines are
                # not records is corrupt, not torn, and is left for the one-line error.
                last = tail.rfind(b"\n", 0, keep - 1) + 1
                try:
                    json.loads(tail[last:keep])
                except ValueError:
                    cut = 0
            if cut:
                f.truncate(start + keep)
                f.flush()
                os.fsync(f.fileno())
    finally:
        lock.release()
    if cut:
        print(f"spartune: warning: {path}: cut a torn last record ({cut} bytes, an append "
              "that never finished); every complete record is kept", file=sys.stderr)
    return cut


def _open_rdb(url: str, tries: int = 6) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with its heartbeat, retried while several workers create the
    tables of a fresh database at once (PostgreSQL fails all but one with a unique violation).
    """
    import random

    import sqlalchemy.exc

    for attempt in range(tries):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL,
                                                  grace_period=HEARTBEAT_GRACE)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == tries - 1:
                raise
            time.sleep(0.1 + 0.5 * random.random())
    raise AssertionError("unreachable")


class _Grid(optuna.samplers.GridSampler):
    """GridSampler for ask/tell: the budget is counted by `run_worker`, so the sampler must not
    call `study.stop()` (which only works inside `study.optimize`) when the grid is done."""

    def after_trial(self, study: optuna.Study, trial: Any, state: TrialState,
                    values: Any) -> None:
        return None


def make_sampler(cfg: Config, worker: int) -> optuna.samplers.BaseSampler:
    s = cfg.study
    seed = s.sampler_seed + 7919 * worker  # workers must not propose the same points
    match s.sampler:
        case "grid":
            grid = {_param_name(n, d): grid_values(n, d) for n, d in s.space.items()}
            # Every worker must shuffle the grid the same way: grid id n is one point for all.
            return _Grid(grid, seed=s.sampler_seed)
        case "tpe":
            startup = min(10, max(3, s.n_trials // 4))
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                              multivariate=True)
        case "random":
            return optuna.samplers.RandomSampler(seed=seed)
        case "bracket":  # every trial is queued with its point (bracket.sync): never sampled
            return optuna.samplers.RandomSampler(seed=seed)
        case "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed)
        case "gp":
            try:
                return optuna.samplers.GPSampler(seed=seed)
            except ImportError as e:
                raise ConfigError("study.sampler", f"gp needs an extra package ({e.name}); "
                                  "pip install scipy, or use tpe") from None
    raise ConfigError("study.sampler", f"unknown sampler {s.sampler!r}")


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    s, t = cfg.study, cfg.train
    match s.pruner:
        case "none":
            return optuna.pruners.NopPruner()
        case "median":
            return optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup_trials,
                                               n_warmup_steps=t.eval_every)
        case "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=t.eval_every,
                                                  max_resource=t.steps, reduction_factor=3)
    raise ConfigError("study.pruner", f"unknown pruner {s.pruner!r}")


def _param_name(name: str, dim: SearchDim) -> str:
    return f"log2_{name}" if dim.log else name


def budget(cfg: Config) -> int:
    """Trials per cell: the grid's size, at most max_points for the bracket, or n_trials."""
    if cfg.study.sampler == "grid":
        return math.prod(len(grid_values(n, d)) for n, d in cfg.study.space.items())
    if cfg.study.sampler == "bracket":
        return cfg.study.max_points
    return cfg.study.n_trials


# -- one trial ----------------------------------------------------------------------------------


def _suggest(trial: optuna.Trial, cfg: Config) -> dict[str, float]:
    values = {}
    for name, dim in cfg.study.space.items():
        lo, hi = _bounds(name, dim)
        step = dim.step if cfg.study.sampler not in ("grid", "bracket") else None
        if step is not None and (hi - lo) / step != int((hi - lo) / step):
            step = None  # Optuna needs (high - low) to be a multiple of step
        x = trial.suggest_float(_param_name(name, dim), lo, hi, step=step)
        values[name] = 2.0**x if dim.log else x
        if dim.values:  # a listed value is used exactly, not as 2**log2(value)
            values[name] = min(dim.values, key=lambda v: abs(v - values[name]))
    return values


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def run_trial(study: optuna.Study, trial: optuna.Trial, cfg: Config, cell: Cell) -> float | None:
    """Run the study's objective (objectives.py: the built-in training run, a Python function
    or a command) as `trial`, record everything in its user attrs, and tell Optuna."""
    from spartune import objectives

    with stops.deferred():  # journal appends: a signal inside Optuna's lock release leaves
        values = _suggest(trial, cfg)  # a FileNotFoundError, not the stop (held till after)
    run_cfg = cell_config(cfg, cell, values)
    role = cfg.study.role
    if role == "target" and not math.isclose(values.get("lr", cfg.optim.lr), cfg.optim.lr,
                                             rel_tol=1e-9):
        role = "check"  # a point of the local LR grid around the transferred value
    attrs = {
        "role": role, "param": cell.param, "width": cell.width, "density": cell.density,
        "seed": cell.seed, "base_width": run_cfg.model.base_width, "depth": run_cfg.model.depth,
        "lr": run_cfg.optim.lr, "init_std": run_cfg.model.init_std,
        "alpha_input": run_cfg.param.alpha_input, "alpha_output": run_cfg.param.alpha_output,
    }
    with stops.deferred():
        for k, v in attrs.items():
            trial.set_user_attr(k, v)

    def report(step: int, loss: float) -> None:
        with stops.deferred():
            trial.report(loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned()

    ckpt = checkpoint_path(cfg, cell, trial.params)
    try:
        if cfg.study.nproc_per_trial > 1:  # the built-in run on N processes (launch.py)
            m = launch.train_trial(cfg, run_cfg, report, ckpt, study=study, trial=trial)
        else:
            m = objectives.run(run_cfg, report, checkpoint=ckpt, values=values,
                               trial=trial.number, cell=cell.key)
    except optuna.TrialPruned:
        _drop(ckpt)
        with stops.deferred():
            study.tell(trial, state=TrialState.PRUNED)
        return None
    except objectives.TrialFailed as e:  # the user's code failed at this point: go on
        with stops.deferred():
            trial.set_user_attr("error", str(e)[:500])
            trial.set_user_attr(failures.MARK, True)  # budgeted, not recovered as a crash
            study.tell(trial, state=TrialState.FAIL)
        print(f"spartune: trial {cell.key}#{trial.number} failed: {e}", file=sys.stderr)
        return None
    except ConfigError:
        with stops.deferred():
            study.tell(trial, state=TrialState.FAIL)
        raise
    except BaseException as e:  # Ctrl-C, or a bug: never leave the trial RUNNING
        if isinstance(e, KeyboardInterrupt):
            stops.shield()  # a second Ctrl-C must not cut the write that fails the trial
        if stops.storage_gone(e) is not None:
            raise  # the storage cannot take the FAIL: the next run's recovery writes it
        with stops.deferred():
            trial.set_user_attr("error", f"{type(e).__name__}: {str(e)[:300]}")
            study.tell(trial, state=TrialState.FAIL)
        raise
    if m["diverged"]:
        # A finite penalty, not NaN (which Optuna would record as FAIL): TPE learns to avoid
        # the region, and `diverged` in the user attrs keeps it out of every plot.
        value = m["loss_ceiling"]
    else:
        value = m["final_val_loss"]
    with stops.deferred():  # a finished run is recorded whole, or re-run whole
        for k in objectives.METRIC_KEYS:
            trial.set_user_attr(k, _clean(m.get(k)))
        trial.set_user_attr("curve", [[r["step"], _clean(r["train_loss"]),
                                       _clean(r["val_loss"]), r["lr"]] for r in m["curve"]])
        study.tell(trial, value)
    _drop(ckpt)
    from spartune import trackers  # logger=...: one run per trial, after Optuna has it

    trackers.log_trial(cfg, cell.key, trial.number, attrs, m)
    return value


def _drop(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
        # a train.parallel=fsdp trial's checkpoint is a DCP folder beside it (sharding.SUFFIX)
        import shutil

        shutil.rmtree(path.with_suffix(".dcp"), ignore_errors=True)


# -- a worker -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _ask_lock(cfg: Config) -> Iterator[None]:
    """Serialize budget-check + ask between local processes sharing a journal file.

    Makes local grids exact: no two trials get one grid point. Across machines (RDB storage)
    two workers may race for the last point; the loser is marked FAIL with `surplus` at once
    and never counts.
    """
    if cfg.study.storage:
        yield
        return
    with atomic.file_lock(study_dir(cfg) / ".ask.lock"):
        yield


def _load_cell_study(cfg: Config, storage: Any, cell: Cell, worker: int) -> optuna.Study:
    name = f"{cfg.study.name}/{cell.key}"
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                sampler=make_sampler(cfg, worker), pruner=make_pruner(cfg),
                                load_if_exists=True)
    if not study.user_attrs:
        for k, v in {"study": cfg.study.name, "cell": cell.key, "param": cell.param,
                     "width": cell.width, "density": cell.density, "seed": cell.seed,
                     fingerprint.ATTR: fingerprint.of(cfg)}.items():
            study.set_user_attr(k, v)
    return study


def _proc_start(pid: int) -> str:
    """A process's start time (clock ticks since boot): with the pid, it names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner() -> str:
    """This process as `host:pid:start`, read afresh so a forked worker names itself, not its
    parent (a trial tagged with a live parent's pid would never be recovered)."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_proc_start(pid)}"


def _owner_alive(owner: str | None) -> bool:
    """False only when the trial's process is known dead: same host, pid gone or reused."""
    if not owner:
        return True
    host, pid, started = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return True  # another machine's trial: Optuna's heartbeat (RDB storages) decides
    return _proc_start(int(pid)) == started if started else os.path.exists(f"/proc/{pid}")


def recover(study: optuna.Study, cfg: Config, since: datetime | None = None) -> int:
    """Fail the trials of dead workers, and queue failed grid points again; returns how many.

    RDB storages: Optuna's own heartbeat (`fail_stale_trials`). Journal files have no
    heartbeat, so a RUNNING trial whose worker process is gone from this machine is failed.
    A grid point whose only trials failed (a crash, Ctrl-C, SIGKILL) is enqueued with its
    parameters, so a rerun completes the grid instead of leaving a hole.

    Invariant: every grid point ends with exactly one COMPLETE (or PRUNED) trial, however many
    workers recover the cell at once. A point is covered, and so never queued again, while any
    live trial holds it: a queued retry (WAITING, its point in `fixed_params`), a retry a
    worker is running, a finished trial. On a journal file `_ask_lock` serialises this call
    between local workers, so a retry is queued once. Machines sharing a database have no
    common lock: two may queue the same retry in the same instant, and the later one (higher
    trial number) is dropped as `surplus` before it trains (`_duplicate`, `_drop_queued_twins`).

    With `since` (the command's start), a point the objective failed in this command is left
    to the failure budget (failures.queue_retries), which retries it while the cell may go on.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    storage = study._storage  # Optuna has no public call to fail another process's trial
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _orphaned(t, cfg):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    if cfg.study.sampler != "grid":
        return 0  # failed trials do not count against n_trials: new ones replace them
    trials = study.get_trials(deepcopy=False)
    covered = {_point(t, study.sampler) for t in _live(trials)}
    queued = 0
    for t in trials:
        params = _point_params(t, study.sampler)
        if (t.state == TrialState.FAIL and params and not t.user_attrs.get("surplus")
                and _key(params) not in covered
                and not (since and failures.point_failures(trials, _key(params), since))):
            study.enqueue_trial(params, user_attrs={"retry_of": t.number})
            covered.add(_key(params))
            queued += 1
    if queued and cfg.study.storage:
        _drop_queued_twins(study)
    return queued


def _orphaned(t: Any, cfg: Config) -> bool:
    """Is this RUNNING trial's process gone?

    A worker tags its trial with `worker` right after `ask`. A trial without the tag was
    created by a process killed in between: on a journal file both happen under `_ask_lock`,
    which `recover` holds too, so an untagged trial seen here is an orphan for certain; on a
    database (no shared lock) it is one once it is older than `UNTAGGED_GRACE`.
    """
    worker = t.user_attrs.get("worker")
    if worker is not None:
        return not _owner_alive(worker)
    if not cfg.study.storage:
        return True
    return _age(t) > UNTAGGED_GRACE


def _age(t: Any) -> float:
    return (datetime.now() - (t.datetime_start or datetime.now())).total_seconds()


def _untagged(study: optuna.Study, cfg: Config) -> bool:
    """Does a RUNNING trial of this cell hold its point with no worker tag (a database only)?

    Younger than `UNTAGGED_GRACE` it may be a live worker's, between `ask` and its tag, or a
    dead one's (its worker lost the storage there); older, it is an orphan. A worker with
    nothing else to do in the cell waits it out and recovers it, rather than end with that
    point undone."""
    if not cfg.study.storage:
        return False
    return any("worker" not in t.user_attrs
               for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _live(trials: list[Any]) -> list[Any]:
    """Trials that hold their grid point: queued, running or finished, not a dropped twin."""
    return [t for t in trials if t.state in _COUNTED and not t.user_attrs.get("surplus")]


def _drop_queued_twins(study: optuna.Study) -> None:
    """Fail (as `surplus`) a queued retry whose point an older live trial already holds.

    Only a WAITING twin is touched, and only while it is still WAITING: one that another
    worker has just popped is left to that worker's own `_duplicate` check, so no running
    trial is ever failed here.
    """
    storage = study._storage  # no public call to change a queued trial of another process
    trials = study.get_trials(deepcopy=False)
    owner_of: dict[tuple, int] = {}
    for t in sorted(_live(trials), key=lambda t: t.number):
        point = _point(t, study.sampler)
        if point is None:
            continue
        if point not in owner_of:
            owner_of[point] = t.number
        elif t.state == TrialState.WAITING:
            fresh = storage.get_trial(t._trial_id)
            if fresh.state != TrialState.WAITING:
                continue
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
                storage.set_trial_user_attr(t._trial_id, "surplus", True)
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, round(float(v), 9)) for k, v in params.items()))


def _point_params(t: Any, sampler: Any) -> dict[str, Any] | None:
    """The grid point a trial runs, as params: its own, a queued retry's fixed params, or
    (stopped before it suggested them) the point of its grid id. A queued or just-popped retry
    has no params yet: without `fixed_params` it would look pointless and be queued again; a
    trial stopped between `ask` and its first suggestion holds a grid id the sampler will not
    hand out again, so only a retry of that point fills the hole."""
    if t.params:
        return dict(t.params)
    fixed = t.system_attrs.get("fixed_params")
    if fixed:
        return dict(fixed)
    gid = t.system_attrs.get("grid_id")
    if gid is None or not isinstance(sampler, optuna.samplers.GridSampler):
        return None
    return dict(zip(sampler._param_names, sampler._all_grids[gid], strict=True))


def _point(t: Any, sampler: Any) -> tuple | None:
    params = _point_params(t, sampler)
    return None if params is None else _key(params)


def _may_ask(study: optuna.Study, cfg: Config, total: int) -> bool:
    """Is there work left in this cell: a queued retry, or budget for a new trial?"""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    if cfg.study.sampler == "grid":
        touched = {_point(t, study.sampler) for t in trials}
        return len(touched - {None}) < total  # a grid point nobody has started
    return len([t for t in trials if t.state in _COUNTED]) < total


def _duplicate(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Does an older live trial, or a finished one, already hold this trial's grid point?

    Two workers without a shared lock (machines on one database) can take the same point at
    once: a fresh grid id, or a retry both queued. The trial with the higher number yields, so
    exactly one of them trains; a finished trial of the point always wins.
    """
    frozen = study._storage.get_trial(trial._trial_id)
    mine = _point(frozen, study.sampler)
    if mine is None:
        return False
    for t in _live(study.get_trials(deepcopy=False)):
        if t.number == trial.number or _point(t, study.sampler) != mine:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or t.number < trial.number:
            return True
    return False


def checkpoint_path(cfg: Config, cell: Cell, params: dict[str, Any]) -> Path | None:
    """One checkpoint per cell and HP point, so a retried trial resumes its predecessor."""
    if cfg.train.checkpoint_every <= 0:
        return None
    tag = hashlib.sha256(repr(_key(params)).encode()).hexdigest()[:12]
    return study_dir(cfg) / "checkpoints" / cell.key.replace("/", "_") / f"{tag}.pt"


def worker_threads(cfg: Config) -> int:
    """Intra-op threads per worker: `train.threads`, else the cores shared out among the local
    workers, so N workers never oversubscribe the machine."""
    return cfg.train.threads or max(1, (os.cpu_count() or 1) // cfg.study.workers)


def run_worker(cfg: Config, worker: int = 0, progress: Any = None,
               since: datetime | None = None) -> int:
    """Run trials cell by cell until every cell's budget is spent; return trials run here.

    `since` is when the command started: the failure budget counts its failures only."""
    import torch

    torch.set_num_threads(worker_threads(cfg))
    stops.quiet_storage_threads()
    launch.pin_worker(cfg, worker)  # its own GPU(s), when there are GPUs
    storage = open_storage(cfg)
    since = since or datetime.now()
    if cfg.study.sampler == "bracket":
        from spartune import bracket  # its own walk over the cells; trials run by run_next

        return bracket.run_worker(cfg, storage, worker, progress, since=since)
    total, start = budget(cfg), time.monotonic()
    ran = 0
    for cell in cells(cfg.study):
        study = _load_cell_study(cfg, storage, cell, worker)
        with _ask_lock(cfg):
            recover(study, cfg, since)

        def may_ask(study: optuna.Study = study) -> bool:
            trials = study.get_trials(deepcopy=False)
            return (failures.verdict(trials, cfg, since) == failures.OK
                    and _may_ask(study, cfg, total))

        while True:
            if cfg.study.timeout and time.monotonic() - start > cfg.study.timeout:
                return ran
            got = run_next(study, cfg, cell, may_ask)
            if got is None:
                if cfg.study.sampler == "grid":
                    with _ask_lock(cfg):
                        retried = failures.queue_retries(study, cfg, since)
                    if retried:
                        continue  # a point the objective failed, once more
                if not _untagged(study, cfg):
                    break
                with _ask_lock(cfg):
                    queued = recover(study, cfg)  # an old one: failed, its point queued
                if not queued:
                    time.sleep(1.0)  # a young one: until it is tagged, ends or grows old
                continue
            if got:
                ran += 1
                if progress is not None:
                    progress(study)
    return ran


def run_next(study: optuna.Study, cfg: Config, cell: Cell, may_ask: Any) -> bool | None:
    """Ask for one trial of `cell` and run it: None when `may_ask()` (called under the ask
    lock) says the cell has no work now, False when the trial was a twin dropped before it
    trained, True when it ran."""
    trial = None
    try:
        with _ask_lock(cfg):
            if not may_ask():
                return None
            with warnings.catch_warnings(), stops.deferred():
                # Optuna warns that heartbeats are meant for Study.optimize; ask/tell
                # keeps one alive below exactly as optimize does.
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = study.ask()
                try:
                    trial.set_user_attr("worker", owner())  # before a stop orphans it
                except optuna.exceptions.UpdateFinishedTrialError:
                    return False  # untagged too long: another machine failed it as an orphan
            if _unwanted(study, trial, cfg):
                # only across machines (no shared lock): two workers took one point
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                return False
        from optuna.storages._heartbeat import get_heartbeat_thread

        with get_heartbeat_thread(trial._trial_id, study._storage):
            run_trial(study, trial, cfg, cell)
    except KeyboardInterrupt:
        if trial is not None:
            _fail_if_running(study, trial)
        raise
    return True


def _unwanted(study: optuna.Study, trial: optuna.Trial, cfg: Config) -> bool:
    """A trial that must not train: a grid or bracket point an older trial holds, or (bracket)
    a trial that another machine's worker left without a queued point to pop."""
    if cfg.study.sampler == "bracket":
        fixed = study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")
        return not fixed or _duplicate(study, trial)
    return cfg.study.sampler == "grid" and _duplicate(study, trial)


def _fail_if_running(study: optuna.Study, trial: optuna.Trial) -> None:
    """A stop that came between `ask` and the run: the trial must not stay RUNNING."""
    stops.shield()
    if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            study.tell(trial, state=TrialState.FAIL)


def worker_context(cfg: Config) -> Any:
    """How local workers start: fork where it is safe, spawn otherwise.

    A spawned worker imports torch, Optuna and spartune afresh (3-5 s on a small CPU), which
    on a proxy sweep of 2-4 s trials costs a worker one or two trials' worth of time. A forked
    worker starts at once with everything imported. Fork is safe here only when
    - the platform has it (Linux; macOS's fork is unsafe with its system frameworks),
    - each worker runs one intra-op thread: GNU OpenMP's thread pool does not survive fork, and
      a forked child that enters a parallel region with more than one thread hangs,
    - CUDA is not initialised in this process (a forked child cannot use it).
    `SPARTUNE_WORKER_START=fork|spawn` overrides the choice.
    Storages are opened afresh in each worker (`run_worker`), never shared across the fork.
    """
    forced = os.environ.get("SPARTUNE_WORKER_START", "")
    if forced in ("fork", "spawn"):
        return mp.get_context(forced)
    can_fork = sys.platform.startswith("linux") and worker_threads(cfg) == 1
    if can_fork and "torch" in sys.modules:
        import torch

        can_fork = not torch.cuda.is_initialized()
    return mp.get_context("fork" if can_fork else "spawn")


def _worker_entry(cfg: Config, worker: int, since: datetime | None = None) -> None:
    from spartune.train import flush_denormals

    flush_denormals()  # before torch starts its thread pool in this fresh process
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The parent stops its workers with SIGTERM on Ctrl-C: end the trial as FAIL, cleanly.
    stops.obey_sigterm()
    try:
        run_worker(cfg, worker, since=since)
    except KeyboardInterrupt as e:
        sys.exit(stops.exit_code(e))
    except atomic.WriteError as e:
        print(f"spartune: error: {e.filename}: cannot write it ({e.strerror}); nothing of it "
              f"was left behind (worker {worker})", file=sys.stderr)
        sys.exit(stops.EXIT_ENVIRONMENT)
    except Exception as e:
        cause = stops.storage_gone(e)
        if cause is None:
            raise
        print(f"spartune: error: study.storage: the storage went away ({cause}); worker "
              f"{worker} stops, finished trials are kept", file=sys.stderr)
        sys.exit(stops.EXIT_ENVIRONMENT)


def count_done(cfg: Config, storage: Any) -> tuple[int, float]:
    """(finished trials, FAIL included, and the best value) over all cells of the study: one
    walk of the storage, progress.tally's."""
    from spartune import progress

    t = progress.tally(storage, cfg.study.name)
    return t.done + t.failed, t.best


def sweep(cfg: Config) -> dict[str, Any]:
    """Run the study with `study.workers` local processes (this one included).

    Refuses a rerun whose configuration differs from the study's (fingerprint.py) before any
    trial; raises failures.ObjectiveFailing at the end when the failure budget stopped a cell.
    """
    since = datetime.now()
    validate_study(cfg)
    if cfg.study.sampler == "bracket":
        from spartune import bracket

        cfg = bracket.prepare(cfg)  # the proxy's winner read once, before workers start
    storage = open_storage(cfg)
    n_total = budget(cfg) * len(cells(cfg.study))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fingerprint.check_storage(cfg, storage)  # a changed experiment stops here, nothing run
    from spartune import progress as lines  # a line every 30 s when stdout is a log

    start = lines.tally(storage, cfg.study.name)
    done0 = start.done + start.failed  # the bar's and the log line's count, FAIL included
    log.info("study %s: %d cells x %d trials = %d; %d already finished; storage %s",
             cfg.study.name, len(cells(cfg.study)), budget(cfg), n_total, done0,
             storage_url(cfg))
    procs = []
    ctx = worker_context(cfg)
    for w in range(1, cfg.study.workers):
        p = ctx.Process(target=_worker_entry, args=(cfg, w, since), daemon=False)
        with warnings.catch_warnings():
            # Python >= 3.12 warns on fork from a threaded process; worker_context only forks
            # when the child stays single-threaded in OpenMP and CUDA is untouched.
            warnings.filterwarnings("ignore", ".*use of fork", DeprecationWarning)
            p.start()
        procs.append(p)
    bar = _bar(n_total, done0, cfg)

    def progress(_: optuna.Study) -> None:
        if bar is not None:
            done, best = count_done(cfg, storage)
            bar.n = min(done, n_total)
            bar.set_postfix(best=f"{best:.4f}" if math.isfinite(best) else "-", refresh=False)
            bar.refresh()

    t0, started = time.monotonic(), since.timestamp()
    pids = [os.getpid(), *(p.pid for p in procs)]
    ticker = lines.Ticker(cfg.study.name, n_total, start.done,
                          lambda: lines.tally(storage, cfg.study.name, pids, started)).start()
    try:
        run_worker(cfg, 0, progress, since=since)
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        stops.shield()  # the stop has begun: a second Ctrl-C must not orphan the workers
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
        raise
    finally:
        ticker.stop()
        if bar is not None:
            bar.close()
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    end = lines.tally(storage, cfg.study.name, pids, started)  # every local worker's trials
    out = {"total": n_total, "finished": end.done + end.failed, "ran_here": end.ran_here,
           "best": end.best,
           "seconds": time.monotonic() - t0, "worker_failures": len(failed),
           "storage": storage_url(cfg), "notes": []}
    if cfg.study.sampler == "bracket":
        from spartune import bracket

        out["notes"], missing = bracket.summary(cfg, storage)
        out["total"] = out["finished"] + missing  # a search's size is known once it has ended
    failures.raise_if_failing(cfg, storage, since)  # exit 4: the objective, not the config
    return out


def _bar(total: int, initial: int, cfg: Config) -> Any:
    if not (cfg.train.progress and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="trial", desc=cfg.study.name,
                dynamic_ncols=True)
