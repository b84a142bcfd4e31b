"""Peak memory of a run vs the model state it must hold, and what the masks cost (report only).

Why: a training run needs parameters + gradients + AdamW's two moments (16 bytes per float32
parameter); anything far above that (activations, temporaries, the interpreter and torch
themselves) is worth knowing before sizing a sweep with many workers. Sparse runs add a mask per
hidden layer: spartune keeps them as bool buffers (1 byte per weight, a quarter of a float32
copy). Since the mask-overhead fix the forward pass uses the weight itself (its masked entries
are exactly 0) and masks the gradient in place, so there is no float32 `weight * mask`
temporary per layer any more (before, autograd kept one per masked layer until backward).

Each run happens in a fresh subprocess (`--child`) so that peak RSS (`VmHWM` of
/proc/self/status, and `ru_maxrss`) belongs to that run alone: the child imports torch and
spartune (and `torch._dynamo`, which the first AdamW would import anyway: ~70 MiB that are the
library's, not the run's), builds the corpus, records its high-water mark, then runs
`spartune.train.run` for a few steps (width 512 by default, SμPar, batch 16 x 64, 2 threads)
and records it again. Runs: density 1 and density 1/16.

Reported: peak RSS / state bytes (params + grads + 2 moments), the same above the import
baseline, and for the sparse run the mask bytes vs a float32 copy of the masked weights.

The run's own memory (the `memory_state` line) judges the measured peak against the parameter +
optimizer bytes the run reports (a check on the mask dtype alone could only fail if the dtype
changed): (peak - import baseline) / state bytes, of the worse of the two runs, passes when
<= RUN_TARGET (measured 2.09 dense, 2.16 sparse at the defaults: the state itself, then
activations and temporaries; one more copy of the state or of the activations fails it), the
masks are <= 1/4 of a float32 copy, and the sparse run's peak is at most its masks plus half a
float32 copy of the masked weights above the dense run's (a float32 `weight * mask` temporary
per layer, the defect the mask-overhead fix removed, fails it). At --quick's width 64 the state
is too small to judge against (activations dominate): that line then says target=report.

Sharded vs replicated (the last line): the same sparse run (density 1/16) as 2 ranks under
torchrun, `train.parallel=fsdp` and `ddp`; each rank reports the bytes it holds itself
(`rank_param_bytes`: parameters + mask buffers, `rank_optimizer_bytes`: AdamW's state, read
from the local shards of the DTensors under fsdp). Ratio: the larger rank's fsdp bytes over the
larger rank's ddp bytes; target <= 0.55 (the ideal is 0.5; shards are torch.chunk splits of
dim 0, so an odd dim puts one row more on one rank). It passes if that holds and the
`memory_state` line passed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    THREADS,
    bench_config,
    parser,
    print_machine,
    print_table,
    verdict,
)

NAME = "memory"
MiB = 2**20
RUN_TARGET = 2.5  # (peak - import) / (params + grads + AdamW moments) at width 512


def high_water_bytes() -> int:
    """Peak resident set of this process so far: VmHWM, else ru_maxrss (KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(width: int, density: float, steps: int) -> dict[str, float]:
    """One run in this (fresh) process; the figures as a dict."""
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim imports it on the first optimizer: ~70 MiB)

    from spartune import train
    from spartune.data import load_corpus
    from spartune.sparsity import SparseLinear

    torch.set_num_threads(THREADS)
    cfg = bench_config(width=width, density=density, steps=steps, eval_batches=2)
    corpus = load_corpus(cfg.data)
    base = high_water_bytes()
    m = train.run(cfg, corpus=corpus)
    peak = high_water_bytes()
    peak_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = train.setup(cfg, corpus=corpus).model  # same seeds: the same model, for counting
    masks = [mod for mod in model.modules() if isinstance(mod, SparseLinear)]
    mask_bytes = sum(mod.mask.numel() * mod.mask.element_size()
                     for mod in masks if mod.mask is not None)
    masked_float = sum(mod.weight.numel() * 4 for mod in masks if mod.mask is not None)
    hidden_float = sum(mod.weight.numel() * mod.weight.element_size() for mod in masks)
    n_params = int(m["n_params"])
    return {"width": width, "density": density, "steps": int(m["steps"]),
            "n_params": n_params, "state_bytes": 16 * n_params, "base_bytes": base,
            "peak_bytes": peak, "peak_ru_bytes": peak_ru, "mask_bytes": mask_bytes,
            "masked_float_bytes": masked_float, "hidden_float_bytes": hidden_float}


