"""A failed grid point is run again exactly once, however many workers recover it.

The invariant: every grid point ends with exactly one COMPLETE trial. These tests build the
storage states that crashes leave (a trial RUNNING under a dead process, a FAIL, a retry already
queued or already running) and call the recovery that every worker runs at cell start, as 1, 2
and 4 workers would, on the journal file and on a database (SQLite here; PostgreSQL in
tests/faults). The whole kill-and-rerun path with real processes is in tests/faults.
"""

from __future__ import annotations

import socket
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from conftest import tiny_config
from spartune import sweep
from spartune.config import SearchDim

GRID = [-9.0, -8.0, -7.0, -6.0]
DEAD = f"{socket.gethostname()}:999999999:1"  # a pid that cannot exist on this host


def _cfg(tmp_path, storage: str | None = None):
    cfg = tiny_config(train__steps=4, train__eval_every=2, train__eval_batches=1)
    cfg.results_dir = str(tmp_path / "results")
    s = cfg.study
    s.name, s.params, s.widths, s.densities, s.seeds = "retry", ["supar"], [32], [1.0], [0]
    s.sampler, s.pruner, s.storage = "grid", "none", storage
    s.space = {"lr": SearchDim(values=[2.0**x for x in GRID])}
    return cfg


def _crashed_cell(cfg) -> optuna.Study:
    """Four grid points: one COMPLETE, one FAIL (Ctrl-C), two RUNNING under a dead worker."""
    storage = sweep.open_storage(cfg)
    cell = sweep.cells(cfg.study)[0]
    study = sweep._load_cell_study(cfg, storage, cell, 0)
    for i in range(4):
        trial = study.ask()
        sweep._suggest(trial, cfg)
        trial.set_user_attr("worker", DEAD)
        if i == 0:
            study.tell(trial, 2.5)
        elif i == 1:
            study.tell(trial, state=TrialState.FAIL)
    return study


def _waiting_points(study: optuna.Study) -> Counter:
    return Counter(sweep._point(t, study.sampler)
                   for t in study.get_trials(states=(TrialState.WAITING,)))


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_every_failed_point_is_queued_once_whatever_the_workers(tmp_path, storage, workers):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if storage == "sqlite" else None
    cfg = _cfg(tmp_path, url)
    study = _crashed_cell(cfg)
    queued = [sweep.recover(study, cfg) for _ in range(workers)]  # each worker at cell start
    assert sum(queued) == 3, queued  # the FAIL and the two dead RUNNING ones, once each
    waiting = _waiting_points(study)
    assert len(waiting) == 3 and set(waiting.values()) == {1}, waiting
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_a_retry_a_live_worker_runs_is_not_queued_again(tmp_path):
    cfg = _cfg(tmp_path)
    study = _crashed_cell(cfg)
    sweep.recover(study, cfg)
    popped = study.ask()  # a live worker takes a queued retry: no params suggested yet
    popped.set_user_attr("worker", sweep.owner())
    assert popped.params == {} and sweep._point(study._storage.get_trial(popped._trial_id),
                                                 study.sampler) is not None
    assert sweep.recover(study, cfg) == 0  # it holds its point: nothing queued again
    assert sum(_waiting_points(study).values()) == 2


def test_retries_two_machines_queued_at_once_run_once(tmp_path):
    """Machines sharing a database have no common lock: both may queue the same retry. The
    twin is dropped as surplus, and the rerun gives each grid point exactly one COMPLETE."""
    cfg = _cfg(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = _crashed_cell(cfg)
    sweep.recover(study, cfg)
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    for t in failed:  # the second machine, in the same instant, before it saw the first's
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    assert sum(_waiting_points(study).values()) == 6
    sweep._drop_queued_twins(study)
    assert sum(_waiting_points(study).values()) == 3
    sweep.run_worker(cfg)
    _assert_exactly_once(study)


def test_a_twin_popped_before_it_was_dropped_yields_at_ask(tmp_path):
    """A twin another worker popped before `_drop_queued_twins` saw it is left alone there;
    that worker's own check fails it as surplus before it trains."""
    cfg = _cfg(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = _crashed_cell(cfg)
    sweep.recover(study, cfg)
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    study.enqueue_trial(failed[0].params, user_attrs={"retry_of": failed[0].number})
    sweep.run_worker(cfg)
    _assert_exactly_once(study)
    surplus = [t for t in study.get_trials() if t.user_attrs.get("surplus")]
    assert len(surplus) == 1 and "final_val_loss" not in surplus[0].user_attrs  # never trained


def _assert_exactly_once(study: optuna.Study) -> None:
    trials = study.get_trials()
    complete = Counter(t.params["log2_lr"] for t in trials if t.state == TrialState.COMPLETE)
    assert sorted(complete) == GRID and set(complete.values()) == {1}, complete
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_a_trial_stopped_before_its_first_suggestion_is_retried_at_its_grid_point(tmp_path):
    """Ctrl-C between `ask` and the suggestion leaves a FAIL with a grid id and no params: the
    sampler will not hand that point out again, so the retry must come from the grid id."""
    cfg = _cfg(tmp_path)
    storage = sweep.open_storage(cfg)
    study = sweep._load_cell_study(cfg, storage, sweep.cells(cfg.study)[0], 0)
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    assert study.get_trials()[0].params == {}
    assert sweep.recover(study, cfg) == 1
    sweep.run_worker(cfg)
    _assert_exactly_once(study)


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_a_trial_killed_before_its_worker_tag_is_recovered(tmp_path, storage, monkeypatch):
    """SIGKILL (or the database going away) between `ask` and the `worker` tag leaves an
    untagged RUNNING trial. On the journal, ask + tag and recovery share one lock, so it is an
    orphan at once; on a database it is failed once older than `UNTAGGED_GRACE` (a young one
    may be a live worker's, between its two writes), and a rerun that finds only such a trial
    holding a point waits it out instead of ending with the grid incomplete."""
    monkeypatch.setattr(sweep, "UNTAGGED_GRACE", 3)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if storage == "sqlite" else None
    cfg = _cfg(tmp_path, url)
    study = sweep._load_cell_study(cfg, sweep.open_storage(cfg), sweep.cells(cfg.study)[0], 0)
    study.ask()
    queued = sweep.recover(study, cfg)
    running = study.get_trials(states=(TrialState.RUNNING,))
    if storage == "journal":
        assert queued == 1 and not running
        sweep.run_worker(cfg)
        _assert_exactly_once(study)
    else:
        assert queued == 0 and len(running) == 1
        sweep.run_worker(cfg)  # the other points, then the orphan's once it is old enough
        _assert_exactly_once(study)
        failed = study.get_trials(states=(TrialState.FAIL,))
        assert [t.number for t in failed] == [running[0].number]
