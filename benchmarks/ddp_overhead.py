"""Data-parallel overhead: 2 ranks x 1 thread vs 1 rank x 2 threads, same global batch (>= 0.9).

Why: a data-parallel run (`torchrun --nproc_per_node=N spartune-train ...`) must cost little
more than the same cores used by one process: each rank trains its half of every global batch
and DDP all-reduces the gradients once per step (gloo on a CPU). On 2 cores the fair comparison
is 2 single-threaded ranks against one process with 2 intra-op threads, both training the same
run (same config, same global batch 16 x 64, SμPar, density 1).

Both sides are `spartune.train.run` in fresh processes: the DDP side launched by torch's own
launcher (`python -m torch.distributed.run --standalone --nproc_per_node=2`), the other a plain
Python process; each prints rank 0's metrics. The figure is the step loop's tokens/s
(`tokens_per_second`: global tokens over train seconds, so process start-up and the process
group's rendezvous do not count). Sides alternate A B A B; the figure is the median of the
per-round ratios (DDP / one process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    alternate,
    bench_config,
    median,
    paired_ratios,
    parser,
    print_machine,
    print_table,
    quiet_logs,
    verdict,
)

NAME = "ddp_overhead"
TARGET = 0.9
HERE = Path(__file__).resolve()


def rank_run(width: int, steps: int, threads: int) -> None:
    """One rank (or the one process): train and, on rank 0, print the metrics as JSON."""
    from spartune import train

    quiet_logs()
    cfg = bench_config(width=width, steps=steps, threads=threads)
    m = train.run(cfg)
    if os.environ.get("RANK", "0") == "0":
        m.pop("curve")
        print("METRICS " + json.dumps(m), flush=True)


def side(width: int, steps: int, nproc: int, threads: int):  # noqa: ANN201
    args = [str(HERE), "--rank-run", str(width), str(steps), str(threads)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def fn() -> dict:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise SystemExit(f"{NAME}: side failed:\n{r.stderr[-2000:]}")
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("METRICS "))
        return json.loads(line.removeprefix("METRICS "))
    return fn


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--rank-run":
        rank_run(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    p = parser(__doc__)
    p.add_argument("--width", type=int, default=None, help="model width (128)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (100)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (3)")
    a = p.parse_args()
    width = a.width or (64 if a.quick else 128)
    steps = a.steps or (10 if a.quick else 100)
    rounds = a.rounds or (1 if a.quick else 3)
    print_machine(f"{NAME}: train.run, 2 gloo ranks x 1 thread vs 1 process x 2 threads, "
                  f"width {width}, batch 16x64 (global), {steps} steps, {rounds} rounds")
    res = alternate({"ddp": side(width, steps, 2, 1), "one": side(width, steps, 1, 2)},
                    rounds, warmup=0)
    ddp = [m["tokens_per_second"] for m in res["ddp"]]
    one = [m["tokens_per_second"] for m in res["one"]]
    assert all(m["world_size"] == 2 for m in res["ddp"])
    ratios = paired_ratios(ddp, one)
    ratio = median(ratios)
    print_table(
        ["side", "world size", "threads/rank", "tok/s (median)", "final train loss"],
        [["ddp", 2, 1, median(ddp), res["ddp"][-1]["final_train_loss"]],
         ["one process", 1, 2, median(one), res["one"][-1]["final_train_loss"]]],
        title="step-loop tokens/s (global batch per second of train time); ratio = ddp / one "
              "process, median of per-round ratios",
    )
    print("# per-round ratios: " + ", ".join(f"{r:.3f}" for r in ratios))
    verdict(NAME, ratio, f">={TARGET}", ratio >= TARGET)


if __name__ == "__main__":
    main()