def rank_child(parallel: str, width: int, density: float, steps: int, out: str) -> None:
    """One rank of a 2-rank run under torchrun: its own parameter and optimizer bytes."""
    import os

    import torch

    from spartune import train

    torch.set_num_threads(1)
    cfg = bench_config(width=width, density=density, steps=steps, eval_batches=1, threads=1)
    cfg.train.parallel, cfg.model.sparse_impl = parallel, "masked"
    m = train.run(cfg)
    rank = os.environ["RANK"]
    Path(out, f"{parallel}{rank}.json").write_text(json.dumps(
        {k: m[k] for k in ("rank_param_bytes", "rank_optimizer_bytes", "world_size",
                           "parallel", "n_params")}))


def run_ranks(parallel: str, width: int, density: float, steps: int) -> list[dict]:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", __file__, "--rank-child", parallel, str(width),
                        str(density), str(steps), out],
                       capture_output=True, text=True, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        return [json.loads(Path(out, f"{parallel}{r}.json").read_text()) for r in range(2)]


def run_child(width: int, density: float, steps: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(width), str(density), str(steps)],
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))))
        return
    if len(sys.argv) == 7 and sys.argv[1] == "--rank-child":
        rank_child(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]),
                   sys.argv[6])
        return
    p = parser(__doc__)
    p.add_argument("--width", type=int, default=None, help="model width (512)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (5)")
    a = p.parse_args()
    width = a.width or (64 if a.quick else 512)
    steps = a.steps or (2 if a.quick else 5)
    print_machine(f"{NAME}: peak RSS of a width-{width} run ({steps} steps, fresh subprocess) "
                  "vs params + grads + AdamW moments; masks at density 1/16")
    dense = run_child(width, 1.0, steps)
    sparse = run_child(width, 1 / 16, steps)
    rows = []
    for r in (dense, sparse):
        above = r["peak_bytes"] - r["base_bytes"]
        rows.append([r["width"], f"{r['density']:g}", r["n_params"], r["state_bytes"] / MiB,
                     r["base_bytes"] / MiB, r["peak_bytes"] / MiB, r["peak_ru_bytes"] / MiB,
                     r["peak_bytes"] / r["state_bytes"], above / r["state_bytes"],
                     r["mask_bytes"] / MiB])
    print_table(["width", "density", "params", "state MiB (16 B/param)", "RSS after import MiB",
                 "peak RSS MiB (VmHWM)", "peak ru_maxrss MiB", "peak / state",
                 "(peak - import) / state", "mask MiB"], rows,
                title="state = params + grads + 2 AdamW moments, float32")
    mask_frac = sparse["mask_bytes"] / sparse["masked_float_bytes"]
    extra = sparse["peak_bytes"] - dense["peak_bytes"]
    print_table(["masked layers' weights MiB (float32)", "masks MiB (bool)",
                 "mask / float copy", "peak RSS sparse - dense MiB"],
                [[sparse["masked_float_bytes"] / MiB, sparse["mask_bytes"] / MiB, mask_frac,
                  extra / MiB]],
                title="density 1/16: mask bytes vs a float32 copy of the masked weights")
    own = max((r["peak_bytes"] - r["base_bytes"]) / r["state_bytes"] for r in (dense, sparse))
    extra_ok = extra <= sparse["mask_bytes"] + 0.5 * sparse["masked_float_bytes"]
    print(f"# run's own peak / state: {own:.3f} (target <= {RUN_TARGET}); sparse peak above "
          f"dense: {extra / MiB:.1f} MiB (allowed: masks + half a float copy = "
          f"{(sparse['mask_bytes'] + 0.5 * sparse['masked_float_bytes']) / MiB:.1f} MiB)")
    judged = width >= 512  # activations, not the state, set the peak of a tiny model
    state_ok = mask_frac <= 0.25 and (not judged or (own <= RUN_TARGET and extra_ok))
    verdict(f"{NAME}_state", own, f"<={RUN_TARGET}" if judged else "report", state_ok)

    per = {p: run_ranks(p, width, 1 / 16, steps) for p in ("ddp", "fsdp")}
    rows = [[p, r, x["rank_param_bytes"] / MiB, x["rank_optimizer_bytes"] / MiB,
             (x["rank_param_bytes"] + x["rank_optimizer_bytes"]) / MiB]
            for p, xs in per.items() for r, x in enumerate(xs)]
    print_table(["parallel", "rank", "params + masks MiB", "AdamW state MiB", "total MiB"], rows,
                title=f"2 ranks, width {width}, density 1/16: bytes each rank holds")
    held = {p: max(x["rank_param_bytes"] + x["rank_optimizer_bytes"] for x in xs)
            for p, xs in per.items()}
    ratio = held["fsdp"] / held["ddp"]
    verdict(NAME, ratio, "<=0.55", ratio <= 0.55 and state_ok)


if __name__ == "__main__":
    main()
