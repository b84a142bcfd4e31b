"""Static random unstructured sparsity: masks, how a layer carries one, the layout seam.

The paper's sparse layer is Y = X (W ⊙ M) with a fixed random mask M (SUPAR.md §2.1). Here the
mask is a bool *buffer* of the layer (`weight_mask`, installed by `install_mask` on any module:
the built-in `SparseLinear` or a user's `nn.Linear`), so `state_dict`, `.to(device)` and
checkpoints carry it (the reference code keeps it as a plain attribute, which DDP ranks and
checkpoints lose, SUPAR.md §2.3). It is drawn on the CPU from a seeded generator, so the
same seed gives the same mask on any device.

Why masked weights stay exactly zero, and why the forward pass can use W itself: `install_mask`
zeroes the masked entries at init (and on `load_state_dict`), so W == W ⊙ M bit for bit and
the forward computes X W^T with no product and no extra autograd node. The gradient is masked
instead: a post-accumulate-grad hook multiplies W.grad by M in place as soon as backward has
written it, i.e. before gradient clipping and the optimizer see it, and gives exactly the
gradient of X (W ⊙ M)^T (the product's backward is the same `grad * M`). So the gradient at a
masked entry is exactly 0; AdamW's moments of a zero gradient stay exactly 0 and its update
there is 0/(sqrt(0)+eps) = 0; decoupled weight decay multiplies the entry, 0 stays 0. Tests
check all of it. Cost: one in-place multiply per masked layer per step, instead of an
out-of-place product in forward plus another in backward (benchmarks/mask_overhead.py).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spartune.params import Role


def random_mask(
    shape: tuple[int, ...], density: float, generator: torch.Generator, kind: str = "per_row",
    fan_in_dim: int = 1,
) -> Tensor:
    """A random (d_out, d_in) bool mask with the given density.

    A weight of more than two dims (a convolution's (out, in, *kernel)) is masked as the 2-D
    (out, in * kernel) matrix of its fan-ins and given back in its own shape. `fan_in_dim` 0 is
    a weight stored (in, out, ...) (HF's Conv1D, a transposed conv: fanin.py): the mask is drawn
    for its (out, in, ...) view, so `per_row` still counts inputs per *output* neuron.

    kind:
      per_row    every output neuron keeps exactly max(1, round(density * d_in)) inputs, chosen at
                 random: the fan-in the SμPar derivation assumes (d_in * rho weights per neuron,
                 SUPAR.md §1.3), and no neuron is left with none at small width (§2.3 item 4).
      exact      exactly round(density * numel) entries kept, anywhere.
      bernoulli  i.i.d. Bernoulli(density) per entry (the reference code's choice).
    """
    if fan_in_dim == 0 and len(shape) >= 2:
        swapped = (shape[1], shape[0], *shape[2:])
        return random_mask(swapped, density, generator, kind).transpose(0, 1).contiguous()
    if len(shape) > 2:
        flat = (shape[0], math.prod(shape[1:]))
        return random_mask(flat, density, generator, kind).view(shape)
    d_out, d_in = shape
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    noise = torch.rand(shape, generator=generator)
    match kind:
        case "per_row":
            k = max(1, round(density * d_in))
            keep = noise.topk(k, dim=1).indices
            return torch.zeros(shape, dtype=torch.bool).scatter_(1, keep, True)
        case "exact":
            k = max(1, round(density * d_out * d_in))
            keep = noise.flatten().topk(k).indices
            return torch.zeros(d_out * d_in, dtype=torch.bool).scatter_(0, keep, True).view(shape)
        case "bernoulli":
            return noise < density
    raise ValueError(f"unknown mask kind {kind!r}; choose per_row, exact or bernoulli")


def mask_name(param_name: str) -> str:
    """The buffer holding a parameter's mask: `weight` -> `weight_mask` (torch.nn.utils.prune's
    convention, so a state dict reads the same to anyone who knows that module)."""
    return f"{param_name}_mask"


def install_mask(module: nn.Module, param_name: str, mask: Tensor) -> None:
    """Make `module.<param_name>` a statically masked parameter, in place (the `masked` layout).

    The mask becomes the buffer `<param_name>_mask` (so `state_dict`, `.to(device)`, DDP's
    buffer broadcast and checkpoints carry it); the masked entries of the parameter are zeroed
    now and after every `load_state_dict`; a post-accumulate-grad hook multiplies the gradient
    by the mask as soon as backward has written it (module docstring: why this keeps masked
    entries exactly zero under AdamW). The module's forward is not touched: its weight *is*
    W ⊙ M. An all-ones mask installs nothing (density 1: no buffer, no per-step multiply).
    """
    param = getattr(module, param_name)
    if not isinstance(param, nn.Parameter):
        raise TypeError(f"{type(module).__name__}.{param_name} is not a parameter")
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != parameter shape {tuple(param.shape)}")
    if bool(mask.all()):
        return
    buf = mask_name(param_name)
    if buf in module._buffers:
        raise ValueError(f"{type(module).__name__}.{param_name} already has a mask")
    module.register_buffer(buf, mask.to(device=param.device, dtype=torch.bool))
    with torch.no_grad():
        if param.device.type != "meta":
            param.mul_(getattr(module, buf))
    # A weak reference: the hook lives on the parameter, which the module owns; it reads the
    # buffer at call time so that `.to(device)` (which replaces the buffer) is seen.
    ref = weakref.ref(module)

    def mask_grad(p: Tensor) -> None:
        owner = ref()
        m = None if owner is None else owner._buffers.get(buf)
        if m is not None and p.grad is not None:
            # The bool mask viewed as uint8 (no copy): on CPU, float * uint8 avoids the slower
            # bool type-promotion path of float * bool.
            p.grad.mul_(m.view(torch.uint8))

    param.register_post_accumulate_grad_hook(mask_grad)
    if not getattr(module, "_spartune_load_hook", False):
        module.register_load_state_dict_pre_hook(_refuse_lost_nonzeros)
        module.register_load_state_dict_post_hook(_zero_masked_after_load)
        module._spartune_load_hook = True  # type: ignore[assignment]


@torch.no_grad()
def apply_masks_(module: nn.Module) -> None:
    """Zero the masked entries of every masked parameter of `module` itself (not children)."""
    for name, param in module.named_parameters(recurse=False):
        m = module._buffers.get(mask_name(name))
        if m is not None:
            param.mul_(m)


def _refuse_lost_nonzeros(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any,
                          strict: bool, missing: list, unexpected: list,
                          error_msgs: list) -> None:
    """A state dict that holds a masked weight but not its mask (saved by code that drops
    buffers, e.g. before parameterize) would be cut by this model's drawn mask after loading:
    refuse, naming the layer, instead of zeroing trained non-zeros (load_state_dict raises; the
    layer is left as it was). One that carries the mask loads it (and its zeros) as it is."""
    for name, _ in module.named_parameters(recurse=False):
        m = module._buffers.get(mask_name(name))
        w = state_dict.get(prefix + name)
        if m is None or w is None or prefix + mask_name(name) in state_dict:
            continue
        if tuple(w.shape) != tuple(m.shape) or w.device.type == "meta":
            continue
        lost = int(((w != 0) & ~m.to(w.device)).sum())
        if lost:
            state_dict.pop(prefix + name)  # (torch's own copy) the layer keeps its weight
            error_msgs.append(
                f"{prefix}{name}: the state dict has no {mask_name(name)}, and {lost} of its "
                "non-zeros lie outside this model's mask, which would zero them; load the "
                "weights into the model first and parameterize it with init=False (the mask is "
                "taken from their zeros), or save with the mask buffers")


def _zero_masked_after_load(module: nn.Module, incompatible: Any) -> None:
    """A loaded state dict could carry non-zero masked entries (e.g. written by other code)."""
    apply_masks_(module)


# Sparse layer layouts: how a hidden layer holds its mask. `masked` is dense storage with a
# masked gradient (above), applied in place by `parameterize` per hidden layer as
# `install(module, param_name, mask)`; `compressed` (layouts.py) replaces the module once masks
# and init are in place, and `auto` picks per layer (layouts.choose). The rule table does not
# know the layout: it gives init std and LR multipliers whatever the storage.
Layout = Callable[[nn.Module, str, Tensor], None]
LAYOUTS: dict[str, Layout] = {"masked": install_mask}


class SparseLinear(nn.Linear):
    """A linear layer with a role (SUPAR.md roles) and an optional static mask.

    `role`, `density` and `residual` are fixed at construction so that init and optimizer code
    never recover them from parameter names (STYLE_ANCHORS rule 3). The mask, when there is
    one, is installed by `install_mask` (here, or by `parameterize`): the buffer `weight_mask`.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        role: Role,
        bias: bool = False,
        density: float = 1.0,
        residual: bool = False,
        mask: Tensor | None = None,
    ) -> None:
        super().__init__(d_in, d_out, bias=bias)
        self.role: Role = role
        self.density = density
        self.residual = residual  # writes into the residual stream (attn out, mlp down)
        if mask is not None:
            install_mask(self, "weight", mask)

    @property
    def mask(self) -> Tensor | None:
        """The weight's bool mask, or None for a dense layer."""
        return self._buffers.get("weight_mask")

    @torch.no_grad()
    def init_(self, std: float, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) init; masked entries start (and so stay) exactly zero."""
        nn.init.normal_(self.weight, mean=0.0, std=std, generator=generator)
        if self.mask is not None:
            self.weight.mul_(self.mask)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        # W's masked entries are exactly 0 (module docstring), so W is W ⊙ M; the gradient is
        # masked by the hook `install_mask` registered.
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the masked entries of W: for code that writes weights directly."""
        apply_masks_(self)

    def nonzero(self) -> int:
        """Weights that can be non-zero (the mask's count), for n_nonzero_params."""
        return self.weight.numel() if self.mask is None else int(self.mask.sum())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, role={self.role}, density={self.density:g}"
