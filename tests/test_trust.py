"""The transfer-trust rule (spartune.trust): values on made-up data with known answers, the
flags, the measured rows it ships with, and the columns it adds to transfer_plan.csv."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from spartune import sparsity, transfer, trust
from spartune.columns import TRIAL_COLUMNS
from spartune.config import Config

ROOT = Path(__file__).resolve().parents[1]


def _rows(offsets: dict[float, float], *, width: int = 128, tokens: int = 1000,
          half: float = 0.1, curvature: float = 2.0) -> pd.DataFrame:
    """Rule rows: the dense optimum at -6, the given offsets, intervals +- `half`."""
    return pd.DataFrame([{"source": "made_up", "corpus": "c", "param": "supar", "width": width,
                          "base_width": 64, "density": d, "tokens": tokens, "n_seeds": 3,
                          "opt_log2_lr": -6 + o, "lo_log2_lr": -6 + o - half,
                          "hi_log2_lr": -6 + o + half, "offset": o, "curvature_pct": curvature,
                          "opt_loss": 2.0} for d, o in offsets.items()], columns=trust.COLUMNS)


ROWS = _rows({1.0: 0.0, 0.25: 0.4, 0.0625: 0.8})


def test_offset_is_linear_in_log2_density_and_regret_is_quadratic() -> None:
    r = trust.predict("supar", 128, 0.125, 1000, ROWS)  # halfway between 1/4 and 1/16
    assert r["trust_offset_octaves"] == pytest.approx(0.6)
    assert (r["trust_offset_lo"], r["trust_offset_hi"]) == pytest.approx((0.5, 0.7))
    assert r["trust_regret_pct"] == pytest.approx(2.0 * 0.6**2)
    assert r["trust_check"] and "beyond the measured noise (0.10" in r["trust_reasons"]
    assert r["trust_data"].startswith("supar: 3 cells, widths 128-128, densities 0.0625-1")


def test_a_target_inside_the_data_with_no_offset_is_trusted() -> None:
    r = trust.predict("supar", 128, 1.0, 1000, ROWS)
    assert r["trust_offset_octaves"] == 0.0 and r["trust_regret_pct"] == 0.0
    assert not r["trust_check"] and r["trust_reasons"] == ""


def test_extrapolation_is_flagged_and_follows_the_last_segment() -> None:
    r = trust.predict("supar", 512, 0.015625, 4000, ROWS)
    assert r["trust_offset_octaves"] == pytest.approx(1.2)  # 0.2 per octave beyond 1/16
    assert r["trust_check"]
    assert "outside the measured width, density, tokens" in r["trust_reasons"]
    assert "weights per neuron" not in r["trust_reasons"]  # 512 / 64 = 8: not below 8
    few = trust.predict("supar", 128, 0.0625, 1000, ROWS)  # 8 weights per neuron: not flagged
    assert "weights per neuron" not in few["trust_reasons"]
    fewer = trust.predict("supar", 64, 0.0625, 1000, ROWS)  # 4
    assert "4 weights per neuron (< 8)" in fewer["trust_reasons"]


def test_no_regret_is_guessed_beyond_the_measured_span() -> None:
    r = trust.predict("supar", 128, 1 / 256, 1000, ROWS)  # 0.8 + 4 x 0.2 = 1.6 octaves
    assert r["trust_offset_octaves"] == pytest.approx(1.6)
    assert math.isnan(r["trust_regret_pct"]) and "regret not estimated" in r["trust_reasons"]


def test_a_param_without_data_asks_for_a_check() -> None:
    r = trust.predict("sp", 128, 0.25, 1000, ROWS)
    assert r["trust_check"] and math.isnan(r["trust_offset_octaves"])
    assert "no measurements for sp" in r["trust_reasons"]


@pytest.mark.parametrize("width,density", [(128, 1.0), (128, 0.25), (128, 1 / 64), (64, 1 / 128),
                                           (1024, 1 / 64), (100, 0.3)])
def test_weights_per_neuron_is_the_masks_smallest_fan_in(width: int, density: float) -> None:
    """The rule flags a target exactly when the mask the model builds keeps < 8 inputs in a
    hidden neuron (the built model's own count, not a formula of the test's)."""
    import torch

    mask = sparsity.random_mask((4, width), density, torch.Generator().manual_seed(0))
    fewest = int(mask.sum(dim=1).min())
    flagged = "weights per neuron" in trust.predict("supar", width, density, 1000, ROWS)[
        "trust_reasons"]
    assert flagged == (fewest < trust.MIN_WEIGHTS_PER_NEURON)


def _trials(truth: dict[float, float], a: float = 0.05, b: float = 2.0) -> pd.DataFrame:
    """Seed x grid trials with loss b + a (x - truth[density])^2 and a little seed noise."""
    rows = []
    for d, x0 in truth.items():
        for seed, e in ((0, 0.002), (1, -0.002), (2, 0.0)):
            for x in (-8.0, -7.0, -6.0, -5.0, -4.0):
                row = dict.fromkeys(TRIAL_COLUMNS)
                row.update(study="t", cell=f"supar/w128/d{d:g}/s{seed}", number=0,
                           state="COMPLETE", role="search", param="supar", width=128,
                           base_width=64, density=d, seed=seed, lr=2.0**x, log2_lr=x,
                           final_val_loss=b + a * (x - x0) ** 2 + e, diverged=False)
                rows.append(row)
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def test_measure_finds_the_offsets_and_the_curvature() -> None:
    rows = trust.measure(_trials({1.0: -6.3, 0.25: -5.8}), source="s", corpus="c", tokens=10)
    assert list(rows.columns) == trust.COLUMNS
    sparse = rows[rows["density"] == 0.25].iloc[0]
    assert sparse["offset"] == pytest.approx(0.5, abs=0.02)
    # the rise to the lower neighbour (-6 -> -7 around a minimum at -6 for truth -5.8):
    # 0.05 ((-7 + 5.8)^2 - (-6 + 5.8)^2) / 1^2, over the loss at -6
    rise = 0.05 * ((-7 + 5.8) ** 2 - (-6 + 5.8) ** 2)
    assert sparse["curvature_pct"] == pytest.approx(100 * rise / (2.0 + 0.05 * 0.04), rel=1e-3)
    assert (rows["tokens"] == 10).all() and (rows["n_seeds"] == 3).all()
    assert (rows["lo_log2_lr"] <= rows["opt_log2_lr"]).all()
    # a cell with fewer seeds than asked for is left out (it has no interval to judge it by)
    one = _trials({1.0: -6.3})
    assert trust.measure(one[one["seed"] == 0], source="s", corpus="c", tokens=10).empty


def test_the_shipped_rows_are_the_tracked_csv() -> None:
    tracked = pd.read_csv(ROOT / trust.DATA_FILE)
    shipped = trust.data()
    assert len(shipped) == len(tracked) > 0
    pd.testing.assert_frame_equal(shipped.reset_index(drop=True), tracked, check_dtype=False)
    assert (ROOT / trust.DATA_FILE).stat().st_size < 50_000


def test_the_plan_carries_the_rule_per_target() -> None:
    cfg = Config()
    cfg.transfer.params, cfg.transfer.widths = ["sp", "supar"], [128]
    cfg.transfer.densities = [1.0, 0.0625]
    chosen = {"lr": 0.02, "init_std": 0.2, "alpha_input": 3.5, "alpha_output": 1.3,
              "proxy_width": 64, "proxy_density": 1.0}
    plan = trust.annotate(transfer.plan(cfg, chosen), transfer.tokens(cfg))
    assert set(trust.PLAN_COLUMNS) <= set(plan.columns)
    per = plan.drop_duplicates(["param", "density"]).set_index(["param", "density"])
    assert len(per) == 4 and not per.loc[("supar", 1.0), "trust_check"]
    assert per.loc[("supar", 0.0625), "trust_check"]  # the measured drift: ~0.5 octave
    assert per.loc[("sp", 0.0625), "trust_offset_octaves"] > 2  # SP's drift is measured too
    text = trust.lines(plan, checked=False)
    assert sum("uncertain: rerun with transfer.check=true" in t for t in text) == 2
    assert any("within the measured range" in t for t in text)
    assert "checked by this run" in "\n".join(trust.lines(plan, checked=True))
    assert sum(t.startswith("  (rule data, ") for t in text) == 2  # one per param
