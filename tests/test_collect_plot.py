"""Optuna storage -> trials/curves tables -> optima, spread, regret -> figures.

Protects the results contract (columns.py) end to end on a real Optuna journal written the way
sweep.py writes it, the numbers the figures claim, and that every figure draws headless.
Run: MPLBACKEND=Agg .venv/bin/python -m pytest tests/test_collect_plot.py -q
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from optuna.distributions import FloatDistribution  # noqa: E402
from optuna.trial import TrialState, create_trial  # noqa: E402

from spartune import analysis, plot  # noqa: E402
from spartune.collect import (  # noqa: E402
    load_trials,
    read_tables,
    storage_for,
    write_tables,
)
from spartune.columns import CURVE_COLUMNS, TRIAL_COLUMNS  # noqa: E402
from spartune.config import ConfigError  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

LOG2_LR = {"log2_lr": FloatDistribution(-14.0, 0.0)}
PENALTY = 8.3  # the loss ceiling a diverged run reports as its value


# ---------------------------------------------------------------------------------------------
# A real journal, written as sweep.py writes it


def _cell_study(storage, study: str, param: str, width: int, density: float, seed: int):
    cell = f"{param}/w{width}/d{density:g}/s{seed}"
    s = optuna.create_study(study_name=f"{study}/{cell}", storage=storage)
    for key, value in dict(study=study, param=param, width=width, density=density, seed=seed,
                           cell=cell).items():
        s.set_user_attr(key, value)
    return s


def _attrs(param: str, width: int, density: float, seed: int, lr: float, **more) -> dict:
    return dict(role="search", param=param, width=width, base_width=64, depth=2,
                density=density, seed=seed, lr=lr, init_std=0.02, alpha_input=1.0,
                alpha_output=2.0, **more)


def _finished(loss: float, curve: list, diverged: bool = False) -> dict:
    return dict(final_train_loss=loss - 0.05, final_val_loss=loss,
                best_val_loss=None if diverged else loss, diverged=diverged, steps=30,
                tokens_per_second=1e4, n_params=1000, n_nonzero_params=400, curve=curve)


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    """results/lr_stability/optuna.journal with 2 cells (5 trials), plus 2 decoy studies."""
    study_dir = tmp_path / "results" / "lr_stability"
    study_dir.mkdir(parents=True)
    backend = optuna.storages.journal.JournalFileBackend(str(study_dir / "optuna.journal"))
    storage = optuna.storages.JournalStorage(backend)

    s = _cell_study(storage, "lr_stability", "supar", 128, 0.25, 0)
    curve = [[0, 5.5, 5.6, 0.0], [10, 4.1, 4.2, 0.01], [20, 3.6, None, 0.005]]
    s.add_trial(create_trial(  # 0: complete, a 2-process bf16 compiled run in micro-batches
        params={"log2_lr": -6.0}, distributions=LOG2_LR, value=3.7,
        user_attrs={**_attrs("supar", 128, 0.25, 0, 2.0**-6), **_finished(3.7, curve),
                    "world_size": 2, "parallel": "fsdp", "precision": "bf16", "compile": True,
                    "micro_batch_size": 4}))
    s.add_trial(create_trial(  # 1: diverged, reported with the penalty value
        params={"log2_lr": -2.0}, distributions=LOG2_LR, value=PENALTY,
        user_attrs={**_attrs("supar", 128, 0.25, 0, 2.0**-2),
                    **_finished(PENALTY, curve[:1], diverged=True)}))
    s.add_trial(create_trial(  # 2: pruned: intermediate values, no final attrs, no curve
        state=TrialState.PRUNED, params={"log2_lr": -10.0}, distributions=LOG2_LR,
        intermediate_values={10: 4.9, 20: 4.7},
        user_attrs=_attrs("supar", 128, 0.25, 0, 2.0**-10)))
    s.add_trial(create_trial(  # 3: failed before recording anything
        state=TrialState.FAIL, params={"log2_lr": -8.0}, distributions=LOG2_LR))

    s = _cell_study(storage, "lr_stability", "sp", 64, 1.0, 1)
    s.add_trial(create_trial(  # 0: complete, lr not searched (a fixed-HP run)
        value=3.2, user_attrs={**_attrs("sp", 64, 1.0, 1, 0.01),
                               **_finished(3.2, [[0, 5.4, 5.5, 0.01], [30, 3.1, 3.2, 0.001]])}))
    for decoy in ("other", "lr_stability_v2"):
        s = _cell_study(storage, decoy, "mup", 64, 1.0, 0)
        s.add_trial(create_trial(value=1.0, user_attrs=_attrs("mup", 64, 1.0, 0, 0.1)))
    return study_dir


def test_load_trials_follows_the_contract(journal: Path) -> None:
    trials, curves = load_trials(storage_for(journal), "lr_stability")
    assert list(trials.columns) == TRIAL_COLUMNS
    assert list(curves.columns) == CURVE_COLUMNS
    assert len(trials) == 5  # decoy studies (another name, a longer name) left out
    assert list(trials["cell"]) == ["sp/w64/d1/s1"] + ["supar/w128/d0.25/s0"] * 4
    assert list(trials["number"]) == [0, 0, 1, 2, 3]
    assert list(trials["state"]) == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "FAIL"]
    assert set(trials["study"]) == {"lr_stability"}

    sp, ok, div, pruned, failed = (row for _, row in trials.iterrows())
    assert ok["log2_lr"] == -6.0 and ok["lr"] == pytest.approx(2.0**-6)
    assert sp["log2_lr"] == pytest.approx(math.log2(0.01))  # not searched: from the value
    assert ok["log2_init_std"] == pytest.approx(math.log2(0.02))
    assert ok["log2_alpha_output"] == pytest.approx(1.0)
    assert (ok["param"], ok["width"], ok["density"], ok["seed"]) == ("supar", 128, 0.25, 0)
    assert ok["role"] == "search" and ok["base_width"] == 64 and ok["depth"] == 2
    assert ok["final_val_loss"] == 3.7 and ok["value"] == 3.7 and ok["n_params"] == 1000
    assert trials["diverged"].dtype == bool
    assert list(trials["diverged"]) == [False, False, True, False, False]
    assert div["value"] == PENALTY and math.isnan(div["best_val_loss"])
    assert math.isnan(pruned["final_val_loss"]) and math.isnan(pruned["value"])
    assert pruned["log2_lr"] == -10.0
    # a failed trial keeps its cell's identity from the study attrs, and its searched lr
    assert (failed["param"], failed["width"], failed["seed"]) == ("supar", 128, 0)
    assert failed["lr"] == pytest.approx(2.0**-8) and pd.isna(failed["role"])
    assert ok["duration_s"] >= 0

    by_trial = {k: g for k, g in curves.groupby(["cell", "number"])}
    c = by_trial[("supar/w128/d0.25/s0", 0)]
    assert list(c["step"]) == [0, 10, 20] and list(c["train_loss"]) == [5.5, 4.1, 3.6]
    assert math.isnan(c["val_loss"].iloc[2]) and c["lr_now"].iloc[1] == 0.01
    assert (c["param"] == "supar").all() and (c["lr"] == 2.0**-6).all()
    p = by_trial[("supar/w128/d0.25/s0", 2)]  # pruned: from intermediate values
    assert list(p["step"]) == [10, 20] and list(p["val_loss"]) == [4.9, 4.7]
    assert p["train_loss"].isna().all()
    assert ("supar/w128/d0.25/s0", 3) not in by_trial
    assert len(curves) == 3 + 1 + 2 + 2


def test_tables_round_trip(journal: Path, tmp_path: Path) -> None:
    trials, curves = load_trials(storage_for(journal), "lr_stability")
    out = tmp_path / "tables"
    paths = write_tables(trials, curves, out)
    assert paths == {"trials": out / "trials.csv", "curves": out / "curves.csv"}
    assert sorted(os.listdir(out)) == ["curves.csv", "trials.csv"]  # no temp files left
    trials2, curves2 = read_tables(out)
    pd.testing.assert_frame_equal(trials2, trials)
    pd.testing.assert_frame_equal(curves2, curves)
    # how each run was trained survives the round trip; unknown stays unknown, not False
    run = trials2.set_index(["cell", "number"])
    ddp = run.loc[("supar/w128/d0.25/s0", 0)]
    assert (ddp["world_size"], ddp["precision"], ddp["micro_batch_size"]) == (2, "bf16", 4)
    assert ddp["parallel"] == "fsdp"
    assert ddp["compile"] is True or ddp["compile"] == True  # noqa: E712 (pandas' boolean)
    unknown = run.loc[("sp/w64/d1/s1", 0)]
    assert pd.isna(unknown["compile"]) and pd.isna(unknown["world_size"])
    assert pd.isna(unknown["parallel"])


def test_load_trials_from_an_rdb_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = _cell_study(url, "grid", "mup", 64, 0.5, 0)
    s.add_trial(create_trial(params={"log2_lr": -5.0}, distributions=LOG2_LR, value=3.0,
                             user_attrs={**_attrs("mup", 64, 0.5, 0, 2.0**-5),
                                         **_finished(3.0, [])}))
    trials, curves = load_trials(storage_for(tmp_path, url), "grid")
    assert len(trials) == 1 and trials["log2_lr"].iloc[0] == -5.0 and curves.empty


def test_read_tables_without_trials_says_run_the_sweep(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="spartune-sweep") as err:
        read_tables(tmp_path)
    assert err.value.field == "study.name" and str(tmp_path) in str(err.value)
    pd.DataFrame(columns=TRIAL_COLUMNS).to_csv(tmp_path / "trials.csv", index=False)
    with pytest.raises(ConfigError) as err:
        read_tables(tmp_path)
    assert err.value.field == "study.name"


def test_storage_for_a_missing_study_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "results" / "nope"
    with pytest.raises(ConfigError, match="spartune-sweep -cn nope") as err:
        storage_for(missing)
    assert err.value.field == "study.name"
    with pytest.raises(ConfigError):
        storage_for(missing, f"sqlite:///{tmp_path / 'nope.db'}")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Analysis on hand-made tables with known answers


def _row(param="supar", width=256, density=1.0, seed=0, log2_lr=-6.0, loss=3.0, *,
         role="search", state="COMPLETE", diverged=False, log2_init_std=None) -> dict:
    row = dict.fromkeys(TRIAL_COLUMNS)
    sigma = -5.64 if log2_init_std is None else log2_init_std
    row.update(study="t", cell=f"{param}/w{width}/d{density:g}/s{seed}", number=0,
               state=state, role=role, param=param, width=width, base_width=64, depth=2,
               density=density, seed=seed, lr=2.0**log2_lr, log2_lr=log2_lr,
               init_std=2.0**sigma, log2_init_std=sigma, alpha_input=1.0,
               log2_alpha_input=0.0, alpha_output=1.0, log2_alpha_output=0.0,
               final_val_loss=loss, value=loss, diverged=diverged)
    return row


def _table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def test_optimum_between_grid_points_is_refined() -> None:
    truth = -5.3
    rows = [_row(seed=s, log2_lr=float(x), loss=3 + 0.1 * (x - truth) ** 2 + e)
            for x in range(-10, -1) for s, e in ((0, 0.01), (1, -0.01))]
    rows += [_row(seed=2, log2_lr=-5.0, loss=1.0, state="PRUNED"),
             _row(seed=2, log2_lr=-4.0, loss=np.nan, state="FAIL")]
    opt = analysis.optima(_table(rows))
    assert list(opt.columns) == ["param", "width", "density", "opt_log2_lr", "fit_log2_lr",
                                 "opt_loss", "n_points", "n_seeds", "at_edge",
                                 "fit_lo_log2_lr", "fit_hi_log2_lr"]
    (r,) = opt.to_dict("records")
    assert r["opt_log2_lr"] == -5.0
    assert abs(r["fit_log2_lr"] - truth) < 0.05
    assert r["opt_loss"] == pytest.approx(3 + 0.1 * 0.3**2)
    assert (r["n_points"], r["n_seeds"], r["at_edge"]) == (9, 2, False)


def test_optimum_at_grid_edge_is_flagged() -> None:
    rows = [_row(log2_lr=float(x), loss=3.0 - 0.1 * x) for x in range(-8, -3)]  # still falling
    (r,) = analysis.optima(_table(rows)).to_dict("records")
    assert r["opt_log2_lr"] == -4.0 and r["fit_log2_lr"] == -4.0 and r["at_edge"]


def test_point_diverged_in_any_seed_is_dropped() -> None:
    losses = {-8: 3.4, -7: 3.2, -6: 3.1, -5: 3.3, -4: 3.6}
    rows = [_row(seed=s, log2_lr=float(x), loss=v) for x, v in losses.items() for s in (0, 1)]
    # seed 1 diverged at -7 with a (meaningless) low loss: the whole grid point goes
    rows[3] = _row(seed=1, log2_lr=-7.0, loss=0.5, diverged=True)
    rows[4] = _row(seed=0, log2_lr=-6.0, loss=3.1)
    grid = analysis.loss_grid(_table(rows))
    assert grid.set_index("log2_lr")["diverged"].to_dict() == {
        -8.0: False, -7.0: True, -6.0: False, -5.0: False, -4.0: False}
    assert grid["mean"].isna().sum() == 1
    (r,) = analysis.optima(_table(rows)).to_dict("records")
    assert r["n_points"] == 4 and r["opt_log2_lr"] == -6.0
    # its left neighbour diverged: no bracket, so the fit falls back to the argmin
    assert r["fit_log2_lr"] == -6.0 and not r["at_edge"]


def test_optimum_spread_across_densities() -> None:
    opt = pd.DataFrame({
        "param": ["supar"] * 3 + ["sp"] * 3, "width": [256] * 6,
        "density": [1.0, 0.25, 0.0625] * 2,
        "fit_log2_lr": [-6.0, -5.75, -6.25, -9.0, -8.0, -6.0]})
    spread = analysis.optimum_spread(opt).set_index("param")
    assert spread.loc["supar", "spread_octaves"] == 0.5
    assert spread.loc["sp", "spread_octaves"] == 3.0
    assert spread.loc["supar", "density_at_min"] == 0.0625
    assert spread.loc["supar", "density_at_max"] == 0.25
    assert spread.loc["sp", "min_fit_log2_lr"] == -9.0 and spread.loc["sp", "n_values"] == 3


def _seeds(points: dict[float, list[float]], param: str, density: float = 1.0) -> pd.DataFrame:
    """A seed-complete trials table: {log2 lr: [final loss per seed]}."""
    return pd.DataFrame([{"state": "COMPLETE", "param": param, "width": 128, "density": density,
                          "seed": seed, "log2_lr": x, "final_val_loss": loss, "diverged": False}
                         for x, losses in points.items() for seed, loss in enumerate(losses)])


def test_frontier_pairs_seeds_and_calls_a_small_gap_noise() -> None:
    t = pd.concat([
        _seeds({-7: [2.50, 2.60, 2.70], -6: [2.55, 2.65, 2.75]}, "supar"),
        _seeds({-7: [2.49, 2.61, 2.68], -6: [2.60, 2.70, 2.80]}, "sp"),
        _seeds({-7: [2.60, 2.70, 2.80]}, "mup"),
        _seeds({-7: [2.60, 2.70, 2.80]}, "sp", density=0.25),  # no supar there: left out
    ])
    fr = analysis.frontier(t).set_index("other")
    assert list(fr["density"]) == [1.0, 1.0]
    assert fr.loc["sp", "within_noise_or_better"]  # mean gap +0.0067, paired sem 0.0088
    assert fr.loc["sp", "reference_loss"] == pytest.approx(2.6)
    assert fr.loc["mup", "gap_pct"] == pytest.approx(-100 * 0.1 / 2.7)
    assert fr.loc["mup", "within_noise_or_better"]
    worse = pd.concat([_seeds({-7: [2.60, 2.70, 2.80]}, "supar"),
                       _seeds({-7: [2.50, 2.61, 2.70]}, "sp")])
    assert not analysis.frontier(worse).iloc[0]["within_noise_or_better"]
    assert analysis.frontier(t[t["param"] == "sp"]).empty


def test_transfer_regret_against_the_local_grid() -> None:
    rows = [_row(param="mup", density=0.25, seed=0, log2_lr=-6.0, loss=3.2, role="target"),
            _row(param="mup", density=0.25, seed=1, log2_lr=-6.0, loss=3.4, role="target"),
            _row(param="mup", density=0.25, seed=0, log2_lr=-7.0, loss=3.5, role="check"),
            _row(param="mup", density=0.25, seed=0, log2_lr=-5.0, loss=3.0, role="check"),
            _row(param="mup", density=0.25, seed=1, log2_lr=-5.0, loss=3.2, role="check"),
            _row(param="mup", density=0.25, seed=0, log2_lr=-4.0, loss=2.0, role="check",
                 diverged=True),
            # a target with no check grid, and proxy search trials: not part of the answer
            _row(param="supar", density=0.25, log2_lr=-6.0, loss=3.0, role="target"),
            _row(param="mup", width=64, log2_lr=-6.0, loss=3.0, role="search")]
    reg = analysis.transfer_regret(_table(rows))
    (r,) = reg.to_dict("records")
    assert (r["param"], r["width"], r["density"]) == ("mup", 256, 0.25)
    assert r["transferred_log2_lr"] == -6.0 and r["best_log2_lr"] == -5.0
    assert r["distance_octaves"] == -1.0
    assert r["loss_transferred"] == pytest.approx(3.3) and r["loss_best"] == pytest.approx(3.1)
    assert r["regret_pct"] == pytest.approx(100 * 0.2 / 3.1)
    assert not r["transferred_diverged"] and r["n_points"] == 3 and r["n_seeds"] == 2


# ---------------------------------------------------------------------------------------------
# Figures


def _stability_table(width: int = 256) -> pd.DataFrame:
    """sp and supar x 2 densities x 5 LRs x 2 seeds; supar at 0.25 diverged once at -3."""
    rows = []
    for param, centre in (("sp", -8.0), ("supar", -5.0)):
        for density in (1.0, 0.25):
            for x in range(-9, -2):
                for seed in (0, 1):
                    loss = 3 + 0.05 * (x - centre) ** 2 + 0.2 * (density < 1) + 0.01 * seed
                    div = param == "supar" and density == 0.25 and x == -3 and seed == 1
                    rows.append(_row(param, width, density, seed, float(x), loss, diverged=div,
                                     log2_init_std=float(x) + 2))
    return _table(rows)


def _container(ax, label: str):
    (c,) = [c for c in ax.containers if c.get_label() == label]
    return c


def test_lr_stability_panels_and_missing_diverged_point(tmp_path: Path) -> None:
    trials = pd.concat([_stability_table(64), _stability_table(256)], ignore_index=True)
    fig = plot.lr_stability(trials)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["SP", "SμPar"]
    sp_ax, supar_ax = fig.axes
    assert len(sp_ax.containers) == len(supar_ax.containers) == 2
    dense = _container(supar_ax, plot.density_label(1.0)).lines[0]
    sparse = _container(supar_ax, plot.density_label(0.25)).lines[0]
    assert len(dense.get_xdata()) == 7 and len(sparse.get_xdata()) == 6
    assert -3.0 not in list(sparse.get_xdata())
    assert "width 256" in fig.get_suptitle()
    assert sp_ax.get_xlabel() == "log2 learning rate η_base"
    # the same density has the same colour in every panel
    assert (_container(sp_ax, plot.density_label(0.25)).lines[0].get_color()
            == sparse.get_color())
    paths = plot.save(fig, tmp_path / "figures" / "lr_stability")
    assert [p.name for p in paths] == ["lr_stability.png", "lr_stability.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_sigma_stability_uses_init_std() -> None:
    fig = plot.sigma_stability(_stability_table(), width=256)
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel() == "log2 init std σ_base"
    sparse = _container(fig.axes[1], plot.density_label(0.25)).lines[0]
    assert sorted(sparse.get_xdata()) == [-7.0, -6.0, -5.0, -4.0, -3.0, -2.0]
    with pytest.raises(ValueError, match="width 512"):
        plot.sigma_stability(_stability_table(), width=512)


def test_loss_vs_density_transferred_and_own_best(tmp_path: Path) -> None:
    trials = _stability_table()
    trials.loc[(trials["log2_lr"] == -6.0), "role"] = "target"
    fig = plot.loss_vs_density(trials)
    (ax,) = fig.axes
    assert len(ax.containers) == 4  # 2 params x (transferred, own best)
    styles = sorted(c.lines[0].get_linestyle() for c in ax.containers)
    assert styles == ["-", "-", "--", "--"]
    for c in ax.containers:
        assert len(c.lines[0].get_xdata()) == 2  # two densities per line
    # own best of supar at density 1 is its grid optimum -5, loss 3 + 0.005 (seed mean)
    best_lines = [c.lines[0] for c in ax.containers if c.lines[0].get_linestyle() == "--"]
    assert min(min(line.get_ydata()) for line in best_lines) == pytest.approx(3.005)
    plot.save(fig, tmp_path / "loss_vs_density")
    assert (tmp_path / "loss_vs_density.pdf").is_file()


def test_training_curves_one_panel_per_density(tmp_path: Path) -> None:
    rows = []
    for param in ("sp", "mup", "supar"):
        for density in (1.0, 0.25, 0.0625):
            for seed in (0, 1):
                for step in (0, 10, 20, 30):
                    rows.append(dict(study="t", cell="c", number=0, role="target", param=param,
                                     width=128, density=density, seed=seed, lr=0.01,
                                     init_std=0.02, step=step, train_loss=5 - step / 10,
                                     val_loss=5.1 - step / 10, lr_now=0.01))
    curves = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    fig = plot.training_curves(curves)
    assert len(fig.axes) == 3
    assert all(len(ax.get_lines()) == 3 for ax in fig.axes)
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0, 10, 20, 30]
    with pytest.raises(ValueError, match="role 'check'"):
        plot.training_curves(curves, role="check")
    assert len(plot.save(fig, tmp_path / "curves")) == 2
