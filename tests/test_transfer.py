"""Transfer: the winner's HPs mapped through the rule table onto targets, run as trials; and
the end-to-end pipeline on its smoke preset."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import cli, fake_metrics, tiny_config
from spartune import collect, params, sweep, transfer, trust
from spartune.config import ConfigError, SearchDim


def _proxy(tmp_path):
    cfg = tiny_config(results_dir=str(tmp_path), train__steps=10, train__eval_every=5)
    cfg.study.name, cfg.study.sampler = "proxy", "grid"
    cfg.study.widths, cfg.study.densities = [32], [1.0]
    cfg.study.space = {"lr": SearchDim(values=[2**-8, 2**-6]),
                       "init_std": SearchDim(values=[0.03])}
    sweep.sweep(cfg)
    return cfg


def _targets(cfg, check=False):
    t = cfg.transfer
    t.source, t.params, t.widths, t.densities = "proxy", ["sp", "mup", "supar"], [64], [1.0, 0.25]
    t.hps, t.check, t.check_octaves = ["lr", "init_std"], check, [-1.0, 1.0]
    cfg.study.name = "targets"
    return cfg


def test_plan_equals_the_rule_table(tmp_path):
    cfg = _targets(_proxy(tmp_path))
    proxy, _ = collect.load_trials(collect.storage_for(tmp_path / "proxy"), "proxy")
    chosen = transfer.select_hps(proxy, select="best", hps=["lr", "init_std"], source="proxy")
    best = proxy.loc[proxy["final_val_loss"].idxmin()]
    assert chosen["lr"] == best["lr"] and chosen["proxy_width"] == 32
    plan = transfer.plan(cfg, chosen)
    for _, r in plan[plan["layer"] == "hidden (qkv, mlp_up)"].iterrows():
        s = params.layer_scale(r["param"], "hidden", width_mult=64 / 32,
                               density_mult=r["density"])
        assert r["adam_lr"] == pytest.approx(chosen["lr"] * s.lr)
        assert r["init_std"] == pytest.approx(chosen["init_std"] * s.init)
    supar = plan[(plan["param"] == "supar") & (plan["layer"] == "hidden (qkv, mlp_up)")]
    dense, sparse = supar.sort_values("density", ascending=False)["adam_lr"]
    assert sparse / dense == pytest.approx(4.0)  # eta / (m_d m_rho): 1/m_rho = 4 at density 1/4
    tcfg = transfer.target_config(cfg, chosen, name="targets")
    assert tcfg.model.base_width == 32 and tcfg.param.base_density == 1.0
    assert tcfg.model.init_std == chosen["init_std"] and tcfg.optim.lr == chosen["lr"]


def test_transfer_runs_targets_with_a_check_grid(tmp_path):
    cfg = _targets(_proxy(tmp_path), check=True)
    res = transfer.run(cfg)
    trials = res["trials"]
    assert len(trials) == 3 * 2 * 3  # params x densities x (transferred + 2 check points)
    assert (trials["role"] == "target").sum() == 6
    target = trials[trials["role"] == "target"]
    assert target["lr"].tolist() == pytest.approx([res["chosen"]["lr"]] * 6)
    assert set(trials["base_width"]) == {32}
    assert (tmp_path / "targets" / "trials.csv").is_file()
    plan = pd.read_csv(tmp_path / "targets" / "transfer_plan.csv")
    assert set(trust.PLAN_COLUMNS) <= set(plan.columns)  # the trust rule, per target


def _bowl(minimum: float):
    """A fake training run (train.run): loss a parabola in log2(optim.lr), minimum known."""
    import math

    def run(cfg, report=None, checkpoint=None):
        return fake_metrics(2.0 + 0.1 * (math.log2(cfg.optim.lr) - minimum) ** 2, cfg.optim.lr)
    return run


def test_bracketed_check_runs_only_the_points_towards_the_best(tmp_path, monkeypatch):
    from spartune import analysis, train

    monkeypatch.setattr(train, "run", _bowl(-5.2))  # the proxy picks 2^-6 of [2^-8, 2^-6]
    cfg = _targets(_proxy(tmp_path), check=True)
    t = cfg.transfer
    t.params, t.densities, t.check_octaves = ["supar"], [0.25], [-1.0, -0.5, 0.5, 1.0]
    t.check_sampler = "bracket"
    trials = transfer.run(cfg)["trials"]
    offsets = sorted(round(x + 6.0, 6) for x in trials["log2_lr"])
    assert offsets == [-0.5, 0.0, 0.5, 1.0]  # grown towards the best, never to -1
    assert trials.set_index("log2_lr")["role"].to_dict() == {
        -6.5: "check", -6.0: "target", -5.5: "check", -5.0: "check"}
    reg = analysis.transfer_regret(trials).iloc[0]
    assert reg["distance_octaves"] == pytest.approx(-1.0) and bool(reg["at_edge"])


@pytest.mark.parametrize(("change", "text"), [
    ({"check_sampler": "tpe"}, "choose grid or bracket"),
    ({"check_sampler": "bracket", "check_octaves": [-1.0, 0.3]}, "not whole steps"),
])
def test_bad_check_sampler_is_one_line(tmp_path, change, text):
    cfg = _targets(tiny_config(results_dir=str(tmp_path)), check=True)
    for k, v in change.items():
        setattr(cfg.transfer, k, v)
    with pytest.raises(ConfigError, match=text) as e:
        transfer.validate_transfer(cfg)
    assert e.value.field.startswith("transfer.check_") and "\n" not in str(e.value)


def test_transfer_from_a_missing_or_empty_study_is_a_clear_error(tmp_path):
    cfg = _targets(tiny_config(results_dir=str(tmp_path)))
    with pytest.raises(ConfigError) as e:
        transfer.run(cfg)
    assert e.value.field == "transfer.source" and "run" in str(e.value)
    assert not any(tmp_path.iterdir())
    proxy = _proxy(tmp_path)
    cfg = _targets(proxy)
    cfg.transfer.source = "proxy"
    journal = tmp_path / "proxy" / "optuna.journal"
    before = journal.read_bytes()
    cfg.transfer.params = ["supar"]
    cfg.transfer.densities = [0.0]
    with pytest.raises(ConfigError) as e:
        transfer.run(cfg)
    assert e.value.field == "transfer.densities"
    assert journal.read_bytes() == before


def test_select_refuses_a_study_without_finished_trials():
    import pandas as pd

    from spartune.columns import TRIAL_COLUMNS

    df = pd.DataFrame([{c: None for c in TRIAL_COLUMNS} | {"state": "FAIL", "diverged": False}])
    with pytest.raises(ConfigError, match="no finished trial"):
        transfer.select_hps(df, select="best", hps=["lr"], source="proxy")


def test_transfer_command_from_a_missing_study(workdir):
    r = cli("spartune-transfer", "-cn", "transfer", "transfer.source=nothing_here", cwd=workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("spartune: error: ")
    assert not (workdir / "results" / "nothing_here").exists()


def test_plot_of_an_empty_results_folder(workdir):
    r = cli("spartune-plot", "study.name=empty", cwd=workdir)
    assert r.returncode == 2 and "study.name" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_pipeline_smoke_end_to_end(workdir):
    r = cli("spartune-pipeline", "pipeline=smoke", "train.device=cpu", cwd=workdir, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = workdir / "results" / "pipeline"
    report = (out / "report.md").read_text()
    for section in ("Proxy", "Targets", "Transfer trust", "Verdict", "Figures"):
        assert section in report
    for fig in ("loss_vs_density", "training_curves"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 10_000
        assert (out / "figures" / f"{fig}.pdf").is_file()
    assert (out / "proxy" / "trials.csv").is_file() and (out / "transfer" / "curves.csv").is_file()
    rows = len((out / "transfer" / "trials.csv").read_text().splitlines())
    again = cli("spartune-pipeline", "pipeline=smoke", "train.device=cpu", cwd=workdir,
                timeout=600)
    assert again.returncode == 0  # resumes: nothing to run, the report is rebuilt
    assert len((out / "transfer" / "trials.csv").read_text().splitlines()) == rows
