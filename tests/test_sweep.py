"""Sweeps: grids cover every point once, resume adds nothing, workers share a study, pruning,
and bad study definitions fail in one line before any storage is touched."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from conftest import ROOT, cli, tiny_config
from spartune import collect, sweep
from spartune.config import ConfigError, SearchDim


def grid_cfg(tmp_path, **over):
    cfg = tiny_config(results_dir=str(tmp_path), train__steps=10, train__eval_every=5)
    cfg.study.name = "g"
    cfg.study.sampler = "grid"
    cfg.study.widths, cfg.study.densities = [32], [1.0, 0.25]
    cfg.study.space = {"lr": SearchDim(low=2**-9, high=2**-5, step=2.0)}  # 3 points
    for k, v in over.items():
        setattr(cfg.study, k, v)
    return cfg


def test_grid_covers_every_point_once_and_resume_adds_nothing(tmp_path):
    cfg = grid_cfg(tmp_path)
    res = sweep.sweep(cfg)
    assert res["finished"] == res["total"] == 6
    trials, curves = collect.load_trials(sweep.open_storage(cfg), "g")
    assert len(trials) == 6 and set(trials["state"]) == {"COMPLETE"}
    for _, g in trials.groupby("cell"):
        assert sorted(g["log2_lr"]) == [-9.0, -7.0, -5.0]
    assert set(trials["density"]) == {1.0, 0.25}
    assert len(curves) == 6 * 2  # two evaluations per 10-step run
    again = sweep.sweep(cfg)
    assert again["ran_here"] == 0
    assert len(collect.load_trials(sweep.open_storage(cfg), "g")[0]) == 6


def test_trials_record_cell_hps_and_results(tmp_path):
    cfg = grid_cfg(tmp_path)
    cfg.study.space["init_std"] = SearchDim(values=[0.02])
    sweep.sweep(cfg)
    trials, _ = collect.load_trials(sweep.open_storage(cfg), "g")
    row = trials.iloc[0]
    assert row["param"] == "supar" and row["width"] == 32 and row["init_std"] == 0.02
    assert row["lr"] == pytest.approx(2.0 ** row["log2_lr"])
    assert row["value"] == pytest.approx(row["final_val_loss"])
    assert row["tokens_per_second"] > 0 and not row["diverged"]
    # how it was trained: one process, fp32, eager, the whole batch at once
    assert (row["world_size"], row["precision"], row["micro_batch_size"]) == \
        (1, "fp32", cfg.train.batch_size)
    assert row["parallel"] == "ddp"  # train.parallel's default: replicas (one, here)
    assert row["compile"] == False  # noqa: E712 (pandas' nullable boolean)


def test_diverged_runs_are_recorded_and_do_not_stop_the_sweep(tmp_path):
    cfg = grid_cfg(tmp_path, densities=[1.0], params=["sp"])
    cfg.optim.warmup_frac, cfg.optim.grad_clip = 0.0, 0.0
    cfg.study.space = {"lr": SearchDim(values=[0.01, 64.0])}
    sweep.sweep(cfg)
    trials, _ = collect.load_trials(sweep.open_storage(cfg), "g")
    assert list(trials.sort_values("lr")["diverged"]) == [False, True]
    bad = trials[trials["diverged"]].iloc[0]
    assert bad["state"] == "COMPLETE" and math.isfinite(bad["value"])
    assert math.isnan(bad["final_val_loss"])


def test_median_pruner_prunes(tmp_path):
    cfg = grid_cfg(tmp_path, sampler="random", pruner="median", n_trials=10,
                   pruner_startup_trials=2, densities=[1.0])
    cfg.train.steps, cfg.train.eval_every = 30, 5
    cfg.study.space = {"lr": SearchDim(low=2**-22, high=2**-4)}
    sweep.sweep(cfg)
    trials, curves = collect.load_trials(sweep.open_storage(cfg), "g")
    assert len(trials) == 10
    pruned = trials[trials["state"] == "PRUNED"]
    assert len(pruned) >= 1
    # a pruned trial still has its partial curve, from its intermediate values
    assert set(pruned["number"]) <= set(curves["number"])


def test_one_seeded_tpe_worker_repeats_its_search_exactly(tmp_path):
    """benchmarks/science.py relies on this: its proxy search gives the same HPs on every run."""
    found = []
    for run in ("a", "b"):
        cfg = grid_cfg(tmp_path / run, sampler="tpe", pruner="median", n_trials=8,
                       pruner_startup_trials=2, densities=[1.0])
        cfg.study.space = {"lr": SearchDim(low=1e-4, high=1e-1),
                           "init_std": SearchDim(low=0.005, high=0.1)}
        cfg.train.threads = 1
        sweep.sweep(cfg)
        trials, _ = collect.load_trials(sweep.open_storage(cfg), "g")
        found.append(trials.sort_values("number")[["lr", "init_std", "state", "value"]]
                     .reset_index(drop=True))
    assert len(found[0]) == 8 and found[0]["lr"].nunique() == 8
    pd.testing.assert_frame_equal(found[0], found[1])


def test_tpe_respects_the_budget_per_cell(tmp_path):
    cfg = grid_cfg(tmp_path, sampler="tpe", n_trials=3, densities=[1.0, 0.5])
    cfg.study.space = {"lr": SearchDim(low=1e-4, high=1e-1),
                       "init_std": SearchDim(low=0.005, high=0.1)}
    sweep.sweep(cfg)
    trials, _ = collect.load_trials(sweep.open_storage(cfg), "g")
    assert trials.groupby("cell").size().tolist() == [3, 3]
    assert trials["log2_init_std"].between(math.log2(0.005), math.log2(0.1)).all()


@pytest.mark.slow
def test_two_processes_share_one_study_without_duplicates(tmp_path):
    args = ["spartune-sweep", "-cn", "lr_stability", "data=synthetic", "train=smoke",
            "model.width=32", "model.head_size=16", "study.widths=[32]",
            "study.params=[supar]", "study.densities=[1.0]", "study.name=pair",
            "study.space.lr.low=0.000244140625", "study.space.lr.high=0.0625",
            "train.steps=10", "train.device=cpu", "train.threads=1", "study.workers=1",
            "study.sampler=grid"]
    exe = Path(sys.executable).with_name(args[0])
    env = {**os.environ, "SPARTUNE_HOME": str(ROOT)}
    procs = [subprocess.Popen([str(exe), *args[1:]], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    storage = collect.storage_for(tmp_path / "results" / "pair")
    trials, _ = collect.load_trials(storage, "pair")
    assert len(trials) == 9 and set(trials["state"]) == {"COMPLETE"}  # 2^-12 .. 2^-4
    assert sorted(trials["log2_lr"]) == [float(x) for x in range(-12, -3)]
    study = optuna.load_study(study_name="pair/supar/w32/d1/s0", storage=storage)
    assert len(study.trials) == 9  # no surplus or duplicate trial in the storage either


BAD_STUDIES = [
    ({"sampler": "bayes"}, "study.sampler"),
    ({"pruner": "asha"}, "study.pruner"),
    ({"densities": [0.0]}, "study.densities"),
    ({"params": ["smup"]}, "study.params"),
    ({"space": {"lr": SearchDim(low=0.1, high=0.001)}}, "study.space.lr"),
    ({"space": {"lr": SearchDim(low=0.0, high=0.1)}}, "study.space.lr"),
    ({"space": {"beta": SearchDim(low=0.1, high=0.2)}}, "study.space.beta.field"),
    ({"space": {}}, "study.space"),
    ({"name": "../outside"}, "study.name"),
    ({"name": "/etc/passwd"}, "study.name"),
    ({"storage": "not-a-url"}, "study.storage"),
]


@pytest.mark.parametrize("over,field", BAD_STUDIES, ids=[b[1] + str(i)
                                                         for i, b in enumerate(BAD_STUDIES)])
def test_bad_study_is_rejected_before_storage_is_touched(tmp_path, over, field):
    cfg = grid_cfg(tmp_path, **over)
    with pytest.raises(ConfigError) as e:
        sweep.sweep(cfg)
    assert e.value.field == field
    assert not any(tmp_path.iterdir())  # nothing written


def test_unreachable_database_is_one_line(workdir):
    r = cli("spartune-sweep", "-cn", "proxy", "data=synthetic",
            "study.storage=postgresql://nobody@127.0.0.1:1/none", cwd=workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("spartune: error: study.storage: cannot open")


def test_unknown_sweep_file_is_one_line(workdir):
    r = cli("spartune-sweep", "-cn", "prxy", cwd=workdir)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "prxy" in r.stderr and "proxy" in r.stderr


def test_bad_search_space_from_the_command_line(workdir):
    r = cli("spartune-sweep", "-cn", "proxy", "data=synthetic", "study.space.lr.low=0.5",
            "study.space.lr.high=0.01", cwd=workdir)
    assert r.returncode == 2 and "study.space.lr: low (0.5) is above high" in r.stderr
    assert not (workdir / "results" / "proxy" / "optuna.journal").exists()


@pytest.mark.parametrize("sampler", ["tpe", "random", "gp", "cmaes"])
def test_every_optuna_sampler_runs(tmp_path, sampler):
    cfg = grid_cfg(tmp_path, sampler=sampler, n_trials=3, densities=[1.0])
    cfg.train.steps = 4
    cfg.study.space = {"lr": SearchDim(low=1e-3, high=1e-1),
                       "init_std": SearchDim(low=0.01, high=0.1)}
    res = sweep.sweep(cfg)
    assert res["finished"] == 3


def test_corrupted_journal_is_one_line_and_left_untouched(workdir):
    journal = workdir / "results" / "x" / "optuna.journal"
    journal.parent.mkdir(parents=True)
    journal.write_text('{"op_code": 0, garbage\nnot json\n')
    before = journal.read_bytes()
    r = cli("spartune-sweep", "-cn", "proxy", "study.name=x", "data=synthetic", cwd=workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("spartune: error: study.storage: cannot read")
    assert journal.read_bytes() == before


def test_empty_data_file_is_one_line(workdir):
    (workdir / "empty.txt").write_text("")
    r = cli("spartune-train", "data=text", "data.path=empty.txt", "train=smoke", cwd=workdir)
    assert r.returncode == 2 and r.stderr.startswith("spartune: error: data.path:")


def test_worker_start_forks_only_when_the_child_stays_single_threaded(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARTUNE_WORKER_START", raising=False)
    cfg = grid_cfg(tmp_path, workers=2)
    cfg.train.threads = 1
    assert sweep.worker_context(cfg).get_start_method() == "fork"
    cfg.train.threads = 2  # GNU OpenMP's pool does not survive fork: a 2-thread child hangs
    assert sweep.worker_context(cfg).get_start_method() == "spawn"
    monkeypatch.setenv("SPARTUNE_WORKER_START", "spawn")
    cfg.train.threads = 1
    assert sweep.worker_context(cfg).get_start_method() == "spawn"


def test_forked_worker_tags_its_trials_with_its_own_pid(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARTUNE_WORKER_START", raising=False)
    cfg = grid_cfg(tmp_path, workers=2, densities=[1.0])
    cfg.study.space = {"lr": SearchDim(values=[2.0**-k for k in range(5, 13)])}  # 8 points
    cfg.train.threads, cfg.train.steps = 1, 20
    res = sweep.sweep(cfg)
    assert res["finished"] == 8 and res["worker_failures"] == 0
    study = optuna.load_study(study_name="g/supar/w32/d1/s0", storage=sweep.open_storage(cfg))
    pids = [int(t.user_attrs["worker"].split(":")[1]) for t in study.trials]
    in_child = [p for p in pids if p != os.getpid()]
    # a child tagged with its parent's pid would look alive after a crash and never be recovered
    assert 0 < len(in_child) < 8
    assert res["ran_here"] == 8  # every local worker's trials count as run now, not the parent's
