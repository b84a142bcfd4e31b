"""spartune as an installed package: the wheel carries the configs, a user's folder overrides
them, `spartune-init` copies them out, --help names the command, completion completes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, cli

PY = sys.executable


def _py(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **env}
    return subprocess.run([PY, "-c", code], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=120)


def test_import_gives_a_version_and_no_hydra_or_optuna(tmp_path: Path) -> None:
    r = _py("import sys, spartune; print(spartune.__version__); "
            "print(sorted(m for m in ('hydra', 'optuna', 'torch') if m in sys.modules))",
            tmp_path)
    assert r.returncode == 0, r.stderr
    version, loaded = r.stdout.split("\n")[:2]
    assert version and version[0].isdigit()
    assert loaded == "[]"


def test_every_subpackage_is_listed_in_pyproject() -> None:
    """`packages` is explicit (conf/ and sweeps/ are mapped in from outside src/): a new
    subpackage of src/spartune must be added there or the wheel lacks it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    src = ROOT / "src"
    found = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


def _sweep_file(folder: Path, name: str, study: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"defaults:\n  - config\n  - _self_\nname: ${{study.name}}\nstudy:\n  name: {study}\n"
        "  space:\n    lr: {low: 0.001, high: 0.1}\n")


def test_user_sweeps_and_conf_take_precedence(workdir: Path) -> None:
    _sweep_file(workdir / "sweeps", "mine", "mine_study")  # a new sweep file
    _sweep_file(workdir / "sweeps", "proxy", "my_proxy")  # overrides the shipped proxy
    (workdir / "conf" / "data").mkdir(parents=True)
    (workdir / "conf" / "data" / "tiny.yaml").write_text("name: synthetic\nvocab_size: 32\n")
    r = cli("spartune-sweep", "-cn", "mine", "data=tiny", "--cfg", "job", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "name: mine_study" in r.stdout and "vocab_size: 32" in r.stdout
    r = cli("spartune-sweep", "-cn", "proxy", "--cfg", "job", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "name: my_proxy" in r.stdout


def test_config_dir_comes_first(workdir: Path, tmp_path: Path) -> None:
    _sweep_file(workdir / "sweeps", "proxy", "from_cwd")
    _sweep_file(tmp_path / "elsewhere", "proxy", "from_config_dir")
    r = cli("spartune-sweep", "-cd", str(tmp_path / "elsewhere"), "-cn", "proxy", "--cfg", "job",
            cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "name: from_config_dir" in r.stdout


def test_unknown_sweep_lists_the_sweep_files(workdir: Path) -> None:
    _sweep_file(workdir / "sweeps", "mine", "x")
    r = cli("spartune-sweep", "-cn", "prxy", cwd=workdir)
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("spartune: error: --config-name: no sweep or config named 'prxy'; "
                           "the sweep files are lr_stability, mine, proxy, sigma_stability")


def test_init_copies_the_sweep_files_and_keeps_edits(workdir: Path) -> None:
    run = "from spartune.resources import init_main; init_main(sys.argv[1:])"
    r = subprocess.run([PY, "-c", f"import sys; {run}", "proj"], cwd=workdir, text=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr
    shipped = sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml"))
    assert sorted(p.name for p in (workdir / "proj" / "sweeps").glob("*.yaml")) == shipped
    assert not (workdir / "proj" / "conf").exists()
    edited = workdir / "proj" / "sweeps" / "proxy.yaml"
    edited.write_text("# mine\n")
    r = subprocess.run([PY, "-c", f"import sys; {run}", "proj", "--conf"], cwd=workdir,
                       text=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr
    assert edited.read_text() == "# mine\n"  # kept without --force
    assert f"kept {Path('proj') / 'sweeps' / 'proxy.yaml'}" in r.stdout
    assert (workdir / "proj" / "conf" / "config.yaml").is_file()


def test_help_names_the_command_and_lists_sweeps(workdir: Path) -> None:
    r = cli("spartune-sweep", "--help", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("spartune-sweep: ")
    assert "== Sweep files (-cn NAME) ==\nlr_stability, proxy, sigma_stability, transfer" \
        in r.stdout
    assert "logger: mlflow, none, tensorboard, wandb" in r.stdout
    assert " cli " not in r.stdout


def test_bash_completion_installs_for_the_command_and_completes_groups(workdir: Path) -> None:
    r = cli("spartune-sweep", "-sc", "install=bash", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("-F hydra_bash_completion spartune-sweep")
    exe = Path(sys.executable).with_name("spartune-sweep")
    line = "spartune-sweep logger="
    env = {**os.environ, "SPARTUNE_HOME": str(ROOT), "COMP_LINE": line,
           "COMP_POINT": str(len(line))}
    r = subprocess.run([str(exe), "-sc", "query=bash"], cwd=workdir, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == {"logger=none", "logger=tensorboard", "logger=mlflow",
                                     "logger=wandb"}


def test_negative_worker_index_is_one_line(workdir: Path) -> None:
    r = cli("spartune-sweep", "-cn", "proxy", "+worker=-1", cwd=workdir)
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("spartune: error: worker: must be an integer >= 0, got -1")
    assert not (workdir / "results").exists()


# -- the wheel, in a fresh venv --------------------------------------------------------------


def _venv_with_wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of the checkout and install it, alone, into a new venv.

    Its dependencies (torch, ...) come from this interpreter's site-packages through a path
    line in a .pth file: a path line does not run the .pth files found there, so this venv's
    editable spartune (a .pth of its own) stays out and only the wheel's copy is importable.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPARTUNE_HOME")}
    copy = tmp / "checkout"  # pip writes build/ and *.egg-info beside the sources
    copy.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    for name in ("src", "conf", "sweeps"):
        shutil.copytree(ROOT / name, copy / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp / "dist"
    subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(copy)], check=True, timeout=300, env=env)
    [wheel] = dist.glob("spartune-*.whl")
    venv = tmp / "venv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The wheel first, into the bare venv: pip must not see (or touch) the editable install.
    subprocess.run([PY, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300, env=env)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return venv


@pytest.mark.slow  # builds a wheel, makes a venv, trains, sweeps and plots: ~2 min
def test_wheel_alone_runs_the_quickstart_from_an_empty_folder(tmp_path: Path) -> None:
    venv = _venv_with_wheel(tmp_path)
    bin_ = venv / "bin"
    user = tmp_path / "user"
    user.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("SPARTUNE_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MPLBACKEND="Agg", HYDRA_FULL_ERROR="0", PATH=f"{bin_}:{env.get('PATH', '')}")

    def run(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([str(bin_ / args[0]), *args[1:]], cwd=user, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{args}: {r.stderr[-2000:]}"
        return r

    r = run("python", "-c", "import spartune; print(spartune.__version__); "
            "print(spartune.__file__)")
    version, where = r.stdout.split()
    assert version == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the checkout
    run("spartune-train", "train=smoke")
    assert list((user / "results" / "train").glob("*/.hydra/config.yaml"))
    # 3 trials: the fewest LRs per cell that make the LR figure (report.make_figures)
    run("spartune-sweep", "-cn", "proxy", "train=smoke", "study.n_trials=3", "study.pruner=none")
    assert (user / "results" / "proxy" / "trials.csv").is_file()
    r = run("spartune-plot", "study.name=proxy")
    assert list((user / "results" / "proxy" / "figures").glob("*.png")), r.stdout
    r = run("spartune-sweep", "-cn", "lr_stability", "--cfg", "job")  # the recipe's sweep
    assert "name: lr_stability" in r.stdout
    # the quickstart's main job, its smoke size: proxy -> transfer -> targets -> report
    run("spartune-pipeline", "pipeline=smoke")
    reports = list((user / "results").rglob("report.md"))
    assert reports, sorted(p.name for p in (user / "results").iterdir())
    run("spartune-init")
    assert (user / "sweeps" / "proxy.yaml").is_file()
    assert sorted(p.name for p in user.iterdir()) == ["results", "sweeps"]
