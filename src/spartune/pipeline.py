"""The main job: proxy sweep -> transfer -> target runs -> tables -> figures -> report.md.

Everything lands in `results/<name>/`: the proxy study in `proxy/`, the targets in `transfer/`,
the report and its figures at the top. Re-running resumes: finished trials are kept.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

from spartune import collect, report, sweep, transfer
from spartune.config import Config, check_name

log = logging.getLogger(__name__)


def _proxy_config(cfg: Config) -> Config:
    proxy_cfg = copy.deepcopy(cfg)
    proxy_cfg.study.name = f"{cfg.name}/proxy"
    return proxy_cfg


def check(cfg: Config) -> None:
    """Every field the pipeline's steps read, checked before anything runs (torch-free, so the
    CLI runs it before torch loads)."""
    check_name(cfg.name, "name")
    sweep.validate_study(_proxy_config(cfg))
    transfer.validate_transfer(cfg)


def run(cfg: Config) -> dict[str, Any]:
    check(cfg)
    t0 = time.monotonic()
    out = Path(cfg.results_dir) / cfg.name
    proxy_cfg = _proxy_config(cfg)
    print(f"[1/4] proxy sweep: {proxy_cfg.study.name} ({sweep.budget(proxy_cfg)} trials, "
          f"width {proxy_cfg.study.widths}, density {proxy_cfg.study.densities})", flush=True)
    sweep.sweep(proxy_cfg)
    proxy, proxy_curves = collect.load_trials(sweep.open_storage(proxy_cfg), proxy_cfg.study.name)
    collect.write_tables(proxy, proxy_curves, sweep.study_dir(proxy_cfg))

    print("[2/4] transfer to the targets", flush=True)
    tcfg = copy.deepcopy(cfg)
    tcfg.transfer.source = proxy_cfg.study.name
    tcfg.transfer.source_storage = proxy_cfg.study.storage
    res = transfer.run(tcfg, name=f"{cfg.name}/transfer")

    print("[3/4] figures", flush=True)
    figs = report.make_figures(res["trials"], res["curves"], out)
    print("[4/4] report", flush=True)
    path = report.pipeline_report(
        out_dir=out, chosen=res["chosen"], plan=res["plan"], proxy=proxy,
        targets=res["trials"], figures=figs, seconds=time.monotonic() - t0,
        command=" ".join(["spartune-pipeline", *(a for a in sys.argv[1:]
                                                 if not a.startswith("hydra.searchpath="))]),
    )
    print(f"report: {path}")
    for p in figs:
        print(f"figure: {p}")
    return {"report": path, "figures": figs, "seconds": time.monotonic() - t0, **res}
