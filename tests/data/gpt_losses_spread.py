"""How far the built-in GPT's losses move from tests/data/gpt_losses.json on another CPU, and
how far a real change of the training path moves them: where test_parameterize.py's LOSS_RTOL
comes from.

Another CPU runs other vectorised kernels (and other MKL code paths), which sum in another
order. This machine can run each of ATen's kernel paths (ATEN_CPU_CAPABILITY=default, avx2,
avx512: read at torch's import, so each runs in a fresh interpreter) and another thread count;
the worst relative difference over the fixture's six cases is the spread. The sensitivity is
the same difference when the base LR is scaled by 1.0001 and 1.001: the smallest change the
check must still see.

    .venv/bin/python tests/data/gpt_losses_spread.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = json.loads((HERE / "gpt_losses.json").read_text())


def worst_difference(threads: int, lr_scale: float) -> tuple[float, float]:
    """(smallest, largest) over the cases of each case's worst relative loss difference."""
    sys.path.insert(0, str(HERE.parent))
    from conftest import tiny_config
    from spartune import train

    per_case = []
    for c in FIXTURE["cases"].values():
        cfg = tiny_config(train__steps=12, train__eval_every=4, **c["over"])
        cfg.train.threads = threads
        cfg.optim.lr *= lr_scale
        curve = train.run(cfg)["curve"]
        got = [r["train_loss"] for r in curve] + [r["val_loss"] for r in curve]
        ref = [float.fromhex(h) for h in c["train"] + c["val"]]
        per_case.append(max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True)))
    return min(per_case), max(per_case)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(worst_difference(int(sys.argv[2]), float(sys.argv[3]))))
        return
    runs = [("native kernels, 1 thread", {}, 1, 1.0), ("native kernels, 2 threads", {}, 2, 1.0)]
    runs += [(f"ATEN_CPU_CAPABILITY={cap}", {"ATEN_CPU_CAPABILITY": cap}, 1, 1.0)
             for cap in ("default", "avx2", "avx512")]
    runs += [(f"lr x {s}", {}, 1, s) for s in (1.0001, 1.001)]
    spread, change = 0.0, float("inf")
    print(f"{'run':32s} {'min over cases':>15s} {'max over cases':>15s}")
    for label, env, threads, scale in runs:
        out = subprocess.run([sys.executable, __file__, "--child", str(threads), str(scale)],
                             env={**os.environ, **env}, capture_output=True, text=True,
                             check=True)
        lo, hi = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label:32s} {lo:15.3g} {hi:15.3g}")
        if scale == 1.0:
            spread = max(spread, hi)
        else:
            change = min(change, lo)
    print(f"spread across kernels (max): {spread:.3g}; smallest LR change seen (min): "
          f"{change:.3g}; a tolerance must lie between them")


if __name__ == "__main__":
    main()
