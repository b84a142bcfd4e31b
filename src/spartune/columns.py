"""Column names of the tidy tables: the shared vocabulary of collect, transfer and plot.

Defined once here (DESIGN.md, results contract). Nothing here imports torch or Optuna.
"""

from __future__ import annotations

# One row per width x density x param x seed x step x module: results/<study>/coord.csv
COORD_COLUMNS = ["param", "width", "density", "seed", "step", "module", "l1"]
# Hidden quantities whose scale must not depend on width or density under SμPar.
HIDDEN_MODULES = ["attn", "mlp"]
COORD_MODULES = ["embedding", "attn", "mlp", "logits"]
