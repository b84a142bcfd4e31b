"""One training run: loss falls, divergence is reported not raised, determinism, outputs."""

from __future__ import annotations

import csv
import json
import math

import pytest

from conftest import tiny_config
from spartune import train
from spartune.config import OptimConfig


def test_short_run_learns_and_writes_outputs(tmp_path):
    cfg = tiny_config(train__steps=60, optim__lr=0.02)
    m = train.run(cfg, out_dir=tmp_path)
    curve = list(csv.DictReader((tmp_path / "curve.csv").open()))
    assert [int(r["step"]) for r in curve] == [10, 20, 30, 40, 50, 60]
    assert float(curve[-1]["val_loss"]) < float(curve[0]["val_loss"]) - 0.3
    assert m["final_val_loss"] < math.log(64) - 0.5  # well below a uniform guess
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("final_train_loss", "final_val_loss", "diverged", "steps",
                "tokens_per_second", "n_params", "n_nonzero_params"):
        assert key in saved, key
    assert saved["diverged"] is False and saved["steps"] == 60
    assert saved["tokens_per_second"] > 0


def test_sparse_run_counts_nonzero_params():
    m = train.run(tiny_config(model__density=0.25, train__steps=2))
    assert m["n_nonzero_params"] < m["n_params"]


def test_diverging_lr_is_reported_not_raised(tmp_path):
    cfg = tiny_config(param__name="sp", optim__lr=30.0, optim__warmup_frac=0.0,
                      optim__grad_clip=0.0, train__steps=50)
    m = train.run(cfg, out_dir=tmp_path)
    assert m["diverged"] is True
    assert m["diverged_step"] is not None and m["steps"] < 50
    assert math.isnan(m["final_val_loss"])
    assert json.loads((tmp_path / "metrics.json").read_text())["final_val_loss"] is None


def test_a_run_that_starts_above_the_ceiling_is_not_called_diverged():
    # alpha_output 64 gives logits far from uniform at init: loss ~ 3x ln(vocab) at step 1.
    # That is a bad start, not a divergence: the run must train, and the proxy search must see
    # its real final loss (a step-1 'divergence' used to hide such points from TPE).
    cfg = tiny_config(param__alpha_output=64.0, model__init_std=0.2, train__steps=30,
                      optim__lr=0.01)
    m = train.run(cfg)
    assert m["curve"][0]["train_loss"] > 1.5 * math.log(64)  # above the default ceiling
    assert m["diverged"] is False and m["steps"] == 30
    assert m["final_val_loss"] < m["curve"][0]["train_loss"]


def test_same_seed_same_losses_different_seed_different():
    a = train.run(tiny_config(seed=3, model__density=0.5, train__steps=20))
    b = train.run(tiny_config(seed=3, model__density=0.5, train__steps=20))
    c = train.run(tiny_config(seed=4, model__density=0.5, train__steps=20))
    assert a["final_val_loss"] == b["final_val_loss"]
    assert a["final_train_loss"] == b["final_train_loss"]
    assert a["final_val_loss"] != c["final_val_loss"]


def test_report_is_called_at_each_eval_and_can_stop_the_run():
    seen = []

    def report(step, loss):
        seen.append((step, loss))
        if step == 20:
            raise KeyboardInterrupt("pruned")  # any exception propagates: the sweep's pruning

    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_config(train__steps=30), report)
    assert [s for s, _ in seen] == [10, 20]
    assert all(math.isfinite(v) for _, v in seen)


def test_lr_schedules():
    o = OptimConfig(schedule="linear", warmup_frac=0.1, min_lr_frac=0.1)
    f = [train.lr_factor(s, 100, o) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # monotone decay
    c = OptimConfig(schedule="cosine", warmup_frac=0.0, min_lr_frac=0.1)
    assert train.lr_factor(0, 100, c) == pytest.approx(1.0)
    assert train.lr_factor(99, 100, c) == pytest.approx(0.1)
    k = OptimConfig(schedule="constant", warmup_frac=0.0)
    assert {train.lr_factor(s, 50, k) for s in range(50)} == {1.0}


def test_groups_carry_the_supar_multiplier():
    cfg = tiny_config(model__width=64, model__base_width=32, model__density=0.25)
    s = train.setup(cfg)
    mults = sorted({g["lr_mult"] for g in s.optimizer.param_groups})
    assert mults == pytest.approx([1.0, 1 / (2 * 0.25)])  # eta / (m_d m_rho) for hidden weights


def test_killed_run_resumes_from_its_checkpoint_with_the_same_final_loss(tmp_path, caplog):
    cfg = tiny_config(model__density=0.25, train__steps=40, train__checkpoint_every=10)
    whole = train.run(cfg, out_dir=tmp_path / "whole")

    def crash(step, loss):
        if step == 30:
            raise RuntimeError("killed")  # as if the process died at step 30 (last save: 20)

    with pytest.raises(RuntimeError):
        train.run(cfg, crash, out_dir=tmp_path / "resumed")
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    reported: list[int] = []
    with caplog.at_level("INFO", logger="spartune.train"):
        resumed = train.run(cfg, lambda step, loss: reported.append(step),
                            out_dir=tmp_path / "resumed")
    # It resumed, not restarted (a restart from step 0 gives the same loss too): it trained
    # and evaluated only the steps after the step-20 checkpoint, and said where it resumed.
    assert reported == [30, 40]
    assert any("resumed from" in r.getMessage() and r.getMessage().endswith("at step 20")
               for r in caplog.records)
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    assert [r["step"] for r in resumed["curve"]] == [10, 20, 30, 40]


def test_checkpoint_of_another_config_is_refused(tmp_path):
    from spartune.config import ConfigError

    cfg = tiny_config(train__steps=20, train__checkpoint_every=10)
    with pytest.raises(RuntimeError):
        train.run(cfg, lambda s, v: (_ for _ in ()).throw(RuntimeError()) if s == 20 else None,
                  out_dir=tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match="different configuration"):
        train.run(tiny_config(train__steps=20, train__checkpoint_every=10, optim__lr=0.5),
                  out_dir=tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # nothing stored is lost


def test_phase_times_account_for_every_step_and_only_when_asked():
    """`phase_times` records each phase once per step, the phases fit inside the step time the
    run reports, and outside it nothing is recorded (the spans are a shared no-op)."""
    cfg = tiny_config(train__steps=5, train__eval_every=5)
    with train.phase_times() as ph:
        m = train.run(cfg)
    assert set(ph) == {"lr_groups", "data", "forward_backward", "clip", "optimizer",
                       "loss_item"}
    assert all(len(v) == 5 for v in ph.values())
    assert 0 < sum(map(sum, ph.values())) <= m["train_seconds"]
    assert train._PHASES is None and train.phase("x") is train.phase("y")
