"""Hugging Face's own GPT-2 (`transformers.GPT2LMHeadModel`), built from a config, parameterized.

Nothing here is written for spartune: the model is HF's, with its `Conv1D` projections (weights
stored (in, out), the transpose of nn.Linear), tied `lm_head`, and attention modules that read
`self.scaling`. `spartune.parameterize` knows each weight's fan-in dim (so masks keep round(rho
d_in) inputs per output neuron and m_d is a fan-in ratio), sets the attention scale (1/head_dim
under µP and SμPar) and says how many modules it set. Built from configs only: nothing is
downloaded.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import spartune

HEAD_DIM = 16


def config(width: int, *, n_layer: int = 2, n_positions: int = 64, vocab_size: int = 256,
           n_inner: int | None = None, **kw: object) -> GPT2Config:
    """GPT-2 at `width` with heads of HEAD_DIM (width grows by adding heads), no dropout."""
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=width,
                      n_layer=n_layer, n_head=width // HEAD_DIM, n_inner=n_inner,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, **kw)


def _model(c: GPT2Config) -> GPT2LMHeadModel:
    # HF's own init draws from torch's global RNG: keep the caller's stream where it was
    state = torch.get_rng_state()
    try:
        return GPT2LMHeadModel(c)
    finally:
        torch.set_rng_state(state)


def build(width: int, *, base_width: int, param: str = "supar", density: float = 1.0,
          base_density: float = 1.0, init_std: float = 0.02, alpha_input: float = 1.0,
          alpha_output: float = 1.0, seed: int = 0, n_inner: int | None = None,
          base_n_inner: int | None = None, **options: object
          ) -> tuple[GPT2LMHeadModel, spartune.Parameterization]:
    """GPT-2 at `width` parameterized against GPT-2 at `base_width` (shapes only).

    `n_inner` / `base_n_inner`: the MLP widths (HF's default 4 x width); `options` go to
    `spartune.parameterize` (sparse_impl=, mask_kind=, n_layer=... are split off: config keys
    go to the GPT2Config).
    """
    cfg_keys = {k: options.pop(k) for k in list(options) if k in ("n_layer", "n_positions",
                                                                  "vocab_size")}
    c = config(width, n_inner=n_inner, **cfg_keys)
    model = _model(c)
    base = _model(config(base_width, n_inner=base_n_inner, **cfg_keys))
    delta = None
    if width == base_width:  # the proxy itself: a third width tells which dims grow
        delta = _model(config(2 * base_width, n_inner=2 * base_n_inner if base_n_inner else None,
                              **cfg_keys))
    sm = spartune.parameterize(
        model, base=base, delta=delta, param=param, density=density, base_density=base_density,
        init_std=init_std, alpha_input=alpha_input, alpha_output=alpha_output,
        residual=["transformer.h.*.attn.c_proj", "transformer.h.*.mlp.c_proj"],
        depth=c.n_layer, mask_seed=seed, seed=seed, **options,
    )
    return model, sm
