"""The bracketing search: its decisions on a synthetic objective, and its exactness in storage.

The synthetic objective replaces `spartune.train.run` (what a trial runs): a parabola in
log2(lr) with a known minimum, a diverged run above a threshold, and a small offset per seed.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from collections import Counter

import pytest
from optuna.trial import TrialState

from conftest import fake_metrics, tiny_config
from spartune import bracket, sweep, train
from spartune.config import ConfigError, SearchDim

LO, HI = -12.0, -1.0


def axis(centre: float = -9.0, max_points: int = 10, step: float = 1.0) -> bracket.Axis:
    return bracket.Axis("lr", "log2_lr", LO, HI, step, centre, max_points)


def drive(objective, seeds=(0,), ax=None, centre=None):
    """Run the pure decision to its end: every requested point gets the objective's loss."""
    ax = ax or axis()
    results: dict[int, dict[float, float]] = {s: {} for s in seeds}
    for _ in range(100):
        p = bracket.plan(results, list(seeds), ax, ax.centre if centre is None else centre)
        if not p.run:
            return p, results
        for s, x in p.run:
            results[s][x] = objective(x, s)
    raise AssertionError("the search did not end")


def bowl(minimum: float, diverge: float = math.inf):
    def f(x: float, seed: int) -> float:
        return math.inf if x > diverge else 2.0 + 0.1 * (x - minimum) ** 2 + 0.003 * seed
    return f


@pytest.mark.parametrize("minimum", [-10.7, -6.3, -3.9, -6.0])
def test_brackets_and_refines_to_the_true_minimum(minimum):
    p, results = drive(bowl(minimum), seeds=(0,))
    assert p.status == "optimum"
    assert abs(p.best - minimum) <= 0.25 + 1e-9  # half-step refinement: the nearest half octave
    xs = sorted(results[0])
    assert any(x < p.best for x in xs) and any(x > p.best for x in xs)  # bracketed
    assert len(xs) < 12  # fewer points than the full one-octave grid over the axis


def test_without_refinement_the_search_stops_once_bracketed():
    ax = bracket.Axis("lr", "log2_lr", LO, HI, 1.0, -9.0, 10, refine=False)
    p, results = drive(bowl(-6.3), ax=ax)
    assert (p.status, p.best) == ("optimum", -6.0)
    assert sorted(results[0]) == [-10.0, -9.0, -8.0, -7.0, -6.0, -5.0]  # no half step
    refined, _ = drive(bowl(-6.3))
    assert refined.best == -6.5  # the default refines towards the lower neighbour


def test_study_refine_reaches_the_axis(tmp_path):
    assert bracket.axis(bracket_cfg(tmp_path)).refine
    assert not bracket.axis(bracket_cfg(tmp_path, refine=False)).refine


def test_minimum_beyond_a_bound_is_reported_as_the_bound():
    p, _ = drive(bowl(-14.0))
    assert (p.status, p.best) == ("at_low_bound", LO)
    p, _ = drive(bowl(2.0))
    assert (p.status, p.best) == ("at_high_bound", HI)


def test_diverged_points_count_as_worse():
    # the loss would keep falling up to -4, but runs above -5.5 diverge
    p, results = drive(bowl(-4.0, diverge=-5.5), seeds=(0,))
    assert p.status == "optimum" and p.best == -6.0
    assert math.isinf(results[0][-5.0])  # the diverged neighbour closed the bracket
    # everything diverged down to the bound: no optimum
    p, _ = drive(bowl(-6.0, diverge=-20.0))
    assert p.status == "diverged" and p.best is None


def test_max_points_stops_an_unbracketed_search():
    p, results = drive(bowl(-30.0), ax=bracket.Axis("lr", "log2_lr", -40, 0, 1.0, -5, 5))
    assert p.status == "max_points" and len(results[0]) == 5


def test_first_seed_scouts_the_others_run_at_the_minimum_and_neighbours():
    p, results = drive(bowl(-5.2), seeds=(0, 1, 2))
    assert p.status == "optimum" and abs(p.best - -5.2) <= 0.25
    scout, others = set(results[0]), set(results[1])
    assert results[1].keys() == results[2].keys()
    assert len(others) < len(scout)  # the extension from -9 up to -5 ran on seed 0 only
    # every estimate uses all seeds: the means are over points every seed ran
    assert set(p.means) == others
    assert p.means[p.best] == pytest.approx(sum(results[s][p.best] for s in (0, 1, 2)) / 3)


def test_plan_is_a_function_of_the_results_only():
    """Extra or reordered results outside the search's own batches change nothing."""
    p1, results = drive(bowl(-6.3), seeds=(0, 1))
    noisy = {s: {**{-11.0: 9.9, -1.0: 0.1}, **r} for s, r in results.items()}
    p2 = bracket.plan(noisy, [0, 1], axis(), -9.0)
    assert (p2.status, p2.best, p2.means) == (p1.status, p1.best, p1.means)


