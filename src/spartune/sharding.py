"""FSDP2 sharding of a parameterized model, with SμPar's masks, LR groups and multipliers intact.

`train.parallel=fsdp` (and a user's own model, examples/own_model) goes through `shard`:
PyTorch's public FSDP2 API (`torch.distributed.fsdp.fully_shard`) on every block, then on the
whole model. Each rank then holds 1/N of every parameter (a DTensor, Shard(0): rows of a
weight), of its gradient and of its AdamW moments. Where µP tools that keep their rules *on*
the parameters lose them here (fully_shard replaces every parameter object), spartune's rules
live outside them and are re-bound by name:

- **masks** are sharded like their weights: each `<param>_mask` buffer becomes a DTensor
  with the weight's mesh and placement, so a rank holds the mask rows of the weight rows it
  holds (1 byte per local weight, no full-size mask per rank);
- **masked gradients**: FSDP2 reduce-scatters the full gradient into the sharded parameter's
  `.grad`, then runs that parameter's post-accumulate-grad hooks (the same public hook the
  masked layout uses without sharding, sparsity.install_mask); the hook installed here
  multiplies the local gradient shard by the local mask shard. Masking is linear, so the
  mean-then-mask of FSDP equals DDP's mask-then-mean: masked entries of every shard's
  gradient, and so of both AdamW moments and of the weight, stay exactly 0 (tests/test_fsdp.py);
- **param groups**: the handle re-binds to the new parameters by name
  (`Parameterization.rebind`), so `param_groups` hands any optimizer the shards, with the same
  `lr_mult` and weight decay per name; the optimizer must be built *after* `shard`;
- **forward multipliers and the attention scale** are plain attributes of modules (or forward
  hooks on them), which fully_shard keeps: nothing to do.

The documented order for a model of your own:

    sm = spartune.parameterize(model, base=base, ...)      # masks, init, multipliers
    spartune.sharding.shard(model, blocks=model.transformer.h)  # under torchrun
    opt = torch.optim.AdamW(sm.param_groups(lr=...))        # after shard: the shards

Checkpoints of a sharded run are torch.distributed.checkpoint (DCP) folders (`save` /
`load`): each rank writes its shards; they load back into the same world size, or into one
process (DCP reshards to full tensors, masks included).

Compressed layers (values + CSR indices) are not sharded: config validation refuses
`model.sparse_impl=compressed` with fsdp, and `auto` resolves to masked.
"""

from __future__ import annotations

import shutil
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

SUFFIX = ".dcp"  # a sharded run's checkpoint folder: `checkpoint.pt` -> `checkpoint.dcp/`
_EXTRA = "extra.pt"  # the run's non-tensor state (step, curve, sampler RNG), rank 0's


def mp_policy(precision: str) -> Any:
    """FSDP2's mixed precision from `train.precision`: fp32 keeps everything fp32; bf16 / fp16
    gather the weights in that dtype for forward and backward and reduce-scatter gradients
    in fp32, so the sharded master weights, gradients and AdamW state stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(model: nn.Module, *, blocks: Iterable[nn.Module], precision: str = "fp32",
          reshard_after_forward: bool = True, device: str | torch.device | None = None,
          mesh: Any = None) -> nn.Module:
    """fully_shard every block, then the model (its embeddings, final norm and readout), in
    place; shard the masks beside their weights and re-bind the parameterization's handle.

    The root keeps its gathered weights after forward (backward needs them first);
    `reshard_after_forward` applies to the blocks. Needs an initialized process group
    (torchrun); `mesh` defaults to all its ranks on `device`'s type (default: the model's
    device). The model may sit on the CPU: each block moves to the mesh's device as it is
    sharded, so no rank ever holds the whole model there. Returns the model (an FSDPModule).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from spartune.parameterizer import parameterization

    if mesh is None:
        kind = torch.device(device if device is not None
                            else next(model.parameters()).device).type
        mesh = init_device_mesh(kind, (dist.get_world_size(),))
    mp = mp_policy(precision)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    shard_masks_(model)
    handle = parameterization(model) or getattr(model, "parameterization", None)
    if handle is not None:
        handle.rebind(model)
    return model


def reshard(model: nn.Module) -> None:
    """Free the gathered weights an inference forward left behind (the root keeps its own
    after forward, for backward): afterwards `model.parameters()` are the shards again, as
    the optimizer, checkpoints and byte counts expect. A no-op on a model not sharded."""
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()


