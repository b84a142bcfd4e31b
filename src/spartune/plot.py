"""Figures from the tidy tables (columns.py): matplotlib only, no torch, no Optuna.

Every function takes a DataFrame and returns a `matplotlib.figure.Figure` built with the object
API (never pyplot's global state), so plotting works headless and from a saved csv alone;
`save` writes the .png and .pdf next to each other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

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
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths
