"""A nanoGPT-style pre-LN GPT whose layers know their SμPar role from construction.

Embedding (token + learned position) -> `depth` blocks of [LN, causal self-attention, LN,
GELU MLP 4x] -> LN -> unembedding. Every hidden projection (QKV, attention out, MLP up, MLP
down) is a `SparseLinear` with a static mask; embeddings, the output layer, norms and biases
stay dense (SUPAR.md §2.1). The parameterization enters in exactly three places, all read from
`params.layer_scale`: `init_weights` (init std), `param_groups` (Adam LR multipliers) and the
forward multipliers held by `Embedder`, `Attention` and `Unembed`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spartune.config import ModelConfig, ParamConfig
from spartune.layouts import CompressedLinear, HiddenLayer, apply_layout, trained_weight
from spartune.params import Role, Scale, attention_scale, layer_scale
from spartune.sparsity import SparseLinear, expected_fan_in, random_mask

# A hidden layer is masked (dense storage) or compressed (non-zeros only): layouts.py. The rules
# below read role, density and residual, which both layouts carry.
HIDDEN = (SparseLinear, CompressedLinear)

log = logging.getLogger(__name__)
_WARNED: set[tuple[int, float]] = set()


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

    def __init__(self, m: ModelConfig, p: ParamConfig, masks: dict[str, Tensor | None]) -> None:
        super().__init__()
        w = m.width
        self.n_head, self.head_size = m.n_head, m.head_size
        self.qkv = SparseLinear(w, 3 * w, role="hidden", bias=m.bias,
                                density=m.density_of("qkv"), mask=masks["qkv"])
        self.proj = SparseLinear(w, w, role="hidden", bias=m.bias, residual=True,
                                 density=m.density_of("attn_out"), mask=masks["attn_out"])
        # µP family: QK^T / d_head (SUPAR.md §1.2, last row); SP: QK^T / sqrt(d_head).
        self.scale = attention_scale(p.name, m.head_size)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_size).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=self.scale,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, m: ModelConfig, masks: dict[str, Tensor | None]) -> None:
        super().__init__()
        h = m.mlp_ratio * m.width
        self.up = SparseLinear(m.width, h, role="hidden", bias=m.bias,
                               density=m.density_of("mlp_up"), mask=masks["mlp_up"])
        self.down = SparseLinear(h, m.width, role="hidden", bias=m.bias, residual=True,
                                 density=m.density_of("mlp_down"), mask=masks["mlp_down"])

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, m: ModelConfig, p: ParamConfig, masks: dict[str, Tensor | None]) -> None:
        super().__init__()
        self.ln1 = _tag(nn.LayerNorm(m.width, bias=m.bias), "norm")
        self.attn = Attention(m, p, masks)
        self.ln2 = _tag(nn.LayerNorm(m.width, bias=m.bias), "norm")
        self.mlp = MLP(m, masks)

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
    def __init__(self, m: ModelConfig, p: ParamConfig, *, vocab_size: int, max_len: int,
                 mask_seed: int) -> None:
        super().__init__()
        self.model_cfg, self.param_cfg = m, p
        self.vocab_size, self.max_len = vocab_size, max_len
        emb = layer_scale(p.name, "embedding", width_mult=m.width_mult,
                          alpha_input=p.alpha_input)
        out = layer_scale(p.name, "output", width_mult=m.width_mult,
                          alpha_output=p.alpha_output)
        self.embed = Embedder(vocab_size, m.width, max_len, emb.out)
        gen = torch.Generator().manual_seed(mask_seed)
        self.blocks = nn.ModuleList(
            Block(m, p, _block_masks(m, gen)) for _ in range(m.depth)
        )
        self.ln_f = _tag(nn.LayerNorm(m.width, bias=m.bias), "norm")
        self.unembed = Unembed(m.width, vocab_size, out.out,
                               self.embed.wte if m.tie_embeddings else None)
        wpn = min(expected_fan_in(layer.in_features, layer.density, m.mask_kind)
                  for layer in self.hidden_layers())
        if wpn < 8 and (m.width, m.density) not in _WARNED:
            _WARNED.add((m.width, m.density))  # once per shape and process, not per trial
            log.warning("width %d at density %g keeps %.0f weights per neuron in some hidden "
                        "layer: SμPar's law-of-large-numbers argument is weak there "
                        "(SUPAR.md §2.3)", m.width, m.density, wpn)

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

    def scale_of(self, layer: HiddenLayer) -> Scale:
        m, p = self.model_cfg, self.param_cfg
        return layer_scale(
            p.name, "hidden", width_mult=m.width_mult,
            density_mult=layer.density / p.base_density,
            residual_depth=m.depth if (layer.residual and p.depth_init_scale) else None,
        )

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

    @torch.no_grad()
    def init_weights(self, init_std: float, generator: torch.Generator | None = None) -> None:
        """Init every weight from sigma_base and its role's multiplier (SUPAR.md §6 step 3)."""
        for mod in self.modules():
            role = getattr(mod, "role", None)
            if isinstance(mod, HIDDEN):
                mod.init_(init_std * self.scale_of(mod).init, generator)
            elif role == "embedding":
                nn.init.normal_(mod.weight, 0.0, init_std, generator=generator)
            elif role == "output" and not mod.tied:
                nn.init.normal_(mod.weight, 0.0, init_std, generator=generator)
            elif role == "norm":
                nn.init.ones_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    def param_groups(self, weight_decay: float, *, wd_independent: bool = False) -> list[dict]:
        """AdamW groups, each with an `lr_mult`: the schedule sets the base LR, groups multiply.

        Hidden weights get the parameterization's LR multiplier (SUPAR.md §1.2 row 2); embeddings,
        the untied output, norms and biases keep eta_base. Weight decay applies to >= 2-D
        weights only. With `wd_independent`, a group's decay is divided by its LR multiplier so
        that AdamW's per-step decay lr * wd is eta_base * wd everywhere.
        """
        buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
        seen: set[int] = set()

        def add(param: nn.Parameter, lr_mult: float, decay: bool) -> None:
            if id(param) in seen:
                return  # the tied unembedding is the embedding: one parameter, one group
            seen.add(id(param))
            buckets.setdefault((lr_mult, decay), []).append(param)

        for mod in self.modules():
            if isinstance(mod, HIDDEN):
                add(trained_weight(mod), self.scale_of(mod).lr, True)
                if mod.bias is not None:
                    add(mod.bias, 1.0, False)
            elif getattr(mod, "role", None) in ("embedding", "output"):
                add(mod.weight, 1.0, True)
            elif getattr(mod, "role", None) == "norm":
                for prm in mod.parameters(recurse=False):
                    add(prm, 1.0, False)
        missing = [n for n, prm in self.named_parameters() if id(prm) not in seen]
        assert not missing, f"parameters without a role: {missing}"
        groups = []
        for (lr_mult, decay), ps in buckets.items():
            wd = weight_decay if decay else 0.0
            if wd_independent and decay:
                wd = weight_decay / lr_mult
            groups.append({"params": ps, "lr_mult": lr_mult, "weight_decay": wd})
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


def _block_masks(m: ModelConfig, gen: torch.Generator) -> dict[str, Tensor | None]:
    """One mask per hidden projection of a block, drawn in a fixed order from one generator."""
    w, h = m.width, m.mlp_ratio * m.width
    shapes = {"qkv": (3 * w, w), "attn_out": (w, w), "mlp_up": (h, w), "mlp_down": (w, h)}
    out: dict[str, Tensor | None] = {}
    for name, shape in shapes.items():
        d = m.density_of(name)
        out[name] = random_mask(shape, d, gen, m.mask_kind) if d < 1 else None
    return out


def build_model(m: ModelConfig, p: ParamConfig, *, vocab_size: int, max_len: int,
                seed: int, mask_seed: int, device: str | torch.device = "cpu") -> GPT:
    """Build on the CPU, draw masks and init from seeded generators: same seeds, same model.

    Then each hidden layer gets its layout (`m.sparse_impl`; `auto` decides for the `device`
    the model will run on): a compressed layer keeps the masked layer's init values.
    """
    model = GPT(m, p, vocab_size=vocab_size, max_len=max_len, mask_seed=mask_seed)
    model.init_weights(m.init_std, torch.Generator().manual_seed(seed))
    apply_layout(model, m.sparse_impl, device)
    return model
