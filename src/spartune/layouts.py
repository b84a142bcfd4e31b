"""How a sparse hidden layer is stored and computed: `masked` or `compressed`, chosen per layer.

The math is one, Y = X (W ⊙ M)^T with a static mask M (SUPAR.md §2.1); the storage is a choice:

masked      `sparsity.SparseLinear`: a dense W with exact zeros at the masked positions, a bool
            mask buffer, dense matmuls, and a hook that masks W.grad. Costs what the dense layer
            costs (and AdamW keeps two dense moments).
compressed  `CompressedLinear`: only the non-zeros are stored (`values`, the one parameter, in
            row-major order of the mask) plus the CSR indices of the mask and of its transpose
            (buffers). Forward and input gradient are CSR x dense products (`torch.sparse.mm`),
            the weight gradient is `torch.sparse.sampled_addmm`, which computes dY^T X only at
            the mask's positions. The optimizer sees `values` alone, so AdamW's state is
            nnz-sized. It is the same update as masked: masked keeps W, its gradient and both
            moments exactly 0 off the mask (sparsity.py), so on the mask's positions both layouts
            run the same elementwise AdamW (weight decay included) on the same numbers; the
            gradient norm for clipping is the same sum over the same non-zeros.

One checkpoint format for both: a compressed layer's `state_dict` holds the dense `weight` and
the bool `mask`, exactly the keys a masked layer has, and loads them back (a load hook, so a
checkpoint saved under one layout loads under the other, in both directions). The rules
(params.py) never see which layout a layer has: the compressed layer carries the same `role`,
`density` and `residual` and its init draws the same dense normal as the masked one.

`auto` picks per layer by `choose`, a rule measured on a 2-core CPU (README, "Sparse layers that
cost less"; benchmarks/sparse_speed.py): compressed where the CSR kernels beat the dense
matmul by a margin, masked elsewhere, and masked on devices where the rule was not measured.

`apply_layout(model, impl)` converts every `SparseLinear` of any module in place, after its
masks and init are in place: the seam for a model parameterized elsewhere.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from spartune.params import Role
from spartune.sparsity import SparseLinear, mask_name

MASK_KEY = mask_name("weight")  # the masked layer's key: checkpoints load across layouts

IMPLS = ("masked", "compressed", "auto")

# torch announces CSR support as beta once per process; the kernels used here are stable ones.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

# -- the auto rule ---------------------------------------------------------------------------
# Measured with `benchmarks/sparse_speed.py --rule` on the 2-core CPU (README, "Sparse layers
# that cost less"): one layer's forward + backward on 1024 tokens, compressed vs masked, widths
# 256-1024, the GPT's four hidden shapes, densities 1/8-1/64. Compressed won by 1.4-2.7x at
# density 1/64 on every layer of >= 2^19 weights (1536 x 512 and up), by 1.1-1.7x at 1/32 on
# layers of >= 2^20 weights (1024 x 1024 and up) but not on smaller ones (0.87-1.36x), and lost
# or tied at 1/16 and 1/8 (0.3-1.3x, dense BLAS wins). Below 2^19 weights the fixed cost of the
# three sparse kernel calls and the transposes ate the gain (0.9-1.3x at 1/64, within noise).
# So: (fewest weights, highest density) pairs where compressed is picked; masked elsewhere.
AUTO_RULE = ((2**20, 1 / 32), (2**19, 1 / 64))
AUTO_DEVICES = ("cpu",)  # CUDA: not measured here; auto keeps masked there


def choose(shape: tuple[int, int], density: float, device: str | torch.device = "cpu") -> str:
    """`auto`'s pick for one hidden layer of shape (d_out, d_in) at `density` on `device`."""
    kind = torch.device(device).type
    if density >= 1.0 or kind not in AUTO_DEVICES:
        return "masked"
    numel = shape[0] * shape[1]
    fast = any(numel >= n and density <= d for n, d in AUTO_RULE)
    return "compressed" if fast else "masked"


