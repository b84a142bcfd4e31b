"""What still moves SμPar's optimal LR? The science benchmark's LR criterion, one factor at a time.

Why: the science benchmark's LR criterion (width 128, base width 64, 300 steps, 3 seeds, the
proxy winner's HPs) finds SμPar's optimum climbing 0.94 octaves over densities 1 .. 1/64
(goal <= 0.5), and the cause is open (issue 17). Each ablation here is that criterion with one
factor changed, run as a plain product command,

    spartune-sweep -cn lr_stability study.name=abl_<name> study.params=[supar] ... <overrides>

(the bracketing search with continuation: each sparser density starts at the denser one's
optimum), then read back with `spartune.collect` and `spartune.analysis`: each density's
parabola optimum with its 95% bootstrap interval over seeds, and the spread across densities
with its interval. Nothing here trains or searches by itself, so a run is resumable exactly as
the product's sweeps are: run the same command again and finished trials are kept.

Writes, under --out (default results/ablations): one study folder per ablation, logs/,
ablations.csv (ablation, density, optimum, interval, spread, the command) and
ablation_optima.png/.pdf (optimum log2 LR vs density, one line per ablation). Prints, per
ablation, the exact command that made it.

    nice -n 19 python benchmarks/ablations.py                  # every ablation, in order
    nice -n 19 python benchmarks/ablations.py --only baseline corpus_licenses
    python benchmarks/ablations.py --report-only               # tables and figure only
    python benchmarks/ablations.py --quick --out /tmp/abl      # a tiny smoke (slow test)

The second corpus (`corpus_licenses`) is the licence texts every Debian system ships in
/usr/share/common-licenses (package base-files): English prose instead of Python source,
about 230 kB, read offline. The glob `*-*` takes the versioned files (GPL-3, Apache-2.0, ...)
and skips the unversioned symlinks (GPL -> GPL-3), so no text is counted twice.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing, too
    sys.path.insert(0, str(ROOT / "src"))

from spartune import analysis, collect, plot, trust  # noqa: E402
from spartune.config import ConfigError  # noqa: E402

BIN = Path(sys.executable).parent  # the venv's console scripts sit beside its python
# The science benchmark's proxy winner (results/reference/science/science_output.txt).
# init_std and the alphas to every digit the reference trials record (lr_stability_trials.csv),
# so the runs repeat the reference's bit for bit; lr is only the search's starting centre.
HPS = {"optim.lr": 0.02005, "model.init_std": 0.1958563870752016,
       "param.alpha_input": 3.5396254820588857, "param.alpha_output": 1.3024209596049312}
LICENSES = "/usr/share/common-licenses/*-*"
PREFIX = "abl_"  # study names: abl_<ablation>


@dataclass(frozen=True)
class Ablation:
    name: str
    what: str  # one line for the table and the README
    overrides: tuple[str, ...] = ()  # on top of the baseline; last on the line, so they win


# In the order they run: the baseline, then the factors most likely to explain the drift (the
# optimum sits next to the dense model's stability edge: length, warm-up, batch, corpus), then
# the cheap switches.
ABLATIONS = [
    Ablation("baseline", "the science benchmark's LR criterion"),
    Ablation("corpus_licenses", "second corpus: /usr/share/common-licenses (English prose)",
             ("data=text", f"data.path='{LICENSES}'")),
    Ablation("warmup_0", "no warm-up (warmup_frac 0, baseline 0.1)", ("optim.warmup_frac=0.0",)),
    Ablation("warmup_30", "warm-up 30% of the steps", ("optim.warmup_frac=0.3",)),
    Ablation("eps_1e-12", "Adam epsilon 1e-12 (baseline 1e-8)", ("optim.eps=1e-12",)),
    Ablation("no_clip", "no gradient clipping (baseline global norm 1)", ("optim.grad_clip=0",)),
    Ablation("no_depth_init", "depth_init_scale off", ("param.depth_init_scale=false",)),
    Ablation("bernoulli", "mask_kind bernoulli (baseline per_row)", ("model.mask_kind=bernoulli",)),
    Ablation("batch_64", "batch 64 x 64 tokens (baseline 16)", ("train.batch_size=64",)),
    Ablation("steps_1000", "1000 steps (baseline 300)",
             ("train.steps=1000", "train.eval_every=1000")),
]
BY_NAME = {a.name: a for a in ABLATIONS}
# In the list but not runnable as a product command: no switch exists for it.
NOT_RUNNABLE = {
    "dense_lr_scaled": "hidden layers sparse with the dense layers' (embedding, readout) LR "
                       "scaled by the hidden share of the updates: the product has no such "
                       "switch (the baseline already sparsifies the hidden layers only)",
}


# Ablations that keep the recipe and change only what a user's target changes (the corpus, the
# tokens): their optima are data for the transfer-trust rule (spartune.trust).
# (Not the baseline: its runs are the science reference's, which the rule always reads.)
TRUST_SOURCES = {"corpus_licenses": "common-licenses", "steps_1000": "pystdlib",
                 "batch_64": "pystdlib"}
REFERENCE = ROOT / "results" / "reference" / "science" / "lr_stability_trials.csv"
# The science benchmark's own LR runs (the same config: width 128, base 64, 300 steps, seeds
# 0-2, these HPs, its own bracketing) are always reported, as baseline_reference.
WHATIF_W256 = ROOT / "results" / "reference" / "science" / "whatif_width256_output.txt"
# What earlier sessions measured (the tracked table): an ablation whose study is not under
# --out is reported from here, its command as it ran then, so a report never drops a result
# only because its study folder was not kept.
PREVIOUS = ROOT / "results" / "reference" / "ablations" / "ablations.csv"
REFERENCE_WHAT = "baseline: the science benchmark's SμPar LR runs (results/reference/science)"
REFERENCE_CMD = ("python benchmarks/science.py   # commit 65e992e, 2026-12-02; SμPar rows of "
                 "results/reference/science/lr_stability_trials.csv")


@dataclass(frozen=True)
class Scale:
    width: int = 128
    base_width: int = 64
    steps: int = 300
    densities: tuple[float, ...] = (1.0, 0.25, 0.0625, 0.015625)
    seeds: tuple[int, ...] = (0, 1, 2)
    workers: int = 2  # one process per core on a 2-core machine
    extra: tuple[str, ...] = ()


FULL = Scale()
QUICK = Scale(width=64, base_width=64, steps=20, densities=(1.0, 0.0625), seeds=(0, 1),
              workers=1, extra=("data.max_bytes=300000", "train.eval_batches=2",
                                "study.max_points=4"))


def _list(values: tuple) -> str:
    return "[" + ",".join(repr(v) for v in values) + "]"


def command(ab: Ablation, out: Path, scale: Scale) -> list[str]:
    """The product command that runs one ablation (its study: `abl_<name>` under `out`)."""
    return ["spartune-sweep", "-cn", "lr_stability", f"results_dir={out}",
            f"data.cache_dir={out / '.cache'}", "train.progress=false",
            f"study.name={PREFIX}{ab.name}", "study.params=[supar]",
            f"study.densities={_list(scale.densities)}", f"study.seeds={_list(scale.seeds)}",
            f"study.widths=[{scale.width}]", f"model.width={scale.width}",
            f"model.base_width={scale.base_width}", *(f"{k}={v!r}" for k, v in HPS.items()),
            f"train.steps={scale.steps}", f"train.eval_every={scale.steps}",  # final loss only
            "train.threads=1", f"study.workers={scale.workers}", *scale.extra, *ab.overrides]


def run(ab: Ablation, out: Path, scale: Scale) -> int:
    """Run (or resume) one ablation's sweep; its output goes to out/logs/<name>.log."""
    argv = command(ab, out, scale)
    log = out / "logs" / f"{ab.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write("$ " + shlex.join(argv) + "\n")
        fh.flush()
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], stdout=fh,
                              stderr=subprocess.STDOUT, cwd=ROOT).returncode


