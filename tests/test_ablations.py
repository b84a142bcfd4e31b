"""benchmarks/ablations.py (issue 17): its product commands, its table, its figure, and a
--quick smoke of the whole script (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from spartune import plot  # noqa: E402
from spartune.columns import TRIAL_COLUMNS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablations  # noqa: E402


def test_every_ablation_is_one_product_command_with_its_own_study(tmp_path: Path) -> None:
    names = set()
    for ab in ablations.ABLATIONS:
        argv = ablations.command(ab, tmp_path, ablations.FULL)
        assert argv[:3] == ["spartune-sweep", "-cn", "lr_stability"]
        assert "study.params=[supar]" in argv and "study.seeds=[0,1,2]" in argv
        assert "study.densities=[1.0,0.25,0.0625,0.015625]" in argv
        assert "model.base_width=64" in argv and "optim.lr=0.02005" in argv
        assert argv[len(argv) - len(ab.overrides):] == list(ab.overrides)  # last: they win
        names.add(next(a for a in argv if a.startswith("study.name=")))
    assert len(names) == len(ablations.ABLATIONS)
    steps = ablations.command(ablations.BY_NAME["steps_1000"], tmp_path, ablations.FULL)
    assert steps[-2:] == ["train.steps=1000", "train.eval_every=1000"]
    assert ablations.tokens(ablations.BY_NAME["batch_64"], ablations.FULL) == 300 * 64 * 64


def test_the_second_corpus_exists_offline() -> None:
    import glob

    files = glob.glob(ablations.LICENSES)
    assert files and not any(os.path.islink(f) for f in files)


def _trials(optimum: dict[float, float], seeds=(0, 1, 2)) -> pd.DataFrame:
    rows = []
    for d, x0 in optimum.items():
        for s in seeds:
            for x in (-7.0, -6.0, -5.0, -4.0):
                row = dict.fromkeys(TRIAL_COLUMNS)
                row.update(study="t", cell=f"supar/w128/d{d:g}/s{s}", number=0, state="COMPLETE",
                           role="search", param="supar", width=128, base_width=64, density=d,
                           seed=s, lr=2.0**x, log2_lr=x, diverged=False,
                           final_val_loss=2 + 0.05 * (x - x0) ** 2 + 0.001 * s)
                rows.append(row)
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def test_summary_has_the_optimum_interval_and_spread_per_density() -> None:
    df = ablations.summarise("x", _trials({1.0: -5.8, 0.015625: -5.3}), 2, 3)
    assert list(df["density"]) == [1.0, 0.015625]
    assert df["counted"].all() and df["complete"].all()
    assert df["spread"].iloc[0] == pytest.approx(0.5, abs=0.02)
    assert (df["lo"] <= df["optimum_log2_lr"]).all() and (df["hi"] >= df["optimum_log2_lr"]).all()
    line = ablations.spread_line(df, 2)
    assert line.startswith("x: spread 0.50 octaves") and "partial" not in line
    md = ablations.markdown(df, (1.0, 0.25, 0.015625)).splitlines()
    assert md[0] == "| ablation | 1 | 2⁻² | 2⁻⁶ | spread (octaves) | runs |"
    assert md[2].startswith("| x | -5.80 [") and "| not run |" in md[2] and "**0.50**" in md[2]
    # a density that not every seed has reached yet is shown but not counted
    part = ablations.summarise("x", pd.concat([_trials({1.0: -5.8}),
                                               _trials({0.25: -5.5}, seeds=(0,))]), 4, 3)
    assert list(part["counted"]) == [True, False] and not part["complete"].any()
    assert "(partial: 1/4 densities)" in ablations.spread_line(part, 4)


def test_ablation_figure_one_line_per_ablation(tmp_path: Path) -> None:
    table = pd.concat([ablations.summarise("a", _trials({1.0: -5.8, 0.25: -5.5}), 2, 3),
                       ablations.summarise("b", _trials({1.0: -5.8, 0.25: -5.8}), 2, 3)])
    fig = plot.ablation_optima(table)
    (ax,) = fig.axes
    assert [c.get_label() for c in ax.containers] == ["a", "b"]
    assert "optimal log2" in ax.get_ylabel()
    paths = plot.save(fig, tmp_path / "ablation_optima")
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError, match="columns"):
        plot.ablation_optima(pd.DataFrame())


@pytest.mark.slow
def test_quick_run_writes_its_table_figure_and_commands(tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablations.py"), "--quick",
                          "--only", "baseline", "no_clip", "--out", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    table = pd.read_csv(tmp_path / "ablations.csv")
    assert set(table["ablation"]) == {"baseline", "no_clip"}
    assert {"optimum_log2_lr", "lo", "hi", "spread", "command"} <= set(table.columns)
    assert (tmp_path / "ablation_optima.png").stat().st_size > 1000
    assert "$ spartune-sweep -cn lr_stability" in out.stdout
    assert "steps_1000: not run" in out.stdout


def test_a_report_keeps_earlier_measurements_whose_studies_are_gone(tmp_path: Path, capsys,
                                                                    monkeypatch) -> None:
    """An ablation measured in an earlier session (only its row in the tracked table is kept)
    is reported from that table, marked so, when --out holds no study of it."""
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--report-only", "--out", str(tmp_path)])
    ablations.main()
    out = capsys.readouterr().out
    previous = pd.read_csv(ablations.PREVIOUS)
    table = pd.read_csv(tmp_path / "ablations.csv")
    assert set(table["ablation"]) == set(previous["ablation"])
    kept = table[table["ablation"] == "corpus_licenses"]
    assert kept["command"].str.endswith(f"# from {ablations.PREVIOUS}").all()
    assert "corpus_licenses: spread 1.59 octaves" in out
    # once read back from its own output, the mark is not doubled
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--report-only", "--out",
                                      str(tmp_path / "b"), "--previous",
                                      str(tmp_path / "ablations.csv")])
    ablations.main()
    twice = pd.read_csv(tmp_path / "b" / "ablations.csv")
    earlier = twice[twice["ablation"] != "baseline_reference"]  # re-fitted, not kept
    assert len(earlier) and (earlier["command"].str.count("# from ") == 1).all()
