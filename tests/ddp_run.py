"""One rank of a test's data-parallel run: `python -m torch.distributed.run ... ddp_run.py MODE
OVERRIDES_JSON OUT_DIR`. Each rank writes `OUT_DIR/rank<R>.json` with what the test compares.

MODE
  run      train.run_and_keep on the tiny config with OVERRIDES (tiny_config keywords); record
           the curve, the metrics, the steps reported (a resumed run reports only those after
           its checkpoint) and whether the masked weights and moments are exactly zero
  die      as run, but the process exits abruptly (os._exit) at the eval after step `die_at`:
           a crash after a checkpoint, for the resume test
  OVERRIDES may hold `only_rank1`: overrides that rank 1 alone applies (a mis-started rank).
  grad     one backward through DDP: the all-reduced gradient of every masked layer, checked
           against the mean of the ranks' own gradients and for zeros at masked entries
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import tiny_config  # noqa: E402
from spartune import distributed, train  # noqa: E402


def masked_zero(s: train.Setup) -> bool:
    from spartune.layouts import CompressedLinear

    for layer in s.model.hidden_layers():
        if isinstance(layer, CompressedLinear):
            continue  # stores only the kept entries: nothing masked to stay zero
        if layer.mask is None:
            continue
        off = ~layer.mask
        st = s.optimizer.state[layer.weight]
        if any(bool(torch.count_nonzero(t[off])) for t in
               (layer.weight.detach(), st["exp_avg"], st["exp_avg_sq"])):
            return False
    return True


def grad_check(over: dict) -> dict:
    """DDP's all-reduce and the mask's gradient hook compose: masked entries exactly 0."""
    cfg = tiny_config(**over)
    s = train.setup(cfg)
    d = distributed.init(s.device)
    net = None
    try:
        gen = torch.Generator().manual_seed(7)
        x, y = s.corpus.train_batch(cfg.train.batch_size, cfg.train.seq_len, gen)
        xs, ys = distributed.shard(x, d), distributed.shard(y, d)
        # this rank's own gradient, no DDP
        s.model.zero_grad(set_to_none=True)
        s.model(xs, ys)[1].backward()
        own = {i: lay.weight.grad.clone() for i, lay in enumerate(s.model.hidden_layers())}
        s.model.zero_grad(set_to_none=True)
        net = distributed.wrap(s.model, s.device, d)
        net(xs, ys)[1].backward()
        out = {"masked_layers": 0, "zero_at_masked": True, "mean_matches": True,
               "nonzero_at_kept": True}
        for i, lay in enumerate(s.model.hidden_layers()):
            if lay.mask is None:
                continue
            out["masked_layers"] += 1
            g = lay.weight.grad
            out["zero_at_masked"] &= not bool(torch.count_nonzero(g[~lay.mask]))
            out["nonzero_at_kept"] &= bool(torch.count_nonzero(g[lay.mask]))
            mean = own[i].clone()
            dist.all_reduce(mean)
            mean /= d.world_size
            out["mean_matches"] &= bool(torch.allclose(g, mean, rtol=1e-5, atol=1e-8))
        return out
    finally:
        # DDP's reducer must go before its process group: torn down after it, one rank can
        # hang for ever in the reducer's destructor (seen on CI)
        net = None
        gc.collect()
        dist.destroy_process_group()


def main() -> None:
    mode, over, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    rank = int(os.environ["RANK"])
    own = over.pop("only_rank1", {}) if rank == 1 else {}  # a rank started differently
    over.pop("only_rank1", None)
    over.update(own)
    if mode == "grad":
        res = grad_check(over)
    else:
        die_at = over.pop("die_at", None)
        ckpt = over.pop("checkpoint", None)

        reported: list[int] = []

        def report(step: int, loss: float) -> None:
            if mode == "die" and step > die_at:
                os._exit(3)  # no cleanup, no finally: as a kill would
            reported.append(step)

        cfg = tiny_config(**over)
        m, s = train.run_and_keep(cfg, report, out_dir=out / "run", checkpoint=ckpt)
        res = {"curve": m["curve"], "world_size": m["world_size"],
               "masked_zero": masked_zero(s), "final_val_loss": m["final_val_loss"],
               "mask_digest": distributed.mask_digest(s.model).hex(),
               "reported": reported}  # the eval steps this run trained to itself
    (out / f"rank{rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
