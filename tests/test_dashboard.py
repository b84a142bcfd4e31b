"""optuna-dashboard on spartune's storages, for real: the dashboard is started on 127.0.0.1 on a
study's journal file (and on a PostgreSQL server), and its HTTP API lists the study's cells
and gives each trial's value as the storage has it."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from conftest import tiny_config
from pg_server import free_port
from spartune import sweep
from spartune.config import SearchDim
from test_postgres import postgres  # noqa: F401  (the fixture: a throwaway server)

pytestmark = pytest.mark.slow  # a sweep, then a web server started and polled
STARTUP_S = 90  # the most a dashboard may take to answer its first request


def _sweep(results: Path, storage: str | None) -> optuna.storages.BaseStorage:
    cfg = tiny_config(results_dir=str(results))
    cfg.study.name, cfg.study.widths, cfg.study.n_trials = "dash", [32], 2
    cfg.study.densities = [1.0, 0.5]  # two cells: two Optuna studies
    cfg.study.space = {"lr": SearchDim(low=1e-3, high=1e-1)}
    cfg.study.storage = storage
    assert sweep.sweep(cfg)["finished"] == 4
    return sweep.open_storage(cfg)


@contextlib.contextmanager
def _dashboard(storage: str, log: Path) -> Iterator[str]:
    """optuna-dashboard on 127.0.0.1:<free port>; yields its base URL once it answers."""
    exe = Path(sys.executable).with_name("optuna-dashboard")
    if not exe.exists():
        pytest.skip("optuna-dashboard is not installed (pip install 'spartune[dashboard]')")
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), storage, "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                _get(base, "/api/meta")
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text()[-1500:]
                    raise AssertionError(f"dashboard did not answer: {tail}") from None
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=20) as r:
        return json.loads(r.read())


def _check(base: str, storage: optuna.storages.BaseStorage) -> None:
    listed = {s["study_name"]: s["study_id"] for s in _get(base, "/api/studies")["study_summaries"]}
    assert set(listed) == {"dash/supar/w32/d1/s0", "dash/supar/w32/d0.5/s0"}
    for name, study_id in listed.items():
        want = {t.number: t for t in optuna.load_study(study_name=name, storage=storage).trials}
        detail = _get(base, f"/api/studies/{study_id}")
        assert detail["name"] == name
        assert {t["number"] for t in detail["trials"]} == set(want) and len(want) == 2
        for t in detail["trials"]:
            ref = want[t["number"]]
            assert t["state"] == "Complete"
            assert t["values"] == [pytest.approx(ref.value)]
            attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
            assert float(attrs["final_val_loss"]) == pytest.approx(ref.user_attrs[
                "final_val_loss"])
            assert attrs["param"] == "supar"


def test_dashboard_reads_a_journal_file(tmp_path: Path) -> None:
    storage = _sweep(tmp_path / "results", None)
    journal = tmp_path / "results" / "dash" / sweep.JOURNAL
    with _dashboard(str(journal), tmp_path / "dashboard.log") as base:
        _check(base, storage)


def test_dashboard_reads_postgresql(tmp_path: Path, postgres: str) -> None:  # noqa: F811
    storage = _sweep(tmp_path / "results", postgres)
    with _dashboard(postgres, tmp_path / "dashboard.log") as base:
        _check(base, storage)
