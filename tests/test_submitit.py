"""Hydra's submitit launcher runs N identical sweep workers as N jobs that join one study:
`spartune-sweep -m ... hydra/launcher=submitit_local +worker='range(2)'`, the local twin of
`hydra/launcher=submitit_slurm`. Against the journal file (same machine) and PostgreSQL."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import optuna
import pytest

from conftest import cli
from spartune.collect import storage_for
from test_postgres import postgres  # noqa: F401  (the fixture: a throwaway server)

pytestmark = pytest.mark.slow  # two jobs, each a fresh Python importing torch, then trials
GRID = [-10.0, -9.0, -8.0, -7.0]  # log2(lr): 4 points, one octave apart
CELL = "supar/w32/d1/s0"


@pytest.fixture(autouse=True)
def _launcher() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="pip install 'spartune[submitit]'")


def _launch(workdir: Path, name: str, *extra: str) -> None:
    r = cli("spartune-sweep", "-m", "-cn", "lr_stability", "hydra/launcher=submitit_local",
            "+worker=range(2)", "hydra.launcher.timeout_min=10",
            "data=synthetic", "train=smoke", "train.steps=10", "model.width=32",
            "model.head_size=16", "study.widths=[32]", "study.params=[supar]",
            "study.densities=[1.0]", f"study.name={name}", "study.workers=1",
            "train.device=cpu", "train.threads=1", *extra, cwd=workdir, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = sorted((workdir / "results" / name / "multirun").rglob("*_log.out"))
    assert len(logs) == 2, logs  # two submitit jobs ran
    for log in logs:
        text = log.read_text()
        assert f"study {name}:" in text, text[-2000:]


def _trials(storage: object, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=f"{name}/{CELL}", storage=storage)
    return [t for t in study.trials if not t.user_attrs.get("surplus")]


def _pids(trials: list[optuna.trial.FrozenTrial]) -> set[str]:
    return {t.user_attrs["worker"].split(":")[1] for t in trials}


def test_two_jobs_share_one_journal_grid(workdir: Path) -> None:
    lo, hi = 2.0 ** GRID[0], 2.0 ** GRID[-1]
    _launch(workdir, "sub", "study.sampler=grid", f"study.space.lr.low={lo!r}",
            f"study.space.lr.high={hi!r}", "study.space.lr.step=1.0")
    trials = _trials(storage_for(workdir / "results" / "sub", None), "sub")
    done = Counter(round(t.params["log2_lr"]) for t in trials if t.state.name == "COMPLETE")
    assert done == Counter({int(g): 1 for g in GRID})  # every point once, none twice
    assert len(_pids(trials)) == 2  # both jobs ran trials of the one study


def test_two_jobs_share_one_postgresql_study(workdir: Path, postgres: str) -> None:  # noqa: F811
    """Random sampling, 3 trials per job: `+worker` gives each job its own sampler seed, so
    the two jobs do not propose the same points."""
    _launch(workdir, "subpg", "study.sampler=random", "study.n_trials=6",
            "study.space.lr.low=0.001", "study.space.lr.high=0.1", f"study.storage={postgres}")
    trials = [t for t in _trials(postgres, "subpg") if t.state.name == "COMPLETE"]
    assert len(trials) == 6
    assert len(_pids(trials)) == 2
    values = sorted(t.params["log2_lr"] for t in trials)
    assert all(not math.isclose(a, b) for a, b in zip(values, values[1:], strict=False))
