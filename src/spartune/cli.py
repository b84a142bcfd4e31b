"""Hydra entry points: the only module that imports Hydra (STYLE_ANCHORS rule 6).

Each command composes `conf/config.yaml` (plus its own overlay), turns it into the typed
`Config`, and calls a plain function. User mistakes end in one line on stderr naming the field
and the fix, and exit code 2; nothing is written before the config has been validated.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spartune import atomic, stops
from spartune.config import Config, ConfigError, register_configs, to_config

log = logging.getLogger("spartune")

EXIT_USAGE = 2


def project_dir() -> Path:
    """The folder holding conf/ (and sweeps/): $SPARTUNE_HOME, the source checkout, or cwd."""
    env = os.environ.get("SPARTUNE_HOME")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2], Path.cwd()]
    for c in candidates:
        if (c / "conf" / "config.yaml").is_file():
            return c
    fail("SPARTUNE_HOME", "cannot find conf/config.yaml; run from a spartune checkout or set "
                          "SPARTUNE_HOME to it")
    raise AssertionError  # unreachable


def fail(field: str, message: str, code: int = EXIT_USAGE) -> None:
    print(f"spartune: error: {field}: {message}", file=sys.stderr)
    sys.exit(code)


def _check_group_choices(argv: list[str], conf: Path) -> None:
    """Reject `group=unknown` before Hydra does, with one line instead of a screenful."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        group_dir = conf / key
        if "." in key or not group_dir.is_dir() or value in ("", "null"):
            continue
        options = sorted(p.stem for p in group_dir.glob("*.yaml"))
        if value not in options:
            fail(key, f"unknown choice {value!r}; choose one of {', '.join(options)}")


def _check_config_name(argv: list[str], root: Path) -> None:
    """`-cn NAME` must name a file in conf/ or sweeps/: say which exist, in one line."""
    stem = _config_name(argv)
    if stem is None:
        return
    if not ((root / "conf" / f"{stem}.yaml").is_file()
            or (root / "sweeps" / f"{stem}.yaml").is_file()):
        have = sorted(p.stem for p in (root / "sweeps").glob("*.yaml"))
        fail("--config-name", f"no sweep or config named {stem!r}; sweeps/ has "
                              f"{', '.join(have)}")


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _forget(run_dir: Path) -> None:
    """Remove the run folder Hydra made for a rejected command, if it holds nothing else."""
    import shutil

    if not run_dir.is_dir():
        return
    own = {".hydra"} | {p.name for p in run_dir.glob("*.log")}
    if {p.name for p in run_dir.iterdir()} <= own:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in (run_dir.parent, run_dir.parent.parent):
            try:
                parent.rmdir()  # only if now empty
            except OSError:
                break


def _config_dirs(argv: list[str], default: str, root: Path) -> tuple[Path, list[str]]:
    """Where Hydra looks: the primary config's own folder (sweeps/ for a sweep file, else
    conf/), with the other folder on the search path. Hydra finds a primary config only in
    config_path, while a sweep's `defaults: [config]` is found on the search path."""
    name = _config_name(argv) or default
    conf, sweeps = root / "conf", root / "sweeps"
    primary, other = (sweeps, conf) if (sweeps / f"{name}.yaml").is_file() else (conf, sweeps)
    if not any(a.startswith("hydra.searchpath=") for a in argv):
        argv = [*argv, f"hydra.searchpath=[file://{other}]"]
    return primary, argv


def _config_name(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("-cn", "--config-name") and i + 1 < len(argv):
            return argv[i + 1].removesuffix(".yaml")
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1].removesuffix(".yaml")
    return None


def hydra_app(config_name: str, task: Callable[[Config, Path], Any]) -> Callable[[], None]:
    """Wrap `task(cfg, run_dir)` as a Hydra app whose errors are one clear line."""
    import hydra
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    def main() -> None:
        from spartune.train import flush_denormals

        flush_denormals()  # before any torch op starts the thread pool (train.flush_denormals)
        stops.obey_sigterm()  # SIGTERM stops as cleanly as Ctrl-C (stops.py)
        root = project_dir()
        _check_group_choices(sys.argv[1:], root / "conf")
        _check_config_name(sys.argv[1:], root)
        primary, sys.argv[1:] = _config_dirs(sys.argv[1:], config_name, root)
        register_configs()

        @hydra.main(version_base="1.3", config_path=str(primary), config_name=config_name)
        def _main(dcfg: DictConfig) -> None:
            run_dir = _run_dir()
            try:
                cfg = to_config(dcfg)
                task(cfg, run_dir)
            except ConfigError as e:
                _forget(run_dir)
                fail(e.field, str(e).split(": ", 1)[1])
            except OmegaConfBaseException as e:
                _forget(run_dir)
                key = getattr(e, "full_key", None) or "config"
                fail(str(key), str(e).splitlines()[0])
            except KeyboardInterrupt as e:
                stops.shield()
                what = "terminated" if isinstance(e, stops.Terminated) else "interrupted"
                print(f"spartune: {what}; finished trials are kept and the interrupted ones "
                      "are marked FAIL and run again: resume with the same command",
                      file=sys.stderr)
                sys.exit(stops.exit_code(e))
            except atomic.WriteError as e:
                why = ("no space left (disk, quota or file-size limit): free some, or set "
                       "results_dir= elsewhere, then run the same command again"
                       if atomic.no_space(e) else f"{e.strerror}: check the folder")
                fail(str(e.filename), f"cannot write it, nothing of it was left behind: {why}; "
                     "finished trials are kept", stops.EXIT_ENVIRONMENT)
            except Exception as e:
                cause = stops.storage_gone(e)
                if cause is None:
                    raise
                fail("study.storage", f"the storage went away ({cause}); finished trials are "
                     "kept: run the same command again once it answers", stops.EXIT_ENVIRONMENT)

        _main()

    return main