# -- CSR helpers -----------------------------------------------------------------------------


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _crow(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers from the (sorted) row index of every non-zero."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def csr_of_mask(mask: Tensor) -> dict[str, Tensor]:
    """The CSR indices of a (d_out, d_in) bool mask and of its transpose.

    `t_perm[k]` is the position in row-major (CSR) order of the k-th non-zero of the transpose
    in its own row-major order, so `values[t_perm]` are the transpose's CSR values.
    """
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: the CSR order
    d_out, d_in = mask.shape
    t_perm = torch.argsort(cols * d_out + rows, stable=True)
    return {
        "crow": _crow(rows, d_out),
        "col": cols.contiguous(),
        "t_crow": _crow(cols[t_perm], d_in),
        "t_col": rows[t_perm].contiguous(),
        "t_perm": t_perm,
    }


class _CSRLinearFn(torch.autograd.Function):
    """Y = X W^T with W in CSR; gradients for X and for W's stored values only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, crow: Tensor, col: Tensor, t_crow: Tensor,
                t_col: Tensor, t_perm: Tensor, d_out: int, d_in: int) -> Tensor:
        w = _csr(crow, col, values, (d_out, d_in))
        ctx.save_for_backward(x, values, crow, col, t_crow, t_col, t_perm)
        ctx.size = (d_out, d_in)
        return torch.sparse.mm(w, x.t()).t().contiguous()  # (W X^T)^T, (N, d_out)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, values, crow, col, t_crow, t_col, t_perm = ctx.saved_tensors
        d_out, d_in = ctx.size
        gx = gv = None
        if ctx.needs_input_grad[0]:  # dX = dY W = (W^T dY^T)^T
            wt = _csr(t_crow, t_col, values[t_perm], (d_in, d_out))
            gx = torch.sparse.mm(wt, gy.t()).t().contiguous()
        if ctx.needs_input_grad[1]:  # dW = dY^T X, only at the mask's positions
            pattern = _csr(crow, col, values, (d_out, d_in))
            gv = torch.sparse.sampled_addmm(pattern, gy.t(), x, beta=0.0).values()
        return gx, gv, None, None, None, None, None, None, None


class CompressedLinear(nn.Module):
    """A hidden linear layer that stores and computes only the non-zeros of its static mask.

    Carries `role`, `density`, `residual` like `SparseLinear`, so the parameterization treats
    both alike. `values` is the trained parameter (one per non-zero, row-major order of the
    mask); the index buffers are not saved (the state dict holds the dense weight and the mask,
    the format a masked layer has).

    It answers what a masked layer answers, the same way: `weight` (the dense W ⊙ M, a detached
    copy: read it, train `values`), `mask` and `weight_mask` (the bool mask, shaped as `weight`).
    `transposed` is a layer that replaced HF's Conv1D, whose weight is stored (in, out): its
    `weight`, `mask` and checkpoint keys keep that layout, the computation is the same.
    """

    crow: Tensor
    col: Tensor
    t_crow: Tensor
    t_col: Tensor
    t_perm: Tensor

    def __init__(self, d_in: int, d_out: int, mask: Tensor, *, role: Role = "hidden",
                 bias: bool = False, density: float | None = None,
                 residual: bool = False, transposed: bool = False) -> None:
        super().__init__()
        self.transposed = transposed
        if mask.shape != (d_out, d_in) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a ({d_out}, {d_in}) bool tensor, got "
                             f"{tuple(mask.shape)} {mask.dtype}")
        self.in_features, self.out_features = d_in, d_out
        self.role: Role = role
        self.density = float(mask.float().mean()) if density is None else density
        self.residual = residual
        self._set_pattern(mask)
        self.values = nn.Parameter(torch.zeros(int(self.col.numel()), device=mask.device))
        self.bias = nn.Parameter(torch.zeros(d_out, device=mask.device)) if bias else None

    def _set_pattern(self, mask: Tensor) -> None:
        for name, t in csr_of_mask(mask).items():
            self.register_buffer(name, t, persistent=False)

    # -- conversion ----------------------------------------------------------------------------

    @classmethod
    def from_module(cls, layer: nn.Module, *, transposed: bool = False) -> CompressedLinear:
        """A user's masked nn.Linear (or, `transposed`, HF Conv1D: weight (in, out)) with its
        `weight_mask` buffer, compressed: the same non-zeros, mask and bias."""
        w, m = layer.weight, layer._buffers.get(MASK_KEY)
        if m is None:
            raise ValueError("a layer without a mask (density 1) has nothing to compress")
        if transposed:
            w, m = w.t(), m.t()
        d_out, d_in = w.shape
        bias = getattr(layer, "bias", None)
        new = cls(d_in, d_out, m.contiguous(), bias=bias is not None,
                  density=getattr(layer, "density", None), transposed=transposed)
        with torch.no_grad():
            new.values.copy_(w[m])
            if bias is not None:
                new.bias.copy_(bias)
        return new.to(dtype=w.dtype)

    @classmethod
    def from_masked(cls, layer: SparseLinear) -> CompressedLinear:
        """The same layer, compressed: the same non-zeros, mask, role, density and bias."""
        if layer.mask is None:
            raise ValueError("a layer without a mask (density 1) has nothing to compress")
        new = cls(layer.in_features, layer.out_features, layer.mask, role=layer.role,
                  bias=layer.bias is not None, density=layer.density, residual=layer.residual)
        with torch.no_grad():
            new.values.copy_(layer.weight[layer.mask])
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new.to(dtype=layer.weight.dtype)

    def to_masked(self) -> SparseLinear:
        """The same layer with dense storage (`SparseLinear`)."""
        if self.transposed:
            raise ValueError("a layer that replaced HF's Conv1D converts back through a state "
                             "dict (weight and weight_mask load into a masked Conv1D)")
        mask = self._mask()
        layer = SparseLinear(self.in_features, self.out_features, role=self.role,
                             bias=self.bias is not None, density=self.density,
                             residual=self.residual, mask=mask)
        layer.to(device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.dense_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def _rows(self) -> Tensor:
        return torch.repeat_interleave(
            torch.arange(self.out_features, device=self.crow.device), self.crow.diff())

    def _mask(self) -> Tensor:
        """The dense (d_out, d_in) bool mask (built on demand; not stored)."""
        m = torch.zeros(self.out_features, self.in_features, dtype=torch.bool,
                        device=self.col.device)
        m[self._rows(), self.col] = True
        return m

    @property
    def mask(self) -> Tensor:
        """The bool mask, shaped as `weight` (as `SparseLinear.mask`; built on demand)."""
        return self._mask().t() if self.transposed else self._mask()

    @property
    def weight_mask(self) -> Tensor:
        """The mask under the name a masked layer's buffer has (`weight_mask`)."""
        return self.mask

    @property
    def weight(self) -> Tensor:
        """W ⊙ M, dense and detached, in the layout of the layer it replaced: for reading
        (what trains is `values`)."""
        w = self.dense_weight()
        return w.t() if self.transposed else w

    def dense_weight(self) -> Tensor:
        """W ⊙ M as a dense (d_out, d_in) tensor (a copy, detached)."""
        w = self.values.new_zeros(self.out_features, self.in_features)
        w[self._rows(), self.col] = self.values.detach()
        return w

    # -- what the parameterization and the model ask of a hidden layer -------------------------

    @torch.no_grad()
    def init_(self, std: float, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) as `SparseLinear.init_` draws it (the same dense draw from the same
        generator), keeping the mask's entries: same seed, same init in either layout."""
        w = torch.empty(self.out_features, self.in_features, dtype=self.values.dtype)
        nn.init.normal_(w, mean=0.0, std=std, generator=generator)
        self.values.copy_(w.to(self.values.device)[self._rows(), self.col])
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def nonzero(self) -> int:
        return int(self.values.numel())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = _CSRLinearFn.apply(x.reshape(-1, shape[-1]), self.values, self.crow, self.col,
                               self.t_crow, self.t_col, self.t_perm, self.out_features,
                               self.in_features)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nonzero()}, bias={self.bias is not None}, role={self.role}, "
                f"density={self.density:g}")

    # -- one checkpoint format: dense weight + mask ------------------------------------------

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        destination[prefix + MASK_KEY] = self.mask
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list, unexpected_keys: list,
                              error_msgs: list) -> None:
        own = ["weight", MASK_KEY] + (["bias"] if self.bias is not None else [])
        for key in own:
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] not in own:
                    unexpected_keys.append(key)
        if prefix + "weight" not in state_dict or prefix + MASK_KEY not in state_dict:
            return
        weight, mask = state_dict[prefix + "weight"], state_dict[prefix + MASK_KEY]
        want = (self.in_features, self.out_features) if self.transposed else (
            self.out_features, self.in_features)
        if weight.shape != want or mask.shape != weight.shape:
            error_msgs.append(f"size mismatch for {prefix}weight/mask: checkpoint has "
                              f"{tuple(weight.shape)}, this layer is {want}")
            return
        if self.transposed:
            weight, mask = weight.t(), mask.t()
        with torch.no_grad():
            mask = mask.to(device=self.col.device, dtype=torch.bool)
            if not torch.equal(mask, self._mask()):  # another mask: adopt it, as masked does
                self._set_pattern(mask)
                self.values.data = self.values.new_zeros(int(mask.sum()))
            self.values.copy_(weight.to(self.values.device, self.values.dtype)[mask])
            if self.bias is not None and prefix + "bias" in state_dict:
                self.bias.copy_(state_dict[prefix + "bias"])


