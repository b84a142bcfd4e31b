"""A study is one experiment: a rerun with a changed configuration is refused before any trial.

Every class of field, on the journal file here and on a real PostgreSQL server in
test_postgres.py (the same `check_field_classes`): a changed model, data, train, optim or
objective field is refused in one line naming it, with nothing stored changed; workers,
n_trials, the logger, a new seed are accepted; `study.allow_changes` accepts and records the
change. Trials run a toy objective (tests/toy_objectives.py): no training.
"""

from __future__ import annotations

import copy

import optuna
import pytest

from conftest import tiny_config
from spartune import fingerprint, sweep
from spartune.config import Config, ConfigError, SearchDim


def _cfg(tmp_path, storage: str | None = None) -> Config:
    cfg = tiny_config(train__steps=20, train__threads=1)
    cfg.results_dir = str(tmp_path / "results")
    s = cfg.study
    s.name, s.sampler, s.pruner, s.storage = "fp", "grid", "none", storage
    s.space = {"lr": SearchDim(values=[2.0**-8, 2.0**-7])}
    s.objective = {"_target_": "toy_objectives.quick"}
    return cfg


def _snapshot(cfg: Config) -> list[tuple]:
    """Everything the storage holds for the study: studies' attrs, every trial."""
    storage = sweep.open_storage(cfg)
    out = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        out.append((s.study_name, sorted(map(str, study.user_attrs.items())),
                    [(t.number, t.state.name, t.value, sorted(map(str, t.user_attrs.items())))
                     for t in study.trials]))
    return sorted(out)


def _changed(cfg: Config, path: str, value) -> Config:
    out = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    obj = out
    for p in parents:
        obj = obj[p] if isinstance(obj, dict) else getattr(obj, p)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)
    return out


REFUSED = [("model.depth", 3), ("model.init_std", 0.05), ("data.vocab_size", 128),
           ("train.steps", 40), ("train.batch_size", 4), ("optim.weight_decay", 0.0),
           ("param.alpha_output", 2.0), ("study.objective._target_", "toy_objectives.raising")]


