"""A nanoGPT-style pre-LN GPT whose layers know their SμPar role from construction.

Embedding (token + learned position) -> `depth` blocks of [LN, causal self-attention, LN,
GELU MLP 4x] -> LN -> unembedding. Every hidden projection (QKV, attention out, MLP up, MLP
down) is a `SparseLinear`; embeddings, the output layer, norms and biases stay dense
(SUPAR.md §2.1). The model itself is plain: `build_model` applies the parameterization through
the public `parameterize` (the same path a user's own model takes), with the roles the layers
were built with, so masks, init std, Adam LR multipliers and the forward multipliers (held by
`Embedder`, `Attention` and `Unembed`, which apply them themselves) all come from the one rule
table in `params.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spartune.config import ModelConfig, ParamConfig
from spartune.layouts import CompressedLinear, HiddenLayer, apply_layout, trained_weight
from spartune.parameterizer import Parameterization, parameterize
from spartune.params import Role
from spartune.sparsity import SparseLinear

# A hidden layer is masked (dense storage) or compressed (non-zeros only): layouts.py. The rules
# below read role, density and residual, which both layouts carry.
HIDDEN = (SparseLinear, CompressedLinear)

log = logging.getLogger(__name__)


def _tag(module: nn.Module, role: Role) -> nn.Module:
    module.role = role  # type: ignore[assignment]
    return module


class Embedder(nn.Module):
    """alpha_input * (token embedding + position embedding) (SUPAR.md §1.2, row 1)."""

    def __init__(self, vocab_size: int, width: int, max_len: int, mult: float) -> None:
        super().__init__()
        self.wte = _tag(nn.Embedding(vocab_size, width), "embedding")
        self.wpe = _tag(nn.Embedding(max_len, width), "embedding")
        self.mult = mult

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        return x if self.mult == 1.0 else self.mult * x  # alpha 1: no op to pay for


class Attention(nn.Module):
    """Causal self-attention with the parameterization's logit scale (1/sqrt(d) or 1/d)."""

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        w = m.width
        self.n_head, self.head_size = m.n_head, m.head_size
        self.qkv = SparseLinear(w, 3 * w, role="hidden", bias=m.bias,
                                density=m.density_of("qkv"))
        self.proj = SparseLinear(w, w, role="hidden", bias=m.bias, residual=True,
                                 density=m.density_of("attn_out"))
        # Set by build_model from the parameterization: µP family QK^T / d_head (SUPAR.md §1.2,
        # last row); SP QK^T / sqrt(d_head).
        self.scale = m.head_size**-0.5

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_size).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=self.scale,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        h = m.mlp_ratio * m.width
        self.up = SparseLinear(m.width, h, role="hidden", bias=m.bias,
                               density=m.density_of("mlp_up"))
        self.down = SparseLinear(h, m.width, role="hidden", bias=m.bias, residual=True,
                                 density=m.density_of("mlp_down"))

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.ln1 = _tag(nn.LayerNorm(m.width, bias=m.bias), "norm")
        self.attn = Attention(m)
        self.ln2 = _tag(nn.LayerNorm(m.width, bias=m.bias), "norm")
        self.mlp = MLP(m)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Unembed(nn.Module):
    """logits = (mult * h) W^T, mult = alpha_output / m_d under µP and SμPar (§1.2, row 3).

    Applied in training *and* inference (the reference code drops it in `generate`, §2.3).
    `weight` is the token embedding when tied, else an own dense parameter.
    """

    def __init__(self, width: int, vocab_size: int, mult: float, tied: nn.Embedding | None):
        super().__init__()
        self.mult = mult
        self.tied = tied is not None
        if tied is not None:
            self.weight = tied.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, width))
        _tag(self, "output")

    def forward(self, h: Tensor) -> Tensor:
        # A scalar commutes with the matmul: scale whichever side is smaller (width or vocab).
        if self.mult == 1.0:
            return F.linear(h, self.weight)
        if h.shape[-1] <= self.weight.shape[0]:
            return F.linear(h * self.mult, self.weight)
        return F.linear(h, self.weight) * self.mult