# -- choosing and converting ------------------------------------------------------------------

HiddenLayer = SparseLinear | CompressedLinear


def impl_of(layer: nn.Module) -> str:
    return "compressed" if isinstance(layer, CompressedLinear) else "masked"


def pick(layer: SparseLinear, impl: str, device: str | torch.device = "cpu") -> str:
    """The layout one masked layer gets under `impl` (a dense layer stays masked: no mask)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown sparse layout {impl!r}; choose one of {', '.join(IMPLS)}")
    if layer.mask is None or impl == "masked":
        return "masked"
    if impl == "compressed":
        return "compressed"
    return choose((layer.out_features, layer.in_features), layer.density, device)


def apply_layout(model: nn.Module, impl: str,
                 device: str | torch.device = "cpu") -> dict[str, str]:
    """Convert, in place, every `SparseLinear` of `model` that `impl` compresses.

    Call after masks and init are in place and before an optimizer is built (the optimizer
    must hold the new `values` parameters). Returns {layer name: layout} for every hidden layer.
    """
    chosen: dict[str, str] = {}
    for name, layer in list(model.named_modules()):
        if isinstance(layer, CompressedLinear):
            chosen[name] = "compressed"
        elif isinstance(layer, SparseLinear):
            chosen[name] = pick(layer, impl, device)
            if chosen[name] == "compressed":
                if not name:
                    raise ValueError("the model is itself a SparseLinear: use "
                                     "CompressedLinear.from_masked(layer)")
                _replace(model, name, CompressedLinear.from_masked(layer))
    return chosen


def to_masked(model: nn.Module) -> None:
    """Convert every `CompressedLinear` of `model` back to `SparseLinear`, in place."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, CompressedLinear):
            _replace(model, name, layer.to_masked())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def trained_weight(layer: HiddenLayer) -> nn.Parameter:
    """The parameter the optimizer trains: the dense weight, or the compressed values."""
    return layer.values if isinstance(layer, CompressedLinear) else layer.weight


