"""The failure budget: a trial the objective failed is not a crash, and is not retried forever.

A crash (a worker killed, a machine lost) leaves a RUNNING trial that recovery fails and runs
again: the point is fine, the process was not, so every point is completed once whatever
happens to the workers (sweep.recover). An objective that fails (a Python exception, a
non-zero exit, a missing executable) would fail again at the same point, and a sweep that
replaced every failed trial by a new one ran 5454 failing trials a minute until killed. So a
FAIL that the objective caused is marked (`objective_failed`) and budgeted, per command:

- each grid or bracket point is retried at most `study.retries` times (a flaky objective
  still completes its grid);
- a cell whose last `study.max_failures` trials all failed stops (TPE, random, ... too), and
  no worker starts a trial that could take the cell past the cap (running trials count
  while any failure is in the streak);
- the command ends with exit 4 and one line: the cell, the count, the last error.

Only failures of this command count (`since`: when it started), so a rerun after the fix
starts with a whole budget; finished trials are kept.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from optuna.trial import TrialState

from spartune.config import Config, ConfigError, StudyConfig

MARK = "objective_failed"  # user attr of a FAIL the objective caused (not a crash)
OK, WAIT, STOP = "ok", "wait", "stop"


class ObjectiveFailing(Exception):
    """Cells stopped by the failure budget: the command exits 4 (stops.EXIT_OBJECTIVE), not 2:
    the configuration was valid, the objective failed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def validate(s: StudyConfig) -> None:
    if not isinstance(s.retries, int) or s.retries < 0:
        raise ConfigError("study.retries", f"must be an integer >= 0, got {s.retries!r}")
    if not isinstance(s.max_failures, int) or s.max_failures < 1:
        raise ConfigError("study.max_failures", f"must be an integer >= 1, got "
                          f"{s.max_failures!r}")


def _failed(t: Any, since: datetime | None) -> bool:
    """A FAIL the objective caused during this command."""
    if t.state != TrialState.FAIL or not t.user_attrs.get(MARK):
        return False
    return since is None or t.datetime_complete is None or t.datetime_complete >= since


def streak(trials: list[Any], since: datetime | None) -> tuple[int, int, str]:
    """(failures, running, last error) of the cell's trials since its last finished one.

    Walks back from the newest trial: a COMPLETE or PRUNED trial, or a failure from before
    this command, ends the streak; a crash's FAIL or a queued trial is neither."""
    fails, running, last = 0, 0, ""
    for t in sorted(trials, key=lambda t: t.number, reverse=True):
        if t.user_attrs.get("surplus"):
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            break
        if t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.FAIL and t.user_attrs.get(MARK):
            if not _failed(t, since):
                break
            fails += 1
            last = last or str(t.user_attrs.get("error", ""))
    return fails, running, last


def verdict(trials: list[Any], cfg: Config, since: datetime | None) -> str:
    """May a worker start another trial of this cell? ok, wait (running trials could take a
    failing streak past the cap), or stop (the cap is reached)."""
    fails, running, _ = streak(trials, since)
    cap = cfg.study.max_failures
    if fails >= cap:
        return STOP
    if fails and fails + running >= cap:
        return WAIT
    return OK


def point_failures(trials: list[Any], key: tuple, since: datetime | None) -> int:
    from spartune.sweep import _key

    return sum(1 for t in trials if _failed(t, since) and t.params and _key(t.params) == key)


def exhausted(trials: list[Any], key: tuple, cfg: Config, since: datetime | None) -> bool:
    """Has this point used up its retries in this command?"""
    return point_failures(trials, key, since) > cfg.study.retries


def queue_retries(study: Any, cfg: Config, since: datetime | None) -> int:
    """Queue once more each grid point the objective failed, while it has retries left and
    no live trial holds it; call under the ask lock. A crash's point is left to recovery."""
    from spartune import sweep

    trials = study.get_trials(deepcopy=False)
    if verdict(trials, cfg, since) != OK:
        return 0
    covered = {sweep._point(t, study.sampler) for t in sweep._live(trials)}
    queued = 0
    for t in trials:
        if not _failed(t, since) or not t.params:
            continue
        key = sweep._key(t.params)
        if key in covered or exhausted(trials, key, cfg, since):
            continue
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
        covered.add(key)
        queued += 1
    return queued


def problems(cfg: Config, storage: Any, since: datetime | None) -> list[str]:
    """One phrase per cell the budget stopped, or with a point out of retries and unfinished."""
    import optuna

    from spartune import sweep

    out = []
    for cell in sweep.cells(cfg.study):
        try:
            study = optuna.load_study(study_name=f"{cfg.study.name}/{cell.key}",
                                      storage=storage, sampler=optuna.samplers.RandomSampler())
        except KeyError:
            continue
        trials = study.get_trials(deepcopy=False)
        fails, _, last = streak(trials, since)
        if fails >= cfg.study.max_failures:
            out.append(f"cell {cell.key}: its last {fails} trials failed (last error: {last})")
            continue
        if cfg.study.sampler not in ("grid", "bracket"):
            continue
        done = {sweep._key(t.params) for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.params}
        given_up = {}
        for t in sorted(trials, key=lambda t: t.number):
            if _failed(t, since) and t.params and sweep._key(t.params) not in done:
                key = sweep._key(t.params)
                if exhausted(trials, key, cfg, since):
                    given_up[key] = str(t.user_attrs.get("error", ""))
        if given_up:
            key, last = next(reversed(given_up.items()))
            point = ", ".join(f"{k}={v:g}" for k, v in key)
            out.append(f"cell {cell.key}: {len(given_up)} point(s) failed "
                       f"{cfg.study.retries + 1} times, e.g. {point} (last error: {last})")
    return out


def raise_if_failing(cfg: Config, storage: Any, since: datetime | None) -> None:
    """End the command (exit 4) when the budget stopped a cell; finished trials are kept."""
    found = problems(cfg, storage, since)
    if not found:
        return
    more = f"; and {len(found) - 1} more cell(s)" if len(found) > 1 else ""
    field = "study.command" if cfg.study.command else "study.objective"
    raise ObjectiveFailing(field, f"{found[0][:400]}{more}: fix the objective, then rerun: "
                                  "finished trials are kept")
