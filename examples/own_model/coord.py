"""Check the wiring: activation scale across widths and densities (spartune.coord_check).

    python coord.py                  # SP, µP, SμPar; prints the spreads and the verdict
    python coord.py --quick          # fewer cells and seeds (a smoke test)

Under SμPar every hidden quantity keeps its scale at any width and density (flat lines); SP
drifts with width and µP with density. A wrong role, a schedule that overwrites the group LRs,
or a missing output multiplier shows up here as a spread above the tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from model import GPT2Config, build
from train import batch, data

import spartune

BASE_WIDTH = 32
TAPS = {"embedding": ["transformer.wte", "transformer.wpe"], "attn": ["transformer.h.*.attn"],
        "mlp": ["transformer.h.*.mlp"], "logits": ["lm_head"]}


def make_model(*, width: int, density: float, param: str, seed: int):
    return build(width, base_width=BASE_WIDTH, param=param, density=density, seed=seed,
                 config=GPT2Config(n_positions=32))


def batches(gen: torch.Generator):
    return batch(data()[0], 8, 32, gen)


def main(quick: bool = False) -> bool:
    torch.set_flush_denormal(True)
    widths = [32, 64, 128] if quick else [32, 64, 128, 256]
    densities = [1.0, 0.25] if quick else [1.0, 0.25, 0.0625]
    result = spartune.coord_check(make_model, widths, densities, data=batches, taps=TAPS,
                                  seeds=[0, 1] if quick else [0, 1, 2],
                                  steps=5 if quick else 10, lr=0.01)
    print(result)
    out = Path("results/own_coord")
    out.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(out / "coord.csv", index=False)
    from spartune import plot

    for path in plot.save(plot.coord_figure(result.table), out / "coord_check"):
        print(f"wrote {path}")
    return result.passed


if __name__ == "__main__":
    sys.exit(0 if main("--quick" in sys.argv[1:]) else 1)
