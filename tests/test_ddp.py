"""Data-parallel runs on the CPU (gloo): N ranks train the run one process trains.

Each test starts real ranks with torch's own launcher (torch.distributed.run) running
tests/ddp_run.py, which writes what every rank saw; the multi-process ones are slow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config
from spartune import distributed, train
from spartune.config import ConfigError

SCRIPT = Path(__file__).with_name("ddp_run.py")


def torchrun(mode: str, over: dict, out: Path, nproc: int = 2,
             check: bool = True) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", str(SCRIPT), mode, json.dumps(over),
                        str(out)], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def ranks(out: Path, n: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def losses(curve: list[dict]) -> list[float]:
    return [v for row in curve for v in (row["train_loss"], row["val_loss"])]


def assert_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x, y, rel_tol=rel), (x, y)


BASE = dict(model__density=0.5, train__steps=20, train__batch_size=8, train__eval_every=5,
            train__threads=1)


@pytest.mark.slow
def test_two_ranks_train_the_one_process_run(tmp_path):
    one = train.run(tiny_config(**BASE))
    torchrun("run", BASE, tmp_path)
    r0, r1 = ranks(tmp_path)
    assert r0["world_size"] == 2
    assert_close(losses(r0["curve"]), losses(one["curve"]), 1e-5)
    assert losses(r0["curve"]) == losses(r1["curve"])  # every rank logs the global numbers
    assert r0["masked_zero"] and r1["masked_zero"]
    assert r0["mask_digest"] == r1["mask_digest"]
    # rank 0 alone wrote the run's outputs
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["micro_batch_size"] == 4


@pytest.mark.slow
def test_two_ranks_train_the_one_process_run_with_compressed_layers(tmp_path):
    """The compressed layout (values + CSR indices) under DDP: its `values` are ordinary
    parameters, so the all-reduce averages them like any weight; both ranks hold one mask."""
    over = {**BASE, "model__density": 0.25, "model__sparse_impl": "compressed"}
    one = train.run(tiny_config(**over))
    torchrun("run", over, tmp_path)
    r0, r1 = ranks(tmp_path)
    assert_close(losses(r0["curve"]), losses(one["curve"]), 1e-5)
    assert r0["mask_digest"] == r1["mask_digest"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {row["impl"] for row in metrics["hidden_layers"]} == {"compressed"}


@pytest.mark.slow
def test_ddp_all_reduce_and_the_mask_hook_compose(tmp_path):
    torchrun("grad", dict(model__density=0.25, train__batch_size=8), tmp_path)
    for r in ranks(tmp_path):
        assert r["masked_layers"] == 8  # 2 blocks x 4 hidden projections
        assert r["zero_at_masked"] and r["nonzero_at_kept"] and r["mean_matches"]


@pytest.mark.slow
def test_ddp_with_micro_batches_and_a_crash_resumes_to_the_same_losses(tmp_path):
    over = dict(BASE, train__micro_batch_size=2, train__checkpoint_every=10)
    torchrun("run", dict(over, checkpoint=str(tmp_path / "a.pt")), tmp_path / "a")
    ckpt = str(tmp_path / "b.pt")
    r = torchrun("die", dict(over, checkpoint=ckpt, die_at=10), tmp_path / "b", check=False)
    assert r.returncode != 0 and Path(ckpt).exists()  # killed after the step-10 checkpoint
    torchrun("run", dict(over, checkpoint=ckpt), tmp_path / "b")
    a, b = ranks(tmp_path / "a")[0], ranks(tmp_path / "b")[0]
    # Resumed from step 10 on every rank, not restarted (a restart gives the same losses too)
    assert a["reported"] == [5, 10, 15, 20]
    assert all(r["reported"] == [15, 20] for r in ranks(tmp_path / "b"))
    assert losses(a["curve"]) == losses(b["curve"])
    one = train.run(tiny_config(**BASE))
    assert_close(losses(a["curve"]), losses(one["curve"]), 1e-5)


@pytest.mark.slow
def test_a_rank_with_other_masks_fails_loudly(tmp_path):
    over = dict(BASE, only_rank1={"model__mask_seed": 5})
    r = torchrun("run", over, tmp_path, check=False)
    assert r.returncode != 0
    assert "hold different sparsity masks than rank 0" in r.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_torchrun_spartune_train_writes_one_run_folder(workdir):
    exe = Path(sys.executable).with_name("spartune-train")
    env = {**os.environ, "SPARTUNE_HOME": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "--no-python", str(exe), "train=smoke",
                        "data=synthetic", "train.device=cpu", "train.steps=4",
                        "train.eval_every=2", "name=ddp", "hydra.run.dir=results/ddp/run"],
                       cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((workdir / "results").rglob("metrics.json"))
    assert len(runs) == 1
    m = json.loads(runs[0].read_text())
    assert m["world_size"] == 2 and m["precision"] == "fp32" and m["compile"] is False


@pytest.mark.slow
def test_a_batch_the_ranks_cannot_share_is_one_line(workdir):
    exe = Path(sys.executable).with_name("spartune-train")
    env = {**os.environ, "SPARTUNE_HOME": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "--no-python", str(exe), "train=smoke",
                        "data=synthetic", "train.device=cpu", "train.batch_size=5"],
                       cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("spartune: error:")]
    assert errors and all(e.startswith("spartune: error: train.batch_size: 5 is not divisible "
                                       "by the 2 processes") for e in errors), r.stderr[-2000:]


def test_batch_and_micro_batch_must_split_over_the_ranks():
    d = distributed.Dist(rank=0, world_size=4)
    assert distributed.per_rank_batch(16, None, d) == (4, 4)
    assert distributed.per_rank_batch(16, 2, d) == (4, 2)
    with pytest.raises(ConfigError, match="train.batch_size"):
        distributed.per_rank_batch(18, None, d)
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        distributed.per_rank_batch(16, 3, d)  # 3 divides no rank's 4 rows


def test_different_masks_have_different_digests():
    a = train.setup(tiny_config(model__density=0.5)).model
    b = train.setup(tiny_config(model__density=0.5)).model
    c = train.setup(tiny_config(model__density=0.5, model__mask_seed=99)).model
    assert distributed.mask_digest(a) == distributed.mask_digest(b)
    assert distributed.mask_digest(a) != distributed.mask_digest(c)
