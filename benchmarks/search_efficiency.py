"""Optuna TPE + pruning vs the full grid on a fixed proxy task: training steps to a near-best loss.

Why: the point of a tuned search (the `proxy` sweep: TPE + median pruning) is to find as good
hyperparameters as an exhaustive grid for a fraction of its cost. Target: TPE + pruning comes
within 0.5% of the grid's best validation loss using <= 25% of the grid's total training steps
(median over sampler seeds).

The proxy task: SμPar, width 64 (= base width), density 1, depth 2, batch 16 x 64, the
`pystdlib` corpus (the project's default data, capped at 2 MB here), short runs. The box:
log2(lr) and log2(init_std), each over 6 octave-spaced grid points by default (a 6 x 6 grid).
Both sides are the real `spartune.sweep.sweep(cfg)` (workers=1, journal storage in a tmp
folder), read back with `spartune.collect.load_trials`. TPE searches the same box continuously.

Steps are counted from the trials: `steps` for a completed trial (fewer if it diverged), the
last reported step for a pruned one. For each sampler seed the figure is the cumulative steps
spent, in trial order, up to and including the first trial whose loss is within 0.5% of the
grid's best; divided by the grid's total steps (inf if never reached within the trial budget).
The last line's ratio is the median of that fraction over seeds (target <= 0.25); a median
that never reached the target within the trial budget prints as ratio=999.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
from _common import (  # noqa: E402
    bench_config,
    median,
    parser,
    print_machine,
    print_table,
    quiet_logs,
    timed,
    verdict,
)

from spartune.collect import load_trials, storage_for  # noqa: E402
from spartune.config import Config, SearchDim  # noqa: E402
from spartune.sweep import sweep  # noqa: E402

NAME = "search_efficiency"
TARGET_STEPS = 0.25
TARGET_GAP = 0.005
NOT_REACHED = 999.0  # printed ratio when the median seed never came within TARGET_GAP
# the log2 box: lr 2^-10 .. 2^-5, init_std 2^-6 .. 2^-1 (the optimum inside, not on an edge)
LR_LOG2 = (-10.0, -5.0)
STD_LOG2 = (-6.0, -1.0)


def study_config(root: Path, name: str, *, sampler: str, steps: int, points: int,
                 eval_every: int, n_trials: int, pruner: str, seed: int, data: str,
                 cache: Path) -> Config:
    cfg = bench_config(width=64, steps=steps, eval_every=eval_every, eval_batches=4, data=data,
                       threads=0)
    cfg.data.max_bytes = 2_000_000
    cfg.data.cache_dir = str(cache)
    cfg.results_dir = str(root)
    cfg.name = name
    s = cfg.study
    s.name, s.sampler, s.pruner, s.sampler_seed = name, sampler, pruner, seed
    s.n_trials, s.workers = n_trials, 1
    s.params, s.widths, s.densities, s.seeds = ["supar"], [64], [1.0], [0]
    octaves = (LR_LOG2[1] - LR_LOG2[0]) / (points - 1)
    octaves_std = (STD_LOG2[1] - STD_LOG2[0]) / (points - 1)
    grid = sampler == "grid"
    s.space = {
        "lr": SearchDim(low=2 ** LR_LOG2[0], high=2 ** LR_LOG2[1],
                        step=octaves if grid else None),
        "init_std": SearchDim(low=2 ** STD_LOG2[0], high=2 ** STD_LOG2[1],
                              step=octaves_std if grid else None),
    }
    return cfg


def trial_table(cfg: Config) -> pd.DataFrame:
    """Trials in order with the steps each one trained and its loss (NaN unless complete)."""
    root = Path(cfg.results_dir) / cfg.study.name
    trials, curves = load_trials(storage_for(root), cfg.study.name)
    last = curves.groupby("number")["step"].max()
    trials = trials.sort_values("number").reset_index(drop=True)
    steps = []
    for _, t in trials.iterrows():
        if t["state"] == "COMPLETE":
            steps.append(int(t["steps"]))
        elif t["state"] == "PRUNED":
            steps.append(int(last.get(t["number"], 0)))
        else:
            steps.append(0)
    trials["trained_steps"] = steps
    ok = (trials["state"] == "COMPLETE") & ~trials["diverged"]
    trials["loss"] = trials["value"].where(ok)
    return trials


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--points", type=int, default=None, help="grid points per dimension (6)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (100)")
    p.add_argument("--eval-every", type=int, default=None, help="report interval (20)")
    p.add_argument("--trials", type=int, default=None, help="TPE trial budget per seed (16)")
    p.add_argument("--seeds", type=int, default=None, help="sampler seeds (5)")
    p.add_argument("--pruner", default="median", choices=["median", "hyperband"])
    p.add_argument("--data", default="pystdlib", choices=["pystdlib", "synthetic"])
    p.add_argument("--show-grid", action="store_true", help="print the grid's losses")
    a = p.parse_args()
    quiet_logs()
    points = a.points or (2 if a.quick else 6)
    steps = a.steps or (6 if a.quick else 100)
    eval_every = a.eval_every or (3 if a.quick else 20)
    n_trials = a.trials or (3 if a.quick else 16)
    seeds = a.seeds or (1 if a.quick else 5)
    print_machine(f"{NAME}: TPE + {a.pruner} pruning vs full {points}x{points} grid over "
                  f"(lr, init_std), width 64, {steps} steps/run, {a.data} data")

    with tempfile.TemporaryDirectory(prefix="spartune-bench-") as tmp:
        root, cache = Path(tmp), Path(tmp) / "cache"
        common = dict(steps=steps, points=points, eval_every=eval_every, pruner=a.pruner,
                      data=a.data, cache=cache)
        gcfg = study_config(root, "grid", sampler="grid", n_trials=1, seed=0,
                            **{**common, "pruner": "none"})
        g_secs, _ = timed(lambda: sweep(gcfg))
        grid = trial_table(gcfg)
        if a.show_grid:
            table = grid.pivot_table(index="log2_lr", columns="log2_init_std", values="value")
            print(table.round(4).to_string())
        grid_steps = int(grid["trained_steps"].sum())
        grid_best = float(grid["loss"].min())
        target_loss = grid_best * (1 + TARGET_GAP)
        best = grid.loc[grid["loss"].idxmin()]
        print(f"# grid: {len(grid)} trials, {grid_steps} steps, {g_secs:.0f} s, best loss "
              f"{grid_best:.4f} at lr={best['lr']:.4g} init_std={best['init_std']:.4g}; "
              f"target <= {target_loss:.4f}", flush=True)

        rows, fractions = [], []
        for seed in range(seeds):
            cfg = study_config(root, f"tpe{seed}", sampler="tpe", n_trials=n_trials, seed=seed,
                               **common)
            secs, _ = timed(lambda cfg=cfg: sweep(cfg))
            tr = trial_table(cfg)
            cum = tr["trained_steps"].cumsum()
            hit = tr.index[tr["loss"] <= target_loss]
            to_target = int(cum[hit[0]]) if len(hit) else math.inf
            fraction = to_target / grid_steps
            fractions.append(fraction)
            best_loss = float(tr["loss"].min())
            rows.append([seed, len(tr), int((tr["state"] == "PRUNED").sum()),
                         int(tr["trained_steps"].sum()), best_loss,
                         100 * (best_loss / grid_best - 1),
                         to_target if math.isfinite(to_target) else "not reached",
                         fraction if math.isfinite(fraction) else "not reached", secs])
            print(f"  seed {seed} done", file=sys.stderr, flush=True)

    print_table(["sampler seed", "trials", "pruned", "steps (all trials)", "best loss",
                 "gap to grid best %", "steps to within 0.5%", "fraction of grid steps",
                 "seconds"], rows,
                title=f"TPE + {a.pruner} pruning, {n_trials} trials per seed; grid: "
                      f"{points * points} trials, {grid_steps} steps, best {grid_best:.4f}")
    ratio = median(fractions)
    verdict(NAME, min(ratio, NOT_REACHED), f"<={TARGET_STEPS}", ratio <= TARGET_STEPS)


if __name__ == "__main__":
    main()
