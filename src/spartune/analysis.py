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
N_BOOT = 1000  # bootstrap resamples of the seeds behind each optimum's interval


def loss_grid(trials: pd.DataFrame, x: str = "lr", *,
              by: Sequence[str] = BY) -> pd.DataFrame:
    """Seed mean, standard error and count of final_val_loss at each log2(x) of each group.

    Only COMPLETE trials count. Columns: by + [log2_x, mean, sem, n, diverged]; rows with
    diverged=True (any seed diverged, or no finite loss) keep mean NaN so callers can see
    where the grid failed without plotting it. sem is 0 with a single seed.
    """
    return _aggregate(trials, [f"log2_{x}"], list(by))


def seed_complete(trials: pd.DataFrame, x: str = "lr", *,
                  by: Sequence[str] = BY) -> pd.DataFrame:
    """The COMPLETE trials at the log2(x) points that every seed of their group ran, or where
    any seed diverged: the points `optima` uses.

    The bracketing search scouts with its first seed, so a bracket study also holds points
    only that seed ran; a best setting or a figure over those would compare a one-seed loss
    with seed means. A diverged scout stays: the point counts as diverged whatever the other
    seeds would have done.
    """
    col = f"log2_{x}"
    done = trials[(trials["state"] == "COMPLETE") & trials[col].notna()]
    if done.empty:
        return done
    keys = [done[c] for c in by]
    point = done[col].astype(float).round(_DECIMALS)
    loss = done["final_val_loss"].astype(float)
    bad = (done["diverged"].astype(bool) | ~np.isfinite(loss))
    n_group = done.groupby(keys, dropna=False)["seed"].transform("nunique")
    n_point = done.groupby([*keys, point], dropna=False)["seed"].transform("nunique")
    any_bad = bad.groupby([*keys, point], dropna=False).transform("any")
    return done[(n_point >= n_group) | any_bad]


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


def optima(trials: pd.DataFrame, x: str = "lr", *, by: Sequence[str] = BY,
           n_boot: int = N_BOOT) -> pd.DataFrame:
    """The optimal log2(x) of each group (e.g. each param x width x density), with its interval.

    Only points that every seed of the group ran are used (a point where any seed diverged
    counts as diverged), so every estimate is a mean over the same seeds: the bracketing
    search's first-seed scouting points are left out. opt_log2_x is the argmin of the seed-mean
    loss; fit_log2_x refines it with the vertex of the parabola through the argmin and its two
    neighbours, because a one-octave grid alone cannot resolve shifts smaller than an octave.
    The fit falls back to the argmin when the argmin has no surviving neighbour on a side (edge,
    a diverged neighbour, or fewer than 3 points). fit_lo/fit_hi_log2_x: the 95% bootstrap
    interval of fit_log2_x over seeds (seeds resampled with replacement, the whole estimate
    redone; widened to hold the estimate; NaN with one seed). opt_loss is the measured seed
    mean at the argmin. at_edge says the argmin is the smallest or largest value used
    (diverged ones included): the points do not bracket the optimum, which may lie further
    out; such a cell reports a bound, not an optimum.
    """
    out_cols = [*by, f"opt_log2_{x}", f"fit_log2_{x}", "opt_loss", "n_points", "n_seeds",
                "at_edge", f"fit_lo_log2_{x}", f"fit_hi_log2_{x}"]
    rows = []
    for row, boot in _fits(trials, x, list(by), n_boot):
        if len(boot):
            lo, hi = np.percentile(boot, [2.5, 97.5])
            fit = row[f"fit_log2_{x}"]
            row[f"fit_lo_log2_{x}"], row[f"fit_hi_log2_{x}"] = min(lo, fit), max(hi, fit)
        rows.append(row)
    return pd.DataFrame(rows, columns=out_cols)


