"""Sharded runs (train.parallel=fsdp, FSDP2's fully_shard) on the CPU (gloo, 2 ranks).

The multi-process tests start real ranks with torch's own launcher running tests/fsdp_run.py
(what every rank saw goes to rank<R>.json); they are slow and few: one run compares fsdp,
ddp and one process and then resumes its DCP checkpoint both sharded and in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fsdp_run
from conftest import ROOT, tiny_config
from spartune import train
from spartune.config import ConfigError, validate

SCRIPT = Path(__file__).with_name("fsdp_run.py")
BASE = dict(model__density=0.5, model__sparse_impl="masked", train__steps=20,
            train__batch_size=8, train__eval_every=5, train__threads=1)
FSDP = {**BASE, "train__parallel": "fsdp"}


def torchrun(mode: str, over: dict, out: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", str(SCRIPT), mode, json.dumps(over),
                        str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def ranks(out: Path, n: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def losses(curve: list[dict]) -> list[float]:
    return [v for row in curve for v in (row["train_loss"], row["val_loss"])]


def assert_close(a: list[float], b: list[float], tol: float = 1e-5) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= tol * max(1.0, abs(y)), (x, y)


def lrs_of(s: train.Setup) -> dict[str, list[float]]:
    names = {id(p): n for n, p in s.model.named_parameters()}
    return {names[id(p)]: [g["lr"], g["lr_mult"], g["weight_decay"]]
            for g in s.optimizer.param_groups for p in g["params"]}


@pytest.mark.slow
def test_fsdp_trains_the_ddp_and_one_process_run_and_resumes_its_dcp_checkpoint(tmp_path):
    """20 steps, global batch 8, fp32: fsdp == ddp == one process to 1e-5; masked entries
    and moments exactly 0 on every shard; LRs per parameter name as unsharded; the step-10
    DCP checkpoint resumes sharded (same world size) and in one process, to the same losses."""
    one, one_s = train.run_and_keep(tiny_config(**BASE))
    ckpt = tmp_path / "ck.pt"  # a sharded run writes the folder ck.dcp/
    torchrun("run", {**FSDP, "train__checkpoint_every": 10, "checkpoint": str(ckpt)},
             tmp_path / "fsdp")
    torchrun("run", BASE, tmp_path / "ddp")
    f0, f1 = ranks(tmp_path / "fsdp")
    d0 = ranks(tmp_path / "ddp")[0]
    assert (f0["parallel"], f0["world_size"], d0["parallel"]) == ("fsdp", 2, "ddp")
    assert_close(losses(f0["curve"]), losses(one["curve"]))
    assert_close(losses(f0["curve"]), losses(d0["curve"]))
    assert losses(f0["curve"]) == losses(f1["curve"])  # every rank logs the global numbers
    metrics = json.loads((tmp_path / "fsdp" / "run" / "metrics.json").read_text())
    assert metrics["parallel"] == "fsdp" and metrics["world_size"] == 2
    assert metrics["n_nonzero_params"] == one["n_nonzero_params"]

    # SμPar under sharding: every rank holds half the rows of each weight and of its mask,
    # masked entries of weight, exp_avg and exp_avg_sq are exactly 0 on each shard
    for r in (f0, f1):
        assert r["masked_zero"] and r["masked_layers"] == 8
        for full, w, m, placement in r["shards"].values():
            assert w == m == [full[0] // 2, full[1]] and "Shard(dim=0)" in placement
    # param groups rebuilt from names: each parameter's LR, lr_mult and decay as unsharded
    assert f0["lrs"] == f1["lrs"] == lrs_of(one_s)
    assert len({v[1] for v in f0["lrs"].values()}) > 1  # SμPar: more than one multiplier
    # 1/2 of ddp's parameter + optimizer bytes per rank (masks included), to padding
    ratio = ((f0["rank_param_bytes"] + f0["rank_optimizer_bytes"])
             / (d0["rank_param_bytes"] + d0["rank_optimizer_bytes"]))
    assert ratio <= 0.55

    # the DCP folder holds step 10: the same world size resumes there, to the same losses
    assert (tmp_path / "ck.dcp" / ".metadata").is_file() and not ckpt.exists()
    torchrun("run", {**FSDP, "train__checkpoint_every": 10, "checkpoint": str(ckpt)},
             tmp_path / "again")
    again = ranks(tmp_path / "again")
    assert [r["resumed_step"] for r in again] == [10, 10] and f0["resumed_step"] == 0
    assert losses(again[0]["curve"]) == losses(f0["curve"])
    assert again[0]["masked_zero"] and again[1]["masked_zero"]
    # ... and one process loads it (shards resharded to full tensors, masks included)
    solo, solo_s = train.run_and_keep(tiny_config(**BASE, train__checkpoint_every=10),
                                      checkpoint=ckpt)
    assert solo["resumed_step"] == 10
    assert_close(losses(solo["curve"]), losses(f0["curve"]))
    for (name, a), b in zip(solo_s.model.state_dict().items(),
                            one_s.model.state_dict().values(), strict=True):
        if name.endswith("_mask"):
            assert bool((a == b).all()), name  # the run's masks came back whole


@pytest.mark.slow
def test_a_users_model_parameterized_then_sharded_trains_as_one_process(tmp_path):
    """examples/own_model: parameterize, then fully_shard (model.shard), then the optimizer
    from the re-bound handle: the losses, LRs per name and masked zeros of one process."""
    one = fsdp_run.own({})
    torchrun("own", {}, tmp_path)
    r0, r1 = ranks(tmp_path)
    assert_close(r0["losses"], one["losses"])
    assert r0["lrs"] == one["lrs"] and len({v[1] for v in one["lrs"].values()}) > 1
    for r in (r0, r1):
        assert r["masked_zero"] and r["masked_layers"] == 8  # 2 blocks x 4 projections
        assert r["counts"] == one["counts"]
        for full, w, m, _ in r["shards"].values():
            assert w == m == [full[0] // 2, full[1]]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_spartune_train_with_fsdp_exits_cleanly_ten_times_in_a_row(workdir):
    """The README's command, ten times: both ranks of every run exit 0 (no hang, no abort at
    the process group's teardown) and write metrics that say fsdp. The ranks are started
    with the environment torchrun gives them (RANK, WORLD_SIZE, MASTER_ADDR/PORT) but without
    its agent, so each rank's own exit status is seen and a launch costs two interpreters,
    not three (test_fsdp's other tests and test_ddp.py go through torchrun itself)."""
    exe = Path(sys.executable).with_name("spartune-train")
    clean = 0
    for i in range(10):
        base = {**os.environ, "SPARTUNE_HOME": str(ROOT), "OMP_NUM_THREADS": "1",
                "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port())}
        procs = [subprocess.Popen(
            [str(exe), "train=smoke", "data=synthetic", "train.device=cpu", "train.steps=2",
             "train.eval_every=2", "train.parallel=fsdp", "model.width=32",
             "model.head_size=16", "model.depth=1", f"name=f{i}", f"hydra.run.dir=results/f{i}"],
            cwd=workdir, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        codes = [p.returncode for p in procs]
        assert codes == [0, 0], f"run {i + 1}: exit codes {codes}\n{errs[0][-2000:]}\n" \
                                f"{errs[1][-2000:]}"
        m = json.loads((workdir / "results" / f"f{i}" / "metrics.json").read_text())
        assert m["parallel"] == "fsdp" and m["world_size"] == 2
        clean += 1
    assert clean == 10


# -- bad input: one line each ------------------------------------------------------------------

# The command-line forms (one line, exit 2, no run folder) are rows of the README's Bad input
# table, run in-process by tests/test_bad_input_table.py; here the library's refusals.


def test_fsdp_without_torchrun_is_refused(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"^train.parallel: fsdp shards the model over the "
                                          r"processes torchrun starts"):
        train.run(tiny_config(train__parallel="fsdp", train__steps=1))


def test_fsdp_with_compressed_layers_is_refused():
    with pytest.raises(ConfigError, match=r"^model.sparse_impl: compressed layers cannot be "
                                          r"sharded by train.parallel=fsdp"):
        validate(tiny_config(train__parallel="fsdp", model__density=0.25,
                             model__sparse_impl="compressed"))


def test_an_unknown_parallel_value_is_refused():
    with pytest.raises(ConfigError, match=r"^train.parallel: unknown value 'zero3'; choose one "
                                          r"of ddp, fsdp"):
        validate(tiny_config(train__parallel="zero3"))


@pytest.fixture
def one_rank_group(tmp_path):
    """A process group of one rank in this process: fsdp's whole path without torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


SMALL = dict(BASE, train__steps=6, train__eval_every=3, train__checkpoint_every=3)


def test_one_rank_fsdp_trains_the_one_process_run_and_resumes(tmp_path, one_rank_group):
    one = train.run(tiny_config(**{**SMALL, "train__checkpoint_every": 0}))
    ckpt = tmp_path / "c.pt"
    fsdp = dict(SMALL, train__parallel="fsdp", train__micro_batch_size=2)  # 4 reduce-scatters
    first, s = train.run_and_keep(tiny_config(**fsdp), checkpoint=ckpt)
    assert first["parallel"] == "fsdp" and first["resumed_step"] == 0
    assert first["grad_accum_steps"] == 4
    assert fsdp_run.masked_zero(s.model, s.optimizer) == (True, 8)  # on the DTensor shards
    assert_close(losses(first["curve"]), losses(one["curve"]))
    assert (tmp_path / "c.dcp" / ".metadata").is_file() and not ckpt.exists()
    again = train.run(tiny_config(**fsdp), checkpoint=ckpt)
    assert again["resumed_step"] == 3 and losses(again["curve"]) == losses(first["curve"])


def test_fsdp_does_not_silently_restart_a_checkpoint_it_cannot_read(tmp_path, one_rank_group):
    ckpt = tmp_path / "c.pt"
    train.run(tiny_config(**SMALL), checkpoint=ckpt)  # a one-process (ddp) checkpoint
    assert ckpt.exists()
    with pytest.raises(ConfigError, match=r"^train.parallel: .*c.pt is a checkpoint of a run "
                                          r"that was not sharded"):
        train.run(tiny_config(**SMALL, train__parallel="fsdp"), checkpoint=ckpt)


def test_auto_layout_is_masked_under_fsdp_and_says_so(one_rank_group, capsys):
    m = train.run(tiny_config(model__density=0.25, model__sparse_impl="auto",
                              train__parallel="fsdp", train__steps=1, train__eval_every=1))
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "sparse_impl=auto" in ln]
    assert notes == ["spartune: note: model.sparse_impl=auto is masked under "
                     "train.parallel=fsdp (fully_shard shards dense weights; compressed layers "
                     "are not sharded)"]
    assert {r["impl"] for r in m["hidden_layers"]} == {"masked"}
