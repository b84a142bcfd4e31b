"""What a trial runs: the built-in training run, a user's Python function, or a shell command.

    study.objective / study.command   what runs                      how it reports
    (neither)                         spartune.train.run             report(step, val_loss)
    {_target_: mypkg.train.run, ...}  fn(cfg, report, **rest)        report(...), returns metrics
    'python train.py lr={lr} ...'     the command, once per trial    stdout JSON lines

Every kind returns the same metrics dict (`run`), so the sweep's workers, storage, resume,
stale-trial recovery, pruning and Ctrl-C handling, `spartune-transfer` and `collect` see no
difference. `report` raises `optuna.TrialPruned` when the pruner says stop: a function lets it
propagate; a command is killed.

The command protocol: the template is split like a shell would (`shlex`) and run without a
shell, each {placeholder} filled with the trial's value (names: config.COMMAND_PLACEHOLDERS and
the searched names; `{python}` is this interpreter). Every stdout line that is a JSON object
with `step` and `val_loss` is reported; the last JSON line holds the final metrics (at least
`final_val_loss`, or `val_loss`); other lines are ignored. A non-zero exit fails the trial
with the command's last stderr line and the study goes on. The command dies with its worker
(Linux: PR_SET_PDEATHSIG), so a killed sweep leaves no orphan training.

A Python function's exception fails its trial in the same way (logged with its traceback):
a user's training code that breaks at one HP point must not stop a search over many.
Optuna is not imported here: the pruning exception passes through unnamed.
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spartune.config import COMMAND_PLACEHOLDERS, Config, ConfigError, command_fields

log = logging.getLogger(__name__)

Report = Callable[[int, float], None]

# The keys every objective's metrics carry (the sweep records them as trial user attrs).
METRIC_KEYS = ("final_train_loss", "final_val_loss", "best_val_loss", "diverged", "steps",
               "tokens_per_second", "n_params", "n_nonzero_params", "train_seconds",
               # how the run was trained (train.run records them; a user's objective may not):
               # a trial of study.nproc_per_trial=2 says world_size 2, so its tokens/s reads right
               "world_size", "parallel", "precision", "compile", "micro_batch_size")


class TrialFailed(Exception):
    """This trial failed (a command's non-zero exit, a user function's exception, no final
    loss): the trial is FAIL with this message and the study goes on."""


def kind(cfg: Config) -> str:
    """builtin | python | command."""
    if cfg.study.command:
        return "command"
    return "python" if cfg.study.objective else "builtin"


def run(cfg: Config, report: Report, *, checkpoint: Path | None = None,
        values: dict[str, float] | None = None, trial: int | None = None,
        cell: str = "") -> dict[str, Any]:
    """Run the trial's objective on its composed config; return normalized metrics."""
    match kind(cfg):
        case "builtin":
            from spartune import train

            return train.run(cfg, report, checkpoint=checkpoint)
        case "python":
            return _python(cfg, report)
        case _:
            return _command(cfg, report, values or {}, trial, cell)


# -- a Python function --------------------------------------------------------------------------


def resolve(target: str) -> Callable[..., Any]:
    """Import `module.function`; the working folder is searched too (as `python -m` does)."""
    module, _, attr = target.rpartition(".")
    field = "study.objective._target_"
    try:
        mod = _import(module)
    except ImportError as e:
        raise ConfigError(field, f"cannot import {module!r} ({e}); install the package or run "
                                 "from the folder that holds it") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConfigError(field, f"{module!r} has no function {attr!r}")
    return fn


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module.split(".")[0] or cwd in sys.path:
            raise
        sys.path.insert(0, cwd)
        return importlib.import_module(module)


