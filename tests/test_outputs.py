"""What the commands print and draw says what it means (issue: outputs that misled).

The verdict follows its table, a bracket that only lacked its refinement says so, a search over
several HPs is drawn as loss vs each HP, figures are wide enough for their titles, the sweep
names its winning HPs and counts every local worker, a log gets a progress line, trust lines
cite what a wheel has, spartune-plot's run folder sits beside its study, completion works
after `-cn NAME`, `--version` answers, a SPARTUNE_HOME with only sweeps/ is accepted.
Commands run in-process (their entry points), as in tests/test_bad_input_table.py.
"""

from __future__ import annotations

import io
import logging
import math
import signal
import sys
import threading
import time

import pandas as pd
import pytest

from conftest import ROOT
from spartune import bracket, cli, plot, progress, report, train, trust
from spartune.columns import TRIAL_COLUMNS


@pytest.fixture
def work(tmp_path, monkeypatch):
    d = tmp_path / "work"
    d.mkdir()
    monkeypatch.chdir(d)
    monkeypatch.setenv("SPARTUNE_HOME", str(ROOT))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    sigterm, root = signal.getsignal(signal.SIGTERM), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield d
    signal.signal(signal.SIGTERM, sigterm)
    root.handlers[:], root.level = handlers, level


def _main(entry, command: str, *args: str, mp, capsys) -> tuple[int, str, str]:
    mp.setattr(sys, "argv", [command, *args])
    capsys.readouterr()
    try:
        entry()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    out = capsys.readouterr()
    return code, out.out, out.err


# -- the sweep's last lines, its figure, its progress line, spartune-plot's run folder ----------


def test_a_tpe_proxy_prints_its_winner_counts_its_workers_and_draws_loss_vs_each_hp(
        work, monkeypatch, capsys):
    monkeypatch.setenv("SPARTUNE_PROGRESS_SECONDS", "0.2")
    monkeypatch.setattr(progress, "_isatty", lambda stream: False)  # as under a batch job
    # The first trial ends only once a progress line was printed, so a fast machine cannot
    # finish both trials before the first tick (no wall-clock assumption in the test).
    ticked, real_line, real_run = threading.Event(), progress.line, train.run

    def line(*a, **k):
        ticked.set()
        return real_line(*a, **k)

    def run(*a, **k):
        metrics = real_run(*a, **k)
        assert ticked.wait(30), "no progress line within 30 s of a 0.2 s period"
        return metrics

    monkeypatch.setattr(progress, "line", line)
    monkeypatch.setattr(train, "run", run)
    args = ["-cn", "proxy", "data=synthetic", "train=smoke", "train.device=cpu",
            "study.widths=[32]", "model.base_width=32", "model.head_size=16",
            "study.n_trials=2", "study.pruner=none", "train.steps=4", "train.eval_every=2",
            "train.eval_batches=1"]
    code, out, err = _main(cli.sweep_main, "spartune-sweep", *args, mp=monkeypatch,
                           capsys=capsys)
    assert code == 0, err
    assert "trials finished (2 run now by 1 local worker," in out
    [best] = [ln for ln in out.splitlines() if ln.startswith("best trial: ")]
    for hp in ("lr", "init_std", "alpha_input", "alpha_output"):
        assert f" {hp}=" in best
    assert "optimum log2" not in out  # no 1-D optimum where all four HPs varied together
    figures = work / "results" / "proxy" / "figures"
    assert (figures / "search.png").is_file() and not (figures / "lr_stability.png").exists()
    ticks = [ln for ln in out.splitlines() if ln.startswith("study proxy: ") and "elapsed" in ln]
    assert ticks, out  # at least one progress line while the trials ran
    assert "/2 trials done (0 failed)" in ticks[0]

    code, out, err = _main(cli.plot_main, "spartune-plot", "study.name=proxy", mp=monkeypatch,
                           capsys=capsys)
    assert code == 0, err
    assert list((work / "results" / "proxy" / "plot").glob("*/.hydra/config.yaml"))
    assert not (work / "results" / "train").exists()


def test_progress_line_rate_and_what_is_left():
    assert progress.line("s", 5, 20, 1, 100.0, 0) == \
        "study s: 5/20 trials done (1 failed), 1m40s elapsed, ~5m00s left"
    assert progress.line("s", 0, 20, 0, 12.0, 0).endswith("time left unknown until a trial "
                                                          "finishes")
    assert progress.line("s", 20, 20, 0, 3700.0, 10).endswith("1h01m elapsed, none left")


def test_ticker_prints_every_interval_and_only_where_no_bar_draws():
    out = io.StringIO()
    t = progress.Ticker("s", 4, 0, lambda: progress.Tally(2, 1, 0), every=0.05, stream=out,
                        force=True).start()
    time.sleep(0.3)
    t.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(ln.startswith("study s: 2/4 trials done (1 failed)")
                                   for ln in lines)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not progress.Ticker("s", 4, 0, lambda: progress.Tally(0, 0, 0), stream=Tty()).active


# -- the bracket, the verdict, the '*' ---------------------------------------------------------


def _drive(objective, ax):
    results: dict[int, dict[float, float]] = {0: {}}
    for _ in range(100):
        p = bracket.plan(results, [0], ax, ax.centre)
        if not p.run:
            return p
        for s, x in p.run:
            results[s][x] = objective(x)
    raise AssertionError("the search did not end")