def read(ab: Ablation, out: Path) -> tuple[pd.DataFrame, tuple, tuple] | None:
    """The ablation's trials, straight from its storage (a partial study reads too), and the
    densities and seeds its cells were made with (cells exist before their first trial)."""
    name = f"{PREFIX}{ab.name}"
    try:
        storage = collect.storage_for(out / name)
    except ConfigError:
        return None
    trials, _ = collect.load_trials(storage, name)
    cells = [s.user_attrs for s in storage.get_all_studies()
             if s.study_name.startswith(f"{name}/")]
    if trials.empty or not cells:
        return None
    return (trials, tuple(sorted({c["density"] for c in cells}, reverse=True)),
            tuple(sorted({c["seed"] for c in cells})))


def summarise(name: str, trials: pd.DataFrame, n_densities: int, n_seeds: int) -> pd.DataFrame:
    """Per density: the fitted optimum log2 LR, its interval, and the ablation's spread.

    Only cells whose optimum is an optimum count towards the spread: a cell where not every
    of the `n_seeds` seeds has run yet, or whose minimum sits at the edge of what was
    tried is reported with `counted` False. `complete` says the spread covers all
    `n_densities` densities.
    """
    ok = trials[trials["state"] == "COMPLETE"]
    opt = analysis.optima(ok, "lr")
    opt["counted"] = (opt["n_seeds"] == n_seeds) & ~opt["at_edge"].astype(bool) \
        & opt["fit_log2_lr"].notna()
    counted = opt[opt["counted"]]
    spread = analysis.optimum_spread(counted, "lr", trials=ok[ok["density"].isin(
        counted["density"])]) if len(counted) > 1 else pd.DataFrame()
    s = spread.iloc[0] if len(spread) else None
    runs = ok.groupby("density").size()
    return pd.DataFrame({
        "ablation": name, "density": opt["density"], "optimum_log2_lr": opt["fit_log2_lr"],
        "lo": opt["fit_lo_log2_lr"], "hi": opt["fit_hi_log2_lr"], "at_edge": opt["at_edge"],
        "n_seeds": opt["n_seeds"], "runs": opt["density"].map(runs).astype(int),
        "counted": opt["counted"],
        "spread": float("nan") if s is None else s["spread_octaves"],
        "spread_lo": float("nan") if s is None else s["spread_lo"],
        "spread_hi": float("nan") if s is None else s["spread_hi"],
        "complete": bool(opt["counted"].sum() == n_densities),
    }).sort_values("density", ascending=False)


