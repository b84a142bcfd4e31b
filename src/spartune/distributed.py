"""Data-parallel runs: torchrun's environment, the process group, and what ranks must agree on.

`torchrun --nproc_per_node=N --no-python spartune-train ...` (or the sweep's
`study.nproc_per_trial=N`) starts N copies of one run. Each reads its place from the
environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE), joins one process group (NCCL on
CUDA, gloo on a CPU) and trains its slice of every global batch; DDP averages the gradients.
What keeps such a run the same run as one process:

- every rank draws the *whole* global batch from the same seeded generator and keeps its own
  rows, so the data, its order and a resumed sampler are those of one process;
- `train.batch_size` is the global batch; a rank's share is batch_size / world_size, split again
  into micro-batches of `train.micro_batch_size` rows (gradient accumulation);
- every rank builds the same masks from the same seed, and `check_same_masks` proves it with a
  hash compared across ranks (a rank with another mask would train another sparse model, and
  DDP would silently average gradients of different networks);
- rank 0 alone writes metrics, curves and checkpoints, and is the one that reports to a sweep;
- evaluation sums token losses over the ranks' rows of each validation batch: the same number
  one process computes.

`train.parallel=fsdp` replaces the DDP replica with FSDP2 shards (sharding.py); everything
above holds for it too (same data split, masks checked before sharding, rank-0 I/O), except
checkpoints, which every rank writes (its shards, as a DCP folder).

Nothing here imports Optuna (a multi-process trial talks to the storage from rank 0 only).
"""

from __future__ import annotations

import gc
import hashlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from spartune.config import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process stands in its run: rank, world size, the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run created the process group, so it tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it; 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def under_torchrun() -> bool:
    """Started by torchrun (or a launcher that sets its variables), or inside a process group
    the caller made: where a sharded run can find its ranks."""
    return dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init(device: torch.device, *, group: bool = False) -> Dist:
    """Join torchrun's process group (NCCL for CUDA, gloo otherwise); a no-op for one process
    unless `group` (fsdp: fully_shard needs a group, even of one rank under torchrun).

    On CUDA each process trains on `cuda:LOCAL_RANK` of the devices the launcher made visible,
    so N ranks on one node use N GPUs. A group made by the caller (a test, a user's script) is
    used as it is.
    """
    world = env_world_size()
    if world <= 1 and not dist.is_initialized() and not group:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local, owns)


def close(d: Dist) -> None:
    """Tear down the group this run made, on every path out of a run (train.run_and_keep
    calls it in a `finally`), in this order:

    1. A DDP wrapper (or FSDP state) still held by a reference cycle is collected first: a
       reducer destroyed after its process group can hang one rank for ever.
    2. A barrier: every rank has left its last collective before any rank tears its end of
       the group down (rank 0 may still be writing metrics while rank 1 is done).
    3. destroy_process_group.

    Why it matters: a process that exits with its gloo group alive leaves the group's C++
    threads to the interpreter's exit, which destroys them still running: "terminate called
    without an active exception", SIGABRT. tests/fsdp_run.py's `tear` mode (fully_shard, ranks
    ending 0.5 s apart) measured 1 abort in 38 runs without this teardown, 0 in 18 with it
    (and 10 of 10 `spartune-train train.parallel=fsdp` runs in a row exit 0, tests/test_fsdp.py).
    A run that raised skips the barrier (a peer may never reach it): it exits non-zero anyway,
    and torchrun stops the other ranks."""
    if d.owns_group and dist.is_initialized():
        gc.collect()
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def per_rank_batch(batch_size: int, micro: int | None, d: Dist) -> tuple[int, int]:
    """(rows per rank, rows per micro-batch), or ConfigError naming the field to change."""
    if batch_size % d.world_size:
        raise ConfigError("train.batch_size", f"{batch_size} is not divisible by the "
                          f"{d.world_size} processes of this run; use a multiple of "
                          f"{d.world_size} (the global batch is split evenly across ranks)")
    local = batch_size // d.world_size
    mb = local if micro is None else micro
    if local % mb:
        raise ConfigError("train.micro_batch_size", f"{mb} does not divide the {local} rows "
                          f"each of the {d.world_size} processes trains per step "
                          f"(train.batch_size={batch_size} / {d.world_size}); use a divisor "
                          f"of {local} or null")
    return local, mb


def shard(x: Tensor, d: Dist) -> Tensor:
    """This rank's contiguous rows of a global batch."""
    if not d.active:
        return x
    n = x.shape[0] // d.world_size
    return x[d.rank * n:(d.rank + 1) * n]


def mask_digest(model: nn.Module) -> bytes:
    """SHA-256 of every mask, in module order: equal digests, equal sparse networks.

    Read from the state dict, where both layouts keep a hidden layer's mask under the same key
    (`<layer>.weight_mask`: a masked layer's buffer, a compressed layer's CSR pattern made
    dense), so the check does not depend on how the mask is stored."""
    h = hashlib.sha256()
    for name, buf in model.state_dict().items():
        if name.endswith("_mask"):
            if hasattr(buf, "full_tensor"):  # a sharded mask (fsdp): every rank calls this
                buf = buf.full_tensor()
            h.update(name.encode())
            h.update(buf.detach().to("cpu", torch.uint8).numpy().tobytes())
    return h.digest()


def check_same_masks(model: nn.Module, d: Dist) -> None:
    """Fail loudly unless every rank holds the same masks (compared by hash, not by shipping
    the masks): DDP would otherwise average gradients of different sparse networks."""
    if not d.active:
        return
    mine = mask_digest(model).hex()
    every: list[Any] = [None] * d.world_size
    dist.all_gather_object(every, mine)
    bad = [r for r, h in enumerate(every) if h != every[0]]
    if bad:
        raise RuntimeError(f"ranks {bad} hold different sparsity masks than rank 0: every rank "
                           "must build the model from the same model.mask_seed and config "
                           "(start all ranks with the same command)")


def broadcast_object(value: Any, d: Dist) -> Any:
    """Rank 0's value on every rank (e.g. a path only rank 0 knows, a decision)."""
    if not d.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(value: Tensor, d: Dist) -> Tensor:
    """Mean of a tensor over the ranks (in place on a copy)."""
    if not d.active:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / d.world_size


def all_sum(value: Tensor, d: Dist) -> Tensor:
    if not d.active:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def wrap(model: nn.Module, device: torch.device, d: Dist) -> nn.Module:
    """DDP around the model for a multi-rank run; the model itself otherwise.

    The mask's post-accumulate-grad hook runs inside autograd's AccumulateGrad, before DDP's
    reducer copies the gradient into its bucket: every rank contributes a masked gradient, and
    the all-reduced mean is exactly 0 at masked entries (tests/test_ddp.py checks it).
    `broadcast_buffers=False`: the only buffers are the masks, equal on every rank by check.
    """
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = None
    if device.type == "cuda":  # "cuda" alone means the current device, set by `init`
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DDP(model, device_ids=ids, broadcast_buffers=False)
