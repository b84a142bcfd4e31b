"""The Hydra commands as a user runs them: composition, typos, and one-line bad-input errors.

Each bad input must exit non-zero with one `spartune: error: FIELD: ...` line, no traceback,
and leave no run folder behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, cli
from spartune.config import Config, register_configs

SMOKE = ["data=synthetic", "train=smoke", "model.width=32", "model.head_size=16",
         "train.device=cpu", "train.steps=4"]


def _compose(overrides: list[str]) -> Config:
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_object(cfg)


def test_defaults_compose_to_the_typed_config():
    cfg = _compose([])
    assert isinstance(cfg, Config)
    assert cfg.param.name == "supar" and cfg.data.name == "pystdlib"
    assert cfg.model.width_mult == 2.0


def test_the_documented_interface_composes():
    cfg = _compose(["param=supar", "model.width=256", "model.base_width=64", "model.depth=2",
                    "model.density=0.0625", "model.init_std=0.08", "optim.lr=0.01",
                    "param.alpha_input=1.0", "param.alpha_output=1.0", "train.steps=300",
                    "train.batch_size=16", "train.seq_len=64", "data=pystdlib", "seed=0"])
    assert cfg.model.width_mult == 4.0 and cfg.model.density == 0.0625


@pytest.mark.parametrize("group", ["param", "data", "train", "coord"])
def test_every_option_of_every_group_composes(group):
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        _compose([f"{group}={path.stem}"])


@pytest.mark.parametrize("typo", ["model.densty=0.2", "optim.learning_rate=0.1",
                                  "param.alpha_in=2"])
def test_typos_are_rejected_at_compose_time(typo):
    with pytest.raises(Exception, match="not in|Could not override|Key"):
        _compose([typo])


def test_train_command_writes_metrics_and_curve(workdir):
    r = cli("spartune-train", *SMOKE, "param=mup", cwd=workdir)
    assert r.returncode == 0, r.stderr
    (run,) = (workdir / "results" / "train").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["param"] == "mup" and metrics["steps"] == 4
    assert (run / "curve.csv").read_text().startswith("step,train_loss,val_loss,lr")
    assert (run / ".hydra" / "config.yaml").is_file()  # the composed config beside its results


# Real console-script processes (exit code, stderr). The README's Bad input rows run in-process
# in test_bad_input_table.py with the same checks; here the first row of that table again as a
# process, and the inputs that are no row of it.
BAD = [
    (["model.density=1.5"], "model.density"),
    (["model.density=0"], "model.density"),
    (["param.name=smup"], "param"),
    (["optim.lr=-0.01"], "optim.lr"),
    (["data=text"], "data.path"),
    (["optim.schedule=exponential"], "optim.schedule"),
    (["name=../escape"], "name"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_clear_line(workdir, overrides, field):
    r = cli("spartune-train", *SMOKE, *overrides, cwd=workdir)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"spartune: error: {field}:"), lines[0]
    leftovers = list((workdir / "results").rglob("*.json")) if (workdir / "results").exists() \
        else []
    assert leftovers == []
    assert not (workdir / "results" / "train").exists()


def test_seq_len_longer_than_a_small_text_file(workdir):
    (workdir / "tiny.txt").write_text("hello spartune " * 10)
    r = cli("spartune-train", *SMOKE, "data=text", "data.path=tiny.txt", "train.seq_len=64",
            cwd=workdir)
    assert r.returncode == 2 and "train.seq_len" in r.stderr and "Traceback" not in r.stderr


# Each command checks its config before torch loads (~2 s of the ~3 s a bad input would cost).
NO_TORCH = [
    ("train_main", ["model.density=1.5"], "model.density"),
    ("sweep_main", ["-cn", "proxy", "study.sampler=nope"], "study.sampler"),
    ("sweep_main", ["-cn", "proxy", "model.width=96"], "model.width"),
    ("transfer_main", ["transfer.select=nope"], "transfer.select"),
    ("coord_main", ["coord.batch_size=0"], "coord.batch_size"),
    ("plot_main", ["study.name=no_such_study"], "study.name"),
    ("pipeline_main", ["name=../escape"], "name"),
]


@pytest.mark.parametrize("entry,args,field", NO_TORCH,
                         ids=[f"{e} {a[-1]}" for e, a, _ in NO_TORCH])
def test_bad_input_fails_before_torch_loads(workdir, entry, args, field):
    probe = (f"import sys\nfrom spartune import cli\ntry:\n    cli.{entry}()\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch', 'torch' in sys.modules)")
    env = {**os.environ, "SPARTUNE_HOME": str(ROOT), "MPLBACKEND": "Agg",
           "HYDRA_FULL_ERROR": "0"}
    r = subprocess.run([sys.executable, "-c", probe, *args], cwd=workdir, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["exit", "2", "torch", "False"], (r.stdout, r.stderr)
    assert r.stderr.strip().startswith(f"spartune: error: {field}:"), r.stderr
