"""Optuna storage -> the tidy tables trials.csv and curves.csv (columns.py).

This is the one place that reads Optuna's records back (STYLE_ANCHORS rules 6 and 9): every
later step (analysis, transfer, plot) works on the two DataFrames alone, so a figure can be
redrawn from the csv files without Optuna, torch or the storage. A sweep keeps one study per cell,
named `f"{study}/{param}/w{width}/d{density:g}/s{seed}"`, all in one storage.

    trials, curves = load_trials(storage_for(Path("results/lr_stability")), "lr_stability")
    write_tables(trials, curves, Path("results/lr_stability"))
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from spartune import atomic
from spartune.columns import CURVE_COLUMNS, HP_FIELDS, TRIAL_COLUMNS
from spartune.config import ConfigError

JOURNAL_NAME = "optuna.journal"

# Column dtypes, applied both when collecting and when reading the csv back, so a table
# survives the round trip unchanged. Integers are nullable: a failed trial may lack them.
_INT_COLUMNS = {"number", "width", "base_width", "depth", "seed", "steps", "n_params",
                "n_nonzero_params", "step", "world_size", "micro_batch_size"}
_STR_COLUMNS = {"study", "cell", "state", "role", "param", "precision", "parallel"}
_BOOL_COLUMNS = {"diverged"}
_NULLABLE_BOOL_COLUMNS = {"compile"}  # unknown (a user's objective did not say) stays empty


def storage_for(study_dir: Path, url: str | None = None) -> str | optuna.storages.BaseStorage:
    """The storage a sweep wrote into: the RDB `url` if given, else `study_dir/optuna.journal`.

    Reading must never create anything (DESIGN.md, "Bad input"): Optuna's journal backend and
    SQLAlchemy both create a missing file on open, which would turn a typo in the study name
    into an empty study. So a missing journal or SQLite file is an error that says what to run.
    """
    study_dir = Path(study_dir)
    if url:
        if url.startswith("sqlite:///"):
            db = Path(url.removeprefix("sqlite:///"))
            if db.name != ":memory:" and not db.is_file():
                raise ConfigError("study.storage", f"no database at {db}: check the URL, or run "
                                                   "the sweep with this storage first")
        return url
    path = study_dir / JOURNAL_NAME
    if not path.is_file():
        raise ConfigError("study.name", f"no Optuna journal in {study_dir} ({path.name} is "
                                        f"missing): run `spartune-sweep -cn {study_dir.name}` "
                                        "first, or check the study name")
    backend = optuna.storages.journal.JournalFileBackend(str(path.resolve()))  # sweep.open_storage
    return optuna.storages.JournalStorage(backend)


def load_trials(storage: str | optuna.storages.BaseStorage,
                study: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every trial of every cell of `study`: (trials, curves) with the contract's columns.

    Cells are the studies named `f"{study}/..."`. Values the sweep records as user attrs are
    taken as they are; a missing one is NaN, so failed trials still appear (with their state)
    and nothing about a sweep is hidden by collecting it. Sorted by cell, then trial number.
    """
    if isinstance(storage, str):
        storage = optuna.storages.get_storage(storage)
    prefix = f"{study}/"
    trial_rows: list[dict[str, Any]] = []
    curve_rows: list[dict[str, Any]] = []
    for frozen in storage.get_all_studies():
        if not frozen.study_name.startswith(prefix):
            continue
        study_id = storage.get_study_id_from_name(frozen.study_name)
        cell_attrs = {**frozen.user_attrs, "study": study,
                      "cell": frozen.study_name.removeprefix(prefix)}
        for trial in storage.get_all_trials(study_id, deepcopy=False):
            row = _trial_row(trial, cell_attrs)
            trial_rows.append(row)
            curve_rows.extend(_curve_rows(trial, row))
    trials = _typed(pd.DataFrame(trial_rows, columns=TRIAL_COLUMNS))
    curves = _typed(pd.DataFrame(curve_rows, columns=CURVE_COLUMNS))
    trials = trials.sort_values(["cell", "number"], kind="stable").reset_index(drop=True)
    curves = curves.sort_values(["cell", "number", "step"], kind="stable").reset_index(drop=True)
    return trials, curves