def _train(cfg: Config, run_dir: Path) -> None:
    from spartune import train

    m = train.run(cfg, out_dir=run_dir)
    status = f"DIVERGED at step {m['diverged_step']}" if m["diverged"] else "ok"
    log.info(
        "%s: param=%s width=%d density=%g lr=%g init_std=%g | final val loss %.4f, "
        "train loss %.4f | %d steps, %.0f tokens/s, %.1f s | %s",
        status, cfg.param.name, cfg.model.width, cfg.model.density, cfg.optim.lr,
        cfg.model.init_std, m["final_val_loss"], m["final_train_loss"], m["steps"],
        m["tokens_per_second"], m["train_seconds"], run_dir,
    )


def _coord(cfg: Config, run_dir: Path) -> None:
    from spartune import coord

    ok = coord.main(cfg, run_dir)
    if not ok:
        sys.exit(1)


def _overrides() -> list[str]:
    """The command line's overrides, as Hydra parsed them."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _sweep(cfg: Config, run_dir: Path) -> None:
    from spartune import collect, report, sweep

    sweep.check_overrides(cfg, _overrides())
    res = sweep.sweep(cfg)
    trials, curves = collect.load_trials(sweep.open_storage(cfg), cfg.study.name)
    out = sweep.study_dir(cfg)
    paths = collect.write_tables(trials, curves, out)
    figs = report.make_figures(trials, curves, out)
    print(f"study {cfg.study.name}: {res['finished']}/{res['total']} trials finished "
          f"({res['ran_here']} run now, {res['seconds']:.0f} s); best val loss "
          f"{res['best']:.4f}; storage {res['storage']}")
    for line in res.get("notes", []):  # the bracketing search: each cell's optimum or bound
        print(line)
    for line in report.optimum_lines(trials, "lr") if "lr" in cfg.study.space else []:
        print(line)
    for line in report.optimum_lines(trials, "init_std") if "init_std" in cfg.study.space \
            else []:
        print(line)
    for p in [*paths.values(), *figs]:
        print(f"wrote {p}")
    if res["finished"] < res["total"]:
        print(f"spartune: {res['total'] - res['finished']} trials not finished here (running in "
              "another worker, or failed): run the same command again to complete the study",
              file=sys.stderr)


def _transfer(cfg: Config, run_dir: Path) -> None:
    from spartune import analysis, report, sweep, transfer

    sweep.check_overrides(cfg, _overrides(), axes="transfer")
    res = transfer.run(cfg)
    figs = report.make_figures(res["trials"], res["curves"], res["dir"])
    done = res["trials"][res["trials"]["role"] == "target"]
    print("\nfinal val loss at the transferred HPs (mean over seeds):")
    print(done.groupby(["density", "param"])["final_val_loss"].mean().unstack("param")
          .sort_index(ascending=False).to_string(float_format=lambda v: f"{v:.4f}"))
    if (res["trials"]["role"] == "check").any():
        print(analysis.transfer_regret(res["trials"]).to_string(index=False))
    for p in figs:
        print(f"wrote {p}")


def _plot(cfg: Config, run_dir: Path) -> None:
    from spartune import collect, report, sweep

    out = sweep.study_dir(cfg)
    journal = out / sweep.JOURNAL
    if cfg.study.storage or journal.exists():
        storage = collect.storage_for(out, cfg.study.storage)
        trials, curves = collect.load_trials(storage, cfg.study.name)
        if not trials.empty:
            collect.write_tables(trials, curves, out)
    trials, curves = collect.read_tables(out)
    figs = report.make_figures(trials, curves, out)
    for line in report.optimum_lines(trials, "lr"):
        print(line)
    for p in figs:
        print(f"wrote {p}")


def _pipeline(cfg: Config, run_dir: Path) -> None:
    from spartune import pipeline

    res = pipeline.run(cfg)
    print(f"pipeline finished in {res['seconds'] / 60:.1f} min")


train_main = hydra_app("config", _train)
coord_main = hydra_app("coord", _coord)
sweep_main = hydra_app("proxy", _sweep)
transfer_main = hydra_app("transfer", _transfer)
plot_main = hydra_app("config", _plot)
pipeline_main = hydra_app("run_pipeline", _pipeline)
