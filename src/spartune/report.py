"""Figures and a markdown report from the tidy tables: what `spartune-plot` and the pipeline show.

Reads only `trials.csv` / `curves.csv` frames (never torch or Optuna), decides which figures the
data support, and writes them under `<dir>/figures/` as PNG and PDF.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from spartune import analysis, plot, trust
from spartune.columns import HP_FIELDS


def _varied(trials: pd.DataFrame, x: str, role: str) -> bool:
    t = trials[(trials["role"] == role) & (trials["state"] == "COMPLETE")]
    if t.empty:
        return False
    per_group = t.groupby(["param", "width", "density"])[f"log2_{x}"].nunique()
    return bool((per_group >= 3).any())


def searched_together(t: pd.DataFrame) -> list[str]:
    """The HPs a search varied together within one cell group (a TPE proxy: all four), or []
    when each group varies one HP alone (a stability grid or bracket)."""
    t = t[(t["state"] == "COMPLETE") & ~t["diverged"].fillna(False).astype(bool)]
    if t.empty:
        return []
    hps = [h for h in HP_FIELDS if f"log2_{h}" in t.columns]
    counts = t.groupby(["param", "width", "density"])[[f"log2_{h}" for h in hps]].nunique()
    varied = [h for h in hps if (counts[f"log2_{h}"] >= 2).any()]
    return varied if ((counts >= 2).sum(axis=1) >= 2).any() else []


def make_figures(trials: pd.DataFrame, curves: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every figure the tables support; returns the PNG paths written."""
    figs = out_dir / "figures"
    written: list[Path] = []

    def emit(fig, name: str) -> None:
        written.extend(p for p in plot.save(fig, figs / name) if p.suffix == ".png")

    together = searched_together(trials[trials["role"] == "search"])
    if together:  # TPE & co. over several HPs: loss vs each HP, not a stability curve
        emit(plot.search_scatter(trials[trials["role"] == "search"], together), "search")
    else:
        if _varied(trials, "lr", "search"):
            emit(plot.lr_stability(trials[trials["role"] == "search"]), "lr_stability")
        if _varied(trials, "init_std", "search"):
            emit(plot.sigma_stability(trials[trials["role"] == "search"]), "sigma_stability")
    targets = trials[trials["role"].isin(["target", "check"])]
    if not targets.empty:
        emit(plot.loss_vs_density(targets), "loss_vs_density")
        if _varied(targets.assign(role="search"), "lr", "search"):
            emit(plot.lr_stability(targets), "target_lr_check")
    if not curves.empty and (curves["role"] == "target").any():
        emit(plot.training_curves(curves, role="target"), "training_curves")
    return written


def optimum_lines(trials: pd.DataFrame, x: str = "lr", role: str = "search") -> list[str]:
    """One line per parameterization: its optimum at each density and the spread in octaves,
    each with its 95% bootstrap interval over seeds when there are several (`*`: the minimum
    is at the edge of the points run, a bound rather than an optimum)."""
    t = trials[trials["role"] == role]
    if t.empty:
        return []
    opt = analysis.optima(t, x)
    spreads = analysis.optimum_spread(opt, x, trials=t).set_index(["param", "width"])
    lo_c, hi_c = f"fit_lo_log2_{x}", f"fit_hi_log2_{x}"
    lines = []
    for (param, width), g in opt.groupby(["param", "width"], sort=False):
        g = g.sort_values("density", ascending=False)
        cells = ", ".join(f"d={r['density']:g}: {r[f'fit_log2_{x}']:+.2f}"
                          f"{_interval(r[lo_c], r[hi_c])}{'*' if r['at_edge'] else ''}"
                          for _, r in g.iterrows())
        spread = g[f"fit_log2_{x}"].max() - g[f"fit_log2_{x}"].min()
        ci = ""
        if (param, width) in spreads.index:
            sp = spreads.loc[(param, width)]
            ci = _interval(sp["spread_lo"], sp["spread_hi"], "{:.2f}")
        edge = (" (*: the best point is at the edge of the points run, so a bound, not an "
                "optimum)") if g["at_edge"].any() else ""
        lines.append(f"{param:>6} w={width}: optimum log2 {x} {cells} | spread {spread:.2f}"
                     f"{ci} octaves{edge}")
    return lines


