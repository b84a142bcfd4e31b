"""Hydra entry points: the only module that imports Hydra (STYLE_ANCHORS rule 6).

Each command composes `conf/config.yaml` (plus its own overlay), turns it into the typed
`Config`, and calls a plain function. The configs are found as resources.py says: a
--config-dir, then ./conf and ./sweeps of the working directory, then the shipped ones.
User mistakes end in one line on stderr naming the field and the fix, and exit code 2;
nothing is written before the config has been validated.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spartune import atomic, inputs, resources, stops
from spartune.config import Config, ConfigError, register_configs, to_config, validate

log = logging.getLogger("spartune")


def fail(field: str, message: str, code: int = stops.EXIT_USAGE) -> None:
    print(f"spartune: error: {field}: {message}", file=sys.stderr)
    sys.exit(code)


def _roots(argv: list[str]) -> list[resources.Root]:
    config_dir = _flag(argv, "-cd", "--config-dir")
    if config_dir is not None and not Path(config_dir).is_dir():
        fail("--config-dir", f"no folder {config_dir!r} (from {Path.cwd()}); name a folder "
                             "holding sweep files or conf/, or drop -cd")
    try:
        return resources.roots(config_dir)
    except resources.MissingConfigs as e:
        fail("SPARTUNE_HOME" if "SPARTUNE_HOME" in str(e) else "config", str(e))
        raise AssertionError from None  # unreachable


def _flag(argv: list[str], short: str, long: str) -> str | None:
    """The value of a Hydra flag given as `-x V`, `--xx V` or `--xx=V`."""
    for i, arg in enumerate(argv):
        if arg in (short, long) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"{long}="):
            return arg.split("=", 1)[1]
    return None


def _choices(value: str) -> list[str]:
    """The options an override names: `a`, `[a,b]` (several at once) or `a,b` (a -m sweep)."""
    return [v.strip() for v in value.strip("[]").split(",") if v.strip()]


def _check_group_choices(argv: list[str], all_roots: list[resources.Root]) -> None:
    """Reject `group=unknown` before Hydra does, with one line instead of a screenful."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if "." in key or value in ("", "null") or "(" in value:
            continue  # a field, a deletion, or a sweep function such as range(...)
        options = resources.group_options(key, all_roots)
        if options is None:
            continue
        for v in _choices(value):
            if v not in options:
                fail(key, f"unknown choice {v!r}; choose one of {', '.join(options)}")


def _check_config_name(argv: list[str], all_roots: list[resources.Root]) -> None:
    """`-cn NAME` must name a sweep file or a primary config: say which exist, in one line."""
    stem = _config_name(argv)
    if stem is None or resources.find(stem, all_roots) is not None:
        return
    fail("--config-name", f"no sweep or config named {stem!r}; the sweep files are "
                          f"{', '.join(resources.sweep_names(all_roots))} (spartune-init copies "
                          "them into ./sweeps to edit)")


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _forget(run_dir: Path) -> None:
    """Remove the run folder Hydra made for a rejected command, if it holds nothing else."""
    import shutil

    if not run_dir.is_dir():
        return
    own = {".hydra"} | {p.name for p in run_dir.glob("*.log")}
    if {p.name for p in run_dir.iterdir()} <= own:
        shutil.rmtree(run_dir, ignore_errors=True)
        top = Path(_RESULTS_DIR[0]).absolute() if _RESULTS_DIR else run_dir.parent.parent
        for parent in run_dir.absolute().parents:  # up to the results folder, while empty
            if not parent.is_relative_to(top):
                break
            try:
                parent.rmdir()  # only if now empty
            except OSError:
                break


def _config_dirs(argv: list[str], default: str,
                 all_roots: list[resources.Root]) -> tuple[str, list[str]]:
    """Hydra's config path (the first root holding the primary config) and the argv with
    every other root on `hydra.searchpath`, in precedence order. A sweep's `defaults:
    [config]` and every config group are found on that search path."""
    name = _config_name(argv) or default
    primary = resources.find(name, all_roots) or all_roots[-1]
    if not any(a.startswith("hydra.searchpath=") for a in argv):
        others = [r.url for r in all_roots if r != primary and r.origin != "--config-dir"]
        argv = _add_overrides(argv, f"hydra.searchpath=[{','.join(others)}]")
    # hydra.main takes an absolute folder or pkg://, not file://
    return primary.url if primary.url.startswith("pkg://") else str(primary.path), argv


_VALUED = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-c", "--cfg",
           "-p", "--package", "--experimental-rerun"}


