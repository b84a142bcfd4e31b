"""The bracketing search: each cell's optimum of one HP, with the fewest runs (sampler: bracket).

A stability study asks where the optimal LR (or sigma) sits at each density. A full grid spends
most of its runs far from any optimum; this search spends them around it. Per *group*
(param, width, density) it walks a log2 axis in steps of `study.step` octaves:

1. start at a centre and its two neighbours: the given `study.centre`, the proxy's winner
   (`study.centre_from`), the config's own value, or with `study.continuation` the optimum
   already found for the next denser group of the same (param, width);
2. extend one step at a time until the seed-mean minimum has a worse neighbour on each side
   (a diverged or pruned run counts as worse than any finite one);
3. refine by half a step from the minimum towards its lower neighbour (one octave apart, the
   parabola through three points is skewed by the loss curve's asymmetry); `study.refine=false`
   skips this, for curves too flat for the half step to tell the points apart;
4. stop at `study.max_points` points or at an axis bound; a minimum at a bound is reported as
   `at_low_bound` / `at_high_bound`, never as an optimum.

Seeds. The sweep's cells carry a seed, so a group is the seed cells of one (param, width,
density), one Optuna study each. Steps 1-2 are scouted with the first seed alone; the other
seeds then run at the scouted minimum and its neighbours, and from then on every decision uses
the points that every seed ran (a point where any seed diverged counts as diverged): every
estimate is a mean over the seeds that ran at every point used.

Exactness, as the grid's. Nothing is remembered outside the storage. The decision is a pure
function of the COMPLETE trials (`plan`): it replays the search from its first batch, each
batch derived from the finished results of the batches before it, and returns the first batch
that is not finished. Its missing points are queued as fixed-param trials in their seed cells
(`sync`), under the grid's `_ask_lock`, and a point is queued only while no live trial
(queued, running, finished) holds it: a rerun, a second worker or a second machine computes the
same batch and finds it held. A failed trial (a crash, a kill) holds nothing, so the same
decision queues its point again. Across machines (no shared lock) twins are dropped exactly as
the grid's retries are (`sweep._drop_queued_twins`, `sweep._duplicate`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
from optuna.trial import TrialState

from spartune import sweep
from spartune.config import Config, ConfigError

EPS = 1e-9
_STATUSES = ("searching", "blocked", "optimum", "at_low_bound", "at_high_bound", "max_points",
             "diverged")


@dataclass(frozen=True)
class Axis:
    """The searched HP's axis in Optuna's units (log2 for a log dimension)."""

    name: str  # the HP's short name in the space, e.g. lr
    param: str  # its name in Optuna, e.g. log2_lr
    lo: float
    hi: float
    step: float
    centre: float  # the default first point, on the lattice lo + k * step
    max_points: int
    refine: bool = True  # half-step refinement once bracketed (study.refine)
    # lo and hi as the trial's distribution has them: `lo`/`hi` are rounded (_r), and a
    # rounded bound can lie just outside them; a point is queued inside them (`sync`)
    exact: tuple[float, float] | None = None


@dataclass
class Plan:
    """Where a group's search stands: what to run next, or how it ended."""

    run: list[tuple[int, float]]  # (seed, point) of the current batch not finished yet
    status: str  # one of _STATUSES; searching while `run` is not empty
    best: float | None  # argmin of the seed means over the points every seed ran
    means: dict[float, float] = field(default_factory=dict)  # those seed means (inf: diverged)
    centre: float | None = None  # the first point of this group

    @property
    def done(self) -> bool:
        return self.status not in ("searching", "blocked")


@dataclass(frozen=True)
class Group:
    """The seed cells of one (param, width, density): one search."""

    param: str
    width: int
    density: float
    cells: tuple[sweep.Cell, ...]

    @property
    def key(self) -> str:
        return f"{self.param}/w{self.width}/d{self.density:g}"


def _r(x: float) -> float:
    return round(float(x), 9)  # the precision sweep._key compares points at


