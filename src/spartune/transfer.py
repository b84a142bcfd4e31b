"""Transfer: the best proxy HPs, mapped through a parameterization, onto large sparse targets.

The proxy is tuned dense at its own width, so the targets' base shape is the proxy's shape:
`model.base_width` = proxy width and `param.base_density` = proxy density; then m_d and m_rho of
each target say how far it is from the proxy, and `params.layer_scale` gives every layer's init
std and Adam LR (SUPAR.md §1.2-1.3). SP and µP re-using the dense-tuned values is the paper's
"standard practice" baseline; they run beside SμPar as trials of the same target study.

With `transfer.check`, each target also runs a local LR grid around the transferred value, so
the report can say how many octaves the target's own optimum lies from it, and at what loss;
`transfer.check_sampler=bracket` runs only the part of that grid that brackets the target's own
best (bracket.py), which at wide targets is most of the check's cost saved.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from spartune import atomic, trust
from spartune.columns import HP_FIELDS
from spartune.config import Config, ConfigError, SearchDim, check_axes, check_name
from spartune.params import describe

log = logging.getLogger(__name__)


def select_hps(trials: pd.DataFrame, *, select: str, hps: list[str], source: str) -> dict:
    """The winning proxy configuration: the best trial, or the best mean over seeds."""
    ok = trials[(trials["state"] == "COMPLETE") & (~trials["diverged"].astype(bool))
                & trials["final_val_loss"].notna()]
    if ok.empty:
        raise ConfigError("transfer.source", f"study {source!r} has no finished trial; run "
                          f"`spartune-sweep -cn proxy study.name={source}` first (or let it "
                          "finish)")
    if select == "best":
        row = ok.loc[ok["final_val_loss"].idxmin()]
        loss, n = float(row["final_val_loss"]), 1
    elif select == "best_mean":
        keys = [f"log2_{h}" for h in HP_FIELDS]
        means = ok.groupby(keys, dropna=False)["final_val_loss"].agg(["mean", "count"])
        best_key = means["mean"].idxmin()
        row = ok.set_index(keys).loc[[best_key]].reset_index().iloc[0]
        loss, n = float(means.loc[best_key, "mean"]), int(means.loc[best_key, "count"])
    else:
        raise ConfigError("transfer.select", f"unknown {select!r}; choose best or best_mean")
    out = {h: float(row[h]) for h in hps}
    out.update({"proxy_width": int(row["width"]), "proxy_density": float(row["density"]),
                "proxy_param": str(row["param"]), "proxy_loss": loss, "proxy_seeds": n,
                "proxy_trial": f"{row['cell']}#{int(row['number'])}"})
    return out


def target_config(cfg: Config, chosen: dict, *, name: str) -> Config:
    """The target study: the chosen HPs as base values, the targets as cells, an LR grid."""
    t = cfg.transfer
    out = copy.deepcopy(cfg)
    for h in t.hps:
        path = HP_FIELDS[h].split(".")
        setattr(getattr(out, path[0]), path[1], chosen[h])
    out.model.base_width = chosen["proxy_width"]
    out.param.base_density = chosen["proxy_density"]
    s = out.study
    s.name, s.params, s.widths = name, list(t.params), list(t.widths)
    s.densities, s.seeds = list(t.densities), list(t.seeds)
    s.sampler, s.pruner, s.role = "grid", "none", "target"
    octaves = [0.0] + ([o for o in t.check_octaves if o != 0] if t.check else [])
    lr = out.optim.lr
    s.space = {"lr": SearchDim(values=[lr * 2.0**o for o in sorted(octaves)])}
    if t.check and t.check_sampler == "bracket":
        # The same lattice, walked: the transferred LR and half a step each side first, then
        # one step at a time towards the target's own best, never past the outermost point.
        s.sampler, s.centre, s.refine, s.continuation = "bracket", lr, False, False
        s.step, s.max_points = check_step(octaves), len(octaves)
        s.space = {"lr": SearchDim(low=lr * 2.0**min(octaves), high=lr * 2.0**max(octaves))}
    return out


def check_step(octaves: list[float]) -> float:
    """The lattice step of the check grid (0 included): its smallest gap, which every point
    must be a whole number of steps from 0 (ConfigError otherwise)."""
    pts = sorted(set(octaves) | {0.0})
    if len(pts) < 2:
        raise ConfigError("transfer.check_octaves", "a bracketed check needs a point besides 0")
    step = min(b - a for a, b in zip(pts, pts[1:], strict=False))
    off = [o for o in pts if abs(o / step - round(o / step)) > 1e-6]
    if off:
        raise ConfigError("transfer.check_octaves", f"{off} are not whole steps of {step:g} "
                          "octaves from 0: a bracketed check walks an even lattice; space the "
                          "points evenly, or use transfer.check_sampler=grid")
    return step


def validate_transfer(cfg: Config) -> None:
    t = cfg.transfer
    check_name(t.source, "transfer.source")
    check_axes(t, "transfer", cfg.model.head_size)
    for h in t.hps:
        if h not in HP_FIELDS:
            raise ConfigError("transfer.hps", f"unknown HP {h!r}; choose among "
                              f"{', '.join(HP_FIELDS)}")
    if t.select not in ("best", "best_mean"):
        raise ConfigError("transfer.select", f"unknown {t.select!r}; choose best or best_mean")
    if t.check_sampler not in ("grid", "bracket"):
        raise ConfigError("transfer.check_sampler", f"unknown {t.check_sampler!r}; choose grid "
                          "or bracket")
    if t.check and t.check_sampler == "bracket":
        check_step(t.check_octaves)


def check_target_name(cfg: Config, name: str) -> None:
    """The targets' study is not the proxy's: its trials would land among the proxy's, and a
    target cell equal to a proxy cell would count the proxy's trials as finished targets."""
    if name == cfg.transfer.source:
        raise ConfigError("study.name", f"{name!r} is also transfer.source: the target runs "
                          "would be written into the proxy's own study; give the targets a "
                          f"study of their own, e.g. study.name={name}_targets")


