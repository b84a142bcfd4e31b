"""The bracketing search vs the full grid over the same axis: the same optima for fewer runs.

Why: a stability study (`sweeps/lr_stability.yaml`) asks where each cell's optimal LR sits.
The full grid spends most of its runs far from any optimum; `study.sampler=bracket` walks
each cell's axis from a centre to a bracketed, half-step-refined minimum, scouting with the
first seed. Target: every cell's optimum within 0.25 octave of the grid's, using <= 40% of
the grid's runs.

The task: SμPar, width 32 (base width 32), depth 2, densities 1, 1/4, 1/16, seeds 0 and 1,
batch 16 x 64, the `pystdlib` corpus capped at 2 MB, 100-step runs of one thread (`--quick`:
3 steps on synthetic data over -8..-4, for the smoke test: its figures mean nothing). The
axis: log2(lr) from -12 to -2 in one-octave steps (11 points, the span a user sets when the
optimum's place is not known). Both sides are the real `spartune.sweep.sweep(cfg)` (one
worker, journal storage in a tmp folder), the bracket with continuation from the default
centre optim.lr = 0.01, and both optima are `analysis.optima`'s parabola vertex over the
points every seed ran. A cell whose grid optimum sits at the axis' edge has no optimum to
compare and fails the check.

The last line's ratio is bracket runs / grid runs (target <= 0.4); it passes only if every
cell's optimum also agrees within 0.25 octave.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    bench_config,
    parser,
    print_machine,
    print_table,
    quiet_logs,
    timed,
    verdict,
)

from spartune import analysis, bracket  # noqa: E402
from spartune.collect import load_trials, storage_for  # noqa: E402
from spartune.config import Config, SearchDim  # noqa: E402
from spartune.sweep import open_storage, sweep  # noqa: E402

NAME = "bracket_efficiency"
TARGET_RUNS = 0.4
TARGET_OCTAVES = 0.25
DENSITIES = [1.0, 0.25, 0.0625]
SEEDS = [0, 1]


def study_config(root: Path, name: str, *, sampler: str, steps: int, lo: int, hi: int,
                 data: str, cache: Path, width: int = 32) -> Config:
    # one thread per run: the figure is a count of runs, and a single thread keeps a run's
    # time steady on a loaded machine
    cfg = bench_config(width=width, steps=steps, eval_batches=4, data=data, threads=1)
    cfg.model.base_width = width
    cfg.data.max_bytes = 2_000_000
    cfg.data.cache_dir = str(cache)
    cfg.results_dir, cfg.name = str(root), name
    s = cfg.study
    s.name, s.sampler, s.pruner, s.workers = name, sampler, "none", 1
    s.params, s.widths, s.densities, s.seeds = ["supar"], [width], DENSITIES, SEEDS
    s.space = {"lr": SearchDim(low=2.0**lo, high=2.0**hi, step=1.0)}
    s.continuation = True
    cfg.optim.lr = 0.01
    return cfg


def run(cfg: Config) -> tuple[float, object]:
    secs, _ = timed(lambda: sweep(cfg))
    trials, _ = load_trials(storage_for(Path(cfg.results_dir) / cfg.study.name), cfg.study.name)
    return secs, trials


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="training steps per run (100)")
    p.add_argument("--data", default=None, choices=["pystdlib", "synthetic"],
                   help="pystdlib (synthetic with --quick)")
    a = p.parse_args()
    quiet_logs()
    steps = a.steps or (3 if a.quick else 100)
    a.data = a.data or ("synthetic" if a.quick else "pystdlib")
    lo, hi = (-8, -4) if a.quick else (-12, -2)
    print_machine(f"{NAME}: bracket vs full grid over log2(lr) {lo}..{hi}, SμPar width 32, "
                  f"densities {DENSITIES}, seeds {SEEDS}, {steps} steps/run, {a.data} data")
    with tempfile.TemporaryDirectory(prefix="spartune-bench-") as tmp:
        root, cache = Path(tmp), Path(tmp) / "cache"
        common = dict(steps=steps, lo=lo, hi=hi, data=a.data, cache=cache)
        gcfg = study_config(root, "grid", sampler="grid", **common)
        bcfg = study_config(root, "bracket", sampler="bracket", **common)
        g_secs, grid = run(gcfg)
        print(f"# grid: {len(grid)} runs, {g_secs:.0f} s", file=sys.stderr, flush=True)
        b_secs, brk = run(bcfg)
        notes = dict(zip([g.density for g in bracket.groups(bcfg)],
                         [p.status for _, p in bracket.status(bcfg, open_storage(bcfg))],
                         strict=True))
    by = ["param", "width", "density"]
    g_opt = analysis.optima(grid, "lr", by=by).set_index("density")
    b_opt = analysis.optima(brk, "lr", by=by).set_index("density")
    rows, agree = [], True
    for d in DENSITIES:
        g, b = g_opt.loc[d], b_opt.loc[d]
        gap = abs(b["fit_log2_lr"] - g["fit_log2_lr"])
        ok = (not g["at_edge"]) and notes[d] == "optimum" and gap <= TARGET_OCTAVES + 1e-9
        agree &= ok
        n_b = int((brk["density"] == d).sum())
        n_g = int((grid["density"] == d).sum())
        rows.append([d, g["fit_log2_lr"], f"[{g['fit_lo_log2_lr']:+.2f}, "
                     f"{g['fit_hi_log2_lr']:+.2f}]", b["fit_log2_lr"],
                     f"[{b['fit_lo_log2_lr']:+.2f}, {b['fit_hi_log2_lr']:+.2f}]", notes[d],
                     gap, n_g, n_b, "yes" if ok else "no"])
    print_table(["density", "grid optimum log2 lr", "grid 95% interval", "bracket optimum",
                 "bracket 95% interval", "bracket status", "octaves apart", "grid runs",
                 "bracket runs", "within 0.25"], rows,
                title=f"grid {len(grid)} runs in {g_secs:.0f} s; bracket {len(brk)} runs in "
                      f"{b_secs:.0f} s (the machine may be shared: times are for reading only)")
    ratio = len(brk) / len(grid) if len(grid) else math.inf
    verdict(NAME, ratio, f"<={TARGET_RUNS}", agree and ratio <= TARGET_RUNS)


if __name__ == "__main__":
    main()