def check_ready(cfg: Config) -> None:
    """Before the first trial: the objective can run at all, so a typo fails the command in one
    line instead of failing every trial (failures.py bounds those, this avoids them).

    A command's executable resolves on PATH or is an executable file (a `{python}` word is
    this interpreter; another placeholder there is left to the trial); a `_target_` imports,
    is callable and accepts `(cfg, report, **kwargs)`."""
    import inspect
    import shutil

    if kind(cfg) == "command":
        try:
            first = shlex.split(cfg.study.command or "")[0]
        except (ValueError, IndexError):
            return  # validate_objective and render say what is wrong with the template
        if first == "{python}" or "{" in first:
            return
        path = Path(first).expanduser()
        found = shutil.which(first) if os.sep not in first else (
            str(path) if path.is_file() and os.access(path, os.X_OK) else None)
        if found is None:
            where = "is not an executable file" if os.sep in first else "is not on PATH"
            raise ConfigError("study.command", f"{first!r} {where}: install it, give its full "
                              "path, or fix the command (e.g. '{python} train.py lr={lr}')")
    elif kind(cfg) == "python":
        kwargs = dict(cfg.study.objective)
        target = kwargs.pop("_target_")
        fn = resolve(target)
        try:
            inspect.signature(fn).bind(cfg, lambda step, loss: None, **kwargs)
        except TypeError as e:
            raise ConfigError("study.objective._target_", f"{target} cannot be called as "
                              f"fn(cfg, report{', ' if kwargs else ''}"
                              f"{', '.join(f'{k}=...' for k in kwargs)}): {e}") from None
        except ValueError:
            pass  # no signature to read (a builtin): the trial will tell


def _python(cfg: Config, report: Report) -> dict[str, Any]:
    kwargs = dict(cfg.study.objective)
    fn = resolve(kwargs.pop("_target_"))
    seen = _Recorder(report)
    try:
        out = fn(cfg, seen, **kwargs)
    except (KeyboardInterrupt, SystemExit, ConfigError, TrialFailed):
        raise
    except Exception as e:
        if type(e).__name__ == "TrialPruned":
            raise
        log.warning("trial objective %s raised", cfg.study.objective["_target_"], exc_info=True)
        raise TrialFailed(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                          ) from e
    if not isinstance(out, dict):
        raise TrialFailed(f"{cfg.study.objective['_target_']} returned {type(out).__name__}, "
                          "not a metrics dict (e.g. {'final_val_loss': 3.1})")
    return normalize(out, seen.curve, cfg)


