"""Masks: density, determinism, buffers in state_dict, and the exact-zero invariant."""

from __future__ import annotations

import pytest
import torch

from spartune.config import ModelConfig, ParamConfig
from spartune.model import build_model
from spartune.sparsity import SparseLinear, random_mask


@pytest.mark.parametrize("kind", ["per_row", "exact", "bernoulli"])
@pytest.mark.parametrize("density", [0.5, 0.0625, 1 / 64])
def test_mask_density(kind, density):
    m = random_mask((256, 512), density, torch.Generator().manual_seed(0), kind)
    assert m.dtype == torch.bool
    assert m.float().mean().item() == pytest.approx(density, rel=0.1)
    if kind == "per_row":
        assert (m.sum(1) == round(density * 512)).all()  # every neuron: the same fan-in


def test_per_row_mask_never_leaves_a_neuron_without_inputs():
    m = random_mask((512, 64), 1 / 128, torch.Generator().manual_seed(0), "per_row")
    assert (m.sum(1) >= 1).all()


def test_same_seed_same_mask_different_seed_different_mask():
    a = random_mask((64, 64), 0.25, torch.Generator().manual_seed(7))
    b = random_mask((64, 64), 0.25, torch.Generator().manual_seed(7))
    c = random_mask((64, 64), 0.25, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _model(density=0.25, seed=0, mask_seed=0, **kw):
    m = ModelConfig(width=64, base_width=32, head_size=16, density=density, **kw)
    return build_model(m, ParamConfig(name="supar"), vocab_size=32, max_len=16, seed=seed,
                       mask_seed=mask_seed)


def test_every_hidden_projection_is_masked_and_the_rest_dense():
    model = _model()
    hidden = list(model.hidden_layers())
    assert len(hidden) == 4 * 2  # qkv, attn out, mlp up, mlp down per block
    assert all(layer.mask is not None for layer in hidden)
    masked = {id(layer.weight) for layer in hidden}
    for name, p in model.named_parameters():
        if id(p) not in masked:
            assert (p != 0).float().mean() > 0.99 or "ln" in name, name


def test_masks_are_buffers_and_roundtrip_through_state_dict():
    a = _model(mask_seed=1)
    sd = a.state_dict()
    mask_keys = [k for k in sd if k.endswith(".mask")]
    assert len(mask_keys) == 8
    b = _model(mask_seed=2)  # different masks...
    assert not torch.equal(sd[mask_keys[0]], b.state_dict()[mask_keys[0]])
    b.load_state_dict(sd)  # ...restored from the checkpoint
    for k in mask_keys:
        assert torch.equal(b.state_dict()[k], sd[k])


def test_mask_seed_is_independent_of_weight_seed():
    a, b = _model(seed=0, mask_seed=5), _model(seed=1, mask_seed=5)
    for la, lb in zip(a.hidden_layers(), b.hidden_layers(), strict=True):
        assert torch.equal(la.mask, lb.mask)


def test_per_layer_density():
    model = _model(density=0.5, layer_density={"mlp_up": 0.125})
    for block in model.blocks:
        assert block.mlp.up.density == 0.125
        assert block.mlp.up.mask.float().mean().item() == pytest.approx(0.125, rel=0.05)
        assert block.attn.qkv.mask.float().mean().item() == pytest.approx(0.5, rel=0.05)
    # SμPar uses each layer's own m_rho: LR mult 1/(m_d m_rho) = 1/(2 * 0.125) = 4
    mults = {g["lr_mult"] for g in model.param_groups(0.1)}
    assert 4.0 in mults and 1.0 in mults and 1 / (2 * 0.5) in mults


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_masked_weights_and_adam_moments_stay_exactly_zero(weight_decay):
    torch.manual_seed(0)
    model = _model(density=0.25)
    opt = torch.optim.AdamW(model.param_groups(weight_decay), lr=0.05)
    for _ in range(5):
        x = torch.randint(0, 32, (4, 16))
        _, loss = model(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer in model.hidden_layers():
        off = ~layer.mask
        assert (layer.weight[off] == 0).all()
        state = opt.state[layer.weight]
        assert (state["exp_avg"][off] == 0).all() and (state["exp_avg_sq"][off] == 0).all()
        assert (layer.weight[layer.mask] != 0).float().mean() > 0.99  # the rest does train


def test_density_one_has_no_mask_and_no_overhead():
    layer = SparseLinear(8, 8, role="hidden", mask=torch.ones(8, 8, dtype=torch.bool))
    assert layer.mask is None and "mask" not in layer.state_dict()
