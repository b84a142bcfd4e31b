"""Sweeps that survive: SIGKILL mid-trial, Ctrl-C, and a rerun that completes the study with no
finished trial lost or repeated. Real `spartune-sweep` processes on a journal file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from spartune import collect

GRID = ["spartune-sweep", "-cn", "lr_stability", "data=synthetic", "train=smoke",
        "model.width=32", "model.head_size=16", "study.widths=[32]", "study.params=[supar]",
        "study.densities=[1.0]", "study.name=crash", "study.workers=1", "study.sampler=grid",
        "study.space.lr.low=0.001953125", "study.space.lr.high=0.015625",  # 2^-9 .. 2^-6
        "train.steps=200", "train.eval_every=10", "train.device=cpu", "train.threads=1"]


def _start(cwd: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name(GRID[0])
    env = {**os.environ, "SPARTUNE_HOME": str(ROOT)}
    # A shell without job control starts background commands with SIGINT ignored, and the
    # child would inherit that (Python then installs no KeyboardInterrupt handler): give the
    # sweep the disposition it has at a terminal, where Ctrl-C is what the user presses.
    return subprocess.Popen([str(exe), *GRID[1:]], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _states(cwd: Path) -> list[str]:
    journal = cwd / "results" / "crash" / "optuna.journal"
    if not journal.exists():
        return []
    trials, _ = collect.load_trials(collect.storage_for(journal.parent), "crash")
    return list(trials.sort_values("number")["state"])


def _wait_for(cwd: Path, proc: subprocess.Popen, pred, timeout: float = 240) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = _states(cwd)
        if pred(states):
            return states
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"timed out waiting; states {_states(cwd)}")


def _mid_grid(states: list[str]) -> bool:
    """A trial is running and another is still to come: a signal now lands mid-sweep, not
    after the last trial has finished (which made the Ctrl-C test see exit code 0 once)."""
    return states[-1:] == ["RUNNING"] and len(states) < 4


def _finish(cwd: Path) -> subprocess.CompletedProcess:
    p = _start(cwd)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_completes_the_grid(tmp_path):
    proc = _start(tmp_path)
    before = _wait_for(tmp_path, proc,
                       lambda s: s.count("COMPLETE") >= 1 and _mid_grid(s))
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the trial stays RUNNING
    proc.wait()
    done_before = before.count("COMPLETE")
    assert _states(tmp_path).count("RUNNING") == 1
    rerun = _finish(tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    trials, _ = collect.load_trials(collect.storage_for(tmp_path / "results" / "crash"), "crash")
    complete = trials[trials["state"] == "COMPLETE"]
    print(f"\nSIGKILL test: {done_before} complete before the kill; after the rerun "
          f"{trials['state'].value_counts().to_dict()}")
    assert sorted(complete["log2_lr"]) == [-9.0, -8.0, -7.0, -6.0]  # the grid, once each
    assert len(complete) >= done_before  # no finished trial lost
    assert (trials["state"] == "FAIL").sum() == 1  # the killed one, failed and re-run


@pytest.mark.slow
def test_ctrl_c_marks_the_trial_failed_and_says_how_to_resume(tmp_path):
    proc = _start(tmp_path)
    _wait_for(tmp_path, proc, _mid_grid)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("spartune: interrupted") and "same command" in last
    states = _states(tmp_path)
    assert "RUNNING" not in states and states[-1] == "FAIL"  # consistent storage
    rerun = _finish(tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert _states(tmp_path).count("COMPLETE") == 4
