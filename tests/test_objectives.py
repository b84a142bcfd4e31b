"""A study's objective: a user's Python function (study.objective._target_) or a command
(study.command, JSON lines). Each completes a grid, prunes, fails one trial without stopping
the study, and resumes after a kill, through the same workers and storage as built-in runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config
from procs import ends_within
from spartune import collect, objectives, sweep
from spartune.config import ConfigError, SearchDim

# A user's training code, stood in for by a fake: loss 1 + |log2 lr + 7| + 1/k at eval k.
FAKE = textwrap.dedent('''
    import json, math, os, sys, time

    def loss_at(lr, k):
        return 1.0 + abs(math.log2(lr) + 7) + 1.0 / k

    def train(lr, eval_every, report, sleep=0.0, fail_above=None):
        if fail_above is not None and lr > fail_above:
            raise RuntimeError(f"lr {lr} is too large for this model")
        for k in range(1, 5):
            time.sleep(sleep)
            report(k * eval_every, loss_at(lr, k))
        done = os.environ.get("FAKE_DONE")
        if done:
            open(os.path.join(done, f"{lr:.6f}"), "w").close()
        return {"final_val_loss": loss_at(lr, 4), "steps": 4 * eval_every, "n_params": 7}

    def run(cfg, report, sleep=0.0, fail_above=None):
        return train(cfg.optim.lr, cfg.train.eval_every, report, sleep, fail_above)

    if __name__ == "__main__":
        a = dict(arg.split("=", 1) for arg in sys.argv[1:])
        pidfile = os.environ.get("FAKE_PIDS")
        if pidfile:
            with open(pidfile, "a") as f:
                f.write(f"{os.getpid()}\\n")
        print("a line that is not JSON")
        lr = float(a["lr"])
        if "fail_above" in a and lr > float(a["fail_above"]):
            print("Traceback (most recent call last):", file=sys.stderr)
            print(f"ValueError: lr {lr} is too large for this model", file=sys.stderr)
            sys.exit(3)
        out = train(lr, int(a["eval_every"]),
                    lambda s, v: print(json.dumps({"step": s, "val_loss": v}), flush=True),
                    float(a.get("sleep", 0)))
        print(json.dumps(out))
''')
GRID = [2.0**-9, 2.0**-8, 2.0**-7, 2.0**-6]
COMMAND = "{python} fake_obj.py lr={lr} eval_every={eval_every}"


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "fake_obj.py").write_text(FAKE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("fake_obj", None)


def _cfg(root: Path, *, objective=None, command=None, pruner="none", name="obj"):
    cfg = tiny_config(train__eval_every=10, train__steps=40)
    cfg.results_dir = str(root / "results")
    s = cfg.study
    s.name, s.sampler, s.pruner, s.pruner_startup_trials = name, "grid", pruner, 1
    s.space = {"lr": SearchDim(values=list(GRID))}
    s.objective = objective or {}
    s.command = command
    return cfg


def _trials(cfg):
    trials, curves = collect.load_trials(sweep.open_storage(cfg), cfg.study.name)
    return trials, curves


@pytest.mark.parametrize("kind", ["python", "command"])
def test_a_user_objective_completes_a_grid_with_curves(user_dir, kind):
    cfg = (_cfg(user_dir, objective={"_target_": "fake_obj.run"}) if kind == "python"
           else _cfg(user_dir, command=COMMAND))
    assert objectives.kind(cfg) == kind
    res = sweep.sweep(cfg)
    assert res["finished"] == 4
    trials, curves = _trials(cfg)
    assert list(trials["state"]) == ["COMPLETE"] * 4
    assert sorted(trials["log2_lr"]) == [-9.0, -8.0, -7.0, -6.0]
    best = trials.loc[trials["final_val_loss"].idxmin()]
    assert best["log2_lr"] == -7.0 and best["final_val_loss"] == pytest.approx(1.25)
    assert (trials["n_params"] == 7).all() and (trials["steps"] == 40).all()
    assert sorted(curves["step"].unique()) == [10, 20, 30, 40]  # the reported curve
    assert len(curves) == 16


@pytest.mark.parametrize("kind", ["python", "command"])
def test_a_user_objective_is_pruned_by_the_median_pruner(user_dir, kind):
    cfg = (_cfg(user_dir, objective={"_target_": "fake_obj.run"}, pruner="median")
           if kind == "python" else _cfg(user_dir, command=COMMAND, pruner="median"))
    cfg.study.sampler_seed = 1
    sweep.sweep(cfg)
    trials, _ = _trials(cfg)
    states = trials["state"].value_counts().to_dict()
    assert states.get("PRUNED", 0) >= 1 and states.get("COMPLETE", 0) >= 1, states
    assert trials.loc[trials["state"] == "COMPLETE", "log2_lr"].eq(-7.0).any() or \
        states["PRUNED"] < 4


@pytest.mark.parametrize("kind", ["python", "command"])
def test_a_failing_trial_fails_alone_and_the_study_goes_on(user_dir, kind, capsys):
    if kind == "python":
        cfg = _cfg(user_dir, objective={"_target_": "fake_obj.run", "fail_above": 0.01})
    else:
        cfg = _cfg(user_dir, command=COMMAND + " fail_above=0.01")
    from spartune.failures import ObjectiveFailing

    with pytest.raises(ObjectiveFailing, match="1 point"):  # the point: out of retries
        sweep.sweep(cfg)
    trials, _ = _trials(cfg)
    failed = trials[trials["state"] == "FAIL"]
    assert list(failed["log2_lr"]) == [-6.0, -6.0]  # 2^-6 = 0.0156 > 0.01, tried 1 + retries
    assert (trials["state"] == "COMPLETE").sum() == 3
    st = sweep.open_storage(cfg)
    import optuna

    study = optuna.load_study(study_name=f"obj/{trials['cell'].iloc[0]}", storage=st)
    error = next(t.user_attrs["error"] for t in study.trials if t.state.name == "FAIL")
    assert "lr 0.015625 is too large for this model" in error
    if kind == "command":
        assert error.startswith("command exited 3: ValueError")  # the last stderr line
    line = [ln for ln in capsys.readouterr().err.splitlines() if "failed" in ln]
    assert line and line[0].startswith(f"spartune: trial {trials['cell'].iloc[0]}#")


def test_command_without_a_final_json_line_fails_the_trial(user_dir):
    (user_dir / "quiet.py").write_text("print('done')\n")
    cfg = _cfg(user_dir, command="{python} quiet.py {lr}")
    cfg.study.space = {"lr": SearchDim(values=[0.01])}
    from spartune.failures import ObjectiveFailing

    with pytest.raises(ObjectiveFailing, match="printed no JSON line"):
        sweep.sweep(cfg)
    trials, _ = _trials(cfg)
    assert list(trials["state"]) == ["FAIL", "FAIL"]  # the point and its one retry


@pytest.mark.parametrize("change, field, words", [
    ({"command": "python train.py lr={lrr}"}, "study.command", "unknown placeholder {lrr}"),
    ({"command": "python train.py lr={lr"}, "study.command", "brace"),
    ({"command": "  "}, "study.command", "empty"),
    ({"command": "x {lr}", "objective": {"_target_": "a.b"}}, "study.command", "not both"),
    ({"objective": {"_target_": "run"}}, "study.objective._target_", "module.function"),
    ({"objective": {"steps": 3}}, "study.objective._target_", "module.function"),
])
def test_bad_objective_config_is_one_line_before_anything_runs(tmp_path, change, field, words):
    cfg = _cfg(tmp_path)
    for k, v in change.items():
        setattr(cfg.study, k, v)
    with pytest.raises(ConfigError) as e:
        sweep.validate_study(cfg)
    assert e.value.field == field and words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "results").exists()


def test_an_unimportable_target_is_one_line(user_dir):
    cfg = _cfg(user_dir, objective={"_target_": "no_such_pkg.train.run"})
    with pytest.raises(ConfigError, match="study.objective._target_: cannot import"):
        sweep.sweep(cfg)
    cfg = _cfg(user_dir, objective={"_target_": "fake_obj.nope"}, name="obj2")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        sweep.sweep(cfg)


def test_placeholders_are_filled_per_word_without_a_shell():
    argv = objectives.render("{python} t.py 'name={study}' lr={lr:.3g} x", {
        "python": "/py", "study": "a b;rm", "lr": 0.012345})
    assert argv == ["/py", "t.py", "name=a b;rm", "lr=0.0123", "x"]


# -- a real sweep process: killed mid-trial, then resumed ---------------------------------------


def _sweep_argv(kind: str) -> list[str]:
    common = ["spartune-sweep", "-cn", "lr_stability", "data=synthetic", "train=smoke",
              "model.width=32", "model.head_size=16", "study.widths=[32]",
              "study.params=[supar]", "study.densities=[1.0]", "study.name=crash",
              "study.workers=1", "study.sampler=grid",
              "study.space.lr.low=0.001953125", "study.space.lr.high=0.015625",
              "train.eval_every=10", "train.device=cpu"]
    if kind == "python":
        return [*common, "+study.objective._target_=fake_obj.run",
                "+study.objective.sleep=0.4"]
    return [*common, f"study.command='{COMMAND} sleep=0.4'"]


def _start(cwd: Path, kind: str) -> subprocess.Popen:
    argv = _sweep_argv(kind)
    exe = Path(sys.executable).with_name(argv[0])
    env = {**os.environ, "SPARTUNE_HOME": str(ROOT), "FAKE_DONE": str(cwd / "done"),
           "FAKE_PIDS": str(cwd / "pids")}
    return subprocess.Popen([str(exe), *argv[1:]], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _states(cwd: Path) -> list[str]:
    journal = cwd / "results" / "crash" / "optuna.journal"
    if not journal.exists():
        return []
    trials, _ = collect.load_trials(collect.storage_for(journal.parent), "crash")
    return list(trials.sort_values("number")["state"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["python", "command"])
def test_a_killed_user_objective_sweep_resumes_and_completes_the_grid(tmp_path, kind):
    (tmp_path / "fake_obj.py").write_text(FAKE)
    (tmp_path / "done").mkdir()
    proc = _start(tmp_path, kind)
    end = time.monotonic() + 240
    while time.monotonic() < end:  # one trial finished, the next one running
        if list((tmp_path / "done").iterdir()) and _states(tmp_path)[-1:] == ["RUNNING"]:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if kind == "command":  # the running command died with its worker: no orphan training
        pid = int((tmp_path / "pids").read_text().split()[-1])
        assert ends_within(pid, 10), f"the command {pid} outlived its killed worker"
    rerun = _start(tmp_path, kind)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    trials, _ = collect.load_trials(collect.storage_for(tmp_path / "results" / "crash"),
                                    "crash")
    complete = trials[trials["state"] == "COMPLETE"]
    assert sorted(complete["log2_lr"]) == [-9.0, -8.0, -7.0, -6.0]
    assert (trials["state"] == "FAIL").sum() == 1  # the killed one, failed and re-run


def test_ctrl_c_during_a_command_stops_the_command(user_dir, monkeypatch):
    monkeypatch.setenv("FAKE_PIDS", str(user_dir / "pids"))
    cfg = _cfg(user_dir, command=COMMAND + " sleep=0.3")

    def interrupted(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        objectives.run(cfg, interrupted, values={"lr": 0.01})
    pid = int((user_dir / "pids").read_text().split()[-1])
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: stopped and waited for, not left running
