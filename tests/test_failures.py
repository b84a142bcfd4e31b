"""The failure budget (failures.py) and the checks before the first trial.

A trial the objective failed is retried at most `study.retries` times per grid or bracket point;
a cell whose last `study.max_failures` trials failed stops, and the sweep raises
ObjectiveFailing (the command's exit 4). Real sweeps, in-process and with a forked second
worker, on toy objectives that train nothing (tests/toy_objectives.py).
"""

from __future__ import annotations

import sys
from collections import Counter

import optuna
import pytest

from conftest import cli, tiny_config
from spartune import failures, sweep, transfer
from spartune.config import ConfigError, SearchDim

GRID = [2.0**-9, 2.0**-8, 2.0**-7, 2.0**-6]
FAILING_COMMAND = "{python} -c 'import sys; print(\"bad input\", file=sys.stderr); sys.exit(3)'"


def _cfg(tmp_path, *, objective=None, command=None, sampler="grid", workers=1, name="fail"):
    cfg = tiny_config(train__eval_every=10, train__steps=40, train__threads=1)
    cfg.results_dir = str(tmp_path / "results")
    s = cfg.study
    s.name, s.sampler, s.pruner, s.workers = name, sampler, "none", workers
    s.space = {"lr": SearchDim(values=list(GRID))}
    if sampler in ("tpe", "bracket"):
        s.space = {"lr": SearchDim(low=2.0**-10, high=2.0**-4, step=1.0)}
        s.n_trials = 2
    s.objective = objective or {}
    s.command = command
    return cfg


def _trials(cfg) -> list[optuna.trial.FrozenTrial]:
    storage = sweep.open_storage(cfg)
    out = []
    for cell in sweep.cells(cfg.study):
        study = optuna.load_study(study_name=f"{cfg.study.name}/{cell.key}", storage=storage)
        out += study.get_trials(deepcopy=False)
    return out


def _states(cfg) -> Counter:
    return Counter(t.state.name for t in _trials(cfg))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["python", "command", "missing_binary"])
def test_an_objective_that_always_fails_stops_its_cell_at_max_failures(tmp_path, kind,
                                                                       workers, capsys):
    if kind == "python":
        cfg = _cfg(tmp_path, objective={"_target_": "toy_objectives.raising"}, workers=workers)
    elif kind == "command":
        cfg = _cfg(tmp_path, command=FAILING_COMMAND, workers=workers)
    else:  # an executable that a placeholder names: only the trial can find it missing
        cfg = _cfg(tmp_path, command="{python}-no-such-binary {lr}", workers=workers)
    with pytest.raises(failures.ObjectiveFailing) as e:
        sweep.sweep(cfg)
    states = _states(cfg)
    assert states == Counter(FAIL=3), states  # max_failures, never more, nothing left RUNNING
    field = "study.objective" if kind == "python" else "study.command"
    assert e.value.field == field and "\n" not in str(e.value)
    msg = e.value.message
    assert "cell supar/w64/d1/s0: its last 3 trials failed" in msg
    assert msg.endswith("fix the objective, then rerun: finished trials are kept")
    words = {"python": "RuntimeError: broken at lr", "command": "exited 3: bad input",
             "missing_binary": "cannot start"}[kind]
    assert words in msg


def test_a_tpe_cell_counts_failures_toward_the_same_cap(tmp_path):
    cfg = _cfg(tmp_path, objective={"_target_": "toy_objectives.raising"}, sampler="tpe")
    cfg.study.n_trials = 1  # before the budget, every FAIL was replaced by a new trial forever
    with pytest.raises(failures.ObjectiveFailing, match="its last 3 trials failed"):
        sweep.sweep(cfg)
    assert _states(cfg) == Counter(FAIL=3)


def test_the_bracket_stops_on_a_failing_objective(tmp_path):
    cfg = _cfg(tmp_path, objective={"_target_": "toy_objectives.raising"}, sampler="bracket")
    with pytest.raises(failures.ObjectiveFailing):
        sweep.sweep(cfg)
    assert _states(cfg)["FAIL"] <= 3 and not _states(cfg)["RUNNING"]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sampler", ["grid", "bracket"])