class GPT(nn.Module):
    """The structure only; `build_model` parameterizes it (masks, init, LR groups, multipliers).
    """

    def __init__(self, m: ModelConfig, *, vocab_size: int, max_len: int) -> None:
        super().__init__()
        self.model_cfg = m
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = Embedder(vocab_size, m.width, max_len, 1.0)
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.depth))
        self.ln_f = _tag(nn.LayerNorm(m.width, bias=m.bias), "norm")
        self.unembed = Unembed(m.width, vocab_size, 1.0,
                               self.embed.wte if m.tie_embeddings else None)
        self.parameterization: Parameterization | None = None

    # -- structure ---------------------------------------------------------------------------

    def hidden_layers(self) -> Iterator[HiddenLayer]:
        for mod in self.modules():
            if isinstance(mod, HIDDEN):
                yield mod

    def tap_modules(self) -> dict[str, list[nn.Module]]:
        """Modules whose outputs the coordinate check measures, by quantity."""
        return {
            "embedding": [self.embed],
            "attn": [b.attn for b in self.blocks],
            "mlp": [b.mlp for b in self.blocks],
            "logits": [self.unembed],
        }

    def roles(self) -> dict[str, Role]:
        """Every parameter's role, from the role its module was built with (not from names).
        The tied unembedding is the embedding's parameter: it has no entry of its own."""
        out: dict[str, Role] = {}
        for mod_name, mod in self.named_modules():
            role = getattr(mod, "role", None)
            for leaf, _ in mod.named_parameters(recurse=False, prefix=mod_name):
                name = leaf
                if role == "hidden" or role == "norm":
                    out[name] = "bias" if name.endswith(".bias") else role
                elif role in ("embedding", "output"):
                    out[name] = role
        return out

    def n_params(self) -> int:
        """Parameters of the architecture: a compressed layer counts its dense shape too."""
        dropped = sum(layer.in_features * layer.out_features - layer.nonzero()
                      for layer in self.hidden_layers() if isinstance(layer, CompressedLinear))
        return sum(p.numel() for p in self.parameters()) + dropped

    def n_nonzero_params(self) -> int:
        """Parameters that can be non-zero: masked entries of hidden weights do not count."""
        masked = sum(layer.in_features * layer.out_features - layer.nonzero()
                     for layer in self.hidden_layers())
        return self.n_params() - masked

    # -- the parameterization ------------------------------------------------------------------

    def param_groups(self, weight_decay: float, *, wd_independent: bool = False) -> list[dict]:
        """AdamW groups from the parameterization, each with an `lr_mult` (SUPAR.md §1.2 row 2):
        the schedule sets the base LR and groups multiply. See `Parameterization.param_groups`.
        """
        if self.parameterization is None:
            raise RuntimeError("build the GPT with build_model: it has no parameterization")
        groups = self.parameterization.param_groups(1.0, weight_decay,
                                                    wd_independent=wd_independent)
        for g in groups:
            del g["lr"]  # the optimizer's lr is eta_base; the training loop multiplies lr_mult
        return groups

    # -- forward -----------------------------------------------------------------------------

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.unembed(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        return logits, loss


def build_model(m: ModelConfig, p: ParamConfig, *, vocab_size: int, max_len: int,
                seed: int, mask_seed: int, device: str | torch.device = "cpu") -> GPT:
    """Build on the CPU and parameterize it through `parameterize`: masks and init from seeded
    generators (same seeds, same model), multipliers from the rule table.

    The base is the same GPT at `model.base_width` (only its shapes are read), so each
    layer's m_d is its fan_in over the base's; roles are the ones the layers were built with,
    so a proxy at its own base width needs no shape inference.

    Then each hidden layer gets its layout (`m.sparse_impl`; `auto` decides for the `device`
    the model will run on, layouts.choose): a compressed layer keeps the masked init values,
    and the parameterization hands the optimizer its non-zero `values` instead of the weight.
    """
    model = GPT(m, vocab_size=vocab_size, max_len=max_len)
    # The base is small (the proxy's width), so it is built on the CPU: the meta device would
    # import torch._dynamo (seconds) on its first use in a process, i.e. in every sweep worker.
    # Its throw-away default init must not move torch's global RNG.
    rng = torch.get_rng_state()
    base = GPT(replace(m, width=m.base_width), vocab_size=vocab_size, max_len=max_len)
    torch.set_rng_state(rng)
    density = {"blocks.*.attn.qkv": m.density_of("qkv"),
               "blocks.*.attn.proj": m.density_of("attn_out"),
               "blocks.*.mlp.up": m.density_of("mlp_up"),
               "blocks.*.mlp.down": m.density_of("mlp_down")}
    sm = parameterize(
        model, base=base, param=p.name, density=density, init_std=m.init_std,
        alpha_input=p.alpha_input, alpha_output=p.alpha_output, base_density=p.base_density,
        roles=model.roles(),
        residual=("blocks.*.attn.proj", "blocks.*.mlp.down") if p.depth_init_scale else (),
        depth=m.depth if p.depth_init_scale else None,
        mask_kind=m.mask_kind, mask_seed=mask_seed, seed=seed, forward_hooks=False,
        attention="none",  # Attention.scale, set below
    )
    # The GPT applies its multipliers itself (Unembed scales the smaller side of its matmul).
    model.embed.mult, model.unembed.mult = sm.input_mult, sm.output_mult
    for block in model.blocks:
        block.attn.scale = sm.attention_scale(m.head_size)
    model.parameterization = sm
    for name, layout in apply_layout(model, m.sparse_impl, device).items():
        if layout == "compressed":
            layer = model.get_submodule(name)
            sm.relayout(f"{name}.weight", name, layer, trained_weight(layer), layout)
    return model