def _fits(trials: pd.DataFrame, x: str, by: list[str], n_boot: int,
          ) -> list[tuple[dict, np.ndarray]]:
    """Per group: the optima row, and the bootstrap replicates of its fit (empty: < 2 seeds).

    Replicates resample seed positions with one fixed generator per group, so groups with the
    same seeds are resampled alike (paired by seed, as their runs share data order and init).
    """
    col = f"log2_{x}"
    done = trials[(trials["state"] == "COMPLETE") & trials[col].notna()].copy()
    if done.empty:
        return []
    done[col] = done[col].astype(float).round(_DECIMALS)
    loss = done["final_val_loss"].astype(float)
    done["_bad"] = done["diverged"].astype(bool) | ~np.isfinite(loss)
    done["_loss"] = loss.where(~done["_bad"])
    out = []
    for key, g in done.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        seeds = sorted(g["seed"].unique())
        per_point = g.groupby(col)
        bad = per_point["_bad"].any()
        full = per_point["seed"].nunique() == len(seeds)
        used = np.array(sorted(bad.index[bad | full]), dtype=float)
        ok = np.array([p for p in used if not bad[p]], dtype=float)
        good = g[~g["_bad"]]
        row = dict(zip(by, key, strict=True), n_points=len(ok),
                   n_seeds=good["seed"].nunique(), **{f"fit_lo_log2_{x}": np.nan,
                                                      f"fit_hi_log2_{x}": np.nan})
        if len(ok) == 0:
            out.append(({**row, f"opt_log2_{x}": np.nan, f"fit_log2_{x}": np.nan,
                         "opt_loss": np.nan, "at_edge": False}, np.array([])))
            continue
        m = (good[good[col].isin(ok)].pivot_table(index="seed", columns=col, values="_loss",
                                                  aggfunc="first")
             .reindex(index=seeds, columns=ok).to_numpy(float))  # seeds x points
        ys = m.mean(axis=0)
        i = int(np.argmin(ys))
        row.update({f"opt_log2_{x}": ok[i], f"fit_log2_{x}": _vertex(ok, ys, i, used),
                    "opt_loss": ys[i], "at_edge": ok[i] in (used.min(), used.max())})
        boot = np.array([])
        if len(seeds) > 1 and n_boot > 0:
            rng = np.random.default_rng(0)
            means = m[rng.integers(0, len(seeds), size=(n_boot, len(seeds)))].mean(axis=1)
            boot = np.array([_vertex(ok, yb, int(np.argmin(yb)), used) for yb in means])
        out.append((row, boot))
    return out

def _match(df: pd.DataFrame, by: list[str], key: tuple) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for c, v in zip(by, key, strict=True):
        mask &= df[c].isna() if pd.isna(v) else df[c] == v
    return mask


def _vertex(xs: np.ndarray, ys: np.ndarray, i: int, tried: np.ndarray) -> float:
    """Vertex of the parabola through points i-1, i, i+1, clipped to the tried range."""
    if i == 0 or i == len(xs) - 1:
        return float(xs[i])
    below, above = tried[tried < xs[i]], tried[tried > xs[i]]
    if xs[i - 1] != below.max() or xs[i + 1] != above.min():
        return float(xs[i])  # a neighbour on the grid diverged: no bracket to fit through
    (x0, x1, x2), (y0, y1, y2) = xs[i - 1:i + 2], ys[i - 1:i + 2]
    # the parabola's leading coefficient and vertex in closed form (the bootstrap calls this
    # a thousand times per cell)
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    a = (d12 - d01) / (x2 - x0)
    if not a > 0:  # flat or concave (ties): the argmin is as good as it gets
        return float(xs[i])
    vertex = (x0 + x1) / 2 - d01 / (2 * a)
    return float(np.clip(vertex, tried.min(), tried.max()))


