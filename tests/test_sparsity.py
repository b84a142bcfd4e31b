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
    mask_keys = [k for k in sd if k.endswith(".weight_mask")]
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
    assert layer.mask is None and "weight_mask" not in layer.state_dict()


def test_gradient_is_masked_before_clipping_and_equals_the_masked_product_gradient():
    """The forward uses W (masked entries are 0) and a hook masks W.grad in place: the gradient
    must be exactly that of X (W ⊙ M)^T, zero at masked entries, before clip_grad_norm_ runs."""
    torch.manual_seed(0)
    layer = SparseLinear(16, 8, role="hidden",
                         mask=random_mask((8, 16), 0.25, torch.Generator().manual_seed(1)))
    layer.init_(0.5, torch.Generator().manual_seed(2))
    x = torch.randn(4, 16)
    layer(x).square().sum().backward()
    w = layer.weight.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x, w * layer.mask).square().sum().backward()
    assert torch.equal(layer.weight.grad, w.grad)
    assert (layer.weight.grad[~layer.mask] == 0).all()
    norm = torch.nn.utils.clip_grad_norm_([layer.weight], 1e-3)
    assert norm == w.grad.norm()  # clipping saw the masked gradient


def test_masked_entries_stay_zero_with_clipping_and_decay_and_after_load():
    torch.manual_seed(0)
    model = _model(density=0.25)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=0.05)
    for _ in range(6):
        x = torch.randint(0, 32, (4, 16))
        _, loss = model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for layer in model.hidden_layers():
            assert (layer.weight.grad[~layer.mask] == 0).all()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
    for layer in model.hidden_layers():
        assert (layer.weight[~layer.mask] == 0).all()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in sd if k.endswith("mlp.up.weight"))
    sd[key].fill_(1.0)  # a state dict with non-zero masked entries
    model.load_state_dict(sd)
    up = model.blocks[0].mlp.up
    assert (up.weight[~up.mask] == 0).all() and (up.weight[up.mask] == 1).all()