def test_a_flaky_objective_still_completes_its_search(tmp_path, sampler, workers):
    """Each point fails once, then succeeds: one retry per point finishes every point."""
    marks = tmp_path / "marks"
    cfg = _cfg(tmp_path, objective={"_target_": "toy_objectives.flaky", "marks": str(marks)},
               sampler=sampler, workers=workers)
    cfg.study.max_failures = 10  # every point fails once: the per-point retry is under test
    sweep.sweep(cfg)
    ts = _trials(cfg)
    done = Counter(t.params["log2_lr"] for t in ts if t.state.name == "COMPLETE")
    failed = Counter(t.params["log2_lr"] for t in ts if t.state.name == "FAIL")
    assert set(done.values()) == {1} and failed == done  # each point: one FAIL, one COMPLETE
    if sampler == "grid":
        assert sorted(done) == [-9.0, -8.0, -7.0, -6.0]
    else:
        best = min((t for t in ts if t.state.name == "COMPLETE"), key=lambda t: t.value)
        assert best.params["log2_lr"] == -7.0  # the toy loss's minimum, bracketed


def _fail_above(folder, above: float) -> None:
    (folder / "tests_fail_above.py").write_text(
        "from toy_objectives import quick\n"
        "def run(cfg, report):\n"
        f"    if cfg.optim.lr > {above}:\n"
        "        raise ValueError(f'lr {cfg.optim.lr} is too large')\n"
        "    return quick(cfg, report)\n")
    sys.modules.pop("tests_fail_above", None)


def test_a_point_out_of_retries_ends_the_command_and_a_rerun_has_a_new_budget(tmp_path):
    """One grid point keeps failing: it is tried 1 + retries times, the others complete, the
    sweep ends with ObjectiveFailing; after the fix the next command runs the point again."""
    cfg = _cfg(tmp_path, objective={"_target_": "tests_fail_above.run"})
    _fail_above(tmp_path, 0.01)
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(failures.ObjectiveFailing) as e:
            sweep.sweep(cfg)
        assert "1 point(s) failed 2 times, e.g. log2_lr=-6" in e.value.message
        assert "lr 0.015625 is too large" in e.value.message
        assert _states(cfg) == Counter(COMPLETE=3, FAIL=2)
        _fail_above(tmp_path, 1.0)  # the fix, in the objective's code
        res = sweep.sweep(cfg)
        assert res["finished"] >= 4 and _states(cfg) == Counter(COMPLETE=4, FAIL=2)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tests_fail_above", None)


def test_budget_fields_are_checked(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.study.retries = -1
    with pytest.raises(ConfigError, match="study.retries"):
        sweep.validate_study(cfg)
    cfg.study.retries, cfg.study.max_failures = 1, 0
    with pytest.raises(ConfigError, match="study.max_failures"):
        sweep.validate_study(cfg)


# -- checked before the first trial ---------------------------------------------------------------


@pytest.mark.parametrize("command, words", [
    ("no_such_binary {lr}", "'no_such_binary' is not on PATH"),
    ("./not_here.sh {lr}", "'./not_here.sh' is not an executable file"),
])
def test_a_command_that_cannot_start_is_refused_before_any_trial(tmp_path, command, words):
    cfg = _cfg(tmp_path, command=command)
    with pytest.raises(ConfigError, match=words) as e:
        sweep.sweep(cfg)
    assert e.value.field == "study.command" and "\n" not in str(e.value)
    assert not (tmp_path / "results").exists()  # nothing written


def test_a_target_that_cannot_take_cfg_and_report_is_refused(tmp_path):
    cfg = _cfg(tmp_path, objective={"_target_": "toy_objectives.no_args"})
    with pytest.raises(ConfigError, match="cannot be called as fn\\(cfg, report\\)") as e:
        sweep.sweep(cfg)
    assert e.value.field == "study.objective._target_"
    cfg = _cfg(tmp_path, objective={"_target_": "toy_objectives.quick", "extra": 1})
    with pytest.raises(ConfigError, match="extra=..."):
        sweep.sweep(cfg)
    assert not (tmp_path / "results").exists()


def test_a_transfer_into_its_own_source_is_refused(tmp_path):
    cfg = tiny_config()
    cfg.results_dir = str(tmp_path / "results")
    cfg.study.name = cfg.transfer.source = "proxy"
    with pytest.raises(ConfigError, match="is also transfer.source") as e:
        transfer.run(cfg)
    assert e.value.field == "study.name"
    assert not (tmp_path / "results").exists()


def test_plot_of_a_study_without_a_completed_trial_is_one_line_exit_2(tmp_path):
    cfg = _cfg(tmp_path, objective={"_target_": "toy_objectives.raising"}, name="allfail")
    with pytest.raises(failures.ObjectiveFailing):
        sweep.sweep(cfg)
    r = cli("spartune-plot", "study.name=allfail", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("spartune: error: study.name: ")
    assert "no completed trial (it holds FAIL 3)" in lines[0]