def spread_line(df: pd.DataFrame, n_densities: int) -> str:
    first = df.iloc[0]
    optima = ", ".join(f"{plot.density_text(r.density)} {r.optimum_log2_lr:+.2f}"
                       f" [{r.lo:+.2f}, {r.hi:+.2f}]" + ("" if r.counted else " (not counted)")
                       for r in df.itertuples())
    done = int(df["counted"].sum())
    spread = "n/a" if pd.isna(first["spread"]) else (
        f"{first['spread']:.2f} octaves [{first['spread_lo']:.2f}, {first['spread_hi']:.2f}]")
    part = "" if done == n_densities else f" (partial: {done}/{n_densities} densities)"
    return f"{first['ablation']}: spread {spread}{part}; optimum log2 lr per density: {optima}"


def markdown(table: pd.DataFrame, densities: tuple[float, ...]) -> str:
    """The README's table: one row per ablation, the optimum [interval] per density, spread."""
    head = ["ablation", *(plot.density_text(d) if d < 1 else "1" for d in densities),
            "spread (octaves)", "runs"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, g in table.groupby("ablation", sort=False):
        by_d = g.set_index("density")
        cells = []
        for d in densities:
            if d not in by_d.index:
                cells.append("not run")
                continue
            r = by_d.loc[d]
            mark = "" if r["counted"] else " (not counted)"
            cells.append(f"{r['optimum_log2_lr']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]{mark}"
                         if pd.notna(r["lo"]) else f"{r['optimum_log2_lr']:+.2f}{mark}")
        first = g.iloc[0]
        spread = "n/a" if pd.isna(first["spread"]) else (
            f"**{first['spread']:.2f}** [{first['spread_lo']:.2f}, {first['spread_hi']:.2f}]")
        runs = int(g["runs"].sum())
        out.append("| " + " | ".join([f"{name}", *cells, spread, str(runs)]) + " |")
    return "\n".join(out)


def tokens(ab: Ablation, scale: Scale) -> int:
    """Training tokens of one run of the ablation (steps x batch x sequence length)."""
    o = dict(kv.split("=", 1) for kv in ab.overrides if "=" in kv)
    return (int(o.get("train.steps", scale.steps)) * int(o.get("train.batch_size", 16))
            * int(o.get("train.seq_len", 64)))


def whatif_width256(n_tokens: int) -> pd.DataFrame:
    """SμPar's optima in the science benchmark's width-256 what-if (densities 1 and 1/4, 3
    seeds). Only its printed output is tracked, so these rows have no interval or curvature."""
    text = WHATIF_W256.read_text().split("fitted optimum log2(lr)", 1)[1]
    found = {}
    for line in text.splitlines()[1:]:
        m = re.match(r"^\s*([0-9.]+)\s+(-?[0-9.]+)\s*$", line)
        if m:
            found[float(m[1])] = float(m[2])
        elif line.startswith("  ("):
            break
    dense = found[1.0]
    return pd.DataFrame([{"source": "whatif_width256", "corpus": "pystdlib", "param": "supar",
                          "width": 256, "base_width": 64, "density": d, "tokens": n_tokens,
                          "n_seeds": 3, "opt_log2_lr": o, "offset": o - dense}
                         for d, o in found.items()], columns=trust.COLUMNS)


def write_trust_data(path: Path, out: Path, scale: Scale) -> None:
    """The rule's rows: the science benchmark's reference LR runs (SP, µP, SμPar) and every
    recipe-keeping ablation that has run (TRUST_SOURCES)."""
    parts = [trust.measure(pd.read_csv(REFERENCE), source="science_reference",
                           corpus="pystdlib", tokens=tokens(BY_NAME["baseline"], scale))]
    # an ablation measured earlier whose study is not under `out` keeps its rows (as its
    # table rows do, --previous): the tracked data file is where they are kept
    kept = pd.read_csv(ROOT / trust.DATA_FILE) if (ROOT / trust.DATA_FILE).is_file() else None
    for name, corpus in TRUST_SOURCES.items():
        got = read(BY_NAME[name], out)
        if got is not None:
            parts.append(trust.measure(got[0], source=f"ablation_{name}", corpus=corpus,
                                       tokens=tokens(BY_NAME[name], scale)))
        elif kept is not None:
            parts.append(kept[kept["source"] == f"ablation_{name}"])
    parts.append(whatif_width256(tokens(BY_NAME["baseline"], scale)))
    df = trust.write_data(parts, path)
    print(f"wrote {path} ({len(df)} rows)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", choices=list(BY_NAME),
                   help="run these ablations only: " + ", ".join(BY_NAME))
    p.add_argument("--out", type=Path, default=ROOT / "results" / "ablations")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (width 64, 20 steps)")
    p.add_argument("--ends", action="store_true",
                   help="densities 1 and 1/64 only (half the runs): the spread between the "
                        "ends, where the baseline's whole drift lies")
    p.add_argument("--report-only", action="store_true", help="read what has run; run nothing")
    p.add_argument("--previous", type=Path, default=PREVIOUS, metavar="CSV",
                   help="an earlier ablations.csv: its ablations that have no study under --out "
                        "are reported from it (default: the tracked reference table; "
                        "--previous none: only what is under --out)")
    p.add_argument("--trust-data", type=Path, metavar="CSV",
                   help="also write the transfer-trust rule's data (spartune.trust) to CSV: "
                        "the science reference runs plus " + ", ".join(TRUST_SOURCES))
    a = p.parse_args()
    scale = QUICK if a.quick else FULL
    if a.ends:
        scale = replace(scale, densities=(scale.densities[0], scale.densities[-1]))
    out = a.out.resolve()
    chosen = [BY_NAME[n] for n in a.only] if a.only else ABLATIONS
    failed = []
    if not a.report_only:
        for ab in chosen:
            print(f"running {ab.name}: {ab.what}", flush=True)
            if run(ab, out, scale) != 0:
                failed.append(ab.name)
                print(f"  {ab.name} exited non-zero: see {out / 'logs' / (ab.name + '.log')}",
                      file=sys.stderr)

    rows = []
    if not a.quick:  # the science benchmark's own SμPar LR runs, all four densities
        ref = pd.read_csv(REFERENCE)
        ref = ref[ref["param"] == "supar"]
        rows.append(summarise("baseline_reference", ref, len(FULL.densities),
                              len(FULL.seeds)).assign(what=REFERENCE_WHAT,
                                                      command=REFERENCE_CMD,
                                                      n_densities=len(FULL.densities)))
    print("\n# results (SμPar, optimum log2 lr per density: parabola vertex [95% interval "
          "over seeds])")
    for ab in ABLATIONS:  # every ablation that has data, whatever ran now
        got = read(ab, out)
        if got is None:
            continue
        trials, densities, seeds = got
        ran = replace(scale, densities=densities, seeds=seeds)
        df = summarise(ab.name, trials, len(densities), len(seeds)).assign(
            what=ab.what, command=shlex.join(command(ab, out, ran)),
            n_densities=len(densities))
        if len(df):  # a study stopped before its first trial finished has nothing to report
            rows.append(df)
    have = {r["ablation"].iloc[0] for r in rows}
    if not a.quick and str(a.previous) != "none" and a.previous.is_file():
        prev = pd.read_csv(a.previous)  # written at 4 decimals: 1/64 reads back as 0.0156
        prev["density"] = prev["density"].map(
            lambda d: min(FULL.densities, key=lambda x: abs(x - d)))
        for name, g in prev.groupby("ablation", sort=False):
            if name not in have and name in BY_NAME:  # baseline_reference: re-fitted above
                ran = g["command"].str.replace(r"\s+# from \S+$", "", regex=True)
                rows.append(g.assign(command=ran + f"   # from {a.previous}"))
    for df in rows:
        print(spread_line(df, int(df["n_densities"].iloc[0])))
        print(f"  $ {df['command'].iloc[0]}")
    have = {r["ablation"].iloc[0] for r in rows}
    for ab in ABLATIONS:
        if ab.name not in have:
            stand_in = " (baseline_reference stands in)" if ab.name == "baseline" and \
                "baseline_reference" in have else ""
            print(f"{ab.name}: not run{stand_in}")
    for name, why in NOT_RUNNABLE.items():
        print(f"{name}: not run ({why})")
    if rows:
        table = pd.concat(rows, ignore_index=True)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "ablations.csv", index=False, float_format="%.4f")
        (out / "ablations.md").write_text(markdown(table, FULL.densities if not a.quick
                                                   else scale.densities) + "\n")
        # the figure leaves out cells that only the scouting seed has run: a one-seed argmin
        # so far is not an optimum (the table keeps them, marked not counted)
        fig = plot.ablation_optima(table[table["n_seeds"] >= table["n_seeds"].max()])
        paths = plot.save(fig, out / "ablation_optima")
        print(f"wrote {out / 'ablations.csv'}, {out / 'ablations.md'}, {paths[0]}")
    if a.trust_data:
        write_trust_data(a.trust_data, out, scale)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
