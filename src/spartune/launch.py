"""How a sweep's trials use the machine: GPU-pinned local workers, multi-process trials.

GPU-pinned workers. With `study.workers=W` on a machine with G visible GPUs, worker w trains on
its own GPU(s): the next `study.nproc_per_trial` entries of `study.devices` (default: every
visible GPU), round robin, so 8 workers on 8 GPUs run 8 trials at once instead of 8 on
`cuda:0`. CPU machines behave as before (each worker gets its share of the cores).

Multi-process trials. With `study.nproc_per_trial=N > 1`, the worker still owns the trial (it
asks Optuna for it, records its attributes and tells the result: the storage holds exactly one
trial per run), but the run itself is N ranks started by torch's own launcher
(`python -m torch.distributed.run --standalone --nproc_per_node=N -m spartune.launch SPEC`).
Pruning still works: rank 0 opens the storage and wraps the worker's trial in
optuna-integration's `TorchDistributedTrial`; every rank calls `report`/`should_prune` on it,
rank 0 alone talks to the storage and broadcasts its decision, so all ranks stop together.
Rank 0 writes the outcome (metrics, pruned, or a config error) to a file the worker reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from spartune.config import Config, ConfigError, StudyConfig

RESULT = "result.json"
_PINNED: list[int] = []  # this worker process's GPUs (pin_worker), for its multi-process trials


# -- devices ------------------------------------------------------------------------------------


def visible_gpus() -> int:
    """CUDA GPUs this process can see (0 without CUDA); does not initialise CUDA."""
    import torch

    # device_count asks NVML first, which (unlike is_available) leaves a later fork usable
    return torch.cuda.device_count()


def uses_gpus(cfg: Config, n_gpus: int) -> bool:
    return n_gpus > 0 and cfg.train.device != "cpu"


def check_devices(cfg: Config, n_gpus: int) -> None:
    """The sweep's device fields against the GPUs this machine shows (`n_gpus`)."""
    s = cfg.study
    if not isinstance(s.nproc_per_trial, int) or s.nproc_per_trial < 1:
        raise ConfigError("study.nproc_per_trial", f"must be >= 1, got {s.nproc_per_trial!r}")
    if s.devices is not None:
        if not s.devices:
            raise ConfigError("study.devices", "is empty: list GPU indices (e.g. [0,1]) or "
                              "leave it null for every visible GPU")
        if n_gpus == 0:
            raise ConfigError("study.devices", f"names GPU(s) {list(s.devices)} but no CUDA GPU "
                              "is visible here; leave study.devices null on a CPU machine")
        missing = [d for d in s.devices if not (isinstance(d, int) and 0 <= d < n_gpus)]
        if missing:
            raise ConfigError("study.devices", f"GPU {missing[0]} is not visible: this machine "
                              f"shows {n_gpus} (indices 0-{n_gpus - 1}); list only those, or "
                              "leave it null")
        if len(set(s.devices)) != len(s.devices):
            raise ConfigError("study.devices", f"{list(s.devices)} lists a GPU twice; list "
                              "each once (workers share them out round robin)")
    if uses_gpus(cfg, n_gpus):
        pool = device_pool(s, n_gpus)
        if s.nproc_per_trial > len(pool):
            raise ConfigError("study.nproc_per_trial", f"{s.nproc_per_trial} processes per "
                              f"trial need as many GPUs, but {len(pool)} are available "
                              f"({'study.devices' if s.devices else 'visible'}: {pool}); "
                              f"use at most {len(pool)} or list more study.devices")
    if s.nproc_per_trial > 1 and cfg.train.batch_size % s.nproc_per_trial:
        raise ConfigError("train.batch_size", f"{cfg.train.batch_size} is not divisible by "
                          f"study.nproc_per_trial={s.nproc_per_trial}; use a multiple of it "
                          "(the global batch is split evenly across a trial's processes)")
    if s.nproc_per_trial > 1:
        _check_integration()


def _check_integration() -> None:
    try:
        import optuna_integration  # noqa: F401
    except ImportError:
        raise ConfigError("study.nproc_per_trial", "multi-process trials need "
                          "optuna-integration (pip install 'spartune[distributed]'), or use "
                          "study.nproc_per_trial=1") from None


def device_pool(s: StudyConfig, n_gpus: int) -> list[int]:
    return list(s.devices) if s.devices else list(range(n_gpus))


def worker_devices(s: StudyConfig, worker: int, n_gpus: int) -> list[int]:
    """The GPUs of local worker `worker`: the next nproc_per_trial of the pool, round robin."""
    pool = device_pool(s, n_gpus)
    n = s.nproc_per_trial
    return [pool[(worker * n + i) % len(pool)] for i in range(n)]


