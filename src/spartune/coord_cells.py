"""The coordinate check's cells and their configs, torch-free.

Why a module of its own: `spartune-coord` checks every cell's config before torch loads, so a
bad input fails in a second (cli.py); the measurement itself (coord.py) needs torch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from spartune.config import Config, ConfigError, CoordConfig, validate, validate_coord


def cells(c: CoordConfig) -> list[tuple[int, float]]:
    """The (width, density) pairs to measure, in a stable order, without duplicates.

    `cross` is the paper's layout: the width axis at density 1 and the density axis at the
    largest width, so each axis is varied alone at the cost of len(widths) + len(densities) - 1
    models instead of their product.
    """
    if c.grid == "product":
        pairs = [(w, float(d)) for w in c.widths for d in c.densities]
    else:
        wmax = max(c.widths)
        pairs = [(w, 1.0) for w in c.widths] + [(wmax, float(d)) for d in c.densities]
    return list(dict.fromkeys(pairs))


def cell_config(cfg: Config, param: str, width: int, density: float, seed: int) -> Config:
    """The full run config of one cell: the user's config with the coord axes substituted.

    Built with `dataclasses.replace` so every other knob (init_std, alphas, depth, optimizer
    betas, weight decay, mask kind...) is exactly what a real run of that shape would use.
    """
    c = cfg.coord
    return replace(
        cfg,
        model=replace(cfg.model, width=width, density=density),
        param=replace(cfg.param, name=param),
        train=replace(cfg.train, seq_len=c.seq_len, batch_size=c.batch_size),
        seed=seed,
    )


def check(cfg: Config) -> None:
    """Every cell's config must be valid before anything is built: fail fast, one clear line."""
    c = cfg.coord
    validate_coord(c, cfg.model)
    _positive_int(c.batch_size, "coord.batch_size")
    _positive_int(c.seq_len, "coord.seq_len")
    for param in c.params:
        for width, density in cells(c):
            validate(cell_config(cfg, param, width, density, c.seeds[0]))


def _positive_int(value: Any, field: str) -> None:
    if not (isinstance(value, int) and value > 0):
        raise ConfigError(field, f"must be a positive integer, got {value!r}")
