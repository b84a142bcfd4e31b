"""`spartune.coord_check` on the example's HF-style GPT-2: the same table and verdict as
`spartune-coord`, flat under SμPar across widths and densities, drifting under SP."""

from __future__ import annotations

import pytest
import torch

import spartune
from own_model import model as ex
from own_model import train as ex_train
from spartune.columns import COORD_COLUMNS
from spartune.config import ConfigError


def make_model(*, width, density, param, seed):
    return ex.build(width, base_width=32, param=param, density=density, seed=seed,
                    config=ex.GPT2Config(n_positions=16))


def batches(gen):
    return ex_train.batch(ex_train.data()[0], 4, 16, gen)


TAPS = {"embedding": ["transformer.wte", "transformer.wpe"], "attn": ["transformer.h.*.attn"],
        "mlp": ["transformer.h.*.mlp"], "logits": ["lm_head"]}


def test_flat_under_supar_drifting_under_sp():
    r = spartune.coord_check(make_model, [32, 128], [1.0, 0.25], data=batches, taps=TAPS,
                             params=["sp", "supar"], seeds=[0], steps=4)
    assert list(r.table.columns) == COORD_COLUMNS
    assert set(r.table["module"]) == {"embedding", "attn", "mlp", "logits"}
    assert len(r.table) == 2 * 3 * 4 * 4  # params x cells (cross grid) x steps x kinds
    sp = r.spreads.set_index(["param", "module"])["spread"]
    assert r.passed, str(r)
    for module in ("attn", "mlp"):
        assert sp[("supar", module)] < 2.0
        assert sp[("sp", module)] > 2 * sp[("supar", module)]  # SP drifts with width
    assert "coordinate check PASSED" in str(r)


def test_default_taps_are_each_hidden_layer():
    r = spartune.coord_check(make_model, [32, 64], [1.0], data=batches, params=["supar"],
                             seeds=[0], steps=2)
    assert set(r.spreads["module"]) == {"transformer.h.*.attn.c_attn",
                                        "transformer.h.*.attn.c_proj",
                                        "transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj"}
    assert {"embedding", "logits"} <= set(r.table["module"])


def test_a_factory_that_does_not_parameterize_is_one_line():
    def plain(**_):
        return ex.GPT2LMHeadModel(ex.GPT2Config(n_embd=32))

    with pytest.raises(ConfigError, match="make_model: must return a model"):
        spartune.coord_check(plain, [32, 64], [1.0], data=batches, seeds=[0], steps=1)


def test_a_tap_glob_that_matches_nothing_is_one_line():
    with pytest.raises(ConfigError, match="taps.attn"):
        spartune.coord_check(make_model, [32, 64], [1.0], data=batches, seeds=[0], steps=1,
                             taps={"attn": ["h.*.attn"]})


def test_the_builtin_check_is_unchanged_by_the_shared_trace(tiny_cfg):
    from spartune import coord

    tiny_cfg.coord.widths, tiny_cfg.coord.densities = [32, 64], [1.0, 0.5]
    tiny_cfg.coord.seeds, tiny_cfg.coord.steps, tiny_cfg.coord.params = [0], 2, ["supar"]
    tiny_cfg.coord.batch_size, tiny_cfg.coord.seq_len = 4, 16
    df = coord.measure(tiny_cfg, progress=False)
    assert len(df) == 3 * 2 * 4 and df["l1"].gt(0).all()
    assert torch.isfinite(torch.tensor(df["l1"].to_numpy())).all()