# -- configuration ------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    """The bracket's own fields (validate_study calls this when sampler is bracket)."""
    s = cfg.study
    if len(s.space) != 1:
        names = ", ".join(s.space) or "nothing"
        raise ConfigError("study.space", f"the bracket searches one HP per cell, the space has "
                          f"{names}: keep one (e.g. study.space={{lr:{{low:1e-4,high:0.1}}}}) "
                          "or use study.sampler=tpe")
    name, dim = next(iter(s.space.items()))
    if dim.values:
        raise ConfigError(f"study.space.{name}.values", "the bracket walks a range, not a list: "
                          "give low and high (and step), or use study.sampler=grid")
    if s.step is not None and not (math.isfinite(s.step) and s.step > 0):
        raise ConfigError("study.step", f"must be > 0 (octaves between points), got {s.step}")
    if s.max_points < 3:
        raise ConfigError("study.max_points", f"must be >= 3 (a centre and two neighbours), "
                          f"got {s.max_points}")
    if s.centre is not None and s.centre_from:
        raise ConfigError("study.centre", "give study.centre or study.centre_from, not both")
    if s.centre_from:
        from spartune.config import check_name

        check_name(s.centre_from, "study.centre_from")
    if s.continuation and len(s.densities) < 2:
        raise ConfigError("study.continuation", f"needs a density axis to continue along "
                          f"(study.densities has {list(s.densities)}): list two or more "
                          "densities, or set study.continuation=false")
    if s.centre is not None:
        _check_centre(cfg, s.centre, "study.centre")


def _check_centre(cfg: Config, value: float, where: str) -> None:
    name, dim = next(iter(cfg.study.space.items()))
    lo, hi = sweep._bounds(name, dim)
    x = math.log2(value) if dim.log and value > 0 else value
    if (dim.log and value <= 0) or not lo - EPS <= x <= hi + EPS:
        low, high = (2.0**lo, 2.0**hi) if dim.log else (lo, hi)
        raise ConfigError(where, f"{value:g} is outside study.space.{name} [{low:g}, "
                          f"{high:g}]: move the centre inside, or widen the bounds")


def prepare(cfg: Config) -> Config:
    """The config with `study.centre` taken from the proxy study when `centre_from` names one.

    Read once per command, from the proxy's storage (its journal under results/, or the same
    URL as this study's): its best finished, non-diverged trial's value of the HP. Every worker
    and machine reads the same trials, so all agree on the centre.
    """
    s = cfg.study
    if not s.centre_from or s.centre is not None:
        return cfg
    from pathlib import Path

    from spartune import collect

    name = next(iter(s.space))
    try:
        storage = collect.storage_for(Path(cfg.results_dir) / s.centre_from, s.storage)
        trials, _ = collect.load_trials(storage, s.centre_from)
    except ConfigError as e:
        raise ConfigError("study.centre_from", f"cannot read study {s.centre_from!r} "
                          f"({e}); run it first, or give study.centre") from None
    ok = trials[(trials["state"] == "COMPLETE") & ~trials["diverged"].astype(bool)
                & trials["final_val_loss"].notna() & trials[name].notna()]
    if ok.empty:
        raise ConfigError("study.centre_from", f"study {s.centre_from!r} has no finished trial "
                          f"with {name}: let it finish, or give study.centre")
    value = float(ok.loc[ok["final_val_loss"].idxmin(), name])
    _check_centre(cfg, value, "study.centre_from")
    out = replace(cfg, study=replace(s, centre=value))
    return out


def axis(cfg: Config) -> Axis:
    """The axis of the one searched HP; its centre snapped onto the lattice lo + k * step, so a
    bracket study and a grid study over the same space run the same points."""
    s = cfg.study
    name, dim = next(iter(s.space.items()))
    lo, hi = sweep._bounds(name, dim)
    step = s.step or dim.step or 1.0
    value = s.centre if s.centre is not None else sweep._get_field(
        cfg, sweep._dim_field(name, dim), "study.space")
    x = math.log2(value) if dim.log else float(value)
    k = round((min(max(x, lo), hi) - lo) / step)
    k = min(k, math.floor((hi - lo) / step + EPS))
    return Axis(name, sweep._param_name(name, dim), _r(lo), _r(hi), float(step),
                _r(lo + k * step), s.max_points, s.refine, (lo, hi))


def groups(cfg: Config) -> list[Group]:
    """The searches in the order workers take them: densest first within each (param, width),
    so that with continuation a sparser group's centre is known by the time it is reached."""
    s = cfg.study
    out = []
    for p in s.params:
        for w in s.widths:
            for d in sorted(s.densities, reverse=True):
                out.append(Group(p, w, d, tuple(sweep.Cell(p, w, d, seed) for seed in s.seeds)))
    return out


def denser(g: Group, gs: list[Group]) -> Group | None:
    """The group this one continues from: the next denser density of the same (param, width)."""
    same = [h for h in gs if (h.param, h.width) == (g.param, g.width) and h.density > g.density]
    return min(same, key=lambda h: h.density) if same else None


# -- the decision (pure) ------------------------------------------------------------------------