class _Recorder:
    """The report callback handed to user code: records the curve, then reports (may prune)."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.curve: list[dict[str, Any]] = []

    def __call__(self, step: int, val_loss: float) -> None:
        step, val_loss = int(step), float(val_loss)
        self.curve.append({"step": step, "train_loss": math.nan, "val_loss": val_loss,
                           "lr": None})
        self.report(step, val_loss)


def normalize(out: dict[str, Any], curve: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """A user's metrics in the built-in run's shape: every METRIC_KEYS key, a curve, a ceiling.

    `final_val_loss` (or `val_loss`, or the last reported one) is required; a non-finite one
    or `diverged: true` makes the trial diverged, valued at the loss ceiling (as built-in runs
    are) so that a sampler learns to avoid the region.
    """
    final = out.get("final_val_loss", out.get("val_loss"))
    if final is None and curve:
        final = curve[-1]["val_loss"]
    if final is None:
        raise TrialFailed("the objective gave no final_val_loss (return or print it, e.g. "
                          '{"final_val_loss": 3.1})')
    try:
        final = float(final)
    except (TypeError, ValueError):
        raise TrialFailed(f"final_val_loss is not a number: {final!r}") from None
    diverged = bool(out.get("diverged", False)) or not math.isfinite(final)
    ceiling = out.get("loss_ceiling", cfg.train.loss_ceiling)
    if ceiling is None:
        ceiling = 1.5 * math.log(cfg.model.vocab_size or cfg.data.vocab_size)
    m: dict[str, Any] = {k: out.get(k) for k in METRIC_KEYS}
    m.update(final_val_loss=math.nan if diverged else final, diverged=diverged,
             loss_ceiling=float(ceiling))
    if m["best_val_loss"] is None:
        vals = [r["val_loss"] for r in curve if math.isfinite(r["val_loss"])]
        m["best_val_loss"] = min(vals + ([final] if not diverged else []), default=math.nan)
    if m["final_train_loss"] is None:
        m["final_train_loss"] = math.nan
    if m["steps"] is None:
        m["steps"] = curve[-1]["step"] if curve else cfg.train.steps
    given = out.get("curve")
    m["curve"] = _curve(given) if given else curve
    return m


def _curve(given: Any) -> list[dict[str, Any]]:
    """A curve given as dicts (step, val_loss, train_loss?, lr?) or [step, train, val, lr]."""
    rows = []
    for r in given:
        if isinstance(r, dict):
            rows.append({"step": int(r["step"]), "train_loss": r.get("train_loss", math.nan),
                         "val_loss": r.get("val_loss", math.nan), "lr": r.get("lr")})
        else:
            step, train, val, *lr = r
            rows.append({"step": int(step), "train_loss": train, "val_loss": val,
                         "lr": lr[0] if lr else None})
    return rows


# -- a shell command ----------------------------------------------------------------------------


def command_values(cfg: Config, values: dict[str, float], trial: int | None,
                   cell: str) -> dict[str, Any]:
    """What each placeholder of `study.command` stands for in this trial."""
    m, p, o, t = cfg.model, cfg.param, cfg.optim, cfg.train
    out: dict[str, Any] = {
        "python": sys.executable, "param": p.name, "width": m.width,
        "base_width": m.base_width, "density": m.density, "base_density": p.base_density,
        "seed": cfg.seed, "mask_seed": cfg.mask_seed, "depth": m.depth, "lr": o.lr,
        "init_std": m.init_std, "alpha_input": p.alpha_input, "alpha_output": p.alpha_output,
        "steps": t.steps, "batch_size": t.batch_size, "seq_len": t.seq_len,
        "eval_every": t.eval_every, "trial": -1 if trial is None else trial,
        "study": cfg.study.name, "cell": cell,
    }
    assert set(out) == set(COMMAND_PLACEHOLDERS), "config.COMMAND_PLACEHOLDERS is out of step"
    out.update(values)
    return out


def render(template: str, values: dict[str, Any]) -> list[str]:
    """The argv of a command template: split like a shell, then fill each word's braces."""
    try:
        words = shlex.split(template)
    except ValueError as e:
        raise ConfigError("study.command", f"cannot split it like a shell would: {e}") from None
    argv = []
    for word in words:
        command_fields(word)  # a bad brace: one clear line
        try:
            argv.append(word.format(**values))
        except KeyError as e:
            raise ConfigError("study.command", f"unknown placeholder {{{e.args[0]}}}") from None
        except (ValueError, IndexError) as e:
            raise ConfigError("study.command", f"cannot fill {word!r}: {e}") from None
    return argv


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _command(cfg: Config, report: Report, values: dict[str, float], trial: int | None,
             cell: str) -> dict[str, Any]:
    argv = render(cfg.study.command or "", command_values(cfg, values, trial, cell))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, bufsize=1, env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    except OSError as e:
        raise TrialFailed(f"cannot start {argv[0]!r}: {e.strerror or e}") from None
    tail: collections.deque[str] = collections.deque(maxlen=20)
    reader = threading.Thread(target=_drain, args=(proc.stderr, tail), daemon=True)
    reader.start()
    seen = _Recorder(report)
    last: dict[str, Any] | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            obj = _json_line(line)
            if obj is None:
                continue
            last = obj
            if "step" in obj and "val_loss" in obj and not _is_final(obj):
                seen(obj["step"], obj["val_loss"])  # may raise TrialPruned: the child is killed
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            _stop(proc)
        reader.join(timeout=5)
    if rc != 0:
        why = tail[-1] if tail else "(nothing on stderr)"
        raise TrialFailed(f"command exited {rc}: {why}")
    if last is None:
        raise TrialFailed('the command printed no JSON line; print {"final_val_loss": ...} last')
    return normalize(last, seen.curve, cfg)


def _is_final(obj: dict[str, Any]) -> bool:
    return "final_val_loss" in obj


def _json_line(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _drain(stream: Any, tail: collections.deque[str]) -> None:
    for line in stream:
        if line.strip():
            tail.append(line.rstrip("\n"))
            log.debug("command: %s", line.rstrip("\n"))


def _stop(proc: subprocess.Popen) -> None:
    """Terminate, then kill if it does not exit within 5 s."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
