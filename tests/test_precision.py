"""Precision, micro-batches and compile: the same run, the same SμPar invariants.

The global batch is the HP: splitting it into micro-batches must not change the loss curve.
bf16/fp16 autocast keeps fp32 master weights and AdamW state, so masked weights and their Adam
moments stay exactly zero at every precision; fp16's gradient scaler counts the steps it skips.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import cli, tiny_config
from spartune import train
from spartune.config import ConfigError, validate
from spartune.sparsity import SparseLinear


def assert_masked_state_zero(s: train.Setup) -> int:
    """Every masked weight, and its AdamW moments, exactly 0; returns how many were checked."""
    checked = 0
    for layer in s.model.hidden_layers():
        if layer.mask is None:
            continue
        off = ~layer.mask
        assert layer.weight.dtype == torch.float32  # fp32 master weights
        assert torch.count_nonzero(layer.weight.detach()[off]) == 0
        state = s.optimizer.state[layer.weight]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.float32
            assert torch.count_nonzero(state[key][off]) == 0, key
        assert torch.count_nonzero(layer.weight.detach()[layer.mask]) > 0  # it did train
        checked += int(off.sum())
    assert checked > 0
    return checked


def _losses(m: dict) -> list[float]:
    return [v for r in m["curve"] for v in (r["train_loss"], r["val_loss"])]


def _close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x, y, rel_tol=rel), (x, y)


def test_micro_batches_give_the_loss_curve_of_the_whole_batch():
    base = dict(model__density=0.5, train__steps=20, train__batch_size=8, train__eval_every=5)
    whole = train.run(tiny_config(**base))
    quarter, s = train.run_and_keep(tiny_config(**base, train__micro_batch_size=2))
    assert quarter["micro_batch_size"] == 2 and quarter["grad_accum_steps"] == 4
    assert whole["micro_batch_size"] == 8 and whole["grad_accum_steps"] == 1
    _close(_losses(quarter), _losses(whole), 1e-5)
    assert_masked_state_zero(s)


@pytest.mark.slow
def test_bf16_on_cpu_trains_like_fp32_and_keeps_masked_state_zero():
    base = dict(model__density=0.25, train__steps=100, train__eval_every=50)
    fp32 = train.run(tiny_config(**base))
    bf16, s = train.run_and_keep(tiny_config(**base, train__precision="bf16"))
    assert bf16["steps"] == 100 and not bf16["diverged"]
    assert bf16["precision"] == "bf16" and bf16["skipped_steps"] == 0
    assert abs(bf16["final_val_loss"] - fp32["final_val_loss"]) <= 0.03 * fp32["final_val_loss"]
    assert bf16["final_val_loss"] != fp32["final_val_loss"]  # it really ran in bf16
    assert_masked_state_zero(s)


def test_fp16_counts_the_steps_its_scaler_skips():
    # alpha_output 64 makes the logits' gradients large enough to overflow fp16 at the
    # scaler's initial scale (2^16): the first steps are skipped while the scale comes down.
    base = dict(model__density=0.5, train__steps=10, param__alpha_output=64.0,
                train__loss_ceiling=1e9)
    fp16, s = train.run_and_keep(tiny_config(**base, train__precision="fp16"))
    fp32 = train.run(tiny_config(**base))
    assert fp16["skipped_steps"] > 0 and fp32["skipped_steps"] == 0
    assert fp16["skipped_steps"] < 10 and math.isfinite(fp16["final_val_loss"])
    assert_masked_state_zero(s)


def test_metrics_say_how_the_run_was_trained(tmp_path):
    cfg = tiny_config(train__steps=4, train__eval_every=2, train__micro_batch_size=4,
                      train__precision="bf16")
    train.run(cfg, out_dir=tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["world_size"] == 1 and saved["precision"] == "bf16"
    assert saved["compile"] is False and saved["micro_batch_size"] == 4
    assert saved["skipped_steps"] == 0


def test_a_bf16_checkpoint_does_not_resume_an_fp32_run(tmp_path):
    cfg = tiny_config(train__steps=10, train__checkpoint_every=5, train__precision="bf16")
    train.run(cfg, checkpoint=tmp_path / "c.pt")  # leaves the step-5 checkpoint
    assert (tmp_path / "c.pt").exists()
    with pytest.raises(Exception, match="train.checkpoint_every"):
        train.run(tiny_config(train__steps=10, train__checkpoint_every=5),
                  checkpoint=tmp_path / "c.pt")


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_cxx(), reason="torch.compile on CPU needs a C++ compiler")
def test_compile_on_cpu_matches_eager_and_keeps_masked_state_zero():
    base = dict(model__density=0.5, train__steps=10, train__eval_every=5)
    eager = train.run(tiny_config(**base))
    compiled, s = train.run_and_keep(tiny_config(**base, train__compile=True))
    assert compiled["compile"] is True
    # inductor reorders float reductions: close, not bit-equal
    _close(_losses(compiled), _losses(eager), 1e-3)
    assert_masked_state_zero(s)
    assert any(isinstance(m, SparseLinear) for m in s.model.modules())


@pytest.mark.slow
def test_a_model_that_cannot_compile_ends_in_one_line(workdir, tmp_path):
    # No working C++ compiler (CXX names one that always fails) and an empty inductor cache:
    # the compile fails, and the user is told to turn it off.
    import os

    env = {"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        r = cli("spartune-train", "train=smoke", "data=synthetic", "train.device=cpu",
                "train.steps=2", "train.compile=true", "model.width=32", "model.head_size=16",
                cwd=workdir, timeout=300)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("spartune: error: train.compile: torch.compile could not compile")
    assert last.endswith("use train.compile=false")


def test_a_micro_batch_that_does_not_divide_the_batch_is_one_line(workdir):
    r = cli("spartune-train", "train=smoke", "data=synthetic", "train.device=cpu",
            "train.batch_size=8", "train.micro_batch_size=3", cwd=workdir)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("spartune: error: train.micro_batch_size: 3 does not divide "
                               "train.batch_size=8; use a divisor of it (e.g. 2)")


@pytest.mark.parametrize("over, field", [
    (dict(train__micro_batch_size=0), "train.micro_batch_size"),
    (dict(train__precision="fp8"), "train.precision"),
    (dict(train__compile="yes"), "train.compile"),
])
def test_bad_precision_compile_and_micro_batch_name_their_field(over, field):
    with pytest.raises(ConfigError) as e:
        validate(tiny_config(**over))
    assert e.value.field == field
