"""Import the example's model and training loop (examples/own_model) for the tests."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

import model  # noqa: E402
import train  # noqa: E402

__all__ = ["EXAMPLE", "model", "train"]