def plan(results: dict[int, dict[float, float]], seeds: list[int], ax: Axis,
         centre: float) -> Plan:
    """The search's state from its finished results: `results[seed][point]` = final loss, inf
    where the run diverged or was pruned.

    Replays the search from the first batch: each batch is decided from the results of the
    batches before it, so the answer depends on what the storage holds, never on timing or on
    which worker asks. Results outside the replayed batches are ignored.
    """
    known: dict[int, dict[float, float]] = {s: {} for s in seeds}
    while True:
        batch, status = _decide(known, seeds, ax, centre)
        missing = [(s, x) for s, x in batch if x not in results.get(s, {})]
        if missing or not batch:
            means = _full(known, seeds)
            finite = {x: v for x, v in means.items() if math.isfinite(v)}
            best = min(finite, key=lambda x: (finite[x], x)) if finite else None
            return Plan(missing, "searching" if missing else status, best, means, centre)
        for s, x in batch:
            known[s][x] = results[s][x]


def _decide(known: dict[int, dict[float, float]], seeds: list[int], ax: Axis,
            centre: float) -> tuple[list[tuple[int, float]], str]:
    """The next batch of (seed, point) after `known`, or ([], how the search ended)."""
    s0 = seeds[0]
    scout = known[s0]
    if not scout:  # the centre first: with continuation it is the denser group's optimum
        pts = dict.fromkeys(_clip(centre + d * ax.step, ax) for d in (0, -1, 1))
        return [(s0, x) for x in pts], "searching"
    room = len(set().union(*map(set, known.values()))) < ax.max_points
    if len(seeds) > 1:
        new, _ = _step(scout, ax, refine=False)
        if new is not None and room:
            return [(s0, new)], "searching"
        near = _neighbourhood(scout)
        batch = [(s, x) for s in seeds[1:] for x in near if x not in known[s]]
        if batch:
            return batch, "searching"
    new, status = _step(_full(known, seeds), ax, refine=ax.refine)
    if new is None:
        return [], status
    if not room:
        return [], "max_points"
    return [(s, new) for s in seeds if new not in known[s]], "searching"


def _clip(x: float, ax: Axis) -> float:
    return _r(min(max(x, ax.lo), ax.hi))


def _step(values: dict[float, float], ax: Axis, *, refine: bool) -> tuple[float | None, str]:
    """One point to add to `values` (point -> loss, inf = worse than any finite), or None and
    why the search is over."""
    tried = sorted(values)
    finite = {x: v for x, v in values.items() if math.isfinite(v)}
    if not finite:  # everything diverged: a smaller LR / sigma is where training is stable
        if tried[0] <= ax.lo + EPS:
            return None, "diverged"
        return _clip(tried[0] - ax.step, ax), "searching"
    best = min(finite, key=lambda x: (finite[x], x))
    left = [x for x in tried if x < best]
    right = [x for x in tried if x > best]
    if not left:
        if best <= ax.lo + EPS:
            return None, "at_low_bound"
        return _clip(best - ax.step, ax), "searching"
    if not right:
        if best >= ax.hi - EPS:
            return None, "at_high_bound"
        return _clip(best + ax.step, ax), "searching"
    if refine:
        lo_n, hi_n = left[-1], right[0]
        up = values[hi_n] < values[lo_n]  # the lower neighbour is above the minimum
        gap = hi_n - best if up else best - lo_n
        if gap > ax.step / 2 + EPS:
            return _r(best + (ax.step / 2 if up else -ax.step / 2)), "searching"
    return None, "optimum"


def _neighbourhood(scout: dict[float, float]) -> list[float]:
    """The scouted minimum and its nearest tried neighbours that did not diverge."""
    finite = {x: v for x, v in scout.items() if math.isfinite(v)}
    if not finite:
        return []
    best = min(finite, key=lambda x: (finite[x], x))
    tried = sorted(scout)
    near = [max((x for x in tried if x < best), default=None),
            min((x for x in tried if x > best), default=None)]
    return sorted([best, *[x for x in near if x is not None and x in finite]])


def _full(known: dict[int, dict[float, float]], seeds: list[int]) -> dict[float, float]:
    """Seed means at the points every seed ran; inf where any seed diverged."""
    out = {}
    for x in set().union(*map(set, known.values())):
        vals = [known[s][x] for s in seeds if x in known[s]]
        if not all(math.isfinite(v) for v in vals):
            out[x] = math.inf
        elif len(vals) == len(seeds):
            out[x] = sum(vals) / len(vals)
    return out


# -- the storage --------------------------------------------------------------------------------