def plan(cfg: Config, chosen: dict) -> pd.DataFrame:
    """Per target and role, the init std, Adam LR and multipliers that will actually be used."""
    t = cfg.transfer
    rows = []
    for p in t.params:
        for w in t.widths:
            for d in t.densities:
                m_d = w / chosen["proxy_width"]
                m_rho = d / chosen["proxy_density"]
                for r in describe(p, width_mult=m_d, density_mult=m_rho,
                                  init_std=chosen.get("init_std", cfg.model.init_std),
                                  lr=chosen.get("lr", cfg.optim.lr),
                                  alpha_input=chosen.get("alpha_input", cfg.param.alpha_input),
                                  alpha_output=chosen.get("alpha_output",
                                                          cfg.param.alpha_output),
                                  head_size=cfg.model.head_size,
                                  depth=cfg.model.depth if cfg.param.depth_init_scale else None):
                    rows.append({"param": p, "width": w, "density": d, "m_d": m_d,
                                 "m_rho": m_rho, **r})
    return pd.DataFrame(rows)


def tokens(cfg: Config) -> int:
    """Training tokens of one target run: what the trust rule (trust.py) calls tokens."""
    return cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len


def format_plan(df: pd.DataFrame) -> str:
    lines = []
    for (p, w, d), g in df.groupby(["param", "width", "density"], sort=False):
        first = g.iloc[0]
        lines.append(f"\n{p}  width={w} density={d:g}  (m_d={first['m_d']:g}, "
                     f"m_rho={first['m_rho']:g})")
        show = g[["layer", "init_std", "adam_lr", "forward_mult"]].copy()
        lines.append(show.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
    return "\n".join(lines)


def run(cfg: Config, *, name: str | None = None) -> dict[str, Any]:
    """Select the proxy winner, print the plan, run the targets, collect their tables."""
    from spartune import collect, sweep

    validate_transfer(cfg)
    check_target_name(cfg, name or cfg.study.name)
    src_dir = Path(cfg.results_dir) / cfg.transfer.source
    try:
        storage = collect.storage_for(src_dir, cfg.transfer.source_storage)
    except ConfigError as e:
        raise ConfigError("transfer.source", str(e).split(": ", 1)[1]) from None
    proxy, _ = collect.load_trials(storage, cfg.transfer.source)
    if proxy.empty:
        raise ConfigError("transfer.source", f"no study named {cfg.transfer.source!r} in "
                          f"{cfg.transfer.source_storage or src_dir}; run the proxy sweep first")
    chosen = select_hps(proxy, select=cfg.transfer.select, hps=cfg.transfer.hps,
                        source=cfg.transfer.source)
    tcfg = target_config(cfg, chosen, name=name or cfg.study.name)
    sweep.validate_study(tcfg)
    table = trust.annotate(plan(tcfg, chosen), tokens(tcfg))
    out_dir = sweep.study_dir(tcfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    hp_text = ", ".join(f"{h}={chosen[h]:.4g} (log2 {math.log2(chosen[h]):+.2f})"
                        for h in cfg.transfer.hps)
    print(f"proxy {cfg.transfer.source}: best {chosen['proxy_trial']} at width "
          f"{chosen['proxy_width']}, density {chosen['proxy_density']:g}: val loss "
          f"{chosen['proxy_loss']:.4f}\ntransferred: {hp_text}")
    print(format_plan(table))
    print("\n".join(trust.lines(table, checked=cfg.transfer.check)))
    with atomic.replacing(out_dir / "transfer_plan.csv") as tmp:
        table.to_csv(tmp, index=False)
    atomic.write_text(out_dir / "transfer.json", json.dumps(chosen, indent=2) + "\n")
    summary = sweep.sweep(tcfg)
    trials, curves = collect.load_trials(sweep.open_storage(tcfg), tcfg.study.name)
    collect.write_tables(trials, curves, out_dir)
    return {"chosen": chosen, "plan": table, "trials": trials, "curves": curves,
            "summary": summary, "dir": out_dir, "config": tcfg}
