"""The fault matrix as tests: each case of cases.py, in its own folder (slow: real sweeps)."""

from __future__ import annotations

import pytest

from .cases import CASES

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name: str, tmp_path, capsys) -> None:
    details = CASES[name](tmp_path)
    with capsys.disabled():
        print(f"\n[faults] {name}: pass ({details})")
