"""The coordinate check on HF GPT-2, tapping HF's own attention and MLP modules.

    python coord.py                  # SP, µP, SμPar; prints the spreads and the verdict
    python coord.py --quick          # fewer cells and seeds (a smoke test)

HF's attention modules return (output, weights): the check measures the first tensor. The
default loss is HF's `.loss` (the pair (x, x) is passed as model(x, labels=x)). Under SμPar
every hidden quantity keeps its scale at any width and density; SP drifts with width, µP with
density.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hf_model import build
from train import batch, data

import spartune

BASE_WIDTH = 32
TAPS = {"embedding": ["transformer.wte", "transformer.wpe"], "attn": ["transformer.h.*.attn"],
        "mlp": ["transformer.h.*.mlp"], "logits": ["lm_head"]}


def make_model(*, width: int, density: float, param: str, seed: int):
    return build(width, base_width=BASE_WIDTH, param=param, density=density, seed=seed,
                 n_positions=32)


def batches(gen: torch.Generator):
    x = batch(data()[0], 8, 32, gen)
    return x, x  # HF shifts the labels itself


def main(quick: bool = False) -> bool:
    torch.set_flush_denormal(True)
    widths = [32, 64, 128] if quick else [32, 64, 128, 256]
    densities = [1.0, 0.25] if quick else [1.0, 0.25, 0.0625]
    result = spartune.coord_check(make_model, widths, densities, data=batches, taps=TAPS,
                                  seeds=[0, 1] if quick else [0, 1, 2],
                                  steps=5 if quick else 10, lr=0.01)
    print(result)
    out = Path("results/hf_coord")
    out.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(out / "coord.csv", index=False)
    from spartune import plot

    for path in plot.save(plot.coord_figure(result.table), out / "coord_check"):
        print(f"wrote {path}")
    return result.passed


if __name__ == "__main__":
    sys.exit(0 if main("--quick" in sys.argv[1:]) else 1)
