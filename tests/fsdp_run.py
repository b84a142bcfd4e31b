"""One rank of a test's sharded run: `python -m torch.distributed.run ... fsdp_run.py MODE
OVERRIDES_JSON OUT_DIR`. Each rank writes `OUT_DIR/rank<R>.json` with what the test compares.

MODE
  run   train.run_and_keep on the tiny config with OVERRIDES (tiny_config keywords, e.g.
        train__parallel="fsdp"); record the curve, the metrics, whether every masked entry of
        this rank's weight shards and AdamW moment shards is exactly zero, each parameter's
        (by name) LR, lr_mult and weight decay, and the shapes of the weight and mask shards
  die   as run, but the process exits abruptly (os._exit) at the first eval after `die_at`
  own   the example's own GPT-2 (examples/own_model): parameterize, fully_shard, train a few
        steps on this rank's rows of each batch; record the losses and masked-zero checks
  tear  the teardown probe: fully_shard two Linear layers, 3 steps, rank 1 ends 0.5 s after
        rank 0; then `distributed.close` (OVERRIDES {"close": true}) or exit with the group
        alive ({"close": false}). Run in a shell loop to count clean exits, e.g.
        for i in $(seq 10); do python -m torch.distributed.run --standalone \
          --nproc_per_node=2 tests/fsdp_run.py tear '{"close": false}' /tmp/t; echo $?; done
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from conftest import tiny_config  # noqa: E402
from spartune import distributed, sharding, train  # noqa: E402


def masked_zero(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[bool, int]:
    """Masked entries of this rank's weight, exp_avg and exp_avg_sq shards are all 0."""
    ok, n = True, 0
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            m = mod._buffers.get(f"{name}_mask")
            if m is None:
                continue
            n += 1
            off = ~sharding.local(m)
            st = opt.state[p]
            for t in (p.detach(), st["exp_avg"], st["exp_avg_sq"]):
                ok &= not bool(torch.count_nonzero(sharding.local(t)[off]))
    return ok, n


def lrs(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[float]]:
    """{parameter name: [lr, lr_mult, weight_decay]} of the group that trains it."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: [g["lr"], g["lr_mult"], g["weight_decay"]]
            for g in opt.param_groups for p in g["params"]}


def shards(model: torch.nn.Module) -> dict[str, list]:
    """{hidden weight: [global shape, local weight shape, local mask shape, placement]}."""
    out = {}
    for mod_name, mod in model.named_modules():
        m = mod._buffers.get("weight_mask")
        if m is not None:
            w = mod.weight
            out[mod_name] = [list(w.shape), list(sharding.local(w).shape),
                             list(sharding.local(m).shape), str(getattr(w, "placements", ""))]
    return out


def own(over: dict) -> dict:
    """A user's model, the documented order: parameterize, fully_shard, optimizer."""
    import torch.distributed as dist

    from own_model import model as example

    steps, rows = over.get("steps", 6), over.get("batch_size", 4)
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if ws > 1 else 0
    torch.manual_seed(0)
    net, sm = example.build(64, base_width=32, density=0.25, seed=0,
                            config=example.GPT2Config(n_positions=16, n_layer=2))
    counts = [sm.n_params(), sm.n_nonzero_params()]
    if ws > 1:
        example.shard(net)
        counts += [sm.n_params(), sm.n_nonzero_params()]  # on DTensor masks: every rank calls
    else:
        counts += counts
    opt = torch.optim.AdamW(sm.param_groups(lr=0.01, weight_decay=0.1), betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 256, (rows, 16), generator=gen)
        n = rows // ws
        xs = x[rank * n:(rank + 1) * n]
        _, loss = net(xs, xs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        total = loss.detach().clone()
        if ws > 1:
            dist.all_reduce(total)
        losses.append(float(total) / ws)
    zero, n_masked = masked_zero(net, opt)
    out = {"losses": losses, "masked_zero": zero, "masked_layers": n_masked, "counts": counts,
           "lrs": lrs(net, opt), "shards": shards(net)}
    if ws > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def tear(over: dict) -> None:
    import time

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    d = distributed.init(torch.device("cpu"), group=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    for layer in net:
        fully_shard(layer)
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    for _ in range(3):
        net(torch.randn(8, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
    if dist.get_rank() == 1:
        time.sleep(0.5)  # ranks that end at different times: the case that aborted
    if over.get("close", True):
        distributed.close(d)


def main() -> None:
    mode, over, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))
    if mode == "tear":
        tear(over)
        return
    if mode == "own":
        res = own(over)
    else:
        die_at = over.pop("die_at", None)
        ckpt = over.pop("checkpoint", None)

        def report(step: int, loss: float) -> None:
            if mode == "die" and step > die_at:
                os._exit(3)  # no cleanup, no finally: as a kill would

        cfg = tiny_config(**over)
        m, s = train.run_and_keep(cfg, report, out_dir=out / "run", checkpoint=ckpt)
        zero, n_masked = masked_zero(s.model, s.optimizer)
        res = {"curve": m["curve"], "world_size": m["world_size"], "parallel": m["parallel"],
               "resumed_step": m["resumed_step"], "masked_zero": zero,
               "masked_layers": n_masked, "lrs": lrs(s.model, s.optimizer),
               "shards": shards(s.model), "rank_param_bytes": m["rank_param_bytes"],
               "rank_optimizer_bytes": m["rank_optimizer_bytes"],
               "n_nonzero_params": m["n_nonzero_params"]}
    (out / f"rank{rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
