"""Which dim of a weight is its fan-in: a fact of each parameter, never a guess from position.

µP and SμPar are rules about fan-in and fan-out (SUPAR.md §1.2): m_d is a layer's fan-in over
the proxy's, a `per_row` mask keeps round(rho d_in) inputs per *output* neuron (§1.3), a weight
whose fan-in scales with width and fan-out does not is a readout. The storage order of a weight
is the module's choice, not a convention: `nn.Linear` keeps (out, in), Hugging Face's
`transformers.pytorch_utils.Conv1D` (GPT-2's projections) keeps (in, out), an embedding table is
(num, dim) and a convolution (out, in/groups, *kernel) or, transposed, (in, out/groups, *kernel).
`fan_dims` answers for one parameter of one module; `parameterize(..., fan_in={glob: dim})`
declares it for anything else. Kernel dims always belong to the fan-in (a conv's fan-in is
in * prod(kernel)). Recognising HF's Conv1D needs no `transformers` import: it is a module named
`Conv1D` whose weight is (nx, nf) with `nf` its output size.
"""

from __future__ import annotations

import math

from torch import nn

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_hf_conv1d(module: nn.Module | None) -> bool:
    """HF's Conv1D: y = x @ W + b with W stored (in, out), recognised by name and `nf`."""
    if module is None or type(module).__name__ != "Conv1D":
        return False
    w = getattr(module, "weight", None)
    return getattr(w, "ndim", 0) == 2 and getattr(module, "nf", None) == w.shape[1]


def fan_dims(module: nn.Module | None, ndim: int, declared: int | None = None
             ) -> tuple[int, int]:
    """(fan_out dim, fan_in dim) of a weight of `ndim` dims held by `module`.

    `declared` (a user's `fan_in=` entry; negative counts from the end) wins; it must be dim 0
    or 1, the fan-out being the other of the two (the rest are kernel dims, part of the fan-in).
    Vectors and scalars have no fan-in: (0, 0).
    """
    if ndim < 2:
        return 0, 0
    if declared is not None:
        d = declared + ndim if declared < 0 else declared
        if d not in (0, 1):
            raise ValueError(f"fan-in dim {declared} of a {ndim}-dim weight: must be dim 0 or 1 "
                             "(the fan-out is the other; further dims are kernel dims)")
        return 1 - d, d
    if isinstance(module, _EMBEDDINGS):
        return 1, 0  # (num, dim): a one-hot over `num` in, `dim` out
    if is_hf_conv1d(module) or isinstance(module, _TRANSPOSED_CONVS):
        return 1, 0  # (in, out) / (in, out/groups, *kernel)
    return 0, 1  # nn.Linear, nn.Bilinear, nn.ConvNd: (out, in, ...)


def fan_in_size(shape: tuple[int, ...], fan_in_dim: int) -> int:
    """Inputs per output neuron of a dense weight: the fan-in dim times any kernel dims."""
    if len(shape) < 2:
        return 1
    return math.prod(shape) // shape[1 - fan_in_dim]
