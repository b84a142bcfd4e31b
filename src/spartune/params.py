"""The parameterizations as one table: SP, µP, SμPar and the paper's two SμPar ablations.

A parameterization says, for a layer of a given role, width multiplier m_d and density
multiplier m_rho, three numbers: what multiplies the base init std sigma_base, what multiplies
the base Adam LR eta_base, and what multiplies the layer's output in the forward pass. Plus the
attention logit scale. Every rule below is a row of SUPAR.md §1.2 (paper Table 1); the five
parameterizations differ only in the exponents of `Rule`, so there is nothing to keep in sync
between init, optimizer and forward code.

Pure functions, no torch: `transfer` and the README's tables use them without building a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Role = Literal["embedding", "hidden", "output", "norm", "bias"]
ROLES: tuple[Role, ...] = ("embedding", "hidden", "output", "norm", "bias")


@dataclass(frozen=True)
class Rule:
    """Exponents of m_d and m_rho applied to hidden weights and to the output logits.

    hidden init std  = sigma_base * m_d**init_width * m_rho**init_density
    hidden Adam LR   = eta_base   * m_d**lr_width   * m_rho**lr_density
    logits           = alpha_output * m_d**output_width * (h_L W_out^T)
    attention scale  = 1/sqrt(d_head) ("sqrt") or 1/d_head ("linear")
    """

    init_width: float
    init_density: float
    lr_width: float
    lr_density: float
    output_width: float
    attention: Literal["sqrt", "linear"]


# SUPAR.md §1.2 (paper Table 1) and App. C (Figs. 13/14, the ablations).
RULES: dict[str, Rule] = {
    # SP: every multiplier is 1; attention QK^T / sqrt(d_head).
    "sp": Rule(0.0, 0.0, 0.0, 0.0, 0.0, "sqrt"),
    # µP: hidden var sigma^2/m_d, hidden LR eta/m_d, logits alpha_out/m_d, attention QK^T/d_head.
    "mup": Rule(-0.5, 0.0, -1.0, 0.0, -1.0, "linear"),
    # SμPar: hidden var sigma^2/(m_d m_rho), hidden LR eta/(m_d m_rho); the rest is µP (§1.3).
    "supar": Rule(-0.5, -0.5, -1.0, -1.0, -1.0, "linear"),
    # Ablation "µP + SμPar init only": SμPar sigma, µP LR (App. C, Fig. 13).
    "supar_init_only": Rule(-0.5, -0.5, -1.0, 0.0, -1.0, "linear"),
    # Ablation "µP + SμPar LR only": µP sigma, SμPar LR (App. C, Fig. 14).
    "supar_lr_only": Rule(-0.5, 0.0, -1.0, -1.0, -1.0, "linear"),
}


@dataclass(frozen=True)
class Scale:
    """Multipliers for one layer: of sigma_base (init), of eta_base (lr), of the output (out)."""

    init: float = 1.0
    lr: float = 1.0
    out: float = 1.0


def rule(name: str) -> Rule:
    """The rule of a parameterization; a clear error for an unknown name."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown parameterization {name!r}; choose one of {', '.join(RULES)}"
        ) from None


def layer_scale(
    name: str,
    role: Role,
    *,
    width_mult: float,
    density_mult: float = 1.0,
    alpha_input: float = 1.0,
    alpha_output: float = 1.0,
    residual_depth: int | None = None,
) -> Scale:
    """Per-layer multipliers of a parameterization (SUPAR.md §1.2-1.3).

    `density_mult` is this layer's m_rho = density / base_density (per-layer densities use each
    layer's own value, SUPAR.md App. D.4 note). `residual_depth`, when given for a hidden layer
    that writes into the residual stream, adds GPT-2's 1/sqrt(2 * depth) init factor (UNVERIFIED
    in the paper; nanoGPT-mup and Cerebras modelzoo apply it in SP, µP and SμPar alike).

    The alphas are applied in SP too, as width-independent constants, so that all five
    parameterizations are the same model at the base shape (width_mult = density_mult = 1) for
    any tuned alphas; with alpha = 1 SP is the textbook one.
    """
    r = rule(name)
    m_d, m_rho = width_mult, density_mult
    match role:
        case "embedding":
            # Table 1 row 1: init var sigma^2, Adam LR eta, forward alpha_input * X0 W_emb.
            return Scale(out=alpha_input)
        case "hidden":
            # Table 1 row 2: init var sigma^2/(m_d m_rho), LR eta/(m_d m_rho) under SμPar.
            init = m_d**r.init_width * m_rho**r.init_density
            if residual_depth is not None:
                init /= math.sqrt(2 * residual_depth)
            return Scale(init=init, lr=m_d**r.lr_width * m_rho**r.lr_density)
        case "output":
            # Table 1 row 3: logits alpha_output * X_L W^T / m_d. An untied output layer keeps
            # init sigma_base and LR eta_base (Cerebras modelzoo µP; UNVERIFIED for SμPar).
            return Scale(out=alpha_output * m_d**r.output_width)
        case "norm" | "bias":
            # Dense, not width-scaled: LayerNorm gains init 1, biases init 0, LR eta_base.
            return Scale()
    raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")


def attention_scale(name: str, head_size: int) -> float:
    """Softmax temperature of QK^T: 1/sqrt(d_head) under SP, 1/d_head under the µP family."""
    r = rule(name)
    return head_size**-0.5 if r.attention == "sqrt" else 1.0 / head_size


def describe(
    name: str,
    *,
    width_mult: float,
    density_mult: float,
    init_std: float,
    lr: float,
    alpha_input: float = 1.0,
    alpha_output: float = 1.0,
    head_size: int = 32,
    depth: int | None = None,
) -> list[dict[str, float | str]]:
    """The values a run will actually use, one row per role: what `transfer` prints."""
    rows: list[dict[str, float | str]] = []
    kw = dict(width_mult=width_mult, density_mult=density_mult,
              alpha_input=alpha_input, alpha_output=alpha_output)
    for label, role, res in [
        ("embedding", "embedding", None),
        ("hidden (qkv, mlp_up)", "hidden", None),
        ("hidden (attn_out, mlp_down)", "hidden", depth),
        ("output (logits)", "output", None),
        ("norm / bias", "norm", None),
    ]:
        s = layer_scale(name, role, residual_depth=res, **kw)  # type: ignore[arg-type]
        rows.append({
            "layer": label,
            "init_std": init_std * s.init if role != "norm" else float("nan"),
            "adam_lr": lr * s.lr,
            "forward_mult": s.out,
        })
    rows.append({"layer": "attention logits", "init_std": float("nan"), "adam_lr": float("nan"),
                 "forward_mult": attention_scale(name, head_size)})
    return rows


# Below this many non-zero inputs per hidden neuron SμPar's law-of-large-numbers argument is
# weak (SUPAR.md §2.3): the model warns when it builds such a layer, the trust rule flags it.
MIN_WEIGHTS_PER_NEURON = 8


def expected_fan_in(d_in: int, density: float, kind: str = "per_row") -> float:
    """Expected non-zero inputs per neuron (WPN): d_in * rho, or the rounded per-row count.

    Here, beside the rules and without torch, so the transfer's trust rule can ask it too."""
    if kind == "per_row" and density < 1:
        return float(max(1, round(density * d_in)))
    return d_in * density