def test_a_bracket_that_only_lacked_its_refinement_is_called_bracketed():
    bowl = lambda x: 2.0 + 0.1 * (x + 6.3) ** 2  # noqa: E731
    # -9, -10, -8, -7, -6, -5: bracketed at -6 with the sixth point; the half step needs a 7th
    p = _drive(bowl, bracket.Axis("lr", "log2_lr", -12.0, -1.0, 1.0, -9.0, 6))
    assert p.status == "max_points" and bracket._bracketed(p)
    p = _drive(lambda x: 2.0 - 0.1 * x, bracket.Axis("lr", "log2_lr", -40.0, 0.0, 1.0, -5.0, 5))
    assert p.status == "max_points" and not bracket._bracketed(p)  # still falling: unbracketed


def _regret(distance: float, regret: float, at_edge: bool) -> pd.DataFrame:
    return pd.DataFrame([{"param": "supar", "width": 256, "density": 0.25,
                          "distance_octaves": distance, "regret_pct": regret,
                          "at_edge": at_edge}])


def test_the_verdict_follows_the_regret_table():
    # the report's own row: distance -1, at_edge True, regret 18.2 % was once "kept"
    assert report.transfer_verdict(_regret(-1.0, 18.2, True), False).startswith(
        "optimum unknown")
    assert report.transfer_verdict(_regret(-1.0, 18.2, False), False) == "optimum moved"
    assert report.transfer_verdict(_regret(0.0, 0.0, False), False) == "kept its optimum"
    assert report.transfer_verdict(_regret(1.0, 0.4, False), False) == "kept its optimum"
    assert report.transfer_verdict(_regret(0.0, 0.0, False), True) == "optimum moved"


def _row(param: str, density: float, seed: int, log2_lr: float, loss: float) -> dict:
    row = dict.fromkeys(TRIAL_COLUMNS)
    row.update(study="t", cell=f"{param}/w64/d{density:g}/s{seed}", number=0,
               state="COMPLETE", role="search", param=param, width=64, base_width=64,
               depth=2, density=density, seed=seed, lr=2.0**log2_lr, log2_lr=log2_lr,
               init_std=0.02, log2_init_std=math.log2(0.02), alpha_input=1.0,
               log2_alpha_input=0.0, alpha_output=1.0, log2_alpha_output=0.0,
               final_val_loss=loss, value=loss, diverged=False)
    return row


def _one_param_grid(edge: bool) -> pd.DataFrame:
    centre = -3.0 if edge else -6.0  # -3: beyond the grid's upper end, the best is its edge
    return pd.DataFrame([_row("supar", d, s, float(x), 3 + 0.05 * (x - centre) ** 2 + 0.01 * s)
                         for d in (1.0, 0.25) for x in range(-9, -4) for s in (0, 1)],
                        columns=TRIAL_COLUMNS)


def test_the_star_of_an_edge_optimum_is_explained_in_the_line():
    [line] = report.optimum_lines(_one_param_grid(edge=True), "lr")
    assert "*" in line and "(*: the best point is at the edge of the points run" in line
    [line] = report.optimum_lines(_one_param_grid(edge=False), "lr")
    assert "*" not in line


def test_a_single_param_stability_figure_holds_its_title():
    fig = plot.lr_stability(_one_param_grid(edge=False))
    assert fig.get_figwidth() >= 4.5  # was 3.0 in (450 px): the title overflowed both ends
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    box = fig.bbox
    assert title.x0 >= box.x0 and title.x1 <= box.x1, (title, box)


# -- trust lines, --version, completion, SPARTUNE_HOME ----------------------------------------


def test_trust_lines_cite_what_a_wheel_has():
    plan = pd.DataFrame([{"param": "supar", "width": 256, "density": 0.25, "layer": "x"}])
    lines = trust.lines(trust.annotate(plan, 300 * 16 * 64), checked=False)
    assert lines[-1].endswith(f"; {trust.DATA_CITE})")
    assert not any("results/" in ln for ln in lines)


@pytest.mark.parametrize("entry", ["train_main", "sweep_main", "transfer_main", "plot_main",
                                   "coord_main", "pipeline_main"])
def test_version_on_every_command(entry, work, monkeypatch, capsys):
    name = "spartune-" + entry.removesuffix("_main")
    code, out, _ = _main(getattr(cli, entry), name, "--version", mp=monkeypatch, capsys=capsys)
    assert code == 0 and out.startswith(f"{name} (spartune ") and "torch " in out
    assert "optuna " in out and "hydra-core " in out
    assert not (work / "results").exists()


def test_init_version(capsys):
    from spartune import resources

    resources.init_main(["--version"])
    assert capsys.readouterr().out.startswith("spartune-init (spartune ")


def test_completion_after_a_config_name(work, monkeypatch, capsys):
    line = "spartune-sweep -cn lr_stability logger="
    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setenv("COMP_POINT", str(len(line)))
    code, out, err = _main(cli.sweep_main, "spartune-sweep", "-sc", "query=bash",
                           mp=monkeypatch, capsys=capsys)
    assert code == 0 and "unrecognized" not in err, err
    assert set(out.split()) == {"logger=none", "logger=tensorboard", "logger=mlflow",
                                "logger=wandb"}


def test_a_spartune_home_with_only_sweeps_is_accepted(work, monkeypatch, capsys):
    from spartune import resources

    home = work / "proj"
    resources.init(home)  # what spartune-init makes: sweeps/ alone
    (home / "sweeps" / "proxy.yaml").rename(home / "sweeps" / "mine.yaml")
    monkeypatch.setenv("SPARTUNE_HOME", str(home))
    code, out, err = _main(cli.sweep_main, "spartune-sweep", "-cn", "mine", "--cfg", "job",
                           mp=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "name: proxy" in out
