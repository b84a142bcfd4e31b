"""The GPT: roles from construction, init std and LR groups as the rule table says, shapes."""

from __future__ import annotations

import pytest
import torch

from spartune.config import ModelConfig, ParamConfig
from spartune.model import build_model
from spartune.params import layer_scale
from spartune.sparsity import SparseLinear


def _build(param="supar", width=256, density=0.25, depth=2, **kw):
    m = ModelConfig(width=width, base_width=64, depth=depth, head_size=32, density=density,
                    init_std=0.05, **kw)
    return build_model(m, ParamConfig(name=param), vocab_size=256, max_len=32, seed=0,
                       mask_seed=0)


def test_every_parameter_has_a_role_and_one_group():
    model = _build(tie_embeddings=False, bias=True)
    groups = model.param_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            assert mod.role == "hidden"


@pytest.mark.parametrize("param", ["sp", "mup", "supar", "supar_init_only", "supar_lr_only"])
def test_init_std_follows_the_rule_table(param):
    model = _build(param)
    m_d, rho = 256 / 64, 0.25
    base = layer_scale(param, "hidden", width_mult=m_d, density_mult=rho).init * 0.05
    for layer in model.hidden_layers():
        expected = base / (2 * 2) ** 0.5 if layer.residual else base
        kept = layer.weight[layer.mask]  # std of the surviving weights
        assert kept.std().item() == pytest.approx(expected, rel=0.05), (param, layer)
    assert model.embed.wte.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.embed.wpe.weight.std().item() == pytest.approx(0.05, rel=0.1)


@pytest.mark.parametrize("param", ["sp", "mup", "supar"])
def test_lr_groups_follow_the_rule_table(param):
    model = _build(param)
    hidden = layer_scale(param, "hidden", width_mult=4, density_mult=0.25).lr
    by_param = {id(p): g["lr_mult"] for g in model.param_groups(0.1) for p in g["params"]}
    for layer in model.hidden_layers():
        assert by_param[id(layer.weight)] == pytest.approx(hidden)
    assert by_param[id(model.embed.wte.weight)] == 1.0
    assert by_param[id(model.ln_f.weight)] == 1.0


def test_weight_decay_only_on_matrices_and_optionally_independent_of_lr_mult():
    model = _build("supar")
    for g in model.param_groups(0.1):
        assert g["weight_decay"] == (0.1 if g["params"][0].dim() == 2 else 0.0)
    for g in model.param_groups(0.1, wd_independent=True):
        if g["params"][0].dim() == 2:
            assert g["weight_decay"] * g["lr_mult"] == pytest.approx(0.1)


def test_forward_multipliers_and_attention_scale():
    mup, sp = _build("mup", density=1.0), _build("sp", density=1.0)
    assert mup.unembed.mult == pytest.approx(64 / 256)
    assert sp.unembed.mult == 1.0
    assert mup.blocks[0].attn.scale == pytest.approx(1 / 32)
    assert sp.blocks[0].attn.scale == pytest.approx(32**-0.5)


def test_tied_and_untied_output():
    tied, untied = _build(tie_embeddings=True), _build(tie_embeddings=False)
    assert tied.unembed.weight is tied.embed.wte.weight
    assert untied.unembed.weight is not untied.embed.wte.weight
    assert untied.n_params() == tied.n_params() + 256 * 256


def test_forward_backward_shapes_and_nonzero_count():
    model = _build(density=0.25)
    x = torch.randint(0, 256, (2, 32))
    logits, loss = model(x, x)
    assert logits.shape == (2, 32, 256) and loss.ndim == 0
    loss.backward()
    hidden = sum(layer.weight.numel() for layer in model.hidden_layers())
    expected = model.n_params() - hidden + hidden * 0.25
    assert model.n_nonzero_params() == pytest.approx(expected, rel=0.01)


def test_same_seed_same_model():
    a, b = _build(), _build()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