def optimum_spread(opt: pd.DataFrame, x: str = "lr", *, across: str = "density",
                   trials: pd.DataFrame | None = None, n_boot: int = N_BOOT) -> pd.DataFrame:
    """How many octaves the optimum moves across `across` (densities, by default).

    The paper's claim in one number per parameterization (and width): SP and µP optima drift
    as density falls, the SμPar one stays put (SUPAR.md §3.4). Uses the refined optimum
    fit_log2_x. Columns: the remaining keys of (param, width, density), spread_octaves,
    min_/max_fit_log2_x, the `across` value at each (`{across}_at_min`, `{across}_at_max`),
    and, given the `trials` `opt` came from, spread_lo/spread_hi: the 95% bootstrap interval
    of the spread (each cell's fit redone on seeds resampled alike in every cell; NaN with one
    seed).
    """
    fit = f"fit_log2_{x}"
    keys = [c for c in BY if c in opt.columns and c != across]
    out_cols = [*keys, "spread_octaves", f"min_{fit}", f"max_{fit}", f"{across}_at_min",
                f"{across}_at_max", "n_values", "spread_lo", "spread_hi"]
    boots: dict[tuple, list[np.ndarray]] = {}
    if trials is not None:
        for row, boot in _fits(trials, x, [*keys, across], n_boot):
            if np.isfinite(row[fit]):
                boots.setdefault(tuple(row[k] for k in keys), []).append(boot)
    ok = opt[opt[fit].notna()]
    rows = []
    for key, g in ok.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        lo, hi = g.loc[g[fit].idxmin()], g.loc[g[fit].idxmax()]
        spread = hi[fit] - lo[fit]
        b = boots.get(key, [])
        s_lo = s_hi = np.nan
        if len(b) > 1 and all(len(r) == n_boot for r in b):
            reps = np.vstack(b)
            s_lo, s_hi = np.percentile(reps.max(axis=0) - reps.min(axis=0), [2.5, 97.5])
            s_lo, s_hi = min(s_lo, spread), max(s_hi, spread)
        rows.append({**dict(zip(keys, key, strict=True)),
                     "spread_octaves": spread, f"min_{fit}": lo[fit],
                     f"max_{fit}": hi[fit], f"{across}_at_min": lo[across],
                     f"{across}_at_max": hi[across], "n_values": g[across].nunique(),
                     "spread_lo": s_lo, "spread_hi": s_hi})
    return pd.DataFrame(rows, columns=out_cols)


def frontier(trials: pd.DataFrame, reference: str = "supar") -> pd.DataFrame:
    """The numbers behind `plot.loss_vs_density`'s own-best lines (paper Fig. 8): per density,
    `reference`'s loss at its best setting against each other param's at theirs.

    Losses are paired by seed (runs of one seed share data order and masks), so the gap's
    standard error is the paired one. within_noise_or_better: the reference's mean loss is at
    most 2 paired standard errors above the other's. Pass seed-complete trials
    (`seed_complete`) so every best setting is a mean over the same seeds. Columns: density,
    other, reference_loss, other_loss, gap_pct (negative: the reference is lower), gap_sem_pct,
    within_noise_or_better.
    """
    cols = ["density", "other", "reference_loss", "other_loss", "gap_pct", "gap_sem_pct",
            "within_noise_or_better"]
    best = best_settings(trials, by=["param", "width", "density"])
    hps = [c for c in best.columns if c.startswith("log2_")]
    ok = trials[(trials["state"] == "COMPLETE") & ~trials["diverged"].astype(bool)]
    ok = ok.assign(**{c: ok[c].astype(float).round(_DECIMALS) for c in hps})

    def losses(param: str, d: float) -> pd.Series:  # per seed, at the param's best setting
        at = best[(best["param"] == param) & (best["density"] == d)].iloc[0]
        sel = ok[(ok["param"] == param) & (ok["density"] == d)]
        for c in hps:
            sel = sel[sel[c].isna()] if pd.isna(at[c]) else sel[sel[c] == round(at[c], 6)]
        return sel.groupby("seed")["final_val_loss"].mean()

    rows = []
    for d in sorted(best["density"].unique(), reverse=True):
        params = set(best.loc[best["density"] == d, "param"])
        if reference not in params:
            continue
        ref = losses(reference, d)
        for other in sorted(params - {reference}):
            o = losses(other, d)
            diff = (ref - o).dropna()
            sem = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
            rows.append({"density": d, "other": other, "reference_loss": float(ref.mean()),
                         "other_loss": float(o.mean()),
                         "gap_pct": 100.0 * float(diff.mean()) / float(o.mean()),
                         "gap_sem_pct": 100.0 * sem / float(o.mean()),
                         "within_noise_or_better": bool(diff.mean() <= 2 * sem)})
    return pd.DataFrame(rows, columns=cols)


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
