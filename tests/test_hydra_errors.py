"""hydra_errors: Hydra's compose errors as (field, message), suggestions from the schema."""

from __future__ import annotations

import pytest

from conftest import ROOT
from spartune import hydra_errors
from spartune.config import register_configs

SEARCH = f"hydra.searchpath=[file://{ROOT / 'conf'}]"
GROUPS = ["coord", "data", "logger", "model", "optim", "param", "pipeline", "train"]


def _compose(*overrides: str, multirun: bool = False):
    register_configs()
    return hydra_errors.preflight(str(ROOT / "sweeps"), "proxy",
                                  hydra_errors.open_dicts([*overrides, SEARCH]), GROUPS,
                                  multirun)


@pytest.mark.parametrize("override, field, words", [
    ("model.densty=0.2", "model.densty", "did you mean model.density"),
    ("model.lr=0.1", "model.lr", "did you mean optim.lr"),  # the same name in another section
    ("optim.learning_rate=0.1", "optim.learning_rate", "optim has lr, beta1"),
    ("sparsity=rigl", "sparsity", "the config groups are coord, data"),
    ("model.width=abc", "model.width", "'abc' is not an integer; give an integer, e.g. "
                                       "model.width=128"),
    ("optim.lr=1e-2x", "optim.lr", "is not a number"),
    ("train.compile=maybe", "train.compile", "is not true or false"),
    ("model.width=null", "model.width", "cannot be null"),
    ("model.width=[", "model.width", "cannot parse"),
    ("study.seeds=0,1", "study.seeds", "add -m (--multirun)"),
    ("study.space.beta={low:0.1,high:0.2}", "study.space.beta", "in the sweep file"),
])
def test_compose_errors_are_one_line_naming_the_field(override, field, words):
    with pytest.raises(hydra_errors.ComposeError) as e:
        _compose(override)
    assert e.value.field == field
    assert words in e.value.message and "\n" not in e.value.message
    assert "+" + field not in e.value.message  # never Hydra's advice to append the key


def test_dict_fields_take_new_keys_as_written():
    cfg = _compose("study.objective._target_=mypkg.run", "study.objective.scale=2",
                   "model.layer_density={qkv: 0.5}", "model.layer_density.mlp_up=0.25")
    assert dict(cfg.study.objective) == {"_target_": "mypkg.run", "scale": 2}
    assert dict(cfg.model.layer_density) == {"qkv": 0.5, "mlp_up": 0.25}
    assert hydra_errors.open_dicts(["study.space.lr.low=0.1", "+x=1", "-m"]) == \
        ["study.space.lr.low=0.1", "+x=1", "-m"]  # typed entries and flags are left alone


def test_a_multirun_sweep_override_is_left_to_each_job():
    cfg = _compose("study.seeds=0,1", "study.n_trials=3", multirun=True)
    assert cfg.study.n_trials == 3
