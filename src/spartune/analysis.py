"""Numbers behind the figures: optimal HPs per cell, how far they move, what transfer costs.

Pure pandas/numpy on the trials table (columns.py), so every claim a figure makes ("the SμPar
optimum stays within half an octave across densities") is a number a test can check.

Conventions, as in the paper (SUPAR.md §3.4): losses are averaged over seeds at each grid value
of log2(HP); a grid value where any seed diverged counts as diverged and is dropped; the
optimum is the argmin of the seed mean, refined by a parabola through it and its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from spartune.columns import HP_FIELDS

BY = ("param", "width", "density")
_DECIMALS = 6  # log2 grid values from different seeds compare equal after this rounding


def loss_grid(trials: pd.DataFrame, x: str = "lr", *,
              by: Sequence[str] = BY) -> pd.DataFrame:
    """Seed mean, standard error and count of final_val_loss at each log2(x) of each group.

    Only COMPLETE trials count. Columns: by + [log2_x, mean, sem, n, diverged]; rows with
    diverged=True (any seed diverged, or no finite loss) keep mean NaN so callers can see
    where the grid failed without plotting it. sem is 0 with a single seed.
    """
    return _aggregate(trials, [f"log2_{x}"], list(by))


def best_settings(trials: pd.DataFrame, *, by: Sequence[str] = BY) -> pd.DataFrame:
    """The HP setting with the lowest seed-mean loss in each group: each cell's own best.

    A setting is one combination of every log2 HP column (HP_FIELDS), so this works for LR
    grids, init grids and random searches alike (paper Fig. 8 compares these per density).
    Columns: by + the log2 HP columns + [mean, sem, n]; groups where everything diverged are
    left out.
    """
    by = list(by)
    hps = [f"log2_{name}" for name in HP_FIELDS if f"log2_{name}" in trials.columns]
    grid = _aggregate(trials, hps, by, drop_na_keys=False)
    grid = grid[~grid["diverged"] & grid["mean"].notna()]
    if grid.empty:
        return pd.DataFrame(columns=[*by, *hps, "mean", "sem", "n"])
    best = grid.loc[grid.groupby(by, dropna=False, sort=True)["mean"].idxmin()]
    return best[[*by, *hps, "mean", "sem", "n"]].reset_index(drop=True)


def _aggregate(trials: pd.DataFrame, cols: list[str], by: list[str], *,
               drop_na_keys: bool = True) -> pd.DataFrame:
    """Seed statistics of final_val_loss per by + cols (see loss_grid)."""
    out_cols = [*by, *cols, "mean", "sem", "n", "diverged"]
    df = trials[trials["state"] == "COMPLETE"].copy()
    if drop_na_keys:
        df = df.dropna(subset=cols)
    if df.empty:
        return pd.DataFrame(columns=out_cols)
    for c in cols:
        df[c] = df[c].astype(float).round(_DECIMALS)
    loss = df["final_val_loss"].astype(float)
    df["_bad"] = df["diverged"].astype(bool) | ~np.isfinite(loss)
    df["_loss"] = loss.where(~df["_bad"])
    g = df.groupby([*by, *cols], dropna=False, sort=True)
    out = g.agg(mean=("_loss", "mean"), std=("_loss", "std"), n=("_loss", "count"),
                diverged=("_bad", "any")).reset_index()
    out["sem"] = (out["std"] / np.sqrt(out["n"])).fillna(0.0)
    out.loc[out["diverged"], ["mean", "sem"]] = np.nan
    return out[out_cols]


def optima(trials: pd.DataFrame, x: str = "lr", *, by: Sequence[str] = BY) -> pd.DataFrame:
    """The optimal log2(x) of each group (e.g. each param x width x density).

    opt_log2_x is the grid argmin of the seed-mean loss; fit_log2_x refines it with the vertex
    of the parabola through the argmin and its two grid neighbours, because a one-octave grid
    alone cannot resolve shifts smaller than an octave. The fit falls back to the argmin when
    the argmin has no surviving neighbour on a side (grid edge, a diverged neighbour, or fewer
    than 3 points). opt_loss is the measured seed mean at the argmin. at_edge says the argmin
    is the smallest or largest value tried (diverged ones included): the grid does not bracket
    the optimum, which may lie further out.
    """
    col, by = f"log2_{x}", list(by)
    out_cols = [*by, f"opt_log2_{x}", f"fit_log2_{x}", "opt_loss", "n_points", "n_seeds",
                "at_edge"]
    grid = loss_grid(trials, x, by=by)
    if grid.empty:
        return pd.DataFrame(columns=out_cols)
    done = trials[(trials["state"] == "COMPLETE") & trials[col].notna()]
    rows = []
    for key, g in grid.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        ok = g[~g["diverged"]].sort_values(col)
        xs, ys = ok[col].to_numpy(float), ok["mean"].to_numpy(float)
        seeds = done.loc[_match(done, by, key) & ~done["diverged"].astype(bool), "seed"]
        row = dict(zip(by, key, strict=True), n_points=len(xs), n_seeds=seeds.nunique())
        if len(xs) == 0:
            rows.append({**row, f"opt_log2_{x}": np.nan, f"fit_log2_{x}": np.nan,
                         "opt_loss": np.nan, "at_edge": False})
            continue
        i = int(np.argmin(ys))
        tried = g[col].to_numpy(float)
        rows.append({**row, f"opt_log2_{x}": xs[i], f"fit_log2_{x}": _vertex(xs, ys, i, tried),
                     "opt_loss": ys[i], "at_edge": xs[i] in (tried.min(), tried.max())})
    return pd.DataFrame(rows, columns=out_cols)


def _match(df: pd.DataFrame, by: list[str], key: tuple) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for c, v in zip(by, key, strict=True):
        mask &= df[c].isna() if pd.isna(v) else df[c] == v
    return mask


def _vertex(xs: np.ndarray, ys: np.ndarray, i: int, tried: np.ndarray) -> float:
    """Vertex of the parabola through points i-1, i, i+1, clipped to the tried range."""
    if i == 0 or i == len(xs) - 1:
        return float(xs[i])
    below, above = np.sort(tried[tried < xs[i]]), np.sort(tried[tried > xs[i]])
    if xs[i - 1] != below[-1] or xs[i + 1] != above[0]:
        return float(xs[i])  # a neighbour on the grid diverged: no bracket to fit through
    a, b, _ = np.polyfit(xs[i - 1:i + 2], ys[i - 1:i + 2], 2)
    if not a > 0:  # flat or concave (ties): the argmin is as good as it gets
        return float(xs[i])
    return float(np.clip(-b / (2 * a), tried.min(), tried.max()))


def optimum_spread(opt: pd.DataFrame, x: str = "lr", *, across: str = "density") -> pd.DataFrame:
    """How many octaves the optimum moves across `across` (densities, by default).

    The paper's claim in one number per parameterization (and width): SP and µP optima drift
    as density falls, the SμPar one stays put (SUPAR.md §3.4). Uses the refined optimum
    fit_log2_x. Columns: the remaining keys of (param, width, density), spread_octaves,
    min_/max_fit_log2_x, and the `across` value at each (`{across}_at_min`, `{across}_at_max`).
    """
    fit = f"fit_log2_{x}"
    keys = [c for c in BY if c in opt.columns and c != across]
    out_cols = [*keys, "spread_octaves", f"min_{fit}", f"max_{fit}", f"{across}_at_min",
                f"{across}_at_max", "n_values"]
    ok = opt[opt[fit].notna()]
    rows = []
    for key, g in ok.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        lo, hi = g.loc[g[fit].idxmin()], g.loc[g[fit].idxmax()]
        rows.append({**dict(zip(keys, key, strict=True)),
                     "spread_octaves": hi[fit] - lo[fit], f"min_{fit}": lo[fit],
                     f"max_{fit}": hi[fit], f"{across}_at_min": lo[across],
                     f"{across}_at_max": hi[across], "n_values": g[across].nunique()})
    return pd.DataFrame(rows, columns=out_cols)


def transfer_regret(trials: pd.DataFrame, x: str = "lr") -> pd.DataFrame:
    """What transferring the proxy's HP costs at each target, against that target's own best.

    Uses targets that have a local check grid: role "target" trials at the transferred value
    plus role "check" trials around it, per param x width x density. The target's own best is
    the argmin over that grid (transferred point included) of the seed-mean loss; diverged grid
    points are dropped. distance_octaves = transferred - best in log2(x) (> 0: the transferred
    value is too high). regret_pct = 100 (loss_transferred - loss_best) / loss_best, on seed
    means; NaN when the transferred point diverged (transferred_diverged says so). at_edge: the
    best is at the grid's edge, so the regret is a lower bound.
    """
    col = f"log2_{x}"
    keys = list(BY)
    out_cols = [*keys, f"transferred_{col}", f"best_{col}", "distance_octaves",
                "loss_transferred", "loss_best", "regret_pct", "transferred_diverged",
                "at_edge", "n_points", "n_seeds"]
    role = trials["role"]
    grid_rows = trials[role.isin(["target", "check"])]
    with_check = grid_rows[grid_rows["role"] == "check"][keys].drop_duplicates()
    if with_check.empty:
        return pd.DataFrame(columns=out_cols)
    grid = loss_grid(grid_rows, x, by=keys)
    targets = trials[(role == "target") & (trials["state"] == "COMPLETE")]
    rows = []
    for key in with_check.itertuples(index=False, name=None):
        t = targets[_match(targets, keys, key)]
        g = grid[_match(grid, keys, key)]
        if t.empty or g.empty:
            continue
        transferred = round(float(t[col].median()), _DECIMALS)
        at_t = g[g[col] == transferred]
        ok = g[~g["diverged"]].sort_values(col)
        if ok.empty:
            continue
        best = ok.loc[ok["mean"].idxmin()]
        t_div = at_t.empty or bool(at_t["diverged"].iloc[0])
        loss_t = np.nan if t_div else float(at_t["mean"].iloc[0])
        rows.append({**dict(zip(keys, key, strict=True)),
                     f"transferred_{col}": transferred, f"best_{col}": best[col],
                     "distance_octaves": transferred - best[col],
                     "loss_transferred": loss_t, "loss_best": best["mean"],
                     "regret_pct": 100.0 * (loss_t - best["mean"]) / best["mean"],
                     "transferred_diverged": t_div,
                     "at_edge": best[col] in (g[col].min(), g[col].max()),
                     "n_points": len(ok), "n_seeds": t["seed"].nunique()})
    out = pd.DataFrame(rows, columns=out_cols)
    return out.sort_values(keys, kind="stable").reset_index(drop=True)
