"""examples/own_model from its README: the training script's JSON-lines protocol, and the
proxy sweep, transfer and coordinate check commands (tiny overrides), run in a copy of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import cli
from own_model import EXAMPLE

FAST = ["train.steps=6", "train.eval_every=3", "train.batch_size=4", "train.seq_len=32",
        "train.threads=1"]


@pytest.fixture
def example(tmp_path: Path) -> Path:
    d = tmp_path / "own_model"
    shutil.copytree(EXAMPLE, d, ignore=shutil.ignore_patterns("results", "__pycache__"))
    return d


def test_train_script_speaks_the_json_lines_protocol(example):
    out = subprocess.run([sys.executable, "train.py", "width=32", "base_width=32", "steps=4",
                          "eval_every=2", "seq_len=32", "density=0.5"], cwd=example,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = [json.loads(ln) for ln in out.stdout.splitlines()]
    assert [ln["step"] for ln in lines[:-1]] == [2, 4]
    final = lines[-1]
    assert final["final_val_loss"] == lines[-2]["val_loss"]
    assert final["n_nonzero_params"] < final["n_params"]


def test_unknown_placeholder_in_the_command_is_one_line(example):
    r = cli("spartune-sweep", "-cn", "proxy", "study.command='{python} train.py lr={lrr}'",
            cwd=example)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        "spartune: error: study.command: unknown placeholder {lrr}; use one of")
    assert not (example / "results" / "proxy" / "optuna.journal").exists()


@pytest.mark.slow
def test_readme_commands_proxy_transfer_coord(example):
    r = cli("spartune-sweep", "-cd", ".", "-cn", "own_proxy", "study.n_trials=2", *FAST,
            cwd=example, timeout=600)
    assert r.returncode == 0, r.stderr
    trials = pd.read_csv(example / "results" / "own_proxy" / "trials.csv")
    assert list(trials["state"]) == ["COMPLETE", "COMPLETE"]
    r = cli("spartune-transfer", "-cd", ".", "-cn", "own_transfer", *FAST,
            "transfer.widths=[64]", "transfer.densities=[1.0,0.25]", cwd=example, timeout=600)
    assert r.returncode == 0, r.stderr
    targets = pd.read_csv(example / "results" / "own_transfer" / "trials.csv")
    assert len(targets) == 4 and (targets["state"] == "COMPLETE").all()
    assert set(targets["base_width"]) == {64} and targets["final_val_loss"].notna().all()
    out = subprocess.run([sys.executable, "coord.py", "--quick"], cwd=example,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "coordinate check PASSED" in out.stdout
    assert (example / "results" / "own_coord" / "coord_check.png").exists()
