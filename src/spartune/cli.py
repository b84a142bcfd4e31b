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


def fail(field: str, message: str) -> None:
    print(f"spartune: error: {field}: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


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


def hydra_app(config_name: str, task: Callable[[Config, Path], Any]) -> Callable[[], None]:
    """Wrap `task(cfg, run_dir)` as a Hydra app whose errors are one clear line."""
    import hydra
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    def main() -> None:
        conf = project_dir() / "conf"
        _check_group_choices(sys.argv[1:], conf)
        register_configs()

        @hydra.main(version_base="1.3", config_path=str(conf), config_name=config_name)
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
            except KeyboardInterrupt:
                print("spartune: interrupted", file=sys.stderr)
                sys.exit(130)

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


train_main = hydra_app("config", _train)
coord_main = hydra_app("coord", _coord)
