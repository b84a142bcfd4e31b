"""Experiment trackers: a tiny sweep logs to TensorBoard, MLflow and W&B (offline) at once, and
each run is read back with the tracker's own reader: every trial's HPs and final loss."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli, tiny_config
from spartune import sweep
from spartune.collect import load_trials
from spartune.config import SearchDim

N_TRIALS = 2


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One sweep (2 trials, one cell), all three trackers on; its trials table."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    out = tmp_path_factory.mktemp("trackers")
    cfg = tiny_config(results_dir=str(out))
    cfg.study.name, cfg.study.widths, cfg.study.n_trials = "tracked", [32], N_TRIALS
    cfg.study.space = {"lr": SearchDim(low=1e-3, high=1e-1)}
    for name in ("tensorboard", "mlflow", "wandb"):
        getattr(cfg.logger, name).enabled = True
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    res = sweep.sweep(cfg)
    assert res["finished"] == N_TRIALS
    trials, _ = load_trials(sweep.open_storage(cfg), cfg.study.name)
    trials = trials[trials["state"] == "COMPLETE"]
    assert len(trials) == N_TRIALS
    return out / "tracked", trials


def _expected(trials) -> dict[int, dict]:
    return {int(r.number): {"lr": r.lr, "width": r.width, "density": r.density,
                            "final_val_loss": r.final_val_loss} for r in trials.itertuples()}


@pytest.mark.slow  # one sweep of 2 trials into three trackers: ~40 s
def test_tensorboard_event_files_hold_every_trial(tracked: tuple) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    root, trials = tracked
    runs = sorted((root / "tensorboard").rglob("trial-*"))
    assert len(runs) == N_TRIALS
    for number, want in _expected(trials).items():
        run = next(r for r in runs if r.name == f"trial-{number}")
        ea = EventAccumulator(str(run))
        ea.Reload()
        content = ea.PluginTagToContent("hparams")
        start = next(plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info
                     for c in content.values()
                     if plugin_data_pb2.HParamsPluginData.FromString(c).HasField(
                         "session_start_info"))
        assert start.hparams["lr"].number_value == pytest.approx(want["lr"])
        assert start.hparams["width"].number_value == want["width"]
        assert start.hparams["param"].string_value == "supar"
        final = ea.Scalars("final/final_val_loss")[-1].value
        assert final == pytest.approx(want["final_val_loss"], rel=1e-6)
        curve = ea.Scalars("curve/val_loss")
        assert len(curve) >= 2 and curve[-1].value == pytest.approx(final, rel=1e-6)


@pytest.mark.slow  # one sweep of 2 trials into three trackers: ~40 s
def test_mlflow_store_holds_every_trial(tracked: tuple) -> None:
    from mlflow.tracking import MlflowClient

    root, trials = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tracked")  # one experiment per study
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == N_TRIALS
    by_trial = {int(r.data.tags["trial"]): r for r in runs}
    for number, want in _expected(trials).items():
        r = by_trial[number]
        assert float(r.data.params["lr"]) == pytest.approx(want["lr"])
        assert r.data.params["param"] == "supar" and r.data.params["width"] == "32"
        assert r.data.metrics["final_val_loss"] == pytest.approx(want["final_val_loss"])
        history = client.get_metric_history(r.info.run_id, "val_loss")
        assert len(history) >= 2
        assert r.info.status == "FINISHED"


def _wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (run-*.wandb): a 7-byte header, then LevelDB-log
    blocks of 32 KiB whose chunks (checksum, length, type) carry wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or last piece
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records


@pytest.mark.slow  # one sweep of 2 trials into three trackers: ~40 s
def test_wandb_offline_runs_hold_every_trial(tracked: tuple) -> None:
    root, trials = tracked
    files = sorted((root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == N_TRIALS  # offline: files only, nothing sent
    seen = {}
    for f in files:
        recs = _wandb_records(f)
        run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
        assert run.run_group == "tracked"  # one group per study
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
        summary = {i.key: json.loads(i.value_json) for r in recs
                   if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
        history = [r for r in recs if r.WhichOneof("record_type") == "history"]
        number = int(run.display_name.rsplit("-", 1)[1])
        seen[number] = (config, summary, history)
    for number, want in _expected(trials).items():
        config, summary, history = seen[number]
        assert config["lr"] == pytest.approx(want["lr"]) and config["width"] == want["width"]
        final = summary.get("final/final_val_loss", summary.get("final", {}))
        if isinstance(final, dict):
            final = final["final_val_loss"]
        assert final == pytest.approx(want["final_val_loss"])
        assert len(history) >= 2


def test_unknown_logger_is_one_line_with_the_choices(workdir: Path) -> None:
    r = cli("spartune-sweep", "-cn", "proxy", "logger=tensorbord", cwd=workdir)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == ["spartune: error: logger: unknown choice 'tensorbord'; choose one of "
                     "mlflow, none, tensorboard, wandb"]
    assert not (workdir / "results").exists()


@pytest.mark.parametrize("tracker,module", [
    ("mlflow", "mlflow"),
    pytest.param("tensorboard", "tensorboard", marks=pytest.mark.slow),
    pytest.param("wandb", "wandb", marks=pytest.mark.slow)])
def test_missing_tracker_library_names_the_extra(workdir: Path, tracker: str,
                                                 module: str) -> None:
    """The library is blocked in a fresh interpreter, as if it were not installed."""
    code = (f"import sys; sys.modules[{module!r}] = None; "
            "sys.argv = ['spartune-sweep', '-cn', 'proxy', "
            f"'logger=[none,{tracker}]', 'data=synthetic', 'study.n_trials=1']; "
            "from spartune.cli import sweep_main; sweep_main()")
    env = {**os.environ, "SPARTUNE_HOME": str(ROOT), "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"spartune: error: logger: logger={tracker} needs the {module} package: "
        f"pip install 'spartune[{tracker}]' (or drop logger={tracker})"]
    assert not list((workdir / "results").rglob("optuna.journal"))


def test_several_loggers_at_once(workdir: Path) -> None:
    import yaml

    r = cli("spartune-sweep", "-cn", "proxy", "logger=[tensorboard,mlflow]", "--cfg", "job",
            cwd=workdir)
    assert r.returncode == 0, r.stderr
    logger = yaml.safe_load(r.stdout)["logger"]
    assert {k: v["enabled"] for k, v in logger.items()} == {
        "tensorboard": True, "mlflow": True, "wandb": False}
