"""Shared fixtures: tiny configs built directly (no Hydra), CPU only, a temp results folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spartune.config import Config

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**over) -> Config:
    """A model and run small enough for a test: width 32, 2 layers, synthetic data, CPU."""
    cfg = Config()
    cfg.model.width, cfg.model.base_width, cfg.model.head_size = 32, 32, 16
    cfg.data.name, cfg.data.vocab_size = "synthetic", 64
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = 30, 8, 32
    cfg.train.eval_every, cfg.train.eval_batches = 10, 2
    cfg.train.device, cfg.train.progress = "cpu", False
    for key, value in over.items():
        group, _, field = key.partition("__")
        if field:
            setattr(getattr(cfg, group), field, value)
        else:
            setattr(cfg, key, value)
    return cfg


def fake_metrics(loss: float, lr: float, diverged: bool = False) -> dict:
    """What `train.run` returns, for a fake run function whose loss a test chooses."""
    return {"diverged": diverged, "loss_ceiling": 10.0, "final_val_loss": loss,
            "final_train_loss": loss, "best_val_loss": loss, "steps": 1,
            "tokens_per_second": 1.0, "n_params": 1, "n_nonzero_params": 1,
            "train_seconds": 0.0,
            "curve": [{"step": 1, "train_loss": loss, "val_loss": loss, "lr": lr}]}


@pytest.fixture
def tiny_cfg() -> Config:
    return tiny_config()


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a console script of this venv as a user would, from `cwd`."""
    exe = Path(sys.executable).with_name(args[0])
    env = {**os.environ, "SPARTUNE_HOME": str(ROOT), "MPLBACKEND": "Agg",
           "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([str(exe), *args[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A user's working folder: cwd for commands, results/ inside it."""
    d = tmp_path / "work"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)