def _trial_row(trial: optuna.trial.FrozenTrial, cell_attrs: dict[str, Any]) -> dict[str, Any]:
    """One trials.csv row. Trial attrs win over the study's: they are what the run really used."""
    attrs = {**cell_attrs, **trial.user_attrs}
    row: dict[str, Any] = {c: attrs.get(c) for c in TRIAL_COLUMNS}
    row.update(study=cell_attrs["study"], cell=cell_attrs["cell"], number=trial.number,
               state=trial.state.name, value=trial.value,
               diverged=bool(attrs.get("diverged") or False))
    for name in HP_FIELDS:
        searched = trial.params.get(f"log2_{name}")
        natural = attrs.get(name)
        if natural is None and searched is not None:
            natural = 2.0 ** searched  # a failed trial may die before recording the value
        row[name] = natural
        row[f"log2_{name}"] = searched if searched is not None else _log2(natural)
    row["duration_s"] = _seconds(trial.datetime_start, trial.datetime_complete)
    return row


def _curve_rows(trial: optuna.trial.FrozenTrial, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The trial's learning curve; a pruned trial stopped before recording `curve`, so its
    reported validation losses (intermediate values) stand in, with no train loss."""
    keys = {c: row.get(c) for c in CURVE_COLUMNS}
    curve = trial.user_attrs.get("curve")
    if curve:
        return [{**keys, "step": p[0], "train_loss": p[1], "val_loss": p[2],
                 "lr_now": p[3] if len(p) > 3 else None} for p in curve]
    return [{**keys, "step": step, "train_loss": None, "val_loss": loss, "lr_now": None}
            for step, loss in sorted(trial.intermediate_values.items())]


def _log2(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return math.log2(value) if value > 0 else math.nan


def _seconds(start: datetime | None, end: datetime | None) -> float:
    return (end - start).total_seconds() if start and end else math.nan


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Fixed dtypes per column, so collected and re-read tables compare equal."""
    df = df.copy()
    for col in df.columns:
        if col in _INT_COLUMNS:
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
        elif col in _STR_COLUMNS:
            df[col] = df[col].astype(object).where(df[col].notna(), None)
        elif col in _BOOL_COLUMNS:
            df[col] = df[col].map(_as_bool).astype(bool)
        elif col in _NULLABLE_BOOL_COLUMNS:
            known = df[col].notna()
            df[col] = df[col].map(_as_bool).astype("boolean").where(known, pd.NA)
        else:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) if value is not None and value == value else False


def write_tables(trials: pd.DataFrame, curves: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write trials.csv and curves.csv into `out_dir`.

    Each file is written to a temporary name and moved into place (os.replace is atomic on one
    file system), so a crash or a concurrent reader never sees half a table.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, df, columns in (("trials", trials, TRIAL_COLUMNS), ("curves", curves, CURVE_COLUMNS)):
        path = out_dir / f"{name}.csv"
        with atomic.replacing(path) as tmp, tmp.open("w", newline="") as f:
            df.reindex(columns=columns).to_csv(f, index=False)
        paths[name] = path
    return paths


def read_tables(out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read trials.csv and curves.csv back with the dtypes `load_trials` gives them.

    An absent or empty trials.csv is a user mistake (wrong study name, or the sweep never ran),
    reported as such rather than as an empty figure later on.
    """
    out_dir = Path(out_dir)
    path = out_dir / "trials.csv"
    trials = pd.read_csv(path) if path.is_file() and path.stat().st_size else None
    if trials is None or trials.empty:
        raise ConfigError("study.name", f"no trials in {out_dir}: run "
                                        f"`spartune-sweep -cn {out_dir.name}` first")
    curves_path = out_dir / "curves.csv"
    has_curves = curves_path.is_file() and curves_path.stat().st_size
    curves = pd.read_csv(curves_path) if has_curves else pd.DataFrame(columns=CURVE_COLUMNS)
    return (_typed(trials.reindex(columns=TRIAL_COLUMNS)),
            _typed(curves.reindex(columns=CURVE_COLUMNS)))