def shard_masks_(model: nn.Module) -> int:
    """Give every `<param>_mask` buffer of a sharded parameter the parameter's placement, and
    mask the sharded gradient after FSDP's reduce-scatter. Returns how many masks it sharded.

    The mask rows a rank gets are those of its weight rows (both are DTensors on one mesh with
    one placement: torch.chunk's split along dim 0), checked shape for shape."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    n = 0
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            buf = f"{name}_mask"
            mask = mod._buffers.get(buf)
            if mask is None or not isinstance(p, DTensor) or isinstance(mask, DTensor):
                continue
            sharded = distribute_tensor(mask.to(p.to_local().device), p.device_mesh,
                                        p.placements)
            if sharded.to_local().shape != p.to_local().shape:
                raise RuntimeError(f"{name}: mask shard {tuple(sharded.to_local().shape)} does "
                                   f"not match its weight shard {tuple(p.to_local().shape)}")
            mod._buffers[buf] = sharded
            p.register_post_accumulate_grad_hook(_MaskShardGrad(mod, buf))
            n += 1
    return n


class _MaskShardGrad:
    """Multiply a sharded parameter's local gradient by its local mask shard, in place.

    FSDP2 calls it once the reduce-scatter has written (or accumulated into) `.grad`, before
    clipping and the optimizer see it. A weak reference to the module: the hook lives on the
    parameter, which the module owns."""

    def __init__(self, module: nn.Module, buf: str) -> None:
        self.module = weakref.ref(module)
        self.buf = buf

    @torch.no_grad()
    def __call__(self, p: Tensor) -> None:
        mod = self.module()
        mask = None if mod is None else mod._buffers.get(self.buf)
        if mask is not None and p.grad is not None:
            p.grad.to_local().mul_(mask.to_local().view(torch.uint8))


def local(t: Tensor) -> Tensor:
    """This rank's part of a tensor: a DTensor's local shard, any other tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def rank_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
               ) -> dict[str, int]:
    """Bytes this rank holds: parameters + buffers (masks), and the optimizer's state tensors.
    Sharded tensors count their local shard only, so under fsdp this is 1/N of ddp's."""
    def size(t: Tensor) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    opt = 0
    if optimizer is not None:
        opt = sum(size(v) for st in optimizer.state.values() for v in st.values()
                  if isinstance(v, Tensor))
    return {"rank_param_bytes": sum(size(p) for p in model.parameters())
            + sum(size(b) for b in model.buffers()),
            "rank_optimizer_bytes": opt}


def layer_rank_bytes(layer: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """layouts.layer_bytes for a sharded layer: this rank's shard of params, mask, grad, state."""
    def size(t: Tensor) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    params = list(layer.parameters(recurse=False))
    opt = 0
    if optimizer is not None:
        opt = sum(size(v) for p in params for v in optimizer.state.get(p, {}).values()
                  if isinstance(v, Tensor))
    return {"param_bytes": sum(size(p) for p in params)
            + sum(size(b) for b in layer.buffers(recurse=False)),
            "grad_bytes": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer_bytes": opt}


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_dir(path: Path) -> Path:
    """The DCP folder of a run whose one-file checkpoint would be `path`."""
    return path.with_suffix(SUFFIX)


def exists(folder: Path) -> bool:
    """A finished DCP checkpoint: DCP writes `.metadata` last, and `save` renames a folder
    into place only once every rank has written."""
    return (folder / ".metadata").is_file() and (folder / _EXTRA).is_file()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], *, is_main: bool) -> None:
    """Every rank writes its shards of model (masks included) and optimizer to a temporary
    folder; rank 0 adds `extra` and moves it into place: a run killed mid-save keeps the
    previous checkpoint. A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = folder.with_name(folder.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
    if is_main:
        torch.save(extra, tmp / _EXTRA)
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
         ) -> dict[str, Any]:
    """Load a DCP checkpoint into `model` (and `optimizer`): sharded under the same world
    size, or whole in one process without a process group (DCP reshards; the masks come
    back full-size and the load hook re-zeroes masked entries). Returns rank 0's `extra`.

    The optimizer must hold the model's parameters (built from `param_groups`); its state is
    materialized first by DCP's zero-LR step, then replaced by the saved one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    solo = not (dist.is_available() and dist.is_initialized())  # one process: say so to DCP
    if optimizer is None:
        sd: dict[str, Any] = {"model": model.state_dict()}
    else:
        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optimizer": osd}
    with warnings.catch_warnings():  # DCP warns that one process is what we asked for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=folder, no_dist=solo)
    if optimizer is None:
        set_model_state_dict(model, sd["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=sd["model"],
                       optim_state_dict=sd["optimizer"])
    return torch.load(folder / _EXTRA, weights_only=False)
