"""A GPT-2-style model written the way Hugging Face's GPT-2 is: nothing here knows spartune.

HF names (transformer.wte/wpe/h/ln_f, attn.c_attn/c_proj, mlp.c_fc/c_proj), biases on every
projection, an untied lm_head. The one thing a µP-family parameterization needs from the
model's own code is the attention softmax scale, so `attn_scale` is an attribute that
`build` sets from `sm.attention_scale(head_dim)` (1/sqrt(d) under SP, 1/d under µP/SμPar).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spartune


@dataclass
class GPT2Config:
    vocab_size: int = 256
    n_positions: int = 64
    n_embd: int = 64
    n_layer: int = 2
    head_dim: int = 16

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_dim


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPT2Config) -> None:
        super().__init__()
        self.n_head, self.head_dim = c.n_head, c.head_dim
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)
        self.attn_scale: float | None = None  # None: torch's default 1/sqrt(head_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, c: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.mlp = MLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, c: GPT2Config) -> None:
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(c.vocab_size, c.n_embd),
            "wpe": nn.Embedding(c.n_positions, c.n_embd),
            "h": nn.ModuleList(Block(c) for _ in range(c.n_layer)),
            "ln_f": nn.LayerNorm(c.n_embd),
        })
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)  # untied

    def forward(self, idx: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if labels is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def build(width: int, *, base_width: int, param: str = "supar", density: float = 1.0,
          base_density: float = 1.0, init_std: float = 0.02, alpha_input: float = 1.0,
          alpha_output: float = 1.0, seed: int = 0, config: GPT2Config | None = None,
          **options: object) -> tuple[GPT2LMHeadModel, spartune.Parameterization]:
    """The model at `width`, parameterized against the same model at `base_width`.

    `options` go to `spartune.parameterize` as they are (roles=, sparse_impl=, mask_kind=...).
    The base (and, when the model is itself at the base width, a third width to tell which
    dims grow) only gives shapes: for a big base, build it under `with torch.device("meta")`;
    these are small, and the meta device costs seconds of import on its first use.
    """
    c = replace(config or GPT2Config(), n_embd=width)
    model = GPT2LMHeadModel(c)
    base = GPT2LMHeadModel(replace(c, n_embd=base_width))
    delta = GPT2LMHeadModel(replace(c, n_embd=2 * base_width)) if width == base_width else None
    sm = spartune.parameterize(
        model, base=base, delta=delta, param=param, density=density, base_density=base_density,
        init_std=init_std, alpha_input=alpha_input, alpha_output=alpha_output,
        residual=["transformer.h.*.attn.c_proj", "transformer.h.*.mlp.c_proj"],
        depth=c.n_layer, mask_seed=seed, seed=seed, **{"attention": "none", **options},
    )
    for block in model.transformer.h:  # this model applies its own scale (attention="none")
        block.attn.attn_scale = sm.attention_scale(c.head_dim)
    return model, sm


def shard(model: GPT2LMHeadModel, *, precision: str = "fp32") -> GPT2LMHeadModel:
    """FSDP2 over the ranks torchrun started, for a target too big for one device.

    The order matters: `build` (parameterize: masks, init, multipliers) first, then `shard`
    (fully_shard on every block, then on the model; masks sharded beside their weights, the
    handle re-bound to the shards by name), then the optimizer from `sm.param_groups`, which
    now hands it the shards with the same LR multipliers. The forward-multiplier hooks and
    `attn_scale` live on modules, which sharding keeps.
    """
    from spartune import sharding

    return sharding.shard(model, blocks=model.transformer.h, precision=precision)