def physical_ids(indices: list[int]) -> list[str]:
    """Indices among this process's visible GPUs -> what CUDA_VISIBLE_DEVICES must say."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return [str(i) for i in indices]
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    return [parts[i] for i in indices]


def pin_worker(cfg: Config, worker: int) -> list[int]:
    """Put this worker process on its own GPU (one-process trials); returns its devices."""
    n_gpus = visible_gpus()
    if not uses_gpus(cfg, n_gpus):
        return []
    devs = worker_devices(cfg.study, worker, n_gpus)
    _PINNED[:] = devs
    if cfg.study.nproc_per_trial == 1:
        import torch

        torch.cuda.set_device(devs[0])  # "cuda" (and train.device=auto) now means this GPU
    return devs


def rank_threads(cfg: Config) -> int:
    """Intra-op threads per rank of a multi-process trial: the worker's share of the cores,
    split over its ranks (train.threads, when set, is per rank)."""
    if cfg.train.threads:
        return cfg.train.threads
    per_worker = max(1, (os.cpu_count() or 1) // cfg.study.workers)
    return max(1, per_worker // cfg.study.nproc_per_trial)


# -- one trial ----------------------------------------------------------------------------------


def train_trial(cfg: Config, run_cfg: Config, report: Any, checkpoint: Path | None, *,
                study: Any, trial: Any) -> dict[str, Any]:
    """A trial's training run: in this process, or as an N-process DDP run (nproc_per_trial).

    Raises optuna.TrialPruned when the run was pruned, ConfigError for a user mistake found
    by a rank, RuntimeError when the ranks failed.
    """
    from spartune import train

    if cfg.study.nproc_per_trial == 1:
        return train.run(run_cfg, report, checkpoint=checkpoint)
    return run_ddp_trial(cfg, run_cfg, checkpoint, study=study, trial=trial)


def run_ddp_trial(cfg: Config, run_cfg: Config, checkpoint: Path | None, *, study: Any,
                  trial: Any) -> dict[str, Any]:
    import optuna

    from spartune.sweep import storage_url, study_dir

    n = cfg.study.nproc_per_trial
    run_cfg.train.threads = rank_threads(cfg)
    base = study_dir(cfg) / ".launch"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"trial{trial.number}-", dir=base))
    spec = {"cfg": cfg, "run_cfg": run_cfg, "storage": storage_url(cfg),
            "study_name": study.study_name, "trial_id": trial._trial_id,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "result": str(work / RESULT)}
    (work / "spec.pkl").write_bytes(pickle.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(run_cfg.train.threads)}
    n_gpus = visible_gpus()
    if uses_gpus(cfg, n_gpus):
        devs = _PINNED or worker_devices(cfg.study, 0, n_gpus)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(physical_ids(devs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", "-m", "spartune.launch", str(work / "spec.pkl")]
    logf = work / "ranks.log"
    with logf.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C / SIGTERM of the worker: stop the ranks with it
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    result = json.loads((work / RESULT).read_text()) if (work / RESULT).exists() else None
    tail = logf.read_text()[-1500:] if logf.exists() else ""
    if result is None or (rc != 0 and result.get("status") == "ok"):
        raise RuntimeError(f"the {n}-process run of trial {trial.number} failed (exit code "
                           f"{rc}); its log ({logf}) ends with:\n{tail}")
    shutil.rmtree(work, ignore_errors=True)
    if result["status"] == "pruned":
        raise optuna.TrialPruned()
    if result["status"] == "config_error":
        raise ConfigError(result["field"], result["message"])
    metrics = result["metrics"]
    return {k: (math.nan if v is None and k.endswith("_loss") else v)
            for k, v in metrics.items()}


# -- a rank of a multi-process trial -------------------------------------------------------------


def _rank_main(spec_path: str) -> int:
    """One rank of a multi-process trial (started by torch.distributed.run)."""
    import optuna
    import torch.distributed as dist

    from spartune import distributed, train
    from spartune.sweep import make_pruner, open_storage

    train.flush_denormals()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = pickle.loads(Path(spec_path).read_bytes())
    cfg, run_cfg = spec["cfg"], spec["run_cfg"]
    d = distributed.init(train.resolve_device(run_cfg.train.device))
    result: dict[str, Any]
    try:
        from optuna_integration import TorchDistributedTrial

        delegate = None
        if d.is_main:  # the only rank that talks to the storage
            study = optuna.load_study(study_name=spec["study_name"], storage=open_storage(cfg),
                                      sampler=optuna.samplers.RandomSampler(),
                                      pruner=make_pruner(cfg))
            delegate = optuna.trial.Trial(study, spec["trial_id"])
        dtrial = TorchDistributedTrial(delegate)

        def report(step: int, loss: float) -> None:
            dtrial.report(loss, step)
            if dtrial.should_prune():  # rank 0 decides, every rank follows
                raise optuna.TrialPruned()

        try:
            m = train.run(run_cfg, report, checkpoint=spec["checkpoint"])
            result = {"status": "ok", "metrics": m}
        except optuna.TrialPruned:
            result = {"status": "pruned"}
        except ConfigError as e:
            result = {"status": "config_error", "field": e.field,
                      "message": str(e).split(": ", 1)[1]}
        if d.is_main:
            tmp = Path(spec["result"] + ".tmp")
            tmp.write_text(json.dumps(result))
            os.replace(tmp, spec["result"])
    finally:
        # gc, barrier, destroy (distributed.close): a rank that destroys its gloo group while
        # its peer is still writing the result, or exits with the group alive, aborts in
        # gloo's threads ("terminate called without an active exception")
        with contextlib.suppress(Exception):
            distributed.close(d)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 2 if result["status"] == "config_error" else 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