def _add_overrides(argv: list[str], *new: str) -> list[str]:
    """Put overrides beside the user's own: Hydra's argparse takes them as one run of
    positionals, so `-cn x a=1 --cfg job` must not become `-cn x a=1 --cfg job b=2`."""
    i, first = 0, len(argv)
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUED:
            i += 2
            continue
        if arg == "--info" and i + 1 < len(argv) and "=" not in argv[i + 1] \
                and not argv[i + 1].startswith("-"):
            i += 2
            continue
        if not arg.startswith("-"):
            first = i
            break
        i += 1
    return [*argv[:first], *new, *argv[first:]]


def _command() -> str:
    """The console script's name (spartune-train, ...), for --help and the job name."""
    name = Path(sys.argv[0]).name
    return name if name.startswith("spartune") else "spartune"


ABOUT = {
    "spartune-train": "train one run (spartune-train param=supar model.density=0.0625)",
    "spartune-sweep": "run a study of a sweep file, resumable (spartune-sweep -cn proxy)",
    "spartune-transfer": "map a proxy's best HPs onto sparse targets and run them",
    "spartune-plot": "tables and figures of a study (spartune-plot study.name=NAME)",
    "spartune-coord": "coordinate check: activation scale vs width and density",
    "spartune-pipeline": "proxy sweep, transfer, targets, tables, figures, report.md",
}


def _help_overrides(argv: list[str], all_roots: list[resources.Root]) -> list[str]:
    """Name the command in Hydra's --help and list the sweep files under it."""
    if not any(a.startswith("hydra.job.name=") for a in argv):
        argv = _add_overrides(argv, f"hydra.job.name={_command()}")
    if "--help" in argv or "-h" in argv:
        sweeps = ", ".join(resources.sweep_names(all_roots))
        where = " > ".join(dict.fromkeys(f"{r.origin} {r.path}" for r in all_roots))
        groups = {}
        for r in all_roots:
            for d in sorted(r.path.iterdir()) if r.kind != "sweeps" else []:
                if d.is_dir() and d.name != "hydra" and any(d.glob("*.yaml")):
                    groups.setdefault(d.name, resources.group_options(d.name, all_roots))
        group_lines = "\n".join(f"{g}: {', '.join(o or [])}" for g, o in sorted(groups.items()))
        # Through the environment: Hydra's override grammar would need every quote escaped.
        os.environ["SPARTUNE_HELP"] = (
            f"{_command()}: {ABOUT.get(_command(), 'spartune')}\n\n"
            "== Configuration groups (group=option; logger=[a,b] takes several) ==\n"
            f"{group_lines}\n\n== Sweep files (-cn NAME) ==\n{sweeps}\n\n"
            "== Config ==\nOverride anything in the config (foo.bar=value)\n\n$CONFIG\n"
            f"Config folders, first wins: {where}\n"
            "spartune-init copies the sweep files into ./sweeps to edit. "
            "Use --hydra-help to view Hydra specific help.\n")
        argv = _add_overrides(argv, "hydra.help.template=${oc.env:SPARTUNE_HELP}")
    return argv


def _completion_argv(argv: list[str]) -> list[str]:
    """Completion runs as `CMD -sc query=bash` with the typed line in COMP_LINE: a `-cn NAME`
    or `-cd DIR` typed there chooses the config it completes against."""
    words = os.environ.get("COMP_LINE", "").split()[1:]
    for short, long in (("-cn", "--config-name"), ("-cd", "--config-dir")):
        value = _flag(words, short, long)
        if value is not None and _flag(argv, short, long) is None:
            argv = [*argv, short, value]
    return argv