def layer_bytes(layer: HiddenLayer, optimizer: torch.optim.Optimizer | None = None
                ) -> dict[str, int]:
    """Bytes a hidden layer holds: parameters + buffers (mask or indices), gradients, and the
    optimizer's state for its parameters."""
    def size(t: Tensor) -> int:
        return t.numel() * t.element_size()

    params = list(layer.parameters(recurse=False))
    opt = 0
    if optimizer is not None:
        for p in params:
            opt += sum(size(v) for v in optimizer.state.get(p, {}).values()
                       if isinstance(v, Tensor))
    return {
        "param_bytes": sum(size(p) for p in params)
        + sum(size(b) for b in layer.buffers(recurse=False)),
        "grad_bytes": sum(size(p.grad) for p in params if p.grad is not None),
        "optimizer_bytes": opt,
    }


def describe(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
             ) -> list[dict[str, Any]]:
    """One row per hidden layer: name, layout, shape, density, non-zeros, bytes."""
    rows = []
    for name, layer in model.named_modules():
        if isinstance(layer, SparseLinear | CompressedLinear):
            rows.append({"name": name, "impl": impl_of(layer),
                         "shape": [layer.out_features, layer.in_features],
                         "density": layer.density, "nnz": layer.nonzero(),
                         **layer_bytes(layer, optimizer)})
    return rows
