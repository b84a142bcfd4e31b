"""Sweep trials on the machine's devices: GPU-pinned workers and multi-process (DDP) trials.

The device arithmetic is checked against a stated GPU count (CI has no GPU); the multi-process
trials run for real on the CPU, two gloo ranks per trial, launched by torch.distributed.run.
"""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from conftest import cli, tiny_config
from spartune import launch, sweep
from spartune.config import ConfigError, SearchDim


def study_cfg(tmp_path, **study):
    cfg = tiny_config(train__steps=12, train__eval_every=4, train__batch_size=4)
    cfg.results_dir, cfg.study.name = str(tmp_path / "results"), "ddp"
    s = cfg.study
    s.params, s.widths, s.densities, s.seeds = ["supar"], [32], [0.5], [0]
    s.space = {"lr": SearchDim(values=[0.003, 0.01, 0.03, 0.1])}
    s.sampler, s.pruner = "grid", "none"
    for k, v in study.items():
        setattr(s, k, v)
    return cfg


def test_each_worker_gets_its_own_gpus_round_robin(tmp_path):
    s = study_cfg(tmp_path, workers=8).study
    assert [launch.worker_devices(s, w, 8) for w in range(8)] == [[w] for w in range(8)]
    s.nproc_per_trial, s.workers = 2, 4
    pairs = [launch.worker_devices(s, w, 8) for w in range(4)]
    assert pairs == [[0, 1], [2, 3], [4, 5], [6, 7]]
    s.devices, s.nproc_per_trial = [5, 7], 1
    assert [launch.worker_devices(s, w, 8) for w in range(3)] == [[5], [7], [5]]


def test_visible_device_indices_map_to_physical_ids(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,6")
    assert launch.physical_ids([0, 2]) == ["2", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launch.physical_ids([1]) == ["1"]


def test_a_cpu_machine_keeps_its_workers_off_gpus(tmp_path):
    cfg = study_cfg(tmp_path, workers=2)
    assert launch.pin_worker(cfg, 1) == [] or launch.visible_gpus() > 0
    assert launch.rank_threads(study_cfg(tmp_path, workers=1, nproc_per_trial=2)) >= 1


@pytest.mark.parametrize("study, n_gpus, field, words", [
    (dict(devices=[0]), 0, "study.devices", "no CUDA GPU is visible"),
    (dict(devices=[0, 3]), 2, "study.devices", "GPU 3 is not visible"),
    (dict(devices=[1, 1]), 2, "study.devices", "lists a GPU twice"),
    (dict(devices=[]), 2, "study.devices", "is empty"),
    (dict(nproc_per_trial=4), 2, "study.nproc_per_trial", "need as many GPUs"),
    (dict(nproc_per_trial=2, devices=[1]), 4, "study.nproc_per_trial", "need as many GPUs"),
    (dict(nproc_per_trial=0), 0, "study.nproc_per_trial", "must be >= 1"),
    (dict(nproc_per_trial=3), 0, "train.batch_size", "not divisible by study.nproc"),
])
def test_device_fields_are_checked_against_the_gpus(tmp_path, study, n_gpus, field, words):
    cfg = study_cfg(tmp_path, **study)
    cfg.train.device = "auto"  # as a GPU machine's run would say
    with pytest.raises(ConfigError, match=words) as e:
        launch.check_devices(cfg, n_gpus)
    assert e.value.field == field


def test_more_processes_than_gpus_is_fine_on_a_cpu_run(tmp_path):
    cfg = study_cfg(tmp_path, nproc_per_trial=4)
    cfg.train.device = "cpu"
    launch.check_devices(cfg, 2)  # gloo ranks on the CPU: no GPU is asked for


def test_devices_naming_a_missing_gpu_is_one_line(workdir):
    if launch.visible_gpus():
        pytest.skip("this machine has a GPU 0")
    r = cli("spartune-sweep", "-cn", "proxy", "train=smoke", "data=synthetic",
            "study.devices=[0]", cwd=workdir)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spartune: error: study.devices: names GPU")


def _trials(cfg):
    storage = sweep.open_storage(cfg)
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        out += optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    return out


@pytest.mark.slow
def test_two_process_trials_complete_a_grid_one_trial_per_run(tmp_path):
    cfg = study_cfg(tmp_path, nproc_per_trial=2)
    res = sweep.sweep(cfg)
    assert res["finished"] == 4 and res["worker_failures"] == 0
    trials = _trials(cfg)
    assert len(trials) == 4  # no trial from rank 1, no duplicate
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["lr"] for t in trials) == [0.003, 0.01, 0.03, 0.1]
    for t in trials:
        assert t.user_attrs["world_size"] == 2  # the trial says how it was trained
        # rank 0 alone reported: one value per evaluation step
        assert sorted(t.intermediate_values) == [4, 8, 12]
        assert t.value == pytest.approx(t.intermediate_values[12])
    assert not list((tmp_path / "results" / "ddp" / ".launch").iterdir())  # cleaned up


@pytest.mark.slow
def test_two_process_trials_are_pruned_by_rank_zero(tmp_path):
    cfg = study_cfg(tmp_path, nproc_per_trial=2, sampler="tpe", pruner="median", n_trials=6,
                    pruner_startup_trials=2)
    cfg.study.space = {"lr": SearchDim(low=1e-4, high=1.0)}
    res = sweep.sweep(cfg)
    trials = _trials(cfg)
    assert len(trials) == 6 and res["finished"] == 6
    states = [t.state for t in trials]
    assert TrialState.PRUNED in states, states
    assert all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    for t in trials:
        steps = sorted(t.intermediate_values)
        assert steps == [4, 8, 12][:len(steps)]  # one value per evaluation: rank 0's
        assert steps or t.user_attrs.get("diverged")  # a large lr may diverge before step 4
