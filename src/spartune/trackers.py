"""Experiment trackers: each finished trial becomes one run in TensorBoard, MLflow and/or W&B.

Called once per trial, after Optuna has the result (sweep.run_trial), never from the training
step: a run is written in one go from the trial's HPs, its curve and its final metrics. One run
group per study: a TensorBoard logdir, an MLflow experiment, a W&B group. Every tracker is
local by default (event files, an MLflow SQLite file, W&B offline mode): nothing is downloaded
or sent unless the user points it at a server.

The trackers' own libraries write the runs; each is an extra of the package, and a missing one
is a one-line ConfigError naming it. optuna-integration's callbacks are not used: they run in
`study.optimize` (spartune asks and tells) and log the sampler's params (`log2_lr`) and the
value only, not the run's HPs or its curve.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from spartune import atomic
from spartune.config import Config, ConfigError

log = logging.getLogger(__name__)

# tracker -> (the module it needs, the extra that installs it)
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
         "wandb": ("wandb", "wandb")}
WANDB_MODES = ("offline", "online", "disabled")
# What a run records, besides its curve: the trial's HPs and its final metrics.
HPARAMS = ("role", "param", "width", "base_width", "depth", "density", "seed", "lr", "init_std",
           "alpha_input", "alpha_output")
FINALS = ("final_val_loss", "final_train_loss", "best_val_loss", "diverged", "steps")


def enabled(cfg: Config) -> list[str]:
    lc = cfg.logger
    return [n for n in NEEDS if getattr(lc, n).enabled]


def check(cfg: Config) -> None:
    """Fail before any trial runs when a chosen tracker's library is missing or misconfigured."""
    for name in enabled(cfg):
        _require(name)
    if cfg.logger.wandb.enabled and cfg.logger.wandb.mode not in WANDB_MODES:
        raise ConfigError("logger.wandb.mode", f"unknown mode {cfg.logger.wandb.mode!r}; "
                          f"choose one of {', '.join(WANDB_MODES)}")


def _require(name: str) -> Any:
    module, extra = NEEDS[name]
    try:
        if name == "tensorboard":  # torch's writer needs the tensorboard package
            return importlib.import_module("torch.utils.tensorboard")
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError("logger", f"logger={name} needs the {module} package: "
                          f"pip install 'spartune[{extra}]' (or drop logger={name})") from None


def study_dir(cfg: Config) -> Path:
    return Path(cfg.results_dir) / cfg.study.name


def log_trial(cfg: Config, cell: str, number: int, hps: dict[str, Any],
              metrics: dict[str, Any]) -> None:
    """Write one finished trial (`metrics` as train.run returns them) to every chosen tracker.

    A tracker that fails to write loses that run only: the trial is already in the storage,
    so the sweep goes on and the failure is one warning.
    """
    names = enabled(cfg)
    if not names:
        return
    run = _Run(study=cfg.study.name, cell=cell, number=number,
               hps={k: hps[k] for k in HPARAMS if hps.get(k) is not None},
               finals={k: float(metrics[k]) for k in FINALS if _finite(metrics.get(k))},
               curve=metrics.get("curve", []))
    for name in names:
        _require(name)
        try:
            WRITERS[name](cfg, run)
        except Exception as e:  # a full disk, a server down: the study itself is safe
            log.warning("logger=%s: could not log trial %s #%d: %s", name, cell, number,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)


def _finite(v: Any) -> bool:
    return isinstance(v, bool | int | float) and math.isfinite(float(v))


class _Run:
    """One trial as every tracker sees it."""

    def __init__(self, study: str, cell: str, number: int, hps: dict[str, Any],
                 finals: dict[str, float], curve: list[dict[str, Any]]) -> None:
        self.study, self.cell, self.number = study, cell, number
        self.hps, self.finals, self.curve = hps, finals, curve
        self.name = f"{cell}/trial-{number}"

    def points(self) -> list[tuple[int, dict[str, float]]]:
        """(step, {train_loss, val_loss, lr}) per evaluation, finite values only."""
        out = []
        for r in self.curve:
            vals = {"train_loss": r.get("train_loss"), "val_loss": r.get("val_loss"),
                    "lr": r.get("lr")}
            out.append((int(r["step"]), {k: float(v) for k, v in vals.items() if _finite(v)}))
        return out


def _tensorboard(cfg: Config, run: _Run) -> None:
    from torch.utils.tensorboard import SummaryWriter

    root = Path(cfg.logger.tensorboard.dir or study_dir(cfg) / "tensorboard")
    with SummaryWriter(log_dir=str(root / run.cell / f"trial-{run.number}")) as w:
        for step, vals in run.points():
            for k, v in vals.items():
                w.add_scalar(f"curve/{k}", v, step)
        # The HParams tab: one row per trial, its HPs against its final metrics.
        w.add_hparams(run.hps, {f"final/{k}": v for k, v in run.finals.items()}, run_name=".")


def _mlflow(cfg: Config, run: _Run) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mc = cfg.logger.mlflow
    uri = mc.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    lock = contextlib.nullcontext()
    if not uri:  # MLflow's local default (its file store is in maintenance mode since 3.x)
        db = study_dir(cfg).resolve() / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        uri, lock = f"sqlite:///{db}", atomic.file_lock(db.with_suffix(".lock"))
    with lock:  # local workers take turns: SQLite has one writer, and its schema is made once
        _mlflow_write(MlflowClient(tracking_uri=uri), mc.experiment or run.study, run,
                      Metric, Param, MlflowException)


def _mlflow_write(client: Any, name: str, run: _Run, Metric: Any, Param: Any,
                  MlflowException: Any) -> None:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name)
        except MlflowException:  # another worker created it first
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    tags = {"study": run.study, "cell": run.cell, "trial": str(run.number)}
    rid = client.create_run(exp_id, run_name=run.name, tags=tags).info.run_id
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, step) for step, vals in run.points() for k, v in vals.items()]
    metrics += [Metric(k, v, ts, 0) for k, v in run.finals.items()]
    params = [Param(k, str(v)) for k, v in run.hps.items()]
    for i in range(0, max(len(metrics), 1), 900):  # MLflow takes at most 1000 per batch
        client.log_batch(rid, metrics=metrics[i:i + 900], params=params if i == 0 else [])
    client.set_terminated(rid, "FINISHED")


def _wandb(cfg: Config, run: _Run) -> None:
    import wandb

    wc = cfg.logger.wandb
    d = Path(wc.dir or study_dir(cfg))
    d.mkdir(parents=True, exist_ok=True)
    r = wandb.init(project=wc.project, entity=wc.entity, group=run.study, name=run.name,
                   job_type=str(run.hps.get("role", "search")), config=run.hps, dir=str(d),
                   mode=wc.mode, reinit="create_new",
                   settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
    try:
        for step, vals in run.points():
            r.log(vals, step=step)
        r.summary.update({f"final/{k}": v for k, v in run.finals.items()})
    finally:
        r.finish()


WRITERS = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}
