"""Hydra's compose and override errors as spartune's one line (part of the command layer).

Hydra rejects a typo, a value of the wrong type or an unknown group before any spartune check
runs, with a screenful that ends in advice to append the key with `+` (which would create a
field nothing reads). Every command therefore composes its config once through Hydra's public
compose API before `hydra.main` runs (`preflight`), and a failure becomes one line:
`spartune: error: FIELD: what is wrong and the fix`, exit 2. Suggestions come from the schema
(config.py's dataclasses), never from Hydra's `+`.

The dict-valued fields of the schema (`model.layer_density`, `study.objective`, `study.space`)
take new keys: `study.objective._target_=mypkg.run` is written `++...` for Hydra
(`open_dicts`), and the keys are then checked by spartune's own validation.

Only cli.py calls this module; it and cli.py are the only ones that import Hydra.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

from spartune import config as schema


def _fields(cls: type) -> dict[str, Any]:
    """A dataclass's field names -> their resolved types."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_dict_type(tp: Any) -> bool:
    return typing.get_origin(tp) is dict or tp is dict


def schema_paths(cls: type = schema.Config, prefix: str = "") -> dict[str, Any]:
    """Every field of the schema by dotted path (sections included) -> its type."""
    out: dict[str, Any] = {}
    for name, tp in _fields(cls).items():
        path = f"{prefix}{name}"
        out[path] = tp
        if _is_dataclass_type(tp):
            out.update(schema_paths(tp, f"{path}."))
    return out


def dict_fields() -> list[str]:
    """The schema's dict-valued fields, whose keys are the user's (layer names, HP names, an
    objective's kwargs)."""
    return [p for p, tp in schema_paths().items() if _is_dict_type(tp)]


def _split(override: str) -> tuple[str, str, str] | None:
    """(prefix, key, value) of `[+|++|~]key=value`, or None for anything else."""
    m = re.match(r"^(\+\+|\+|~)?([A-Za-z_][\w.\-/@]*)=(.*)$", override, re.S)
    return (m.group(1) or "", m.group(2), m.group(3)) if m else None


def open_dicts(overrides: list[str]) -> list[str]:
    """`study.objective._target_=x` and `model.layer_density={qkv: 0.5}` as Hydra needs them
    (`++`: add or override), so they work as the README writes them. A typed entry of
    `study.space` (its `lr`, ...) is an ordinary override already and is left as it is."""
    dicts = dict_fields()
    out = []
    for ov in overrides:
        parts = _split(ov)
        if parts is None or parts[0]:
            out.append(ov)
            continue
        _, key, value = parts
        home = next((d for d in dicts if key == d or key.startswith(d + ".")), None)
        typed = home == "study.space"  # values are SearchDim: Hydra merges them per field
        if home is not None and not typed and (key != home or value.lstrip().startswith("{")):
            out.append(f"++{ov}")
        else:
            out.append(ov)
    return out


def _suggest(full_key: str, groups: list[str]) -> str:
    """'did you mean model.density?' from the schema (and the config groups at the top)."""
    paths = schema_paths()
    parent, _, leaf = full_key.rpartition(".")
    if parent and parent in paths and _is_dataclass_type(paths[parent]):
        siblings = list(_fields(paths[parent]))
        near = [f"{parent}.{n}" for n in difflib.get_close_matches(leaf, siblings, 3, 0.6)]
        elsewhere = [p for p in paths if p.rpartition(".")[2] == leaf and p != full_key]
        near += [p for p in elsewhere if p not in near]
        if near:
            return f"did you mean {' or '.join(near[:3])}?"
        return f"{parent} has {', '.join(siblings)}"
    if not parent:
        top = [*(n for n in _fields(schema.Config)), *groups]
        near = difflib.get_close_matches(leaf, list(dict.fromkeys(top)), 3, 0.6)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        return (f"{hint}the config groups are {', '.join(sorted(groups))}; the other fields "
                f"are {', '.join(n for n in _fields(schema.Config) if n not in groups)}")
    near = [p for p in paths if p.rpartition(".")[2] == leaf]
    return f"did you mean {' or '.join(near[:3])}?" if near else "no such section in the schema"


_KINDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false",
          "String": "a string"}


def _default(path: str) -> Any:
    """The schema's default for `path`, for an example of a valid value."""
    obj: Any = schema.Config()
    for part in path.split("."):
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if isinstance(obj, int | float | bool | str) else None


def _omegaconf_error(e: BaseException) -> BaseException | None:
    """The OmegaConf error inside a Hydra one (its cause chain), if any."""
    from omegaconf.errors import OmegaConfBaseException

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OmegaConfBaseException):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def translate(e: BaseException, overrides: list[str], groups: list[str]) -> tuple[str, str]:
    """(field, message) for a Hydra compose error: what is wrong and the fix, one line."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(e, OverrideParseException):
        bad = e.override or next((o for o in overrides if o.strip() and o in str(e)), None)
        parts = _split(bad) if bad else None
        field = parts[1] if parts else "override"
        return field, (f"cannot parse {bad or e.override!r} ({_first_line(e)}); write "
                       "key=value, quoting a value that holds spaces or brackets")
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '([^']+)'", str(e))
        where = m.group(1) if m else "config"
        group = where.rpartition("/")[0] or where
        return group.replace("/", "."), _first_line(e)
    m = re.search(r"(?:Ambiguous value for argument|Sweep parameters) '([^']+)'", str(e))
    if m:  # `a=1,2` or `range(...)` outside -m
        parts = _split(m.group(1))
        return (parts[1] if parts else "override",
                f"{m.group(1)!r} sweeps several values: add -m (--multirun) for one job per "
                "value, or write a list in brackets ([0,1]) where the field takes one")
    inner = _omegaconf_error(e)
    key = str(getattr(inner, "full_key", "") or "") if inner is not None else ""
    full = key or "config"
    if isinstance(inner, ConfigKeyError | ConfigAttributeError) and key:
        home = next((d for d in dict_fields() if key.startswith(d + ".")), None)
        if home == "study.space":  # OmegaConf cannot add a typed SearchDim entry from here
            return key, ("is not a dimension of this sweep's study.space; a new HP is added in "
                         "the sweep file (space: {NAME: {low: ..., high: ...}}; spartune-init "
                         "copies the sweep files to edit)")
        if home is not None:
            return key, _first_line(inner)
        what = "no such field" if "." in key else "no config group or field of that name"
        return key, f"{what}; {_suggest(key, groups)} (--cfg job prints every field)"
    if isinstance(inner, ValidationError) and key:
        text = _first_line(inner)
        m = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", text)
        example = _default(key)
        eg = f", e.g. {key}={str(example).lower() if isinstance(example, bool) else example}" \
            if example is not None else ""
        if m:
            value, want = m.group(1), _KINDS.get(m.group(3), m.group(3).lower())
            return key, f"{value!r} is not {want}; give {want}{eg}"
        b = re.search(r"Value '(.*)' is not a valid bool", text)
        if b:
            return key, f"{b.group(1)!r} is not true or false; give true or false{eg}"
        if "is not Optional" in text:
            return key, f"cannot be null; give a value{eg}"
        return key, f"{text}{eg and '; give a value' + eg}"
    if inner is not None:
        return full, _first_line(inner)
    return full, _first_line(e)


def preflight(primary: str, config_name: str, overrides: list[str], groups: list[str],
              multirun: bool) -> Any:
    """Compose the config as the command will, through Hydra's public compose API; the
    composed config, or (field, message) raised as `ComposeError`. A multirun's sweep
    overrides (`a=1,2`, `range(...)`) are left to Hydra: each job composes one value."""
    from hydra import compose, initialize_config_dir, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        kept = [o for o, p in zip(overrides, parsed, strict=True)
                if not (multirun and p.is_sweep_override())]
        init = (initialize_config_module(primary.removeprefix("pkg://"), version_base="1.3")
                if primary.startswith("pkg://")
                else initialize_config_dir(primary, version_base="1.3"))
        with init:
            return compose(config_name, overrides=kept)
    except (HydraException, OmegaConfBaseException) as e:
        raise ComposeError(*translate(e, overrides, groups)) from None


class ComposeError(Exception):
    """A compose error in spartune's words: `field` and `message` for cli.fail."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