def _completion_line(all_roots: list[resources.Root], primary: str) -> None:
    """Shell completion (`eval "$(spartune-train -sc install=bash)"`) reads the typed line
    from COMP_LINE, not argv: put the search path there too, so groups complete. It goes
    where _add_overrides puts overrides (after `-cn NAME`: Hydra's argparse takes the
    overrides as one run of positionals)."""
    line = os.environ.get("COMP_LINE")
    if not line or "hydra.searchpath=" in line:
        return
    head, _, rest = line.partition(" ")
    others = ",".join(r.url for r in all_roots if primary not in (r.url, str(r.path)))
    extra = f"hydra.searchpath=[{others}]"
    words = rest.split(" ")
    if words and words[-1] != "":  # the word being completed stays last
        new = [*_add_overrides(words[:-1], extra), words[-1]]
    else:
        new = [*_add_overrides([w for w in words if w], extra), ""]
    os.environ["COMP_LINE"] = head + " " + " ".join(new)
    os.environ["COMP_POINT"] = str(len(os.environ["COMP_LINE"]))


def _pop_worker(dcfg: Any) -> int | None:
    """`+worker=N`: which of N identical jobs this is (a launcher's `+worker='range(N)'`)."""
    from omegaconf import open_dict

    if "worker" not in dcfg:
        return None
    with open_dict(dcfg):
        value = dcfg.pop("worker")
    if not isinstance(value, int) or value < 0:
        raise ConfigError("worker", f"must be an integer >= 0, got {value!r} "
                          "(e.g. +worker='range(32)' with -m and a launcher)")
    return value


def _spread_seed(cfg: Config, worker: int | None) -> None:
    """Job N's samplers get seeds of their own, so N identical jobs do not propose the same
    points. The grid sampler keeps the shared seed: every worker must shuffle the grid the
    same way (sweep.make_sampler)."""
    if worker and cfg.study.sampler != "grid":
        cfg.study.sampler_seed += 7919 * cfg.study.workers * worker


def _config_name(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("-cn", "--config-name") and i + 1 < len(argv):
            return argv[i + 1].removesuffix(".yaml")
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1].removesuffix(".yaml")
    return None


