"""How far to trust a transferred LR: a rule measured on the repo's own stability runs.

Why: SμPar's rules match µP's oracle, yet at CPU scale its optimal LR still climbs as density
falls (0.94 octaves over densities 1 .. 1/64 in the science benchmark, README "What still
moves SμPar's optimum"). A user who transfers the proxy's HPs onto a sparse target should know
how far off the LR is expected to be, what that costs, and when to pay for `transfer.check`
(a local LR grid at the target). This module turns measured optima into that answer.

The data (`MEASURED`, one row per measured cell, recorded in
results/reference/trust/trust_data.csv and rebuilt from the runs by `measure`): per
(param, width, density, tokens, corpus), the cell's optimal log2 LR with its 95% bootstrap
interval over seeds (analysis.optima), its `offset` from the dense optimum of the same width,
recipe and corpus (> 0: the target wants a higher LR than the dense model), and how fast the
loss rises below the optimum, in % of the loss per octave squared.

The rule (`predict`), for a target (width, density, tokens):
- expected offset: the mean of the measured offsets at each density, linear in log2(density)
  between measured densities, extended along the last measured segment outside them;
- expected regret: curvature x offset^2, the curvature (the loss's rise below the optimum,
  where a too-low transferred LR falls) interpolated the same way; only within the span it is
  measured over (PARABOLA_SPAN octaves, the grid step around the optimum): further out it is
  NaN, not a guess;
- uncertain (recommend `transfer.check=true`) when the target lies outside the measured
  widths, densities or tokens, keeps fewer than 8 weights per neuron in a hidden layer
  (SUPAR.md §2.3: the law-of-large-numbers argument is weak there), or the expected offset
  exceeds the measured noise (the median half-width of the optima's intervals).
The µP width transfer itself is taken as exact: the dense optima at widths 64 (the proxy),
128 and 256 agree within 0.02 octave in the reference runs.

No torch here: the transfer plan and the report import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from spartune import analysis
from spartune.params import MIN_WEIGHTS_PER_NEURON, expected_fan_in

PARABOLA_SPAN = 1.0  # octaves: the curvature is measured between the optimum's neighbours
COLUMNS = ["source", "corpus", "param", "width", "base_width", "density", "tokens", "n_seeds",
           "opt_log2_lr", "lo_log2_lr", "hi_log2_lr", "offset", "curvature_pct", "opt_loss"]
# What the rule adds to each row of transfer_plan.csv.
PLAN_COLUMNS = ["trust_offset_octaves", "trust_offset_lo", "trust_offset_hi", "trust_regret_pct",
                "trust_check", "trust_reasons", "trust_data"]
DATA_FILE = "results/reference/trust/trust_data.csv"
# What the printed lines and the report cite: the table that ships in the package (a wheel has
# no results/ folder; DATA_FILE is its copy in the source tree)
DATA_CITE = "spartune.trust.MEASURED, shipped in the package"

# results/reference/trust/trust_data.csv, inlined so an installed wheel has it too
# (tests/test_trust.py fails when the two differ). Rebuild both with
# `python benchmarks/ablations.py --trust-data`.
MEASURED: tuple[tuple, ...] = (
    ('science_reference', 'pystdlib', 'mup', 128, 64, 0.015625, 307200, 3,
     -3.0572, -3.2363, -2.6249, 2.5639, 1.386, 2.4337),
    ('science_reference', 'pystdlib', 'mup', 128, 64, 0.0625, 307200, 3,
     -3.0707, -3.2657, -2.9246, 2.5505, 1.8137, 2.3208),
    ('science_reference', 'pystdlib', 'mup', 128, 64, 0.25, 307200, 3,
     -3.8824, -4.1392, -3.7777, 1.7387, 3.3203, 2.305),
    ('science_reference', 'pystdlib', 'mup', 128, 64, 1.0, 307200, 3,
     -5.6211, -5.7992, -5.531, 0.0, 0.8982, 2.2377),
    ('science_reference', 'pystdlib', 'sp', 128, 64, 0.015625, 307200, 3,
     -3.5149, -3.8702, -3.3228, 3.1002, 1.6386, 2.4246),
    ('science_reference', 'pystdlib', 'sp', 128, 64, 0.0625, 307200, 3,
     -3.9948, -4.0401, -3.9786, 2.6204, 6.0776, 2.3149),
    ('science_reference', 'pystdlib', 'sp', 128, 64, 0.25, 307200, 3,
     -5.3374, -5.4705, -5.0376, 1.2778, 5.2045, 2.2647),
    ('science_reference', 'pystdlib', 'sp', 128, 64, 1.0, 307200, 3,
     -6.6152, -6.923, -6.5741, 0.0, 2.5853, 2.5112),
    ('science_reference', 'pystdlib', 'supar', 128, 64, 0.015625, 307200, 3,
     -4.686, -4.7424, -4.6184, 0.9351, 2.7001, 2.455),
    ('science_reference', 'pystdlib', 'supar', 128, 64, 0.0625, 307200, 3,
     -4.7398, -5.1293, -4.6252, 0.8813, 0.3006, 2.3173),
    ('science_reference', 'pystdlib', 'supar', 128, 64, 0.25, 307200, 3,
     -5.2991, -5.469, -5.1013, 0.322, 3.0984, 2.2315),
    ('science_reference', 'pystdlib', 'supar', 128, 64, 1.0, 307200, 3,
     -5.6211, -5.7992, -5.531, 0.0, 0.8982, 2.2377),
    ('ablation_corpus_licenses', 'common-licenses', 'supar', 128, 64, 0.015625, 307200, 3,
     -5.2121, -5.6263, -5.1027, 1.0106, 1.9318, 2.6397),
    ('ablation_corpus_licenses', 'common-licenses', 'supar', 128, 64, 0.0625, 307200, 3,
     -4.629, -4.8268, -4.5099, 1.5936, 9.6744, 2.3383),
    ('ablation_corpus_licenses', 'common-licenses', 'supar', 128, 64, 0.25, 307200, 3,
     -5.5728, -5.9591, -5.0, 0.6499, 2.9921, 2.28),
    ('ablation_corpus_licenses', 'common-licenses', 'supar', 128, 64, 1.0, 307200, 3,
     -6.2227, -6.4629, -6.1177, 0.0, 1.898, 2.2718),
    ('ablation_steps_1000', 'pystdlib', 'supar', 128, 64, 0.015625, 1024000, 3,
     -5.8283, -5.9862, -5.2292, 0.5669, 4.6259, 2.2214),
    ('ablation_steps_1000', 'pystdlib', 'supar', 128, 64, 1.0, 1024000, 3,
     -6.3952, -6.8208, -5.9515, 0.0, 1.475, 1.8422),
    ('whatif_width256', 'pystdlib', 'supar', 256, 64, 1.0, 307200, 3,
     -5.63, math.nan, math.nan, 0.0, math.nan, math.nan),
    ('whatif_width256', 'pystdlib', 'supar', 256, 64, 0.25, 307200, 3,
     -5.23, math.nan, math.nan, 0.4, math.nan, math.nan),
)


def data() -> pd.DataFrame:
    """The measured rows the rule is fitted from (`MEASURED`), as a DataFrame."""
    return pd.DataFrame(list(MEASURED), columns=COLUMNS)


def measure(trials: pd.DataFrame, *, source: str, corpus: str, tokens: int,
            min_seeds: int = 3) -> pd.DataFrame:
    """Rule rows from one stability study's trials (every param x width x density in it).

    The offset is taken from the density-1 cell of the same param and width in `trials`; a
    group without one gets offsets NaN (and does not count in the rule). Cells whose minimum
    sits at the edge of what was tried, or with fewer than `min_seeds` seeds at every point
    used, are left out: they bound an optimum, or have no interval to judge it by.
    """
    ok = trials[trials["state"] == "COMPLETE"]
    opt = analysis.optima(ok, "lr")
    curv = _curvatures(ok)
    rows = []
    for r in opt.itertuples(index=False):
        if r.at_edge or not math.isfinite(r.fit_log2_lr) or r.n_seeds < min_seeds:
            continue
        dense = opt[(opt["param"] == r.param) & (opt["width"] == r.width)
                    & (opt["density"] == 1.0)]
        base = float(dense["fit_log2_lr"].iloc[0]) if len(dense) else math.nan
        bw = ok.loc[(ok["param"] == r.param) & (ok["width"] == r.width), "base_width"]
        rows.append({"source": source, "corpus": corpus, "param": r.param, "width": int(r.width),
                     "base_width": int(bw.iloc[0]), "density": float(r.density),
                     "tokens": int(tokens), "n_seeds": int(r.n_seeds),
                     "opt_log2_lr": r.fit_log2_lr, "lo_log2_lr": r.fit_lo_log2_lr,
                     "hi_log2_lr": r.fit_hi_log2_lr, "offset": r.fit_log2_lr - base,
                     "curvature_pct": curv.get((r.param, r.width, r.density), math.nan),
                     "opt_loss": r.opt_loss})
    return pd.DataFrame(rows, columns=COLUMNS)


def _curvatures(trials: pd.DataFrame) -> dict[tuple, float]:
    """Per cell: how fast the loss rises below the optimum, in % of the loss per octave^2.

    From the seed-mean loss at the points every seed ran: the rise from the argmin to its
    lower neighbour over their distance squared, over the argmin's loss. The lower side,
    because every measured offset is > 0 (the target wants a higher LR than the transferred
    one, so the transferred LR falls below the target's optimum), and the two sides differ:
    the loss climbs steeply towards the stability edge above the optimum and gently below it.
    regret ~ curvature_pct x offset^2.
    """
    grid = analysis.loss_grid(trials, "lr", by=["param", "width", "density"])
    grid = grid[~grid["diverged"].astype(bool)]
    out = {}
    for key, g in grid.groupby(["param", "width", "density"]):
        g = g[g["n"] == g["n"].max()].sort_values("log2_lr")
        xs, ys = g["log2_lr"].to_numpy(float), g["mean"].to_numpy(float)
        i = int(np.argmin(ys)) if len(ys) else 0
        if len(ys) < 2 or i == 0:
            continue
        out[key] = 100.0 * (ys[i - 1] - ys[i]) / (xs[i] - xs[i - 1]) ** 2 / ys[i]
    return out


def noise(rows: pd.DataFrame) -> float:
    """The measured noise of an optimum: the median half-width of the rows' intervals."""
    half = (rows["hi_log2_lr"] - rows["lo_log2_lr"]) / 2
    half = half[np.isfinite(half)]
    return float(half.median()) if len(half) else math.nan


def _interp(x: float, xs: np.ndarray, ys: np.ndarray) -> float:
    """Linear in x between measured points, extended along the end segments outside them."""
    if len(xs) == 1:
        return float(ys[0])
    if x < xs[0]:
        return float(ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0]))
    if x > xs[-1]:
        return float(ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return float(np.interp(x, xs, ys))


def predict(param: str, width: int, density: float, tokens: int,
            rows: pd.DataFrame | None = None) -> dict:
    """The rule's answer for one target: expected offset, its data range, regret, and whether
    to check. Keys are PLAN_COLUMNS (trust_reasons: '; '-joined, empty when trusted)."""
    rows = data() if rows is None else rows
    rows = rows[(rows["param"] == param) & rows["offset"].notna()]
    reasons = []
    if rows.empty:
        return {"trust_offset_octaves": math.nan, "trust_offset_lo": math.nan,
                "trust_offset_hi": math.nan, "trust_regret_pct": math.nan,
                "trust_check": True, "trust_reasons": f"no measurements for {param}",
                "trust_data": "none"}
    per = rows.assign(x=np.log2(rows["density"].astype(float)),
                      lo=rows["offset"] + rows["lo_log2_lr"] - rows["opt_log2_lr"],
                      hi=rows["offset"] + rows["hi_log2_lr"] - rows["opt_log2_lr"])
    by = per.groupby("x").agg(offset=("offset", "mean"), lo=("lo", "min"), hi=("hi", "max"),
                              curv=("curvature_pct", "mean")).sort_index()
    by["lo"] = by["lo"].fillna(by["offset"])
    by["hi"] = by["hi"].fillna(by["offset"])
    xs, x = by.index.to_numpy(float), math.log2(density)
    offset = _interp(x, xs, by["offset"].to_numpy())
    lo, hi = _interp(x, xs, by["lo"].to_numpy()), _interp(x, xs, by["hi"].to_numpy())
    c = by["curv"].dropna()
    curv = _interp(x, c.index.to_numpy(float), c.to_numpy()) if len(c) else math.nan
    w_lo, w_hi = int(rows["width"].min()), int(rows["width"].max())
    d_lo, d_hi = float(rows["density"].min()), float(rows["density"].max())
    t_lo, t_hi = int(rows["tokens"].min()), int(rows["tokens"].max())
    outside = [name for name, v, a, b in (("width", width, w_lo, w_hi),
                                          ("density", density, d_lo, d_hi),
                                          ("tokens", tokens, t_lo, t_hi))
               if not a - 1e-9 <= v <= b + 1e-9]
    if outside:
        reasons.append("outside the measured " + ", ".join(outside))
    wpn = expected_fan_in(width, density)  # the smallest hidden fan-in: width
    if wpn < MIN_WEIGHTS_PER_NEURON:
        reasons.append(f"{wpn:.0f} weights per neuron (< {MIN_WEIGHTS_PER_NEURON})")
    eps = noise(rows)
    if math.isfinite(eps) and abs(offset) > eps:
        reasons.append(f"expected offset beyond the measured noise ({eps:.2f} octave)")
    regret = curv * offset**2 if math.isfinite(curv) else math.nan
    if abs(offset) > PARABOLA_SPAN:
        regret = math.nan
        reasons.append(f"offset beyond the {PARABOLA_SPAN:g} octave the curvature is measured "
                       "over: regret not estimated")
    corpora = sorted(set(rows["corpus"]))
    return {"trust_offset_octaves": offset, "trust_offset_lo": min(lo, offset),
            "trust_offset_hi": max(hi, offset), "trust_regret_pct": regret,
            "trust_check": bool(reasons), "trust_reasons": "; ".join(reasons),
            "trust_data": (f"{param}: {len(rows)} cells, widths {w_lo}-{w_hi}, densities "
                           f"{d_lo:g}-{d_hi:g}, tokens {_span(t_lo, t_hi)}, "
                           f"corpora {'+'.join(corpora)}")}


def _span(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a}-{b}"


def annotate(plan: pd.DataFrame, tokens: int, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """`plan` (transfer.plan) with the rule's PLAN_COLUMNS on every row of each target."""
    keys = plan[["param", "width", "density"]].drop_duplicates()
    found = {k: predict(k[0], int(k[1]), float(k[2]), tokens, rows)
             for k in keys.itertuples(index=False, name=None)}
    extra = pd.DataFrame([found[k] for k in plan[["param", "width", "density"]]
                          .itertuples(index=False, name=None)], index=plan.index)
    return pd.concat([plan.drop(columns=[c for c in PLAN_COLUMNS if c in plan]), extra], axis=1)


def lines(plan: pd.DataFrame, checked: bool) -> list[str]:
    """One line per target of an annotated plan, for the terminal and the report."""
    out = []
    for (p, w, d), g in plan.groupby(["param", "width", "density"], sort=False):
        r = g.iloc[0]
        if not math.isfinite(r["trust_offset_octaves"]):
            head = f"trust {p} width={w} density={d:g}: no measured rule"
        else:
            regret = r["trust_regret_pct"]
            head = (f"trust {p} width={w} density={d:g}: expected LR offset "
                    f"{r['trust_offset_octaves']:+.2f} octaves [{r['trust_offset_lo']:+.2f}, "
                    f"{r['trust_offset_hi']:+.2f}], regret "
                    + (f"~{regret:.2f}%" if math.isfinite(regret) else "not estimated"))
        if r["trust_check"]:
            tail = ("checked by this run (transfer.check=true)" if checked else
                    "uncertain: rerun with transfer.check=true")
            head += f"; {tail} ({r['trust_reasons']})"
        else:
            head += "; within the measured range"
        out.append(head)
    for text in dict.fromkeys(plan["trust_data"]):
        out.append(f"  (rule data, {text}; {DATA_CITE})")
    return out


def write_data(rows: Iterable[pd.DataFrame], path: Path) -> pd.DataFrame:
    """Concatenate measured rows and write them as the rule's csv (measures to 4 decimals)."""
    df = pd.concat([r for r in rows if len(r)], ignore_index=True)[COLUMNS]
    measured = COLUMNS[COLUMNS.index("opt_log2_lr"):]
    df[measured] = df[measured].astype(float).round(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return pd.read_csv(path)
