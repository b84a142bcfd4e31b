"""What a sweep costs on top of its training runs: sweep wall time vs bare runs (target <= 3%).

Why: every trial of a study goes through Optuna (ask, report at each evaluation, tell with the
curve in user attrs), a journal file with a lock, and the budget count. For short proxy runs
that bookkeeping must stay a small fraction of the training itself.

Side A: `spartune.sweep.sweep(cfg)` of N trials (grid sampler over lr x init_std, workers=1,
journal storage in a fresh tmp folder each round). Side B: the same N configs (built with
`spartune.sweep.cell_config` from the same grid points) run with bare `spartune.train.run`
calls one after another in this process. Both at width 64, SμPar, synthetic data, 2 torch
threads. Sides alternate A B A B; the figure is the median of per-round ratios A/B (target
<= 1.03, i.e. at most 3% overhead).
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    THREADS,
    alternate,
    bench_config,
    median,
    paired_ratios,
    parser,
    print_machine,
    print_table,
    quiet_logs,
    set_threads,
    timed,
    verdict,
)

from spartune import train  # noqa: E402
from spartune.config import Config, SearchDim  # noqa: E402
from spartune.sweep import Cell, cell_config, grid_values, sweep  # noqa: E402

NAME = "orchestration_overhead"
TARGET = 1.03


def study_config(results_dir: str, *, lr_points: int, std_points: int, steps: int,
                 eval_every: int) -> Config:
    cfg = bench_config(width=64, steps=steps, eval_every=eval_every, eval_batches=2,
                       threads=THREADS)
    cfg.results_dir, cfg.name = results_dir, "overhead"
    s = cfg.study
    s.name, s.sampler, s.pruner, s.workers = "overhead", "grid", "none", 1
    s.params, s.widths, s.densities, s.seeds = ["supar"], [64], [1.0], [0]
    s.space = {
        "lr": SearchDim(values=[0.01 * 2.0**i for i in range(lr_points)]),
        "init_std": SearchDim(values=[0.02 * 2.0**i for i in range(std_points)]),
    }
    return cfg


def bare_configs(cfg: Config) -> list[Config]:
    """The run config of every grid point, exactly as the sweep builds them."""
    cell = Cell("supar", 64, 1.0, 0)
    names = list(cfg.study.space)
    axes = [[2.0**x for x in grid_values(n, cfg.study.space[n])] for n in names]
    return [cell_config(cfg, cell, dict(zip(names, combo, strict=True)))
            for combo in itertools.product(*axes)]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="steps per trial (60)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (5)")
    a = p.parse_args()
    quiet_logs()
    set_threads(THREADS)
    lr_points, std_points = (2, 1) if a.quick else (4, 3)
    steps = a.steps or (5 if a.quick else 60)
    eval_every = max(1, steps // 3)
    rounds = a.rounds or (2 if a.quick else 5)
    n = lr_points * std_points
    print_machine(f"{NAME}: sweep of {n} grid trials (workers=1, journal) vs {n} bare "
                  f"train.run calls, width 64, {steps} steps/trial, {THREADS} threads, "
                  f"{rounds} alternating rounds")

    with tempfile.TemporaryDirectory(prefix="spartune-bench-") as tmp:
        counter = itertools.count()
        template = study_config(tmp, lr_points=lr_points, std_points=std_points, steps=steps,
                                eval_every=eval_every)
        configs = bare_configs(template)

        def sweep_side() -> float:
            cfg = study_config(f"{tmp}/r{next(counter)}", lr_points=lr_points,
                               std_points=std_points, steps=steps, eval_every=eval_every)
            secs, out = timed(lambda: sweep(cfg))
            assert out["finished"] == n, out
            return secs

        def bare_side() -> float:
            secs, _ = timed(lambda: [train.run(c) for c in configs])
            return secs

        res = alternate({"sweep": sweep_side, "bare": bare_side}, rounds,
                        warmup=0 if a.quick else 1)
    ratios = paired_ratios(res["sweep"], res["bare"])
    ratio = median(ratios)
    sw, bare = median(res["sweep"]), median(res["bare"])
    print_table(
        ["trials", "steps/trial", "sweep s", "bare runs s", "overhead s/trial", "ratio",
         "overhead %"],
        [[n, steps, sw, bare, (sw - bare) / n, ratio, 100 * (ratio - 1)]],
        title="wall seconds, medians; ratio = sweep/bare, median of per-round ratios "
              f"({', '.join(f'{r:.3f}' for r in ratios)})",
    )
    verdict(NAME, ratio, f"<={TARGET}", ratio <= TARGET)


if __name__ == "__main__":
    main()