# -- through the storage ------------------------------------------------------------------------


def fake_run(minimum: float = -6.3, diverge: float = -2.5, die_at: int | None = None):
    calls = {"n": 0}

    def run(cfg, report=None, checkpoint=None):
        calls["n"] += 1
        if die_at is not None and calls["n"] == die_at:
            os._exit(9)  # a kill in the middle of a trial: it stays RUNNING, its owner gone
        x = math.log2(cfg.optim.lr)
        div = x > diverge
        loss = 2.0 + 0.1 * (x - minimum) ** 2 + 0.01 * cfg.seed - 0.02 * (1 - cfg.model.density)
        return fake_metrics(loss, cfg.optim.lr, diverged=div)
    return run


def bracket_cfg(tmp_path, **study):
    cfg = tiny_config(results_dir=str(tmp_path / "results"))
    cfg.train.threads = 1
    s = cfg.study
    s.name, s.sampler, s.seeds, s.densities = "b", "bracket", [0, 1], [1.0, 0.5]
    s.space = {"lr": SearchDim(low=2.0**LO, high=2.0**HI, step=1.0)}
    cfg.optim.lr = 2.0**-9
    for k, v in study.items():
        setattr(s, k, v)
    return cfg


def finished(cfg) -> Counter:
    """(cell, log2 lr) -> number of COMPLETE trials, over the whole study."""
    storage = sweep.open_storage(cfg)
    out: Counter = Counter()
    for cell in sweep.cells(cfg.study):
        study = sweep._load_cell_study(cfg, storage, cell, 0)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            out[(cell.key, round(t.params["log2_lr"], 9))] += 1
    return out


def statuses(cfg):
    return [(g.key, p.status, p.best) for g, p in bracket.status(cfg, sweep.open_storage(cfg))]


