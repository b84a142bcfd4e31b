"""Where the configs are: the user's folder first, then the ones shipped with spartune.

A wheel carries the config groups and the sweep files as `spartune/conf` and `spartune/sweeps`
(mapped from the checkout's top-level conf/ and sweeps/ by pyproject.toml); a source tree or
an editable install uses the checkout's own folders. A user's project folder adds or overrides
them: `--config-dir DIR` (Hydra's flag, first of all), then `./conf` and `./sweeps` in the
working directory, then `$SPARTUNE_HOME/conf` and `/sweeps` if set, then the shipped ones.
For a file name or a config group option found in several, the first wins.

`spartune-init` copies the shipped sweep files (and, with --conf, the config groups) into the
working directory to edit. No Hydra here: cli.py turns these roots into Hydra's search path.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

KINDS = ("conf", "sweeps")


@dataclass(frozen=True)
class Root:
    """One folder of configs: `path` to list and read it, `url` for Hydra's search path."""

    kind: str  # conf | sweeps | extra (a --config-dir, which may hold either)
    path: Path
    url: str
    origin: str  # what put it there, for messages: --config-dir, ./, SPARTUNE_HOME, spartune


class MissingConfigs(RuntimeError):
    """The shipped configs cannot be found (a broken install), or $SPARTUNE_HOME is wrong."""


def source_tree() -> Path | None:
    """The checkout this module runs from, if it is one (src/spartune/ beside conf/)."""
    top = Path(__file__).resolve().parents[2]
    if (top / "conf" / "config.yaml").is_file() and (top / "sweeps").is_dir():
        return top
    return None


def shipped() -> list[Root]:
    """The configs that come with spartune: the checkout's, or the installed package's."""
    top = source_tree()
    if top is not None:
        return [Root(k, top / k, f"file://{top / k}", "spartune") for k in KINDS]
    roots = []
    for k in KINDS:
        path = Path(str(importlib.resources.files("spartune") / k))
        if not path.is_dir():
            raise MissingConfigs(f"spartune's {k}/ is missing from {path.parent}: reinstall "
                                 "spartune (pip install --force-reinstall spartune)")
        roots.append(Root(k, path, f"pkg://spartune.{k}", "spartune"))
    return roots


def roots(config_dir: str | None = None, cwd: Path | None = None) -> list[Root]:
    """Every config folder a command sees, first wins (see the module docstring)."""
    cwd = cwd or Path.cwd()
    out: list[Root] = []
    if config_dir:
        p = Path(config_dir).resolve()
        out.append(Root("extra", p, f"file://{p}", "--config-dir"))
    for k in KINDS:
        p = (cwd / k).resolve()
        if p.is_dir():
            out.append(Root(k, p, f"file://{p}", "./"))
    home = os.environ.get("SPARTUNE_HOME")
    if home:
        top = Path(home).resolve()
        # either folder is enough: spartune-init makes sweeps/ alone (its --conf adds conf/)
        if not (top / "sweeps").is_dir() and not (top / "conf").is_dir():
            raise MissingConfigs(f"{top} holds neither sweeps/ nor conf/; point SPARTUNE_HOME "
                                 "at a folder spartune-init made (or one holding conf/), or "
                                 "unset it")
        out += [Root(k, top / k, f"file://{top / k}", "SPARTUNE_HOME") for k in KINDS
                if (top / k).is_dir()]
    out += shipped()
    seen: set[Path] = set()
    unique = []
    for r in out:  # the checkout's root as cwd: its conf/ is both ./conf and the shipped one
        if r.path not in seen:
            seen.add(r.path)
            unique.append(r)
    return unique


def find(name: str, all_roots: list[Root]) -> Root | None:
    """The first root holding `name`.yaml (a primary config or a sweep file)."""
    for r in all_roots:
        if (r.path / f"{name}.yaml").is_file():
            return r
    return None


def group_options(group: str, all_roots: list[Root]) -> list[str] | None:
    """The options of a config group over every root, or None if no root has that group."""
    found = [r.path / group for r in all_roots if (r.path / group).is_dir()]
    if not found:
        return None
    return sorted({p.stem for d in found for p in d.glob("*.yaml")})


def sweep_names(all_roots: list[Root]) -> list[str]:
    """The sweep files a user can name with -cn, from every root that holds sweeps."""
    names = {p.stem for r in all_roots if r.kind in ("sweeps", "extra")
             for p in r.path.glob("*.yaml")}
    return sorted(names - {"config"})


# -- spartune-init --------------------------------------------------------------------------------


def init(dest: Path, *, conf: bool = False, force: bool = False) -> list[tuple[Path, str]]:
    """Copy the shipped sweep files (and with `conf` the config groups) into `dest`.

    Existing files are kept unless `force`: a user's edited sweep is never overwritten by
    accident. Returns (path, "wrote" | "kept") per file.
    """
    done = []
    for root in shipped():
        if root.kind == "conf" and not conf:
            continue
        for src in sorted(root.path.rglob("*.yaml")):
            target = dest / root.kind / src.relative_to(root.path)
            if target.exists() and not force:
                done.append((target, "kept"))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            done.append((target, "wrote"))
    return done


def version_line(command: str) -> str:
    """`CMD --version`: spartune's version and those of what it runs on, none of them
    imported (so it answers at once, and even where torch is broken)."""
    from importlib.metadata import PackageNotFoundError, version

    import spartune

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"{command} (spartune {spartune.__version__}): torch {v('torch')}, optuna "
            f"{v('optuna')}, hydra-core {v('hydra-core')}, omegaconf {v('omegaconf')}, python "
            f"{sys.version.split()[0]}")


def init_main(argv: list[str] | None = None) -> None:
    """`spartune-init [DIR]`: start a project folder whose sweeps/ you can edit."""
    ap = argparse.ArgumentParser(
        prog="spartune-init",
        description="Copy spartune's sweep files into DIR/sweeps/ (and with --conf its config "
                    "groups into DIR/conf/) to edit. Commands run in DIR use them first: "
                    "./sweeps and ./conf take precedence over the shipped files.")
    ap.add_argument("dir", nargs="?", default=".", help="project folder (default: here)")
    ap.add_argument("--conf", action="store_true", help="also copy the config groups (conf/)")
    ap.add_argument("--force", action="store_true", help="overwrite files that exist")
    ap.add_argument("--version", action="store_true", help="print the versions and exit")
    args = ap.parse_args(argv)
    if args.version:
        print(version_line("spartune-init"))
        return
    dest = Path(args.dir)
    if dest.exists() and not dest.is_dir():
        print(f"spartune: error: dir: {dest} is a file; name a folder", file=sys.stderr)
        sys.exit(2)
    try:
        done = init(dest, conf=args.conf, force=args.force)
    except (MissingConfigs, OSError) as e:
        print(f"spartune: error: dir: {e}", file=sys.stderr)
        sys.exit(2)
    for path, what in done:
        print(f"{what} {path}" + (" (exists; --force overwrites)" if what == "kept" else ""))
    print(f"edit {dest / 'sweeps'}/*.yaml, then run from {dest}: spartune-sweep -cn proxy")
