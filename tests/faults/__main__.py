"""Run the fault matrix: `python -m tests.faults [CASE ...]` from the checkout, with the venv's
python. One line per case, `CASE: pass|fail (details)`, then `faults: N/M pass`; exit 0 only
when every case passed."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .cases import CASES
from .harness import CaseFailed


def run_case(name: str, root: Path) -> tuple[bool, str]:
    cwd = root / name
    cwd.mkdir(parents=True)
    t0 = time.monotonic()
    try:
        details = CASES[name](cwd)
        ok = True
    except CaseFailed as e:
        details, ok = str(e).strip().splitlines()[0][:300], False
    except Exception as e:  # a broken harness is a failed case too, never a silent pass
        details, ok = f"{type(e).__name__}: {str(e)[:300]}", False
    return ok, f"{details} [{time.monotonic() - t0:.0f} s]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    ap.add_argument("cases", nargs="*", help=f"cases to run (default all): {', '.join(CASES)}")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    a = ap.parse_args(argv)
    unknown = [c for c in a.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose among {', '.join(CASES)}")
    names = a.cases or list(CASES)
    passed = 0
    with tempfile.TemporaryDirectory(prefix="spartune-faults-") as tmp:
        root = a.keep or Path(tmp)
        for name in names:
            ok, details = run_case(name, root)
            passed += ok
            print(f"{name}: {'pass' if ok else 'fail'} ({details})", flush=True)
    print(f"faults: {passed}/{len(names)} pass")
    return 0 if passed == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
