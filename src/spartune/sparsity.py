"""Static random unstructured sparsity: masks, and the linear layer that carries one.

The paper's sparse layer is Y = X (W ⊙ M) with a fixed random mask M (SUPAR.md §2.1). Here the
mask is a bool *buffer* of the layer, so `state_dict`, `.to(device)` and checkpoints carry it
(the reference code keeps it as a plain attribute, which DDP ranks and checkpoints lose,
SUPAR.md §2.3). It is drawn on the CPU from a seeded generator, so the same seed gives the same
mask on any device.

Why masked weights stay exactly zero, and why the forward pass can use W itself: `SparseLinear`
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

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spartune.params import Role


def random_mask(
    shape: tuple[int, int], density: float, generator: torch.Generator, kind: str = "per_row"
) -> Tensor:
    """A random (d_out, d_in) bool mask with the given density.

    kind:
      per_row    every output neuron keeps exactly max(1, round(density * d_in)) inputs, chosen at
                 random: the fan-in the SμPar derivation assumes (d_in * rho weights per neuron,
                 SUPAR.md §1.3), and no neuron is left with none at small width (§2.3 item 4).
      exact      exactly round(density * numel) entries kept, anywhere.
      bernoulli  i.i.d. Bernoulli(density) per entry (the reference code's choice).
    """
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


class SparseLinear(nn.Linear):
    """A linear layer with a role (SUPAR.md roles) and an optional static mask.

    `role`, `density` and `residual` are fixed at construction so that init and optimizer code
    never recover them from parameter names (STYLE_ANCHORS rule 3).
    """

    mask: Tensor | None

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
        if mask is not None and bool(mask.all()):
            mask = None  # density 1: no buffer, no per-step multiply
        self.register_buffer("mask", mask)
        if mask is not None:
            # A weak reference: the hook lives on the parameter, which the module owns; it reads
            # `self.mask` at call time so that `.to(device)` (which replaces the buffer) is seen.
            ref = weakref.ref(self)

            def mask_grad(param: Tensor) -> None:
                layer = ref()
                if layer is not None and layer.mask is not None and param.grad is not None:
                    # The bool mask viewed as uint8 (no copy): on CPU, float * uint8 avoids the
                    # slower bool type-promotion path of float * bool.
                    param.grad.mul_(layer.mask.view(torch.uint8))

            self.weight.register_post_accumulate_grad_hook(mask_grad)
            self.register_load_state_dict_post_hook(_zero_masked_after_load)

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
        # masked by the hook registered in __init__.
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the masked entries of W: for code that writes weights directly."""
        if self.mask is not None:
            self.weight.mul_(self.mask)

    def nonzero(self) -> int:
        """Weights that can be non-zero (the mask's count), for n_nonzero_params."""
        return self.weight.numel() if self.mask is None else int(self.mask.sum())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, role={self.role}, density={self.density:g}"


def _zero_masked_after_load(module: nn.Module, incompatible: Any) -> None:
    """A loaded state dict could carry non-zero masked entries (e.g. written by other code)."""
    if isinstance(module, SparseLinear):
        module.apply_mask_()


def expected_fan_in(d_in: int, density: float, kind: str = "per_row") -> float:
    """Expected non-zero inputs per neuron (WPN): d_in * rho, or the rounded per-row count."""
    if kind == "per_row" and density < 1:
        return float(max(1, round(density * d_in)))
    return d_in * density

