"""Objectives for the failure-budget and fingerprint tests: no training, a loss in microseconds.

`quick` is a smooth loss of log2 lr (its minimum at 2^-7) that also depends on train.steps;
`raising` always raises; `flaky` raises the first time it meets each lr (a marker file per
point in `marks`), then succeeds; `no_args` cannot be called as fn(cfg, report).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def quick(cfg: Any, report: Any) -> dict[str, Any]:
    loss = 1.0 + abs(math.log2(cfg.optim.lr) + 7) + 10.0 / cfg.train.steps
    report(cfg.train.steps, loss)
    return {"final_val_loss": loss, "steps": cfg.train.steps}


def raising(cfg: Any, report: Any) -> dict[str, Any]:
    raise RuntimeError(f"broken at lr {cfg.optim.lr:g}")


def flaky(cfg: Any, report: Any, marks: str) -> dict[str, Any]:
    mark = Path(marks) / f"{cfg.optim.lr:.8f}-{cfg.seed}"
    if not mark.exists():
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
        raise OSError(f"flaky at lr {cfg.optim.lr:g}")
    return quick(cfg, report)


def no_args() -> dict[str, Any]:
    return {"final_val_loss": 1.0}