def check_field_classes(tmp_path, storage: str | None = None) -> None:
    cfg = _cfg(tmp_path, storage)
    assert sweep.sweep(cfg)["finished"] == 2
    before = _snapshot(cfg)
    for path, value in REFUSED:
        bad = _changed(cfg, path, value)
        with pytest.raises(ConfigError) as e:
            sweep.sweep(bad)
        msg = str(e.value)
        assert e.value.field == path and "\n" not in msg, msg
        assert f"{path} " in msg and "->" in msg and "study.name" in msg
        assert f"study.allow_changes=[{path}]" in msg
        assert _snapshot(cfg) == before, f"{path}: the storage changed"
    # The same experiment: how it runs, how much, what is logged, an lr the grid sets anyway.
    same = _changed(cfg, "study.workers", 2)
    same.study.n_trials, same.train.progress, same.optim.lr = 99, True, 0.5
    same.logger.tensorboard.enabled, same.train.checkpoint_every = True, 5
    assert sweep.sweep(same)["finished"] == 2
    # An extension: a new seed is a new cell, run; the old ones are kept.
    more = _changed(cfg, "study.seeds", [0, 1])
    assert sweep.sweep(more)["finished"] == 4
    # Meant: allowed, run, and recorded in every cell; from then on it is the study's config.
    meant = _changed(more, "train.steps", 40)
    meant.study.allow_changes = ["train"]
    sweep.sweep(meant)
    storage = sweep.open_storage(cfg)
    cells = [s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    assert len(cells) == 2
    for s in cells:
        assert s.user_attrs[fingerprint.ATTR]["train.steps"] == 40
        (change,) = s.user_attrs[fingerprint.CHANGES]
        assert change["fields"] == {"train.steps": [20, 40]}
    meant.study.allow_changes = []
    sweep.sweep(meant)  # the recorded configuration now
    with pytest.raises(ConfigError, match="train.steps 40 -> 20"):
        sweep.sweep(more)


def test_every_field_class_on_the_journal_file(tmp_path):
    check_field_classes(tmp_path)


def test_a_study_made_before_fingerprints_gets_one_with_one_line(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    sweep.sweep(cfg)
    # As an older spartune left it: a cell study with its trial, without a fingerprint.
    storage = sweep.open_storage(cfg)
    (summary,) = optuna.get_all_study_summaries(storage, include_best_trial=False)
    cfg_old = _changed(cfg, "study.name", "old")
    old = optuna.create_study(study_name="old/" + summary.user_attrs["cell"],
                              storage=sweep.open_storage(cfg_old))
    for k, v in summary.user_attrs.items():
        if k != fingerprint.ATTR:
            old.set_user_attr(k, v if k != "study" else "old")
    capsys.readouterr()
    assert sweep.sweep(cfg_old)["finished"] == 2
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "no recorded configuration" in ln]
    assert len(notes) == 1 and notes[0].startswith("spartune: note: study 'old'")
    assert optuna.load_study(study_name=old.study_name, storage=sweep.open_storage(
        cfg_old)).user_attrs[fingerprint.ATTR] == fingerprint.of(cfg_old)
    with pytest.raises(ConfigError, match="train.steps"):
        sweep.sweep(_changed(cfg_old, "train.steps", 40))


def test_the_fingerprint_leaves_out_what_cannot_change_a_result():
    cfg = tiny_config()
    cfg.study.space = {"lr": SearchDim(low=1e-3, high=1e-1)}
    fp = fingerprint.of(cfg)
    for gone in ("model.width", "model.density", "param.name", "optim.lr", "study.workers",
                 "study.storage", "study.n_trials", "study.seeds", "train.device",
                 "train.threads", "train.progress", "study.sampler_seed", "data.cache_dir",
                 "train.parallel", "train.fsdp_reshard_after_forward"):
        assert gone not in fp, gone
    for kept in ("model.depth", "model.init_std", "data.name", "train.steps", "optim.beta2",
                 "param.alpha_output", "study.sampler", "study.pruner", "study.space.lr.low"):
        assert kept in fp, kept
    assert fingerprint.diff(fp, fingerprint.of(copy.deepcopy(cfg))) == {}
    # A field a newer schema adds reads as its default in an older fingerprint.
    older = {k: v for k, v in fp.items() if k != "study.role"}
    assert fingerprint.diff(older, fp) == {}


def test_a_transfer_rerun_with_another_proxy_winner_is_refused(tmp_path):
    """Targets of another winner are another experiment: the transferred init std differs."""
    from spartune import transfer

    cfg = tiny_config()
    chosen = {"lr": 0.01, "init_std": 0.02, "alpha_input": 1.0, "alpha_output": 1.0,
              "proxy_width": 32, "proxy_density": 1.0}
    a = transfer.target_config(cfg, chosen, name="t")
    b = transfer.target_config(cfg, {**chosen, "init_std": 0.04}, name="t")
    assert "model.init_std" in fingerprint.diff(fingerprint.of(a), fingerprint.of(b))
    c = transfer.target_config(cfg, {**chosen, "lr": 0.02}, name="t")
    assert any(k.startswith("study.space.lr") for k in
               fingerprint.diff(fingerprint.of(a), fingerprint.of(c)))


def test_a_transfer_rerun_after_the_proxy_found_another_winner_is_refused(tmp_path):
    from spartune import transfer

    proxy = _cfg(tmp_path)
    proxy.study.space = {"lr": SearchDim(values=[2.0**-9, 2.0**-8])}
    sweep.sweep(proxy)
    t = copy.deepcopy(proxy)
    t.study.name, t.transfer.source, t.transfer.hps = "targets", "fp", ["lr"]
    t.transfer.params, t.transfer.widths, t.transfer.densities = ["supar"], [64], [0.5]
    transfer.run(t)
    transfer.run(t)  # the same winner: the same experiment, resumed
    grown = copy.deepcopy(proxy)  # the proxy grows a better point (2^-7), on purpose
    grown.study.space = {"lr": SearchDim(values=[2.0**-9, 2.0**-8, 2.0**-7])}
    grown.study.allow_changes = ["study.space"]
    sweep.sweep(grown)
    with pytest.raises(ConfigError, match="study.space.lr.values") as e:
        transfer.run(t)
    assert "study 'targets' was run with another configuration" in str(e.value)
