"""Smoke test of benchmarks/: every script runs with --quick and ends with its verdict line.

Only the form of the last line is checked, never a figure or a target: timings on a shared
machine are noise, and the benchmarks report ratios for a person to read (benchmarks/README.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["trainer_throughput", "mask_overhead", "search_efficiency", "orchestration_overhead",
           "parallel_scaling", "memory", "sparse_speed", "ddp_overhead", "bracket_efficiency"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_quick_runs_and_prints_its_verdict(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines, out.stderr[-2000:]
    assert re.match(rf"^{name}: ratio=[0-9.]+ target=\S+ (pass|fail)$", lines[-1]), lines[-1]


# Scripts in benchmarks/ that are not ratio benchmarks: science.py drives the paper's
# experiments (tests/test_science.py covers it), ablations.py its what-ifs
# (tests/test_ablations.py); neither prints a verdict line.
NOT_RATIO = {"science", "ablations"}


def test_every_script_is_listed() -> None:
    found = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                   if not p.stem.startswith("_") and p.stem not in NOT_RATIO)
    assert found == sorted(SCRIPTS)
