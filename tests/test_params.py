"""The rule table (SUPAR.md §1.2-1.3): agreement at base shape and the m_d / m_rho exponents."""

from __future__ import annotations

import math

import pytest

from spartune.params import ROLES, RULES, attention_scale, describe, layer_scale

PARAMS = list(RULES)


@pytest.mark.parametrize("role", ROLES)
def test_all_parameterizations_agree_at_base_shape(role):
    """At m_d = m_rho = 1 every parameterization is the same model, whatever the alphas."""
    kw = dict(width_mult=1.0, density_mult=1.0, alpha_input=3.0, alpha_output=0.5)
    scales = {p: layer_scale(p, role, **kw) for p in PARAMS}
    assert len(set(scales.values())) == 1, scales


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("m_d", [0.5, 1.0, 4.0, 16.0])
def test_supar_equals_mup_at_density_one(role, m_d):
    kw = dict(width_mult=m_d, density_mult=1.0, alpha_input=2.0, alpha_output=3.0)
    assert layer_scale("supar", role, **kw) == layer_scale("mup", role, **kw)


def _exponent(f, x0=2.0, x1=16.0):
    return math.log(f(x1) / f(x0)) / math.log(x1 / x0)


# (param, init exponent of m_d, of m_rho, LR exponent of m_d, of m_rho, output exponent of m_d)
EXPECTED = [
    ("sp", 0.0, 0.0, 0.0, 0.0, 0.0),
    ("mup", -0.5, 0.0, -1.0, 0.0, -1.0),
    ("supar", -0.5, -0.5, -1.0, -1.0, -1.0),
    ("supar_init_only", -0.5, -0.5, -1.0, 0.0, -1.0),
    ("supar_lr_only", -0.5, 0.0, -1.0, -1.0, -1.0),
]


@pytest.mark.parametrize("p,i_d,i_r,l_d,l_r,o_d", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_exponents_per_role(p, i_d, i_r, l_d, l_r, o_d):
    def hidden(m_d=1.0, m_r=1.0):
        return layer_scale(p, "hidden", width_mult=m_d, density_mult=m_r)

    assert _exponent(lambda m: hidden(m_d=m).init) == pytest.approx(i_d)
    assert _exponent(lambda r: hidden(m_r=1 / r).init) == pytest.approx(-i_r)
    assert _exponent(lambda m: hidden(m_d=m).lr) == pytest.approx(l_d)
    assert _exponent(lambda r: hidden(m_r=1 / r).lr) == pytest.approx(-l_r)
    assert hidden(4.0, 0.25).out == 1.0  # hidden layers have no forward multiplier
    out = lambda m: layer_scale(p, "output", width_mult=m, density_mult=0.1).out  # noqa: E731
    assert _exponent(out) == pytest.approx(o_d)
    # Embedding, norms and biases never scale with width or density (Table 1, §1.2).
    for role in ("embedding", "norm", "bias"):
        s = layer_scale(p, role, width_mult=8.0, density_mult=0.125)
        assert (s.init, s.lr) == (1.0, 1.0)


def test_paper_worked_example():
    """SUPAR.md §1.3: d=2048, m_d=8, rho=2^-7, sigma=0.08666, eta=1.62e-2."""
    s = layer_scale("supar", "hidden", width_mult=8, density_mult=2**-7)
    assert 0.08666 * s.init == pytest.approx(0.347, abs=1e-3)
    assert 1.62e-2 * s.lr == pytest.approx(0.259, abs=1e-3)
    m = layer_scale("mup", "hidden", width_mult=8, density_mult=2**-7)
    assert 0.08666 * m.init == pytest.approx(0.0306, abs=1e-4)
    assert 1.62e-2 * m.lr == pytest.approx(2.03e-3, rel=1e-2)


def test_residual_depth_factor_and_reference_values():
    """SUPAR.md §4.5: s=0.75, m_d=2 -> std 0.0283, c_proj std 0.01414 at L=2, lr_scale 2.0."""
    s = layer_scale("supar", "hidden", width_mult=2, density_mult=0.25)
    r = layer_scale("supar", "hidden", width_mult=2, density_mult=0.25, residual_depth=2)
    assert 0.02 * s.init == pytest.approx(0.0283, abs=1e-4)
    assert 0.02 * r.init == pytest.approx(0.01414, abs=1e-5)
    assert s.lr == pytest.approx(2.0)
    assert layer_scale("mup", "hidden", width_mult=2, density_mult=0.25).lr == pytest.approx(0.5)


def test_attention_scale():
    assert attention_scale("sp", 64) == pytest.approx(1 / 8)
    for p in ("mup", "supar", "supar_init_only", "supar_lr_only"):
        assert attention_scale(p, 64) == pytest.approx(1 / 64)


def test_unknown_parameterization_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown parameterization 'smup'.*supar"):
        layer_scale("smup", "hidden", width_mult=1.0)


def test_describe_reports_the_values_a_run_uses():
    rows = {r["layer"]: r for r in describe("supar", width_mult=4, density_mult=0.25,
                                            init_std=0.1, lr=0.01, alpha_output=2.0, depth=2)}
    assert rows["hidden (qkv, mlp_up)"]["init_std"] == pytest.approx(0.1)
    assert rows["hidden (qkv, mlp_up)"]["adam_lr"] == pytest.approx(0.01)
    assert rows["hidden (attn_out, mlp_down)"]["init_std"] == pytest.approx(0.05)
    assert rows["output (logits)"]["forward_mult"] == pytest.approx(0.5)
    assert rows["embedding"]["adam_lr"] == pytest.approx(0.01)