def _positional_indices(argv: list[str]) -> list[int]:
    """Where the overrides of a Hydra command line are (its positionals, not flag values)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUED or (arg == "--info" and i + 1 < len(argv) and "=" not in argv[i + 1]
                              and not argv[i + 1].startswith("-")):
            i += 2
            continue
        if not arg.startswith("-"):
            out.append(i)
        i += 1
    return out


def _positionals(argv: list[str]) -> list[str]:
    """The overrides of a Hydra command line, flags and their values left out."""
    return [argv[i] for i in _positional_indices(argv)]


def _with_overrides(argv: list[str], change: Callable[[list[str]], list[str]]) -> list[str]:
    """argv with its overrides replaced, one for one, by `change(overrides)`."""
    at = _positional_indices(argv)
    out = list(argv)
    for i, new in zip(at, change([argv[i] for i in at]), strict=True):
        out[i] = new
    return out


_RESULTS_DIR: list[str] = []  # the composed results_dir (_preflight), for _forget

_NO_COMPOSE = {"-sc", "--shell-completion", "-h", "--help", "--hydra-help", "--info",
               "--experimental-rerun"}


def _preflight(argv: list[str], primary: str, config_name: str,
               all_roots: list[resources.Root]) -> None:
    """Compose once through Hydra's public API, so a typo, a wrong type or an unknown group
    ends in spartune's one line (hydra_errors.py); then check the results folder can be
    written, before Hydra makes a run folder in it."""
    if _NO_COMPOSE & set(argv):
        return
    from spartune import hydra_errors

    groups = sorted({d.name for r in all_roots if r.kind != "sweeps" for d in r.path.iterdir()
                     if d.is_dir() and d.name != "hydra" and any(d.glob("*.yaml"))})
    try:
        dcfg = hydra_errors.preflight(primary, _config_name(argv) or config_name,
                                      _positionals(argv), groups,
                                      multirun="-m" in argv or "--multirun" in argv)
    except hydra_errors.ComposeError as e:
        fail(e.field, e.message)
    if os.environ.get("RANK", "0") != "0":
        return  # other ranks write nothing (_scratch_for_other_ranks)
    try:
        _RESULTS_DIR[:] = [str(dcfg.results_dir)]
        inputs.check_writable(_RESULTS_DIR[0])
    except inputs.FolderError as e:
        fail("results_dir", f"{e}; point results_dir= at a folder you can write, then run "
                            "the same command again", stops.EXIT_ENVIRONMENT)
    except Exception:  # an interpolation the command itself resolves (and reports) later
        return


def hydra_app(config_name: str, task: Callable[[Config, Path], Any],
              check: Callable[[Config], None], *, trains: bool = True,
              run_dir: str | None = None) -> Callable[[], None]:
    """Wrap `task(cfg, run_dir)` as a Hydra app whose errors are one clear line.

    `check(cfg)` is the command's torch-free validation, run before torch loads (~2 s), so bad
    input fails in about a second; `trains` says whether the task runs torch at all (the
    denormal flush is set up only then, before any torch op starts the thread pool);
    `run_dir` replaces the config's `hydra.run.dir` (unless the command line sets it)."""
    import hydra
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    def main() -> None:
        stops.obey_sigterm()  # SIGTERM stops as cleanly as Ctrl-C (stops.py)
        argv = sys.argv[1:]
        _RESULTS_DIR.clear()
        if "--version" in argv:
            print(resources.version_line(_command()))
            sys.exit(0)
        completing = "-sc" in argv or "--shell-completion" in argv
        if completing:
            argv = _completion_argv(argv)
        all_roots = _roots(argv)
        if not completing:
            _check_group_choices(argv, all_roots)
            _check_config_name(argv, all_roots)
        from spartune.hydra_errors import open_dicts

        argv = _with_overrides(argv, open_dicts)
        if run_dir is not None and not any(a.startswith("hydra.run.dir=") for a in argv):
            argv = _add_overrides(argv, f"hydra.run.dir={run_dir}")
        primary, argv = _config_dirs(argv, config_name, all_roots)
        if completing:
            _completion_line(all_roots, primary)
        register_configs()
        if not completing:
            _preflight(argv, primary, config_name, all_roots)
        sys.argv[1:] = _help_overrides(argv, all_roots)
        scratch = _scratch_for_other_ranks()

        @hydra.main(version_base="1.3", config_path=primary, config_name=config_name)
        def _main(dcfg: DictConfig) -> None:
            run_dir = _run_dir()
            try:
                worker = _pop_worker(dcfg)
                cfg = to_config(dcfg)
                _spread_seed(cfg, worker)
                inputs.check_finite(cfg)  # every command: no NaN/inf, no axis value twice
                inputs.check_distinct(cfg)
                check(cfg)
                if trains:  # here, not earlier: --help, --cfg, completion, bad input need no torch
                    from spartune.train import flush_denormals

                    flush_denormals()  # before any torch op starts the thread pool
                task(cfg, run_dir)
            except ConfigError as e:
                _forget(run_dir)
                fail(e.field, str(e).split(": ", 1)[1])
            except OmegaConfBaseException as e:
                _forget(run_dir)
                key = getattr(e, "full_key", None) or "config"
                fail(str(key), str(e).splitlines()[0])
            except KeyboardInterrupt as e:
                stops.shield()
                what = "terminated" if isinstance(e, stops.Terminated) else "interrupted"
                print(f"spartune: {what}; finished trials are kept and the interrupted ones "
                      "are marked FAIL and run again: resume with the same command",
                      file=sys.stderr)
                sys.exit(stops.exit_code(e))
            except atomic.WriteError as e:
                why = ("no space left (disk, quota or file-size limit): free some, or set "
                       "results_dir= elsewhere, then run the same command again"
                       if atomic.no_space(e) else f"{e.strerror}: check the folder")
                fail(str(e.filename), f"cannot write it, nothing of it was left behind: {why}; "
                     "finished trials are kept", stops.EXIT_ENVIRONMENT)
            except Exception as e:
                cause = stops.storage_gone(e)
                if cause is None:
                    raise
                fail("study.storage", f"the storage went away ({cause}); finished trials are "
                     "kept: run the same command again once it answers", stops.EXIT_ENVIRONMENT)

        try:
            _main()
        finally:
            if scratch is not None:
                import shutil

                shutil.rmtree(scratch, ignore_errors=True)

    return main


