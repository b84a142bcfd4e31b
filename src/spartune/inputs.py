"""Checks every command applies to its composed config, whatever the command (torch-free).

- **Numbers are finite.** OmegaConf reads `nan` and `inf` as floats, so `study.space.lr.high=nan`
  used to reach numpy as an OverflowError; a non-finite number anywhere in the config is refused.
- **Axis values are distinct.** `study.seeds=[0,0]` would run the same cell twice and count it
  as two seeds (a standard error over copies); every list of cells or grid points must hold
  each value once.
- **The results folder can be written.** Checked before anything is written, by making and
  removing a probe inside the nearest folder that exists: a folder that cannot be created or
  written is the environment's fault (exit 3, as a full disk), not a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from spartune.config import Config, ConfigError

# Lists whose values are cells or grid points: each value once.
AXES = {
    "study": ("params", "widths", "densities", "seeds", "devices"),
    "transfer": ("params", "widths", "densities", "seeds", "hps", "check_octaves"),
    "coord": ("params", "widths", "densities", "seeds"),
}


def _walk(obj: Any, path: str) -> Any:
    """(dotted path, value) of every leaf of a config dataclass, lists and dicts included."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def check_finite(cfg: Config) -> None:
    """Refuse NaN and inf wherever the config holds a number."""
    for path, value in _walk(cfg, ""):
        if isinstance(value, float) and not math.isfinite(value):
            field = path.split("[", 1)[0]
            where = f" (at {path})" if path != field else ""
            raise ConfigError(field, f"{value} is not a finite number{where}; give a finite "
                              "value (null where the field allows none)")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def check_distinct(cfg: Config) -> None:
    """Refuse a value listed twice on any axis (cells, grid values, check octaves)."""
    lists: list[tuple[str, list[Any]]] = []
    for section, names in AXES.items():
        obj = getattr(cfg, section)
        lists += [(f"{section}.{n}", getattr(obj, n)) for n in names
                  if isinstance(getattr(obj, n), list)]
    lists += [(f"study.space.{name}.values", dim.values) for name, dim in cfg.study.space.items()
              if getattr(dim, "values", None)]
    for field, values in lists:
        for i, v in enumerate(values):
            if any(_same(v, w) for w in values[:i]):
                shown = ", ".join(str(x) for x in values)
                raise ConfigError(field, f"{v} is listed twice ([{shown}]); each value is one "
                                  "cell or grid point: list it once")


class FolderError(OSError):
    """The results folder cannot be created or written (exit 3)."""


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Raise FolderError unless `folder` exists and takes a new file, or can be created.

    Nothing is left behind: the probe (a file in the folder, or a folder in the nearest
    existing parent) is removed at once, so a rejected command still writes nothing."""
    path = Path(folder).expanduser().absolute()
    probe_in = path
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise FolderError(f"{probe_in} is not a folder: results_dir={folder} cannot be created")
    try:
        if probe_in == path:
            fd, name = tempfile.mkstemp(prefix=".spartune-probe-", dir=path)
            os.close(fd)
            os.unlink(name)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".spartune-probe-", dir=probe_in))
    except OSError as e:
        what = "written" if probe_in == path else "created"
        raise FolderError(f"{path} cannot be {what} ({e.strerror or e} in {probe_in})") \
            from None
