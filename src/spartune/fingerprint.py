"""What a study's results depend on, recorded when it is created and compared on every rerun.

"Run the same command again to resume" only holds while the command is the same experiment: a
rerun with `train.steps=40` on a study of 20-step trials would report the old losses as if they
were the new ones, and a TPE study would prune 40-step trials against 20-step ones. So every
cell study records, as its user attr `fingerprint`, the composed fields that decide a trial's
result (model, data, train, optim, param, the objective, the search space, sampler and
pruner), and a rerun whose fingerprint differs stops before any trial with one line naming
the changed fields, their old and new values, and the two fixes: a new study name, or
`study.allow_changes=[field, ...]` when the change is meant (then recorded in the study, as
its user attr `changes`).

Left out, because they cannot change a result: where and how fast a trial runs (workers,
devices, threads, storage, the layout a sparse layer is stored in, compile, micro-batches,
ddp or fsdp: equal losses, tested), what is logged (logger, progress, checkpoints), how much
is run (n_trials, max_points, timeout, the cell axes: a new seed, density or width is an
extension), where a search walks (the sampler's seed, which a launcher's job N shifts; where
the bracket walk starts and how it steps: each point's result is the same run wherever the
walk began), and the fields a trial takes from its cell or from the search space (model.width,
param.name, optim.lr when lr is searched, ...). The fingerprint is plain JSON, so it reads
the same from a journal file and from a database.

Torch-free; Optuna is imported only by the functions that read or write a storage.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime
from typing import Any

from spartune.columns import HP_FIELDS
from spartune.config import Config, ConfigError

ATTR, CHANGES = "fingerprint", "changes"
GROUPS = ("model", "param", "data", "optim", "train", "study")
# Fields that cannot change a trial's result (module docstring).
IGNORED = frozenset({
    "model.width", "model.density", "model.sparse_impl", "param.name", "data.cache_dir",
    "train.device", "train.threads", "train.progress", "train.checkpoint_every",
    "train.compile", "train.micro_batch_size", "train.parallel",
    "train.fsdp_reshard_after_forward",
    "study.name", "study.params", "study.widths", "study.densities", "study.seeds",
    "study.n_trials", "study.timeout", "study.storage", "study.workers", "study.devices",
    "study.nproc_per_trial", "study.max_points", "study.centre", "study.centre_from",
    "study.continuation", "study.step", "study.refine", "study.retries",
    "study.max_failures", "study.allow_changes", "study.sampler_seed",
})
_MISSING = object()


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
        return
    out[prefix] = json.loads(json.dumps(value, default=str))  # as the storage gives it back


def of(cfg: Config) -> dict[str, Any]:
    """The fingerprint: dotted field -> JSON value, for the fields that decide results."""
    searched = {dim.field or HP_FIELDS.get(name, "") for name, dim in cfg.study.space.items()}
    out: dict[str, Any] = {}
    for group in GROUPS:
        _flat(group, getattr(cfg, group), out)
    return {k: v for k, v in sorted(out.items())
            if k not in IGNORED and k not in searched and not _under(k, IGNORED)}


def _under(key: str, prefixes: Any) -> bool:
    return any(key.startswith(f"{p}.") for p in prefixes)


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """field -> (old, new) for every field whose value differs. A field the old fingerprint
    lacks (a newer schema) counts as changed only when its new value is not the default."""
    defaults = of(Config())
    out = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a is _MISSING and b == defaults.get(key, _MISSING):
            continue
        if b is _MISSING and a == defaults.get(key, _MISSING):
            continue
        if a != b:
            out[key] = (a, b)
    return out


def allowed(field: str, allow: list[str]) -> bool:
    return any(field == a or field.startswith(f"{a}.") for a in allow)


def _show(v: Any) -> str:
    return "(unset)" if v is _MISSING else repr(v)


def refusal(name: str, changes: dict[str, tuple[Any, Any]], allow: list[str]) -> ConfigError:
    """The one line that stops a rerun with a changed configuration."""
    refused = {k: v for k, v in changes.items() if not allowed(k, allow)}
    shown = [f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in list(refused.items())[:4]]
    more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
    fields = ",".join(refused)
    return ConfigError(
        next(iter(refused)),
        f"study {name!r} was run with another configuration ({'; '.join(shown)}{more}): its "
        "finished trials would be reported as this one's; give it a new study.name (name= "
        f"for spartune-pipeline), or set study.allow_changes=[{fields}] if you mean to "
        "change it (recorded in the study)")


# -- the storage --------------------------------------------------------------------------------


def _cell_studies(cfg: Config, storage: Any) -> list[Any]:
    import optuna

    return [s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
            if s.user_attrs.get("study") == cfg.study.name and "cell" in s.user_attrs]


def check_storage(cfg: Config, storage: Any) -> list[str]:
    """Compare the study's recorded fingerprint with this config's, before any trial runs.

    Raises ConfigError (nothing written) when a field changed that `study.allow_changes` does
    not name. Writes the fingerprint into cell studies made before fingerprints existed, and
    records allowed changes; returns the note lines saying so (printed by `sweep`)."""
    import optuna

    new = of(cfg)
    summaries = _cell_studies(cfg, storage)
    unrecorded, changed = [], []
    for s in summaries:
        old = s.user_attrs.get(ATTR)
        if not isinstance(old, dict):
            unrecorded.append(s)
            continue
        d = diff(old, new)
        if d:
            if not all(allowed(k, cfg.study.allow_changes) for k in d):
                raise refusal(cfg.study.name, d, cfg.study.allow_changes)
            changed.append((s, d))
    notes = []
    when = datetime.now().isoformat(timespec="seconds")
    for s, d in changed:
        study = optuna.load_study(study_name=s.study_name, storage=storage,
                                  sampler=optuna.samplers.RandomSampler())
        log = list(s.user_attrs.get(CHANGES) or [])
        log.append({"at": when, "fields": {k: [None if a is _MISSING else a,
                                                 None if b is _MISSING else b]
                                             for k, (a, b) in d.items()}})
        study.set_user_attr(CHANGES, log)
        study.set_user_attr(ATTR, new)
    if changed:
        d = changed[0][1]
        notes.append(f"spartune: note: study {cfg.study.name!r}: allowed changes recorded in "
                     f"its {len(changed)} cell(s): " + "; ".join(
                         f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in d.items()))
    for s in unrecorded:
        study = optuna.load_study(study_name=s.study_name, storage=storage,
                                  sampler=optuna.samplers.RandomSampler())
        study.set_user_attr(ATTR, new)
    if unrecorded:
        notes.append(f"spartune: note: study {cfg.study.name!r} had no recorded configuration "
                     f"(made by an older spartune): this run's is now recorded in its "
                     f"{len(unrecorded)} cell(s), and a rerun with another one is refused")
    for line in notes:
        print(line, file=sys.stderr)
    return notes