def _scratch_for_other_ranks() -> str | None:
    """Under torchrun, ranks other than 0 write nothing: Hydra's run folder (its config copy and
    log) goes to a scratch folder removed at exit, and the run learns rank 0's folder from it."""
    import tempfile

    if os.environ.get("RANK", "0") == "0":
        return None
    scratch = tempfile.mkdtemp(prefix=f"spartune-rank{os.environ['RANK']}-")
    sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    return scratch


def _train(cfg: Config, run_dir: Path) -> None:
    from spartune import train

    m = train.run(cfg, out_dir=run_dir)
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 speaks for a data-parallel run
    status = f"DIVERGED at step {m['diverged_step']}" if m["diverged"] else "ok"
    log.info(
        "%s: param=%s width=%d density=%g lr=%g init_std=%g | final val loss %.4f, "
        "train loss %.4f | %d steps, %.0f tokens/s, %.1f s | %s",
        status, cfg.param.name, cfg.model.width, cfg.model.density, cfg.optim.lr,
        cfg.model.init_std, m["final_val_loss"], m["final_train_loss"], m["steps"],
        m["tokens_per_second"], m["train_seconds"], run_dir,
    )
    for row in m["hidden_layers"]:  # the layout each hidden layer got (model.sparse_impl)
        log.info("hidden layer %s: %s, %dx%d, density %g, %d non-zeros, %.2f MiB params + "
                 "%.2f MiB optimizer state", row["name"], row["impl"], *row["shape"],
                 row["density"], row["nnz"], row["param_bytes"] / 2**20,
                 row["optimizer_bytes"] / 2**20)


def _coord(cfg: Config, run_dir: Path) -> None:
    from spartune import coord

    ok = coord.main(cfg, run_dir)
    if not ok:
        sys.exit(stops.EXIT_VERDICT)


