"""Figures from the tidy tables (columns.py): matplotlib only, no torch, no Optuna.

Every function takes a DataFrame and returns a `matplotlib.figure.Figure` built with the object
API (never pyplot's global state), so plotting works headless and from a saved csv alone;
`save` writes the .png and .pdf next to each other.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from spartune import atomic
from spartune.analysis import best_settings, loss_grid, optima
from spartune.columns import HIDDEN_MODULES

# Display names of the parameterizations (paper's spelling; ablations as in its App. C).
PARAM_TITLES = {
    "sp": "SP",
    "mup": "µP",
    "supar": "SμPar",
    "supar_init_only": "µP + SμPar init only",
    "supar_lr_only": "µP + SμPar LR only",
}
MODULE_LABELS = {"attn": "attention", "mlp": "MLP", "embedding": "embedding", "logits": "logits"}


def param_title(name: str) -> str:
    return PARAM_TITLES.get(name, name)


def _coord_rows(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(module, axis) panels worth drawing: only axes along which the data vary."""
    rows = []
    for module in HIDDEN_MODULES:
        if module not in set(df["module"]):
            continue
        for axis in ("width", "density"):
            if len(_axis_slice(df, axis)[axis].unique()) > 1:
                rows.append((module, axis))
    return rows


def _axis_slice(df: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Cells that vary `axis` alone: widths at the densest density, densities at the widest."""
    if axis == "width":
        return df[df["density"] == df["density"].max()]
    return df[df["width"] == df["width"].max()]


def coord_figure(df: pd.DataFrame) -> Figure:
    """The coordinate check (paper Fig. 5): mean |activation| vs width and vs density.

    One column per parameterization, one row per (hidden module, axis) along which the table
    varies; one line per training step on a coolwarm ramp (blue = init), mean over seeds with
    standard-error bars. Rows share their y-axis so SP, µP and SμPar are read on one scale:
    flat lines are what SμPar promises, sloped ones are the drift SP and µP show.
    """
    df = df[df["l1"] > 0]  # log axes: a zero is a missing or collapsed run, not a point
    params = list(dict.fromkeys(df["param"]))
    rows = _coord_rows(df)
    if not params or not rows:
        raise ValueError("coord_figure needs rows for at least one parameterization and a "
                         "hidden module measured at more than one width or density")
    steps = sorted(df["step"].unique())
    cmap = colormaps["coolwarm"]
    colours = {s: cmap(i / max(1, len(steps) - 1)) for i, s in enumerate(steps)}

    fig = Figure(figsize=(3.4 * len(params) + 1.2, 2.7 * len(rows)), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), len(params), sharey="row", squeeze=False))
    for i, (module, axis) in enumerate(rows):
        for j, param in enumerate(params):
            ax = axes[i, j]
            sel = _axis_slice(df[(df["param"] == param) & (df["module"] == module)], axis)
            stats = (sel.groupby(["step", axis])["l1"]
                     .agg(["mean", "std", "count"]).reset_index())
            for step in steps:
                s = stats[stats["step"] == step].sort_values(axis)
                if s.empty:
                    continue
                sem = (s["std"] / np.sqrt(s["count"])).fillna(0.0)
                ax.errorbar(s[axis], s["mean"], yerr=sem, color=colours[step], marker="o",
                            markersize=3, linewidth=1.2, capsize=2, label=str(step))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel(axis if axis == "width" else "density (1 - sparsity)")
            fixed = (f"density {sel['density'].max():g}" if axis == "width"
                     else f"width {sel['width'].max():g}" if not sel.empty else "")
            ax.set_title(f"{param_title(param)}: {MODULE_LABELS[module]} ({fixed})",
                         fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{MODULE_LABELS[module]}\nmean |output|")
    handles = [Line2D([], [], color=colours[s], marker="o", markersize=3) for s in steps]
    fig.legend(handles, [str(s) for s in steps], title="step", loc="outside right center",
               fontsize=8)
    fig.suptitle("Coordinate check: mean |activation| vs width and density")
    return fig


def save(fig: Figure, path_without_suffix: str | Path) -> list[Path]:
    """Write `<path>.png` (150 dpi) and `<path>.pdf`, creating folders; return both paths."""
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.parent / f"{base.name}.png", base.parent / f"{base.name}.pdf"]
    for path, kw in zip(paths, ({"dpi": 150, "format": "png"}, {"format": "pdf"}), strict=True):
        with atomic.replacing(path) as tmp:  # a reader never sees half a figure
            fig.savefig(tmp, **kw)
    return paths


# ---------------------------------------------------------------------------------------------
# HP-transfer figures (paper Figs 1, 6, 7, 8) from trials.csv / curves.csv

# Density -> colour is fixed, not fitted to the densities at hand, so one density has one colour
# in every figure: viridis over log2(density), dense = dark, 2^-7 (the paper's sparsest) = light.
DENSITY_OCTAVES = 7
# One colour per parameterization where lines are parameterizations (Fig. 8, training curves).
PARAM_COLOURS = {"sp": "#4c72b0", "mup": "#dd8452", "supar": "#2a9d55",
                 "supar_init_only": "#8172b3", "supar_lr_only": "#937860"}
HP_LABELS = {"lr": "log2 learning rate η_base", "init_std": "log2 init std σ_base",
             "alpha_input": "log2 input multiplier α_input",
             "alpha_output": "log2 output multiplier α_output"}
HP_NAMES = {"lr": "learning rate", "init_std": "init std", "alpha_input": "α_input",
            "alpha_output": "α_output"}
LOSS_LABEL = "final validation loss (nats)"


def density_colour(density: float) -> tuple[float, float, float, float]:
    """The colour of a density in every figure (viridis on log2 density, dense = dark)."""
    t = min(1.0, max(0.0, -math.log2(float(density)) / DENSITY_OCTAVES))
    return colormaps["viridis"](0.92 * t)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def density_text(density: float) -> str:
    """A density as the paper writes it: 2⁻⁴ for powers of two, else the decimal."""
    k = math.log2(float(density))
    return f"2{str(round(k)).translate(_SUPERSCRIPT)}" if 0 > k == round(k) else f"{density:g}"


def density_label(density: float) -> str:
    """'1 (dense)', '2⁻² (75% sparse)': density is what the config takes, sparsity what
    papers quote."""
    if density >= 1:
        return "1 (dense)"
    return f"{density_text(density)} ({100 * (1 - density):.4g}% sparse)"


def param_colour(name: str) -> str:
    return PARAM_COLOURS.get(name, "#555555")


def _ordered_params(values: pd.Series) -> list[str]:
    """Parameterizations present, in the paper's order SP, µP, SμPar, then ablations."""
    present = list(dict.fromkeys(values.dropna()))
    rank = {p: i for i, p in enumerate(PARAM_TITLES)}
    return sorted(present, key=lambda p: (rank.get(p, len(rank)), p))


def _at_width(df: pd.DataFrame, width: int | None) -> tuple[pd.DataFrame, int]:
    """Rows at `width` (default: the largest, where transfer is tested); error if absent."""
    widths = sorted(int(w) for w in df["width"].dropna().unique())
    if not widths:
        raise ValueError("no rows with a width to plot: is the table empty?")
    if width is None:
        width = widths[-1]
    if width not in widths:
        raise ValueError(f"no rows at width {width}; widths present: {widths}")
    return df[df["width"] == width], width


def _n_seeds(df: pd.DataFrame) -> str:
    n = df["seed"].nunique()
    return f"{n} seed" + ("s" if n != 1 else "")


def lr_stability(trials: pd.DataFrame, x: str = "lr", width: int | None = None) -> Figure:
    """Validation loss vs log2(x), one panel per parameterization, one line per density.

    The headline figure (paper Figs 1 and 6): under SP and µP the optimum (star; the triangle
    on the x axis is the parabola-refined optimum) drifts as density falls, under SμPar the
    lines' optima stack at one x; a bar along the axis is the fitted optimum's bootstrap
    interval over seeds. Lines are seed means with standard-error bars; a value that
    diverged in any seed is left out, as in the paper. Panels share y, capped a margin above the
    worst line's minimum so blown-up points do not flatten the basins.
    """
    col = f"log2_{x}"
    sel, width = _at_width(trials, width)
    grid = loss_grid(sel, x, by=["param", "density"])
    grid = grid[~grid["diverged"].astype(bool)]
    # points every seed ran, as the optima use (a bracketing search's scouting points ran on
    # the first seed only, and a one-seed "mean" beside all-seed means would mislead)
    grid = grid[grid["n"] == grid.groupby(["param", "density"])["n"].transform("max")]
    if grid.empty:
        raise ValueError(f"no finished, non-diverged trials with {col} at width {width}")
    opt = optima(sel, x, by=["param", "density"]).set_index(["param", "density"])
    params = _ordered_params(grid["param"])
    densities = sorted(grid["density"].unique(), reverse=True)

    # the legend sits outside, right: room for it, so one panel is not squeezed to a sliver
    fig = Figure(figsize=(2.6 * len(params) + 2.2, 3.5), layout="constrained")
    axes = fig.subplots(1, len(params), sharey=True, squeeze=False)[0]
    minima, any_edge, any_interval = [], False, False
    for ax, param in zip(axes, params, strict=True):
        for d in densities:
            line = grid[(grid["param"] == param) & (grid["density"] == d)].sort_values(col)
            if line.empty:
                continue
            c = density_colour(d)
            ax.errorbar(line[col], line["mean"], yerr=line["sem"], color=c, marker="o",
                        markersize=3.5, linewidth=1.6, capsize=2, elinewidth=1,
                        label=density_label(d))
            o = opt.loc[(param, d)]
            minima.append(o["opt_loss"])
            edge = bool(o["at_edge"])
            ax.plot(o[f"opt_log2_{x}"], o["opt_loss"], marker="*", markersize=11, color=c,
                    markerfacecolor="white" if edge else c, markeredgecolor="black",
                    markeredgewidth=0.6, zorder=5, linestyle="none")
            any_edge |= edge
            ax.plot(o[f"fit_log2_{x}"], 0.0, marker="^", markersize=7, color=c,
                    markeredgecolor="black", markeredgewidth=0.5, clip_on=False, zorder=6,
                    transform=ax.get_xaxis_transform(), linestyle="none")
            lo_i, hi_i = o[f"fit_lo_log2_{x}"], o[f"fit_hi_log2_{x}"]
            if np.isfinite(lo_i) and np.isfinite(hi_i):  # its bootstrap interval over seeds
                ax.hlines(0.012, lo_i, hi_i, colors=[c], linewidth=2.2, clip_on=False,
                          zorder=5.5, transform=ax.get_xaxis_transform())
                any_interval = True
        ax.set_title(param_title(param), fontsize=11)
        ax.set_xlabel(HP_LABELS.get(x, f"log2 {x}"), fontsize=9.5)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.tick_params(labelsize=8.5)
    lo, hi = min(minima), max(minima)
    top = hi + max(0.8 * (hi - lo), 0.04 * abs(hi), 0.05)
    bottom = lo - 0.06 * (top - lo)
    axes[0].set_ylim(bottom, top)
    axes[0].set_ylabel(LOSS_LABEL, fontsize=9.5)

    handles = [Line2D([], [], color=density_colour(d), marker="o", markersize=3.5, linewidth=1.6)
               for d in densities]
    labels = [density_label(d) for d in densities]
    handles += [Line2D([], [], color="0.6", marker="*", markersize=10, markeredgecolor="black",
                       markeredgewidth=0.6, linestyle="none"),
                Line2D([], [], color="0.6", marker="^", markersize=6, markeredgecolor="black",
                       markeredgewidth=0.5, linestyle="none")]
    labels += ["best grid point",
               "fitted optimum" + (" (bar: 95% interval over seeds)" if any_interval else "")]
    if any_edge:
        handles.append(Line2D([], [], color="0.6", marker="*", markersize=10,
                              markerfacecolor="white", markeredgecolor="black",
                              markeredgewidth=0.6, linestyle="none"))
        labels.append("best at grid edge")
    fig.legend(handles, labels, title="density ρ", loc="outside right center", fontsize=8.5,
               title_fontsize=9, frameon=False)
    spread = f"mean ± s.e. over {_n_seeds(sel)}" if sel["seed"].nunique() > 1 else "1 seed"
    _title(fig, f"Validation loss vs {HP_NAMES.get(x, x)}: width {width}, {spread}")
    return fig


def _title(fig: Figure, text: str, fontsize: float = 11) -> None:
    """A suptitle wrapped to the figure's width (about 11 characters per inch at 11 pt), so a
    narrow figure does not cut it off at both ends."""
    import textwrap

    chars = max(24, int(fig.get_figwidth() * 120 / fontsize))
    fig.suptitle(textwrap.fill(text, chars), fontsize=fontsize)


def search_scatter(trials: pd.DataFrame, hps: list[str]) -> Figure:
    """A search over several HPs at once (TPE, random, ...), drawn as what it is: the final
    validation loss of every finished trial against each HP, the best trial starred.

    Its samples vary all HPs together, so a line through them along one HP would be no
    stability curve; the panels only show where the good trials lie. Diverged trials are
    left out; y is capped above the median so blown-up trials do not flatten the rest."""
    t = trials[(trials["state"] == "COMPLETE") & ~trials["diverged"].astype(bool)]
    t = t[t["final_val_loss"].notna()]
    if t.empty:
        raise ValueError("no finished, non-diverged trials to draw")
    best = t.loc[t["final_val_loss"].idxmin()]
    fig = Figure(figsize=(2.6 * len(hps) + 2.0, 3.5), layout="constrained")
    axes = fig.subplots(1, len(hps), sharey=True, squeeze=False)[0]
    for ax, hp in zip(axes, hps, strict=True):
        col = f"log2_{hp}"
        ax.scatter(t[col], t["final_val_loss"], s=14, color="#4c72b0", alpha=0.7,
                   edgecolors="none", label="finished trial")
        ax.plot(best[col], best["final_val_loss"], marker="*", markersize=13, color="#d62728",
                markeredgecolor="black", markeredgewidth=0.6, linestyle="none",
                label="best trial")
        ax.set_title(f"best {hp} = {best[hp]:.3g}", fontsize=9.5)
        ax.set_xlabel(HP_LABELS.get(hp, f"log2 {hp}"), fontsize=9.5)
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.tick_params(labelsize=8.5)
    lo, med = t["final_val_loss"].min(), t["final_val_loss"].median()
    top = min(t["final_val_loss"].max(), lo + 3 * (med - lo)) + 0.05 * max(med - lo, 0.02)
    axes[0].set_ylim(lo - 0.08 * (top - lo), top)
    axes[0].set_ylabel(LOSS_LABEL, fontsize=9.5)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8.5, frameon=False)
    _title(fig, f"Search over {', '.join(HP_NAMES.get(h, h) for h in hps)}: {len(t)} finished "
                f"trials, the best starred (val loss {best['final_val_loss']:.4f})")
    return fig


