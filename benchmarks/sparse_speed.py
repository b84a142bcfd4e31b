"""Sparse targets that cost less: `compressed` vs `masked` hidden layers (target >= 1.5x at 1/64).

Why: under `masked` a density-1/64 model costs what the dense one costs (dense weights with
zeros, dense matmuls, dense AdamW moments). `compressed` stores only the non-zeros and uses CSR
kernels (layouts.py); `auto` picks per layer by a measured rule. This prints what each costs.

Whole training step (forward, backward, gradient clipping, fused AdamW, as `train.run` does it)
of the built-in GPT: width 1024 (base 64), depth 2, batch 8 x 128 tokens, SμPar, densities 1,
1/4, 1/16, 1/64; sides `masked`, `compressed` (not at density 1: nothing to compress) and
`auto`, built by `train.setup` (same seeds: the same model). Steps alternate A B C A B C on the
same batches after 2 untimed warm-up steps per side; figures are medians of per-round ratios.
Memory: the hidden layers' weights (+ mask or CSR indices), gradients and AdamW state after a
step, when all of them are alive at once (`layouts.describe`), compressed / masked.

Goals: at density 1/64 compressed >= 1.5x masked tokens/s (the last line's ratio) and hidden
weight + optimizer bytes <= 1/10 of masked's; auto >= 0.95x the faster of the two at every
density (printed as `# goal` lines above the last one).

`--rule` instead times one hidden layer's forward + backward alone, masked vs compressed, over
widths, the GPT's four hidden shapes and densities (1024 tokens): the table `layouts.choose`
was written from.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    add_step_options,
    bench_config,
    configure_process,
    median,
    paired_ratios,
    parser,
    print_machine,
    print_table,
    quiet_logs,
    verdict,
)

from spartune import train  # noqa: E402
from spartune.data import Corpus, load_corpus  # noqa: E402
from spartune.layouts import CompressedLinear, choose, describe  # noqa: E402
from spartune.sparsity import SparseLinear, random_mask  # noqa: E402

NAME = "sparse_speed"
TARGET = 1.5
MEMORY_TARGET = 0.1
AUTO_TARGET = 0.95
SIDES = ("masked", "compressed", "auto")
MiB = 2**20


class Stepper:
    """One side: a model and optimizer from `train.setup`, stepped as `train.run` steps."""

    def __init__(self, impl: str, width: int, density: float, batch: int, seq: int,
                 corpus: Corpus, threads: int) -> None:
        cfg = bench_config(width=width, density=density, batch_size=batch, seq_len=seq,
                           threads=threads)
        cfg.model.sparse_impl = impl
        self.cfg = cfg
        self.s = train.setup(cfg, corpus=corpus)
        for g in self.s.optimizer.param_groups:
            g["lr"] = cfg.optim.lr * g["lr_mult"]
        self.gen = torch.Generator().manual_seed(0)
        self.layouts = [r["impl"] for r in describe(self.s.model)]

    def step(self) -> float:
        """Seconds of one training step (the batch is drawn before the clock starts)."""
        t, s = self.cfg.train, self.s
        x, y = s.corpus.train_batch(t.batch_size, t.seq_len, self.gen)
        tic = time.perf_counter()
        _, loss = s.model(x, y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), self.cfg.optim.grad_clip)
        s.optimizer.step()
        loss.item()
        return time.perf_counter() - tic

    def memory(self) -> dict[str, int]:
        rows = describe(self.s.model, self.s.optimizer)
        return {k: sum(r[k] for r in rows) for k in ("param_bytes", "grad_bytes",
                                                     "optimizer_bytes")}


def measure_density(density: float, width: int, batch: int, seq: int, rounds: int,
                    corpus: Corpus, threads: int, warmup: int = 2) -> dict[str, Any]:
    sides = [s for s in SIDES if not (s == "compressed" and density >= 1)]
    steppers = {s: Stepper(s, width, density, batch, seq, corpus, threads) for s in sides}
    for st in steppers.values():  # warm-up: AdamW state, allocator, kernels
        for _ in range(warmup):
            st.step()
    times: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(rounds):
        for s, st in steppers.items():
            times[s].append(st.step())
        print(f"  density {density:g}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    tokens = batch * seq
    out: dict[str, Any] = {"density": density, "tokens": tokens}
    for s in sides:
        out[f"{s}_tok_s"] = tokens / median(times[s])
        out[f"{s}_mem"] = steppers[s].memory()
        out[f"{s}_layouts"] = steppers[s].layouts
    # per-round speed ratios (time ratios inverted): other side's time / this side's time
    out["compressed_x"] = (median(paired_ratios(times["masked"], times["compressed"]))
                           if "compressed" in times else float("nan"))
    out["auto_x_masked"] = median(paired_ratios(times["masked"], times["auto"]))
    if "compressed" in times:
        fastest = [min(a, b) for a, b in zip(times["masked"], times["compressed"], strict=True)]
    else:
        fastest = times["masked"]
    out["auto_x_best"] = median(paired_ratios(fastest, times["auto"]))
    del steppers
    gc.collect()
    print(f"# density {density:g}: tokens/s masked {out['masked_tok_s']:.0f}, compressed "
          f"{out.get('compressed_tok_s', float('nan')):.0f}, auto {out['auto_tok_s']:.0f}; "
          f"compressed/masked {out['compressed_x']:.3f}, auto/faster {out['auto_x_best']:.3f}; "
          f"per-round seconds " + "; ".join(f"{s} " + " ".join(f"{t:.2f}" for t in times[s])
                                            for s in sides), flush=True)
    return out


def layouts_label(names: list[str]) -> str:
    c = names.count("compressed")
    return f"{c}/{len(names)} compressed"


# -- --rule: one layer alone ------------------------------------------------------------------


def layer_pair(shape: tuple[int, int], density: float, tokens: int
               ) -> dict[str, Callable[[], float]]:
    d_out, d_in = shape
    mask = random_mask(shape, density, torch.Generator().manual_seed(0))
    masked = SparseLinear(d_in, d_out, role="hidden", density=density, mask=mask)
    masked.init_(0.02, torch.Generator().manual_seed(1))
    compressed = CompressedLinear.from_masked(masked)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(2))
    gy = torch.randn(tokens, d_out, generator=torch.Generator().manual_seed(3))

    def side(layer: torch.nn.Module) -> Callable[[], float]:
        def fn() -> float:
            xi = x.detach().requires_grad_(True)
            for p in layer.parameters():
                p.grad = None
            tic = time.perf_counter()
            layer(xi).backward(gy)
            return time.perf_counter() - tic
        return fn

    return {"masked": side(masked), "compressed": side(compressed)}


def rule_table(widths: list[int], densities: list[float], tokens: int, reps: int) -> None:
    rows = []
    for w in widths:
        shapes = {"qkv": (3 * w, w), "attn_out": (w, w), "mlp_up": (4 * w, w),
                  "mlp_down": (w, 4 * w)}
        for name, shape in shapes.items():
            for d in densities:
                sides = layer_pair(shape, d, tokens)
                for fn in sides.values():
                    fn()
                t: dict[str, list[float]] = {k: [] for k in sides}
                for _ in range(reps):
                    for k, fn in sides.items():
                        t[k].append(fn())
                speed = median(paired_ratios(t["masked"], t["compressed"]))
                rows.append([w, name, f"{shape[0]}x{shape[1]}", f"1/{round(1 / d)}",
                             1000 * median(t["masked"]), 1000 * median(t["compressed"]), speed,
                             choose(shape, d)])
            print(f"  width {w} {name} done", file=sys.stderr, flush=True)
    print_table(["width", "layer", "shape", "density", "masked ms", "compressed ms",
                 "compressed speed-up", "auto picks"], rows,
                title=f"one hidden layer, forward + backward on {tokens} tokens, medians of "
                      f"{reps} alternating reps (speed-up = masked time / compressed time)")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--width", type=int, default=None, help="model width (1024)")
    p.add_argument("--rounds", type=int, default=None, help="timed steps per side (7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (2)")
    p.add_argument("--densities", type=float, nargs="+", default=None,
                   help="densities (1 0.25 0.0625 0.015625)")
    p.add_argument("--rule", action="store_true", help="time single layers (the auto rule)")
    add_step_options(p)
    a = p.parse_args()
    configure_process(a.threads, a.denormals)
    quiet_logs()
    if a.rule:
        print_machine(f"{NAME} --rule: one layer, masked vs compressed, {a.threads} threads")
        widths = [128] if a.quick else [256, 512, 1024]
        dens = [1 / 64] if a.quick else [1 / 8, 1 / 16, 1 / 32, 1 / 64]
        rule_table(widths, dens, 128 if a.quick else 1024, 2 if a.quick else 5)
        return
    width = a.width or (128 if a.quick else 1024)
    batch, seq = (2, 32) if a.quick else (8, 128)
    densities = a.densities or ([1.0, 1 / 64] if a.quick else [1.0, 1 / 4, 1 / 16, 1 / 64])
    rounds = a.rounds or (2 if a.quick else 7)
    print_machine(f"{NAME}: whole training step, SμPar width {width} depth 2, batch {batch}x"
                  f"{seq}, masked vs compressed vs auto, {a.threads} threads, denormals "
                  f"{a.denormals}, {a.warmup} warm-up + {rounds} alternating rounds")
    corpus = load_corpus(bench_config().data)
    rows = [measure_density(d, width, batch, seq, rounds, corpus, a.threads, a.warmup)
            for d in densities]

    def mem(r: dict[str, Any], side: str, keys: tuple[str, ...]) -> float:
        m = r.get(f"{side}_mem")
        return float("nan") if m is None else sum(m[k] for k in keys) / MiB

    wo = ("param_bytes", "optimizer_bytes")
    allk = ("param_bytes", "grad_bytes", "optimizer_bytes")
    print_table(
        ["density", "masked tok/s", "compressed tok/s", "auto tok/s", "compressed / masked",
         "auto / faster", "auto layouts"],
        [[f"{r['density']:g}", r["masked_tok_s"], r.get("compressed_tok_s", float("nan")),
          r["auto_tok_s"], r["compressed_x"], r["auto_x_best"], layouts_label(r["auto_layouts"])]
         for r in rows],
        title="tokens/s of a whole step, medians; ratios: medians of per-round ratios",
    )
    print_table(
        ["density", "masked MiB (w+opt)", "compressed MiB (w+opt)", "ratio (w+opt)",
         "masked MiB (w+grad+opt)", "compressed MiB (w+grad+opt)", "ratio (all)"],
        [[f"{r['density']:g}", mem(r, "masked", wo), mem(r, "compressed", wo),
          mem(r, "compressed", wo) / mem(r, "masked", wo), mem(r, "masked", allk),
          mem(r, "compressed", allk), mem(r, "compressed", allk) / mem(r, "masked", allk)]
         for r in rows],
        title="hidden layers' memory after a step: weights (+ mask / CSR indices), gradients, "
              "AdamW state",
    )
    last = rows[-1]
    mem_ratio = mem(last, "compressed", wo) / mem(last, "masked", wo)
    worst_auto = min(r["auto_x_best"] for r in rows)
    print(f"# goal memory at density {last['density']:g}: compressed/masked weight+optimizer "
          f"bytes = {mem_ratio:.3f} target <={MEMORY_TARGET} "
          f"{'pass' if mem_ratio <= MEMORY_TARGET else 'fail'}")
    print(f"# goal auto: worst auto / faster side = {worst_auto:.3f} target >={AUTO_TARGET} "
          f"{'pass' if worst_auto >= AUTO_TARGET else 'fail'}")
    ratio = last["compressed_x"]
    verdict(NAME, ratio, f">={TARGET}", ratio >= TARGET)


if __name__ == "__main__":
    main()