def _overrides() -> list[str]:
    """The command line's overrides, as Hydra parsed them."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _check_sweep(cfg: Config) -> None:
    from spartune import sweep, trackers

    sweep.check_overrides(cfg, _overrides())
    trackers.check(cfg)
    sweep.validate_study(cfg)


def _objective_failing(task: Callable[[Config, Path], Any]) -> Callable[[Config, Path], Any]:
    """A task whose sweep the failure budget stopped (failures.py) ends in its one line and
    exit 4, after the task has written what the finished trials give."""
    import functools

    @functools.wraps(task)
    def wrapped(cfg: Config, run_dir: Path) -> Any:
        from spartune.failures import ObjectiveFailing

        try:
            return task(cfg, run_dir)
        except ObjectiveFailing as e:
            fail(e.field, e.message, stops.EXIT_OBJECTIVE)
    return wrapped


@_objective_failing
def _sweep(cfg: Config, run_dir: Path) -> None:
    from spartune import collect, report, sweep
    from spartune.failures import ObjectiveFailing

    try:
        res = sweep.sweep(cfg)
    except ObjectiveFailing:
        trials, curves = collect.load_trials(sweep.open_storage(cfg), cfg.study.name)
        collect.write_tables(trials, curves, sweep.study_dir(cfg))  # the finished ones, kept
        raise
    trials, curves = collect.load_trials(sweep.open_storage(cfg), cfg.study.name)
    out = sweep.study_dir(cfg)
    paths = collect.write_tables(trials, curves, out)
    figs = report.make_figures(trials, curves, out)
    workers = cfg.study.workers
    print(f"study {cfg.study.name}: {res['finished']}/{res['total']} trials finished "
          f"({res['ran_here']} run now by {workers} local worker{'s' * (workers > 1)}, "
          f"{res['seconds']:.0f} s); best val loss {res['best']:.4f}; storage {res['storage']}")
    best = report.best_line(trials, list(cfg.study.space))
    if best is not None:
        print(best)
    for line in res.get("notes", []):  # the bracketing search: each cell's optimum or bound
        print(line)
    one_hp = not report.searched_together(trials[trials["role"] == "search"])
    for line in report.optimum_lines(trials, "lr") if "lr" in cfg.study.space and one_hp \
            else []:  # an optimum along one HP means nothing where all of them varied
        print(line)
    for line in report.optimum_lines(trials, "init_std") if "init_std" in cfg.study.space \
            and one_hp else []:
        print(line)
    for p in [*paths.values(), *figs]:
        print(f"wrote {p}")
    if res["finished"] < res["total"]:
        print(f"spartune: {res['total'] - res['finished']} trials not finished here (running in "
              "another worker, or failed): run the same command again to complete the study",
              file=sys.stderr)


def _check_transfer(cfg: Config) -> None:
    from spartune import sweep, trackers, transfer

    sweep.check_overrides(cfg, _overrides(), axes="transfer")
    trackers.check(cfg)
    transfer.validate_transfer(cfg)
    transfer.check_target_name(cfg, cfg.study.name)


@_objective_failing
def _transfer(cfg: Config, run_dir: Path) -> None:
    from spartune import analysis, report, transfer

    res = transfer.run(cfg)
    figs = report.make_figures(res["trials"], res["curves"], res["dir"])
    done = res["trials"][res["trials"]["role"] == "target"]
    print("\nfinal val loss at the transferred HPs (mean over seeds):")
    print(done.groupby(["density", "param"])["final_val_loss"].mean().unstack("param")
          .sort_index(ascending=False).to_string(float_format=lambda v: f"{v:.4f}"))
    if (res["trials"]["role"] == "check").any():
        print(analysis.transfer_regret(res["trials"]).to_string(index=False))
    for p in figs:
        print(f"wrote {p}")


def _plot(cfg: Config, run_dir: Path) -> None:
    from spartune import collect, report, sweep

    out = sweep.study_dir(cfg)
    journal = out / sweep.JOURNAL
    if cfg.study.storage or journal.exists():
        storage = collect.storage_for(out, cfg.study.storage)
        trials, curves = collect.load_trials(storage, cfg.study.name)
        if not trials.empty:
            collect.write_tables(trials, curves, out)
    trials, curves = collect.read_tables(out)
    _require_completed(trials, cfg.study.name)
    figs = report.make_figures(trials, curves, out)
    one_hp = not report.searched_together(trials[trials["role"] == "search"])
    for line in report.optimum_lines(trials, "lr") if one_hp else []:
        print(line)
    for p in figs:
        print(f"wrote {p}")


def _require_completed(trials: Any, name: str) -> None:
    """Figures of a study with no completed trial would be empty: say what it holds."""
    if (trials["state"] == "COMPLETE").any():
        return
    found = ", ".join(f"{k} {v}" for k, v in trials["state"].value_counts().sort_index().items())
    fail("study.name", f"study {name!r} has no completed trial (it holds {found or 'none'}): "
         "nothing to plot; run or finish the sweep first (spartune-sweep ... "
         f"study.name={name}), or fix its objective if its trials FAIL")


def _check_pipeline(cfg: Config) -> None:
    from spartune import pipeline, trackers

    trackers.check(cfg)
    pipeline.check(cfg)


@_objective_failing
def _pipeline(cfg: Config, run_dir: Path) -> None:
    from spartune import pipeline

    res = pipeline.run(cfg)
    print(f"pipeline finished in {res['seconds'] / 60:.1f} min")


def _check_coord(cfg: Config) -> None:
    from spartune import coord_cells

    coord_cells.check(cfg)


def _check_plot(cfg: Config) -> None:
    from spartune.config import check_name

    check_name(cfg.study.name, "study.name")


train_main = hydra_app("config", _train, validate)
coord_main = hydra_app("coord", _coord, _check_coord)
sweep_main = hydra_app("proxy", _sweep, _check_sweep)
transfer_main = hydra_app("transfer", _transfer, _check_transfer)
# its Hydra run folder (the composed config) beside the study it draws, not under results/train
plot_main = hydra_app("config", _plot, _check_plot, trains=False,
                      run_dir="${results_dir}/${study.name}/plot/${now:%Y-%m-%d_%H-%M-%S}")
pipeline_main = hydra_app("run_pipeline", _pipeline, _check_pipeline)