def sigma_stability(trials: pd.DataFrame, width: int | None = None) -> Figure:
    """lr_stability for the init std σ_base (paper Fig. 7)."""
    return lr_stability(trials, x="init_std", width=width)


def loss_vs_density(trials: pd.DataFrame, width: int | None = None) -> Figure:
    """Final validation loss vs density, one colour per parameterization (paper Fig. 8).

    Solid: at the transferred HPs (role "target"), i.e. what tuning once on the dense proxy
    buys. Dashed: each parameterization's own best at that density (best setting over its
    search and check trials, target included): what re-tuning at every density would buy.
    SμPar's promise is that its solid line sits on the dashed ones. Seed means with
    standard-error bars; a target that diverged in any seed is left out.
    """
    if width is None and (trials["role"] == "target").any():
        width = int(trials.loc[trials["role"] == "target", "width"].max())
    sel, width = _at_width(trials, width)
    targets = best_settings(sel[sel["role"] == "target"], by=["param", "density"])
    best = best_settings(sel, by=["param", "density"])
    if targets.empty and best.empty:
        raise ValueError(f"no finished, non-diverged trials at width {width}")
    fig = Figure(figsize=(5.4, 3.6), layout="constrained")
    ax = fig.subplots()
    params = _ordered_params(pd.concat([targets["param"], best["param"]]))
    for param in params:
        c = param_colour(param)
        for frame, style, marker in ((targets, "-", "o"), (best, "--", "s")):
            line = frame[frame["param"] == param].sort_values("density")
            if line.empty:
                continue
            ax.errorbar(line["density"], line["mean"], yerr=line["sem"], color=c,
                        linestyle=style, marker=marker, markersize=4, linewidth=1.6,
                        capsize=2, elinewidth=1)
    densities = sorted(best["density"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(densities, [density_text(d) for d in densities])
    ax.minorticks_off()
    ax.set_xlabel("density ρ (log scale, dense at the right)", fontsize=9.5)
    ax.set_ylabel(LOSS_LABEL, fontsize=9.5)
    ax.tick_params(labelsize=8.5)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    top = ax.secondary_xaxis("top")
    top.set_xticks(densities, [f"{100 * (1 - d):.4g}%" for d in densities])
    top.minorticks_off()
    top.tick_params(labelsize=8)
    top.set_xlabel("sparsity", fontsize=9)

    handles = [Line2D([], [], color=param_colour(p), linewidth=2) for p in params]
    labels = [param_title(p) for p in params]
    if not targets.empty:
        handles += [Line2D([], [], color="0.3", linestyle="-", marker="o", markersize=4),
                    Line2D([], [], color="0.3", linestyle="--", marker="s", markersize=4)]
        labels += ["transferred HPs", "own best per density"]
    else:
        handles.append(Line2D([], [], color="0.3", linestyle="--", marker="s", markersize=4))
        labels.append("best per density")
    ax.legend(handles, labels, fontsize=8.5, frameon=False)
    what = "transferred vs own-best HPs" if not targets.empty else "best HPs per density"
    ax.set_title(f"Loss vs density, {what} (width {width}, {_n_seeds(sel)})", fontsize=10)
    return fig


def training_curves(curves: pd.DataFrame, role: str = "target",
                    width: int | None = None) -> Figure:
    """Validation loss vs step, one panel per density, one line per parameterization.

    Shows how the final losses of the other figures were reached (an early blow-up, a slow
    start). Seed means. Where a parameterization has several HP settings with this role (a
    grid), the line is the setting with the lowest final validation loss.
    """
    sel = curves[(curves["role"] == role) & curves["val_loss"].notna()]
    if sel.empty:
        raise ValueError(f"no curves with a validation loss for role {role!r}")
    sel, width = _at_width(sel, width)
    densities = sorted(sel["density"].unique(), reverse=True)
    ncols = min(4, len(densities))
    nrows = math.ceil(len(densities) / ncols)
    fig = Figure(figsize=(2.6 * ncols + 1.2, 2.5 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax in axes[len(densities):]:
        fig.delaxes(ax)
    params = _ordered_params(sel["param"])
    finals = []
    for ax, d in zip(axes, densities, strict=False):
        for param in params:
            cur = _best_curve(sel[(sel["density"] == d) & (sel["param"] == param)])
            if cur is None:
                continue
            ax.plot(cur.index, cur.to_numpy(), color=param_colour(param), linewidth=1.6,
                    label=param_title(param))
            finals.append(cur.to_numpy()[len(cur) // 4:])
        ax.set_title(density_label(d), fontsize=10)
        ax.set_xlabel("step", fontsize=9.5)
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.tick_params(labelsize=8.5)
    for ax in axes[::ncols]:
        ax.set_ylabel("validation loss (nats)", fontsize=9.5)
    if finals:  # the first evaluations (loss ~ ln vocab) would flatten the rest
        vals = np.concatenate(finals)
        lo, hi = np.nanmin(vals), np.nanmax(vals)
        axes[0].set_ylim(lo - 0.05 * (hi - lo), hi + 0.15 * (hi - lo) + 1e-3)
    handles = [Line2D([], [], color=param_colour(p), linewidth=2) for p in params]
    fig.legend(handles, [param_title(p) for p in params], loc="outside right center",
               fontsize=8.5, frameon=False)
    fig.suptitle(f"Validation loss during training ({role} runs, width {width}, "
                 f"mean over {_n_seeds(sel)})", fontsize=11)
    return fig


def _best_curve(df: pd.DataFrame) -> pd.Series | None:
    """Seed-mean val loss by step of the HP setting ending lowest; None if no rows."""
    if df.empty:
        return None
    keys = ["lr", "init_std"]
    by_setting = df.assign(**{k: df[k].fillna(-1.0) for k in keys}).groupby(keys)
    best, best_final = None, math.inf
    for _, g in by_setting:
        mean = g.groupby("step")["val_loss"].mean().sort_index()
        if mean.empty:
            continue
        final = float(mean.iloc[-1])
        final = final if math.isfinite(final) else math.inf
        if best is None or final < best_final:
            best, best_final = mean, final
    return best


def ablation_optima(table: pd.DataFrame) -> Figure:
    """Optimal log2 LR vs density, one line per ablation (issue 17's ablation figure).

    `table` has one row per ablation x density: ablation, density, optimum_log2_lr and its
    interval lo / hi (benchmarks/ablations.py writes it). A flat line is an optimum that
    transfers across densities; the baseline's drift is the thing the ablations try to move.
    Bars are the 95% bootstrap intervals over seeds; lines are nudged sideways a little so
    the bars do not hide each other. A hollow marker is a cell not counted in the spread (not
    every seed has run, or its minimum sits at the edge of what was tried).
    """
    need = {"ablation", "density", "optimum_log2_lr", "lo", "hi"}
    if table.empty or not need <= set(table.columns):
        raise ValueError(f"an ablation table needs rows with columns {sorted(need)}")
    names = list(dict.fromkeys(table["ablation"]))
    colours = colormaps["tab10"]
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.06 * (len(names) - 1)
    for i, name in enumerate(names):
        rows = table[table["ablation"] == name].sort_values("density")
        x = np.log2(rows["density"].astype(float)) + (i * 0.06 - width / 2 if width else 0.0)
        y = rows["optimum_log2_lr"].astype(float)
        err = np.vstack([(y - rows["lo"]).clip(lower=0).fillna(0),
                         (rows["hi"] - y).clip(lower=0).fillna(0)])
        c = colours(i % 10)
        ax.errorbar(x, y, yerr=err, color=c, linewidth=1.6, capsize=2, elinewidth=1,
                    label=name, marker="none")
        counted = rows["counted"].astype(bool) if "counted" in rows else pd.Series(
            True, index=rows.index)
        ax.plot(x[counted], y[counted], "o", color=c, markersize=4.5, linestyle="none")
        ax.plot(x[~counted], y[~counted], "o", color=c, markerfacecolor="white",
                markersize=4.5, linestyle="none")
    densities = sorted(table["density"].astype(float).unique())
    ax.set_xticks(np.log2(densities), [density_text(d) if d < 1 else "1" for d in densities])
    ax.set_xlabel("density ρ (dense at the right)", fontsize=9.5)
    ax.set_ylabel("optimal log2 η_base (SμPar)", fontsize=9.5)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.tick_params(labelsize=8.5)
    fig.legend(fontsize=8, frameon=False, loc="outside right center")
    ax.set_title("SμPar's optimal LR vs density, per ablation (bars: 95% over seeds)",
                 fontsize=10)
    return fig