def test_sweep_finds_every_cells_optimum_once_each_point(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", fake_run())
    cfg = bracket_cfg(tmp_path)
    res = sweep.sweep(cfg)
    done = finished(cfg)
    assert set(done.values()) == {1}  # no point ran twice
    assert res["finished"] == res["total"] == sum(done.values())
    for _, status, best in statuses(cfg):
        assert status == "optimum" and abs(best - -6.3) <= 0.25
    assert any("optimum lr=" in line for line in res["notes"])
    grid = 12 * len(sweep.cells(cfg.study))  # the full one-octave grid over the same axis
    assert sum(done.values()) <= 0.5 * grid
    again = sweep.sweep(cfg)  # a rerun of a finished study runs nothing
    assert again["ran_here"] == 0 and finished(cfg) == done


def test_a_point_at_a_bound_is_queued_inside_the_trials_range(tmp_path, monkeypatch, recwarn):
    """log2 of a bound rounded to the points' precision can lie outside it (a transfer check
    centred on a proxy's LR): the trial must still get a value in its distribution's range."""
    monkeypatch.setattr(train, "run", fake_run(minimum=2.0))  # the minimum beyond the top
    cfg = bracket_cfg(tmp_path, seeds=[0], densities=[1.0])
    hi = -4.640575207078866  # rounds up to -4.640575207, above the bound
    cfg.study.space = {"lr": SearchDim(low=2.0 ** (hi - 2), high=2.0**hi, step=1.0)}
    cfg.optim.lr = 2.0**hi
    sweep.sweep(cfg)
    assert not [w for w in recwarn if "out of range" in str(w.message)]
    lo_x, hi_x = math.log2(2.0 ** (hi - 2)), math.log2(2.0**hi)
    xs = [x for (_, x), n in finished(cfg).items() for _ in range(n)]
    assert len(xs) == 2 and all(lo_x - 1e-9 <= x <= hi_x + 1e-9 for x in xs)
    storage = sweep.open_storage(cfg)
    (cell,) = sweep.cells(cfg.study)
    raw = [t.params["log2_lr"] for t in sweep._load_cell_study(cfg, storage, cell, 0)
           .get_trials(deepcopy=False)]
    assert max(raw) <= hi_x  # the exact bound, not its rounding above it
    assert statuses(cfg)[0][1] == "at_high_bound"


def test_continuation_starts_at_the_denser_cells_optimum(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", fake_run(minimum=-6.3))
    cfg = bracket_cfg(tmp_path, continuation=True)
    sweep.sweep(cfg)
    (_, s1, best1), (_, s2, _) = statuses(cfg)
    assert s1 == s2 == "optimum"
    storage = sweep.open_storage(cfg)
    sparse = sweep._load_cell_study(cfg, storage, sweep.Cell("supar", 64, 0.5, 0), 0)
    first = min(sparse.get_trials(deepcopy=False), key=lambda t: t.number)
    assert first.params["log2_lr"] == pytest.approx(best1)
    assert best1 != bracket.axis(cfg).centre  # it is not just the configured centre
    dense_only = finished(cfg)
    n_sparse = sum(n for (k, _), n in dense_only.items() if "/d0.5/" in k)
    n_dense = sum(n for (k, _), n in dense_only.items() if "/d1/" in k)
    assert n_sparse < n_dense  # it needs no extension


def test_centre_from_the_proxy_study(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", fake_run(minimum=-5.0))
    proxy = bracket_cfg(tmp_path, name="proxy", sampler="grid", seeds=[0], densities=[1.0])
    proxy.study.space = {"lr": SearchDim(values=[2.0**-8, 2.0**-5, 2.0**-3])}
    sweep.sweep(proxy)
    cfg = bracket_cfg(tmp_path, centre_from="proxy", densities=[1.0], seeds=[0])
    assert bracket.axis(bracket.prepare(cfg)).centre == -5.0
    sweep.sweep(cfg)
    study = sweep._load_cell_study(cfg, sweep.open_storage(cfg), sweep.cells(cfg.study)[0], 0)
    first = min(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert first.params["log2_lr"] == -5.0
    missing = bracket_cfg(tmp_path, centre_from="nope")
    with pytest.raises(ConfigError, match="study.centre_from"):
        bracket.prepare(missing)


def _worker(cfg, die_at):
    train.run = fake_run(die_at=die_at)
    sweep.run_worker(cfg, 0)


@pytest.mark.slow
def test_two_workers_run_no_point_twice_and_agree_with_one(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", fake_run())
    monkeypatch.setenv("SPARTUNE_WORKER_START", "fork")
    one = bracket_cfg(tmp_path / "one")
    sweep.sweep(one)
    two = bracket_cfg(tmp_path / "two", workers=2, params=["supar", "sp"])
    res = sweep.sweep(two)
    assert res["worker_failures"] == 0
    done = finished(two)
    assert set(done.values()) == {1}
    ran_one = {(k, x) for (k, x) in finished(one)}
    assert {(k, x) for (k, x) in done if k.startswith("supar/")} == ran_one
    assert [s for s in statuses(two) if s[0].startswith("supar/")] == statuses(one)


@pytest.mark.slow
def test_kill_and_rerun_continues_the_search(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", fake_run())
    whole = bracket_cfg(tmp_path / "whole")
    sweep.sweep(whole)
    cfg = bracket_cfg(tmp_path / "killed")
    sweep.validate_study(cfg)
    sweep.open_storage(cfg)
    p = mp.get_context("fork").Process(target=_worker, args=(cfg, 7))
    p.start()
    p.join()
    assert p.exitcode == 9
    before = finished(cfg)
    assert 0 < sum(before.values()) < sum(finished(whole).values())
    storage = sweep.open_storage(cfg)
    running = [t for c in sweep.cells(cfg.study)
               for t in sweep._load_cell_study(cfg, storage, c, 0).get_trials(deepcopy=False)
               if t.state == TrialState.RUNNING]
    assert len(running) == 1  # the killed trial
    res = sweep.sweep(cfg)  # the rerun
    after = finished(cfg)
    assert all(after[k] == n for k, n in before.items())  # nothing finished was lost
    assert set(after.values()) == {1} and after == finished(whole)
    assert res["ran_here"] == sum(after.values()) - sum(before.values())
    assert statuses(cfg) == statuses(whole)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "field", "text"), [
    ({"space": {"lr": SearchDim(low=1e-4, high=0.1),
                "init_std": SearchDim(low=0.01, high=0.1)}}, "study.space", "one HP"),
    ({"step": 0.0}, "study.step", "must be > 0"),
    ({"step": -1.0}, "study.step", "must be > 0"),
    ({"centre": 0.9}, "study.centre", "outside study.space.lr"),
    ({"centre": 1e-6}, "study.centre", "outside study.space.lr"),
    ({"continuation": True, "densities": [0.25]}, "study.continuation", "density axis"),
    ({"max_points": 2}, "study.max_points", ">= 3"),
    ({"space": {"lr": SearchDim(values=[0.01, 0.02])}}, "study.space.lr.values", "a range"),
    ({"centre": 0.01, "centre_from": "proxy"}, "study.centre", "not both"),
])
def test_bad_bracket_input(tmp_path, change, field, text):
    cfg = bracket_cfg(tmp_path, **change)
    with pytest.raises(ConfigError, match=text) as e:
        sweep.validate_study(cfg)
    assert e.value.field == field
    assert "\n" not in str(e.value)


def test_bad_bracket_input_is_one_line_from_the_command(workdir):
    from conftest import cli

    r = cli("spartune-sweep", "-cn", "lr_stability", "data=synthetic", "study.step=0",
            cwd=workdir)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["spartune: error: study.step: must be > 0 (octaves between points), got "
                     "0.0"], r.stderr
    assert not (workdir / "results" / "lr_stability" / "optuna.journal").exists()


# -- optima with intervals ----------------------------------------------------------------------


def _trials(n_seeds: int, truth: float = -5.3, densities=(1.0,), noise: float = 0.03):
    import numpy as np
    import pandas as pd

    from spartune.columns import TRIAL_COLUMNS

    rng = np.random.default_rng(1)
    rows = []
    for d in densities:
        for seed in range(n_seeds):
            for x in range(-9, -1):
                loss = 3 + 0.1 * (x - truth) ** 2 + noise * rng.standard_normal()
                row = dict.fromkeys(TRIAL_COLUMNS)
                row.update(state="COMPLETE", role="search", param="supar", width=64,
                           density=d, seed=seed, log2_lr=float(x), final_val_loss=loss,
                           diverged=False)
                rows.append(row)
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_seeds():
    from spartune import analysis

    widths = []
    for n in (3, 12):
        (r,) = analysis.optima(_trials(n)).to_dict("records")
        assert r["fit_lo_log2_lr"] <= r["fit_log2_lr"] <= r["fit_hi_log2_lr"]
        assert r["fit_lo_log2_lr"] < r["fit_hi_log2_lr"]
        widths.append(r["fit_hi_log2_lr"] - r["fit_lo_log2_lr"])
    assert widths[1] < 0.75 * widths[0]
    (one,) = analysis.optima(_trials(1)).to_dict("records")
    assert math.isnan(one["fit_lo_log2_lr"])  # one seed: no interval to give


def test_scouted_points_are_left_out_and_the_spread_has_an_interval():
    import pandas as pd

    from spartune import analysis

    t = _trials(4, densities=(1.0, 0.25))
    scout = t.iloc[[0]].copy()  # a first-seed-only point with a lower loss than any other
    scout["log2_lr"], scout["final_val_loss"] = -1.0, 0.5
    (r, _) = analysis.optima(pd.concat([t, scout])).to_dict("records")
    assert abs(r["opt_log2_lr"] - -5.0) < 1e-9 and r["n_points"] == 8
    opt = analysis.optima(t)
    (s,) = analysis.optimum_spread(opt, trials=t).to_dict("records")
    assert s["spread_lo"] <= s["spread_octaves"] <= s["spread_hi"]
    (plain,) = analysis.optimum_spread(opt).to_dict("records")
    assert math.isnan(plain["spread_lo"]) and plain["spread_octaves"] == s["spread_octaves"]


def test_seed_complete_leaves_out_one_seed_scouts_but_keeps_diverged_ones():
    import pandas as pd

    from spartune import analysis

    t = _trials(3)
    scout = t.iloc[[0, 0]].copy()  # seed 0 alone at -1 (finite) and at 0 (diverged)
    scout["log2_lr"], scout["final_val_loss"] = [-1.0, 0.0], [0.5, float("nan")]
    scout["diverged"] = [False, True]
    kept = analysis.seed_complete(pd.concat([t, scout], ignore_index=True))
    assert sorted(kept["log2_lr"].unique()) == [*map(float, range(-9, -1)), 0.0]
    assert len(kept) == len(t) + 1
    assert analysis.best_settings(kept)["log2_lr"].iloc[0] != -1.0  # the scout is not "best"


def test_stability_figure_draws_the_intervals():
    from matplotlib.collections import LineCollection

    from spartune import plot

    def bars(fig):
        return [c for ax in fig.axes for c in ax.collections
                if isinstance(c, LineCollection) and len(c.get_segments()) == 1
                and c.get_linewidth()[0] == 2.2]

    assert len(bars(plot.lr_stability(_trials(4, densities=(1.0, 0.25))))) == 2
    assert bars(plot.lr_stability(_trials(1))) == []


@pytest.mark.slow
def test_lr_stability_command_brackets_every_cell(workdir):
    from conftest import cli

    args = ["spartune-sweep", "-cn", "lr_stability", "data=synthetic", "train=smoke",
            "model.width=32", "model.base_width=32", "model.head_size=16", "study.widths=[32]",
            "study.params=[supar]", "study.densities=[1.0,0.5]", "study.workers=1",
            "train.device=cpu", "train.threads=1", "study.name=brk"]
    r = cli(*args, cwd=workdir, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cells = [ln for ln in r.stdout.splitlines() if ln.startswith("supar/w32/")]
    assert len(cells) == 2, r.stdout
    assert all(("optimum lr=" in ln or "bound" in ln) for ln in cells), r.stdout
    assert "trials not finished" not in r.stderr
    again = cli(*args, cwd=workdir, timeout=600)  # a rerun of a finished search runs nothing
    assert again.returncode == 0 and "(0 run now" in again.stdout, again.stdout
