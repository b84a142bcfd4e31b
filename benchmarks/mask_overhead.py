"""What a static mask costs per training step: SμPar at density 1/16 vs density 1 (target <= 1.05).

Why: spartune's sparsity is simulated (dense matmuls on `weight * mask`), so a sparse run does
the same FLOPs as a dense one plus the masking. That extra must stay small, or a sparse sweep
costs more than the dense proxy it is compared with.

Both sides are `spartune.train.run(cfg)` at the same width, SμPar, batch 16 x 64, 2 torch
threads; only `model.density` differs (1/16 vs 1). The figure is the step time (the run's own
`train_seconds / steps`: the step loop without model build, mask drawing or evaluation),
median of per-round ratios sparse/dense over alternating rounds. The whole-run wall ratio
(which includes drawing the masks) is shown too.

The tables also say what masking costs: (1) the time of `weight * mask` for every masked layer,
forward and the same product again for the gradient in backward (2 per layer per step), timed
alone with the bool mask the model uses and with a float32 copy of the mask (for comparison);
(2) the parts of one step (forward+backward, gradient clipping, AdamW step) timed alone for
the dense and the sparse model, which shows where the rest of the difference is.

Threads (2) and denormal handling (flush-to-zero by default, `--denormals keep` for the CPU's
default) are set once for the process, before any torch op, so that both sides share them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    add_step_options,
    alternate,
    bench_config,
    configure_process,
    median,
    paired_ratios,
    parser,
    print_machine,
    print_table,
    quiet_logs,
    timed,
    verdict,
)

from spartune import train  # noqa: E402
from spartune.config import Config  # noqa: E402
from spartune.data import Corpus, load_corpus  # noqa: E402
from spartune.sparsity import SparseLinear  # noqa: E402

NAME = "mask_overhead"
TARGET = 1.05
DENSITY = 1 / 16


def mask_product_seconds(width: int, float_mask: bool, reps: int) -> float:
    """Seconds per step spent in `weight * mask` (forward + the same product for the gradient)
    over every masked layer of the density-1/16 model, median of `reps` timings."""
    cfg = bench_config(width=width, density=DENSITY, steps=1)
    model = train.setup(cfg, corpus=load_corpus(cfg.data)).model
    pairs = []
    for layer in model.modules():
        if isinstance(layer, SparseLinear) and layer.mask is not None:
            mask = layer.mask.float() if float_mask else layer.mask
            pairs.append((layer.weight.detach().clone(), mask))
    times = []
    for _ in range(reps + 1):
        tic = time.perf_counter()
        for w, mask in pairs:
            w * mask  # forward: the masked weight
            w * mask  # backward: grad_output * mask, same shapes and dtypes
        times.append(time.perf_counter() - tic)
    return median(times[1:])


PARTS = ("forward+backward", "clip_grad_norm_", "AdamW step")


def step_parts(width: int, reps: int, corpus: Corpus) -> dict[str, dict[str, float]]:
    """Median ms of each part of a training step, dense vs sparse, alternating per rep.

    Both models come from `train.setup` (same seeds, same optimizer); one fixed batch; the first
    3 reps (Adam state allocation) are not counted.
    """
    setups = {name: train.setup(bench_config(width=width, density=d), corpus=corpus)
              for name, d in (("dense", 1.0), ("sparse", DENSITY))}
    x, y = corpus.train_batch(16, 64, torch.Generator().manual_seed(0))
    times: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PARTS} for n in setups}
    for rep in range(reps + 3):
        for name, s in setups.items():
            t0 = time.perf_counter()
            _, loss = s.model(x, y)
            s.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), 1.0)
            t2 = time.perf_counter()
            s.optimizer.step()
            t3 = time.perf_counter()
            if rep >= 3:
                for part, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    times[name][part].append(1000 * dt)
    return {n: {p: median(v) for p, v in parts.items()} for n, parts in times.items()}


def measure(width: int, steps: int, rounds: int, corpus: Corpus,
            threads: int) -> dict[str, Any]:
    dense = bench_config(width=width, density=1.0, steps=steps, threads=threads)
    sparse = bench_config(width=width, density=DENSITY, steps=steps, threads=threads)

    def side(cfg: Config) -> Callable[[], tuple[float, float]]:
        def fn() -> tuple[float, float]:
            wall, m = timed(lambda: train.run(cfg, corpus=corpus))
            return wall, m["train_seconds"] / m["steps"]
        return fn

    res = alternate({"sparse": side(sparse), "dense": side(dense)}, rounds)
    s_wall, s_step = zip(*res["sparse"], strict=True)
    d_wall, d_step = zip(*res["dense"], strict=True)
    reps = 5 if steps < 20 else 20
    mul_bool = mask_product_seconds(width, float_mask=False, reps=reps)
    mul_float = mask_product_seconds(width, float_mask=True, reps=reps)
    d_ms = 1000 * median(d_step)
    ratios = paired_ratios(s_step, d_step)
    return {
        "width": width,
        "steps": steps,
        "dense_ms": d_ms,
        "sparse_ms": 1000 * median(s_step),
        "ratio": median(ratios),
        "ratios": ratios,
        "ratio_wall": median(paired_ratios(s_wall, d_wall)),
        "mul_bool_ms": 1000 * mul_bool,
        "mul_bool_pct": 100 * 1000 * mul_bool / d_ms,
        "mul_float_ms": 1000 * mul_float,
        "mul_float_pct": 100 * 1000 * mul_float / d_ms,
        "parts": step_parts(width, reps, corpus),
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--widths", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="steps per run, one per width (default 100 at 128, 25 at 512)")
    p.add_argument("--rounds", type=int, default=None)
    add_step_options(p)
    a = p.parse_args()
    configure_process(a.threads, a.denormals)
    quiet_logs()
    widths = a.widths or ([64] if a.quick else [128, 512])
    default_steps = {64: 8} if a.quick else {128: 100, 256: 50, 512: 25}
    steps = a.steps or [default_steps.get(w, 20) for w in widths]
    rounds = a.rounds or (2 if a.quick else 7)
    print_machine(f"{NAME}: SμPar density {DENSITY:g} vs 1 at the same width, batch 16x64, "
                  f"{a.threads} threads, denormals {a.denormals}, "
                  f"{rounds} alternating rounds")
    corpus = load_corpus(bench_config().data)
    rows = [measure(w, s, rounds, corpus, a.threads)
            for w, s in zip(widths, steps, strict=True)]
    print_table(
        ["width", "steps/run", "dense ms/step", f"d={DENSITY:g} ms/step", "ratio (step)",
         "ratio (whole run)", "w*mask ms/step (bool)", "% of dense step",
         "w*mask ms/step (float mask)", "% of dense step "],
        [[r["width"], r["steps"], r["dense_ms"], r["sparse_ms"], r["ratio"], r["ratio_wall"],
          r["mul_bool_ms"], r["mul_bool_pct"], r["mul_float_ms"], r["mul_float_pct"]]
         for r in rows],
        title="step time, medians; ratio = sparse/dense, median of per-round ratios; "
              "w*mask = forward + backward products over all masked layers, timed alone",
    )
    print_table(
        ["width", "part", "dense ms", f"d={DENSITY:g} ms", "sparse - dense ms"],
        [[r["width"], part, r["parts"]["dense"][part], r["parts"]["sparse"][part],
          r["parts"]["sparse"][part] - r["parts"]["dense"][part]]
         for r in rows for part in PARTS],
        title="where the difference is: parts of one step timed alone (same batch, medians)",
    )
    for r in rows:
        print(f"# width {r['width']}: per-round ratios "
              + ", ".join(f"{x:.3f}" for x in r["ratios"]))
    worst = max(r["ratio"] for r in rows)
    verdict(NAME, worst, f"<={TARGET}", worst <= TARGET)


if __name__ == "__main__":
    main()