def observe(studies: dict[sweep.Cell, optuna.Study], g: Group, ax: Axis
            ) -> tuple[dict[int, dict[float, float]], dict[int, set[float]]]:
    """(finished results, points held by a live trial) per seed of a group, from the storage.

    The oldest finished trial of a point is its result (twins never train, see
    sweep._duplicate). A failed trial holds nothing: its point is queued again.
    """
    results: dict[int, dict[float, float]] = {}
    held: dict[int, set[float]] = {}
    for cell in g.cells:
        study = studies[cell]
        res, live = results.setdefault(cell.seed, {}), held.setdefault(cell.seed, set())
        for t in sorted(sweep._live(study.get_trials(deepcopy=False)), key=lambda t: t.number):
            params = sweep._point_params(t, study.sampler)
            if not params or ax.param not in params:
                continue
            x = _r(params[ax.param])
            live.add(x)
            if t.state == TrialState.COMPLETE and x not in res:
                v = t.value
                bad = t.user_attrs.get("diverged") or v is None or not math.isfinite(v)
                res[x] = math.inf if bad else float(v)
            elif t.state == TrialState.PRUNED and x not in res:
                res[x] = math.inf
    return results, held


def state(cfg: Config, g: Group, gs: list[Group], studies: dict[sweep.Cell, optuna.Study],
          ax: Axis) -> Plan:
    """The group's plan as the storage has it; `blocked` while continuation waits on the
    denser group."""
    centre = ax.centre
    if cfg.study.continuation:
        d = denser(g, gs)
        if d is not None:
            prev = state(cfg, d, gs, studies, ax)
            if not prev.done:
                return Plan([], "blocked", None)
            if prev.best is not None:
                centre = prev.best
    results, _ = observe(studies, g, ax)
    return plan(results, list(cfg.study.seeds), ax, centre)


def sync(cfg: Config, g: Group, gs: list[Group], studies: dict[sweep.Cell, optuna.Study],
         ax: Axis, since: Any = None) -> Plan:
    """Queue the group's missing points that no live trial holds; call under `_ask_lock`.

    With `since` (the command's start), a point out of retries, or a cell the failure budget
    stopped, is not queued (failures.py): the search is then `stuck`."""
    p = state(cfg, g, gs, studies, ax)
    if not p.run:
        return p
    _, held = observe(studies, g, ax)
    by_cell = {c.seed: c for c in g.cells}
    for seed, x in p.run:
        if x in held[seed]:
            continue  # queued, or running in some worker
        study = studies[by_cell[seed]]
        if since is not None and _given_up(cfg, study, ax, x, since):
            continue
        value = min(max(x, ax.exact[0]), ax.exact[1]) if ax.exact else x  # _r(value) == x
        study.enqueue_trial({ax.param: value}, user_attrs={"bracket": g.key})
        held[seed].add(x)
        if cfg.study.storage:
            sweep._drop_queued_twins(study)
    return p


def _given_up(cfg: Config, study: optuna.Study, ax: Axis, x: float, since: Any) -> bool:
    """Has the failure budget given up on point `x` of this cell (or on the whole cell)?"""
    from spartune import failures

    trials = study.get_trials(deepcopy=False)
    key = sweep._key({ax.param: x})
    return (failures.verdict(trials, cfg, since) == failures.STOP
            or failures.exhausted(trials, key, cfg, since))


def stuck(cfg: Config, g: Group, gs: list[Group], studies: dict[sweep.Cell, optuna.Study],
          ax: Axis, p: Plan, since: Any) -> bool:
    """A search that cannot go on: a point it needs has no retries left, or a cell of the
    group was stopped by the failure budget, or (continuation) the denser search it waits on
    is stuck. The command then exits 4 (failures.raise_if_failing)."""
    if since is None or p.done:
        return False
    if p.status == "blocked":
        d = denser(g, gs)
        return d is not None and stuck(cfg, d, gs, studies, ax, state(cfg, d, gs, studies, ax),
                                       since)
    _, held = observe(studies, g, ax)
    by_cell = {c.seed: c for c in g.cells}
    return any(x not in held[seed] and _given_up(cfg, studies[by_cell[seed]], ax, x, since)
               for seed, x in p.run)


def _waiting(study: optuna.Study) -> bool:
    return any(not t.user_attrs.get("surplus")
               for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


# -- a worker -----------------------------------------------------------------------------------


def run_worker(cfg: Config, storage: Any, worker: int = 0, progress: Any = None,
               poll: float = 2.0, since: Any = None) -> int:
    """Run the groups' searches until every one has ended; return the trials run here.

    A worker takes a queued point of any group it can; while every open group waits on points
    other workers run (or on a denser group, with continuation), it polls the storage, failing
    the trials of dead workers on the way so their points are queued again.
    """
    cfg = prepare(cfg)
    ax, gs = axis(cfg), groups(cfg)
    studies = {c: sweep._load_cell_study(cfg, storage, c, worker) for g in gs for c in g.cells}
    deadline = time.monotonic() + cfg.study.timeout if cfg.study.timeout else math.inf
    ran, idle = 0, 0.05
    while True:
        with sweep._ask_lock(cfg):
            for study in studies.values():
                sweep.recover(study, cfg)
        busy, open_groups = False, False
        for g in gs:
            n, ended = _work_on(cfg, g, gs, studies, ax, progress, deadline, since)
            ran, busy, open_groups = ran + n, busy or n > 0, open_groups or not ended
            if time.monotonic() > deadline:
                return ran
        if not open_groups:
            return ran
        if busy:
            idle = 0.05
        else:
            time.sleep(idle)
            idle = min(poll, idle * 2)


def _work_on(cfg: Config, g: Group, gs: list[Group], studies: dict[sweep.Cell, optuna.Study],
             ax: Axis, progress: Any, deadline: float, since: Any = None) -> tuple[int, bool]:
    """Run the group's queued points this worker can take: (trials run, has the search
    ended, or stopped on failures)."""
    from spartune import failures

    ran, ended = 0, False
    for cell in g.cells:
        study = studies[cell]

        def may_ask(study: optuna.Study = study) -> bool:
            nonlocal ended
            p = sync(cfg, g, gs, studies, ax, since)
            ended = p.done or stuck(cfg, g, gs, studies, ax, p, since)
            trials = study.get_trials(deepcopy=False)
            return failures.verdict(trials, cfg, since) == failures.OK and _waiting(study)

        while time.monotonic() <= deadline:
            got = sweep.run_next(study, cfg, cell, may_ask)
            if got is None:
                break
            if got:
                ran += 1
                if progress is not None:
                    progress(study)
    return ran, ended


def status(cfg: Config, storage: Any) -> list[tuple[Group, Plan]]:
    """Every group's plan as the storage has it (reads only; the cells' studies must exist)."""
    cfg = prepare(cfg)
    ax, gs = axis(cfg), groups(cfg)
    studies = {}
    for g in gs:
        for c in g.cells:
            name = f"{cfg.study.name}/{c.key}"
            try:
                studies[c] = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                studies[c] = None
    out = []
    for g in gs:
        if any(studies[c] is None for c in g.cells):
            out.append((g, Plan([], "searching", None)))
            continue
        out.append((g, state(cfg, g, gs, studies, ax)))
    return out


def _bracketed(p: Plan) -> bool:
    """The seed-mean minimum has a worse point on each side (a diverged one counts)."""
    if p.best is None:
        return False
    return (any(x < p.best and v > p.means[p.best] for x, v in p.means.items())
            and any(x > p.best and v > p.means[p.best] for x, v in p.means.items()))


def summary(cfg: Config, storage: Any) -> tuple[list[str], int]:
    """One line per group (its optimum, or why it has none), and how many points the open
    searches still miss (at least one per open search)."""
    ax = axis(prepare(cfg))
    unit = (lambda x: f"{2.0**x:.3g}") if ax.param.startswith("log2_") else (lambda x: f"{x:g}")
    lines, missing = [], 0
    for g, p in status(cfg, storage):
        if not p.done:
            missing += max(1, len(p.run))
        n = len(p.means)
        if p.status == "optimum" and p.best is not None:
            what = f"optimum {ax.name}={unit(p.best)} ({ax.param} {p.best:g})"
        elif p.status in ("at_low_bound", "at_high_bound"):
            side = "low" if p.status == "at_low_bound" else "high"
            what = (f"minimum at the {side} bound {ax.name}={unit(p.best)}: no optimum inside "
                    "the axis; widen study.space")
        elif p.status == "max_points" and _bracketed(p):
            what = (f"bracketed at {ax.name}={unit(p.best)} ({ax.param} {p.best:g}: worse "
                    f"neighbours on both sides) but not refined: study.max_points="
                    f"{ax.max_points} was reached before the half-step point; the optimum "
                    "line fits the bracket on the step grid")
        elif p.status == "max_points":
            what = f"not bracketed within study.max_points={ax.max_points}"
        elif p.status == "diverged":
            what = "every point diverged down to the low bound"
        else:
            what = "still searching"
        lines.append(f"{g.key}: {what} [{n} points with all seeds]")
    return lines, missing