def best_line(trials: pd.DataFrame, hps: list[str], role: str = "search") -> str | None:
    """The winning trial and its HPs (natural units and log2), for a sweep's last lines: the
    best loss alone does not say what to transfer."""
    t = trials[(trials["role"] == role) & (trials["state"] == "COMPLETE")]
    t = t[~t["diverged"].fillna(False).astype(bool) & t["final_val_loss"].notna()]
    if t.empty:
        return None
    r = t.loc[t["final_val_loss"].idxmin()]
    shown = ", ".join(f"{h}={r[h]:.4g} (log2 {r[f'log2_{h}']:+.2f})" for h in hps
                      if h in r.index and pd.notna(r[h]))
    return (f"best trial: {r['cell']} #{int(r['number'])}, val loss {r['final_val_loss']:.4f}"
            f": {shown}")


def _interval(lo: float, hi: float, fmt: str = "{:+.2f}") -> str:
    if pd.isna(lo) or pd.isna(hi):
        return ""
    return f" [{fmt.format(lo)}, {fmt.format(hi)}]"


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append("-" if math.isnan(v) else f"{v:.4g}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _trust_section(plan: pd.DataFrame) -> list[str]:
    """How far to trust each target's transferred LR (trust.py's measured rule)."""
    if "trust_check" not in plan.columns:
        return []
    per = plan.drop_duplicates(["param", "width", "density"])
    shown = per[["param", "width", "density", "trust_offset_octaves", "trust_offset_lo",
                 "trust_offset_hi", "trust_regret_pct", "trust_check", "trust_reasons"]]
    shown = shown.rename(columns={"trust_offset_octaves": "expected LR offset (oct)",
                                  "trust_offset_lo": "lo", "trust_offset_hi": "hi",
                                  "trust_regret_pct": "expected regret %",
                                  "trust_check": "check", "trust_reasons": "why"})
    return ["### Transfer trust (measured rule, `spartune.trust`)", "",
            "Expected offset of each target's own optimal LR from the transferred one (> 0: the "
            "target wants a higher LR) and the loss that costs; `check` True: rerun with "
            "`transfer.check=true` to measure it. Data, in "
            f"`{trust.DATA_CITE}`: " + "; ".join(dict.fromkeys(per["trust_data"])) + ".", "",
            _md_table(shown.reset_index(drop=True)), ""]


KEPT_REGRET_PCT = 1.0  # the science benchmark's criterion 4: within 1 % of the own best


def transfer_verdict(rows: pd.DataFrame, diverged: bool) -> str:
    """What one parameterization's rows of `analysis.transfer_regret` say, and nothing more.

    An own best at the local grid's edge leaves the optimum unknown (it may lie further out);
    kept means every target's transferred LR is its own best or within KEPT_REGRET_PCT of it."""
    if diverged:
        return "optimum moved"  # the line names the densities
    if rows["at_edge"].astype(bool).any():
        return ("optimum unknown: a target's own best is at its local grid's edge (widen "
                "transfer.check_octaves)")
    regret = rows["regret_pct"]
    if regret.isna().any():
        return "optimum unknown: the transferred point has no finite loss"
    if ((rows["distance_octaves"].abs() < 1e-9) | (regret <= KEPT_REGRET_PCT)).all():
        return "kept its optimum"
    return "optimum moved"


def pipeline_report(*, out_dir: Path, chosen: dict, plan: pd.DataFrame, proxy: pd.DataFrame,
                    targets: pd.DataFrame, figures: list[Path], seconds: float,
                    command: str) -> Path:
    """results/<name>/report.md: tuned HPs, per-target table, figures, verdict."""
    hps = [h for h in ("lr", "init_std", "alpha_input", "alpha_output") if h in chosen]
    done = targets[(targets["state"] == "COMPLETE")]
    at_transfer = done[done["role"] == "target"]
    loss = (at_transfer.groupby(["param", "density"])["final_val_loss"].mean()
            .unstack("param").sort_index(ascending=False))
    div = at_transfer.groupby(["param", "density"])["diverged"].any().unstack("param")
    lines = [
        f"# spartune pipeline report: `{out_dir.name}`",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {seconds / 60:.1f} min on this machine.",
        "",
        "## 1. Proxy (dense, tuned with Optuna)",
        "",
        f"{len(proxy)} trials ({(proxy['state'] == 'COMPLETE').sum()} complete, "
        f"{(proxy['state'] == 'PRUNED').sum()} pruned). Best: `{chosen['proxy_trial']}` at "
        f"width {chosen['proxy_width']}, val loss {chosen['proxy_loss']:.4f}.",
        "",
        "| HP | value | log2 |",
        "|---|---|---|",
        *[f"| {h} | {chosen[h]:.4g} | {math.log2(chosen[h]):+.2f} |" for h in hps],
        "",
        "## 2. Targets: the values each parameterization actually uses",
        "",
        _md_table(plan[plan["layer"].str.startswith("hidden (qkv")]
                  [["param", "width", "density", "m_d", "m_rho", "init_std", "adam_lr"]]),
        "",
        *_trust_section(plan),
        "## 3. Final validation loss at the transferred HPs",
        "",
    ]
    if not loss.empty:
        shown = loss.copy()
        for c in shown.columns:
            shown[c] = [("diverged" if bool(div.loc[d, c]) else f"{v:.4f}")
                        for d, v in zip(shown.index, shown[c], strict=True)]
        shown.index = [f"{d:g}" for d in shown.index]
        lines += [_md_table(shown.reset_index(names="density")), ""]
    regret = analysis.transfer_regret(targets) if (targets["role"] == "check").any() else None
    lines += ["## 4. Verdict", ""]
    if regret is not None and not regret.empty:
        lines += ["Distance of each target's own best LR (local grid) from the transferred one:",
                  "", _md_table(regret), ""]
        kept = []
        for param in sorted(set(at_transfer["param"])):
            g = regret[regret["param"] == param]
            bad = sorted({float(d) for d in at_transfer.loc[(at_transfer["param"] == param)
                                                              & at_transfer["diverged"],
                                                              "density"]}, reverse=True)
            if g.empty:
                kept.append(f"- **{param}**: no finite point on any local grid.")
                continue
            worst = g["distance_octaves"].abs().max()
            regret_max = g["regret_pct"].max()
            edge = " (or more: the best is at the grid's edge)" if g["at_edge"].any() else ""
            verdict = transfer_verdict(g, bool(bad))
            text = (f"- **{param}**: {verdict}; own optimum at most {worst:.1f} octave(s) from "
                    f"the transferred LR{edge}, regret at most {regret_max:.1f}%"
                    f"{' (a lower bound)' if edge else ''}")
            if bad:
                text += ("; **diverged** at the transferred HPs at density "
                         + ", ".join(f"{d:g}" for d in bad))
            kept.append(text + ".")
        lines += kept + [""]
    if not loss.empty:
        best = {d: " = ".join(c for c in row.index if row[c] <= row.min() + 1e-9)
                for d, row in loss.iterrows()}  # µP and SμPar are one model at density 1
        lines += ["Best parameterization at each density (transferred HPs): " + ", ".join(
            f"{d:g}: {p}" for d, p in best.items()) + ".", ""]
    lines += ["## 5. Figures", ""]
    lines += [f"![{p.stem}](figures/{p.name})" for p in figures]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
