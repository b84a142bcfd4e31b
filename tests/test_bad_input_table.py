"""The README's "Bad input" table, row by row: each row is one case here, and a row without a
case (or a case without a row) fails `test_every_row_of_the_table_has_a_case`.

A case runs the row's input as a user would and checks the promise: the exit code (2, or 3
for a folder that cannot be written), exactly one line on stderr, `spartune: error: FIELD:`
with the field the row names, no traceback, and no run folder left behind. Commands run
in-process (the console script's entry point with its argv, in a fresh working folder), so a
case costs what the check costs, not an interpreter and a torch import; the few rows that are
library calls (`parameterize(...)`, a torchrun rank's batch split) call the library.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT, tiny_config
from spartune import cli
from spartune.config import ConfigError

SMOKE = ["data=synthetic", "train=smoke", "model.width=32", "model.head_size=16",
         "train.device=cpu", "train.steps=4"]
SWEEP = ["data=synthetic", "train=smoke", "train.device=cpu"]
ENTRIES = {"spartune-train": cli.train_main, "spartune-sweep": cli.sweep_main,
           "spartune-transfer": cli.transfer_main, "spartune-plot": cli.plot_main,
           "spartune-coord": cli.coord_main, "spartune-pipeline": cli.pipeline_main}
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[[\w.]+\]\[(INFO|DEBUG)\] - ")
TRIAL_FAILED = re.compile(r"^spartune: trial \S+ failed: ")  # progress while a study runs


@dataclass
class Run:
    """One command line: `command *args` from a fresh folder, and what it must end in."""

    command: str
    args: list[str]
    field: str
    code: int = 2
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Call:
    """A library call that must raise one ConfigError naming `field`."""

    call: Callable[[Path], object]
    field: str


def _sweep_file(work: Path, _: pytest.MonkeyPatch) -> None:
    (work / "mine").mkdir()
    (work / "mine" / "beta.yaml").write_text(
        "defaults:\n  - proxy\n  - _self_\nstudy:\n  name: beta\n"
        "  space:\n    beta: {low: 0.1, high: 0.2}\n")


def _corrupt_journal(work: Path, _: pytest.MonkeyPatch) -> None:
    journal = work / "results" / "x" / "optuna.journal"
    journal.parent.mkdir(parents=True)
    journal.write_text('{"op_code": 0, garbage\nnot json\n')


def _empty_text(work: Path, _: pytest.MonkeyPatch) -> None:
    (work / "empty.txt").write_bytes(b"")


def _no_mlflow(_: Path, mp: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        mp.delitem(sys.modules, name)
    mp.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError


def _gpus(n: int) -> Callable[[Path, pytest.MonkeyPatch], None]:
    def setup(_: Path, mp: pytest.MonkeyPatch) -> None:
        from spartune import launch

        mp.setattr(launch, "visible_gpus", lambda: n)
    return setup


def _compile_fails(_: Path, mp: pytest.MonkeyPatch) -> None:
    # what a machine without a working C++ compiler does at the first compiled step (the real
    # thing is tests/test_precision.py, ~20 s): the compiled model raises when first called
    from spartune import train

    class _Broken(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, *a, **k):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error")

    mp.setattr(train, "compile_model", _Broken)


def _empty_home(work: Path, mp: pytest.MonkeyPatch) -> None:
    (work / "home").mkdir()
    mp.setenv("SPARTUNE_HOME", str(work / "home"))


def _failing_command(work: Path, _: pytest.MonkeyPatch) -> None:
    (work / "t.py").write_text("import sys\nprint('it broke', file=sys.stderr)\nsys.exit(3)\n")


def _no_args_objective(work: Path, mp: pytest.MonkeyPatch) -> None:
    (work / "mypkg.py").write_text("def f():\n    return {'final_val_loss': 1.0}\n")
    mp.syspath_prepend(str(work))
    mp.delitem(sys.modules, "mypkg", raising=False)


TOY = ["-cn", "proxy", *SWEEP, "study.n_trials=1", "study.pruner=none"]


def _in_process(command: str, args: list[str], mp: pytest.MonkeyPatch) -> int:
    """Run one command as `_run` does (a setup step: the study a row's input then meets)."""
    mp.setattr(sys, "argv", [str(Path(sys.executable).with_name(command)), *args])
    try:
        ENTRIES[command]()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def _study_of_20_steps(work: Path, mp: pytest.MonkeyPatch) -> None:
    code = _in_process("spartune-sweep", [*TOY, "study.name=fp", "train.steps=20",
                                          "study.objective._target_=toy_objectives.quick"], mp)
    assert code == 0


def _study_of_failures(work: Path, mp: pytest.MonkeyPatch) -> None:
    code = _in_process("spartune-sweep", [*TOY, "study.name=allfail",
                                          "study.objective._target_=toy_objectives.raising"], mp)
    assert code == 4  # the failure budget: 3 FAIL trials, no COMPLETE one


# -- library calls ---------------------------------------------------------------------------


class _Net(nn.Module):
    """A tiny model of one's own: an embedding, one block's MLP, a readout."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(16, width)
        self.h = nn.ModuleList([nn.Module()])
        self.h[0].mlp = nn.Module()
        self.h[0].mlp.c_fc = nn.Linear(width, 4 * width, bias=False)
        self.h[0].mlp.c_proj = nn.Linear(4 * width, width, bias=False)
        self.out = nn.Linear(width, 16, bias=False)


class _Odd(_Net):
    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.mix = nn.Parameter(torch.zeros(8, 8))  # fixed size: no width-like dim


def _parameterize(model: nn.Module, base: nn.Module, **kw) -> object:
    import spartune

    return spartune.parameterize(model, base=base, **kw)


def _other_checkpoint(tmp: Path) -> object:
    from spartune import train

    cfg = tiny_config(train__steps=4, train__eval_every=2, train__checkpoint_every=2)

    def stop(step: int, _: float) -> None:
        if step == 4:
            raise RuntimeError("stopped after its checkpoint")

    with pytest.raises(RuntimeError):
        train.run(cfg, stop, out_dir=tmp)
    before = (tmp / "checkpoint.pt").read_bytes()
    try:
        return train.run(tiny_config(train__steps=4, train__eval_every=2,
                                     train__checkpoint_every=2, optim__lr=0.5), out_dir=tmp)
    finally:
        assert (tmp / "checkpoint.pt").read_bytes() == before  # nothing stored is lost


def _rank_batch(_: Path) -> object:
    from spartune import distributed

    return distributed.per_rank_batch(5, None, distributed.Dist(rank=0, world_size=2))


# -- the table's rows ------------------------------------------------------------------------

CASES: dict[str, list[Run | Call]] = {
    "`model.density=1.5`": [Run("spartune-train", [*SMOKE, "model.density=1.5"],
                                "model.density")],
    "`model.width=100`": [Run("spartune-train", [*SMOKE, "model.width=100"], "model.width")],
    "`model.base_width=0`, `optim.lr=0`, `model.init_std=0`": [
        Run("spartune-train", [*SMOKE, f"{f}=0"], f)
        for f in ("model.base_width", "optim.lr", "model.init_std")],
    "`param=smup` / `data=wikipedia`": [Run("spartune-train", [*SMOKE, "param=smup"], "param"),
                                        Run("spartune-train", [*SMOKE, "data=wikipedia"],
                                            "data")],
    "`data=text data.path=missing.txt`": [
        Run("spartune-train", [*SMOKE, "data=text", "data.path=missing.txt"], "data.path")],
    "`train.seq_len=100000`": [Run("spartune-train", [*SMOKE, "train.seq_len=100000"],
                                   "train.seq_len")],
    "`-cn prxy`": [Run("spartune-sweep", ["-cn", "prxy"], "--config-name")],
    "`logger=tensorbord`": [Run("spartune-train", [*SMOKE, "logger=tensorbord"], "logger")],
    "`logger=mlflow` without MLflow installed": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "logger=mlflow"], "logger",
            setup=_no_mlflow)],
    "`+worker=-1`": [Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "+worker=-1"], "worker")],
    "`study.space.lr.low=0.5 study.space.lr.high=0.01`": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.space.lr.low=0.5",
                               "study.space.lr.high=0.01"], "study.space.lr")],
    "`study.sampler=bayes` / `study.pruner=asha`": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.sampler=bayes"], "study.sampler"),
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.pruner=asha"], "study.pruner")],
    "`study.sampler=bracket` with two HPs in `study.space`": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.sampler=bracket"],
            "study.space")],
    "`study.step=0` (bracket)": [Run("spartune-sweep", ["-cn", "lr_stability", *SWEEP,
                                                        "study.step=0"], "study.step")],
    "`study.centre=0.9` outside `study.space.lr`": [
        Run("spartune-sweep", ["-cn", "lr_stability", *SWEEP, "study.centre=0.9"],
            "study.centre")],
    "`study.continuation=true study.densities=[0.25]`": [
        Run("spartune-sweep", ["-cn", "lr_stability", *SWEEP, "study.continuation=true",
                               "study.densities=[0.25]"], "study.continuation")],
    "`study.centre_from=none` (no such study)": [
        Run("spartune-sweep", ["-cn", "lr_stability", *SWEEP, "study.centre_from=none"],
            "study.centre_from")],
    "`study.storage=postgresql://...` unreachable": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP,
                               "study.storage=postgresql://nobody@127.0.0.1:1/none"],
            "study.storage")],
    "`study.name=../x`": [Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.name=../x"],
                              "study.name")],
    "`spartune-transfer transfer.source=none`": [
        Run("spartune-transfer", [*SWEEP, "transfer.source=none"], "transfer.source")],
    "`transfer.densities=[0]`": [Run("spartune-transfer", [*SWEEP, "transfer.densities=[0]"],
                                     "transfer.densities")],
    "`spartune-plot study.name=empty`": [Run("spartune-plot", ["study.name=empty"],
                                             "study.name")],
    "a corrupted `results/<study>/optuna.journal`": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.name=x"], "study.storage",
            setup=_corrupt_journal)],
    "`data=text data.path=empty.txt`": [
        Run("spartune-train", [*SMOKE, "data=text", "data.path=empty.txt"], "data.path",
            setup=_empty_text)],
    "`study.storage=not-a-url`": [Run("spartune-sweep", ["-cn", "proxy", *SWEEP,
                                                         "study.storage=not-a-url"],
                                      "study.storage")],
    "`space: {beta: {low: 0.1, high: 0.2}}` in a sweep file": [
        Run("spartune-sweep", ["-cd", "mine", "-cn", "beta", *SWEEP], "study.space.beta.field",
            setup=_sweep_file)],
    "`study.space.lr.low=0`": [Run("spartune-sweep", ["-cn", "proxy", *SWEEP,
                                                      "study.space.lr.low=0"],
                                   "study.space.lr")],
    "`model.sparse_impl=compressed` with every hidden layer at density 1": [
        Run("spartune-train", [*SMOKE, "model.sparse_impl=compressed"], "model.sparse_impl")],
    "`model.sparse_impl=csr`": [Run("spartune-train", [*SMOKE, "model.sparse_impl=csr"],
                                    "model.sparse_impl")],
    "a checkpoint from another configuration": [Call(_other_checkpoint,
                                                     "train.checkpoint_every")],
    "`study.command='python t.py lr={lrr}'`": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.command='python t.py lr={lrr}'"],
            "study.command")],
    "`study.objective._target_=nopkg.run` (written so, no `+`)": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.objective._target_=nopkg.run"],
            "study.objective._target_")],
    # the trials fail with the command's last stderr line until the failure budget is spent:
    # then one line naming the cell and the last error, exit 4
    "a command that exits non-zero": [
        Run("spartune-sweep", [*TOY, "study.command='{python} t.py'"], "study.command", code=4,
            setup=_failing_command)],
    "`study.command='no_such_binary {lr}'`": [
        Run("spartune-sweep", [*TOY, "study.command='no_such_binary {lr}'"], "study.command")],
    "`study.objective._target_=mypkg.f` where `f` takes no `(cfg, report)`": [
        Run("spartune-sweep", [*TOY, "study.objective._target_=mypkg.f"],
            "study.objective._target_", setup=_no_args_objective)],
    "a rerun with a changed result field (`train.steps=40`, `data=...`)": [
        Run("spartune-sweep", [*TOY, "study.name=fp", "train.steps=40",
                               "study.objective._target_=toy_objectives.quick"], "train.steps",
            setup=_study_of_20_steps)],
    "`spartune-transfer -cn proxy` (`study.name` = `transfer.source`)": [
        Run("spartune-transfer", ["-cn", "proxy", *SWEEP], "study.name")],
    "`spartune-plot` on a study without a completed trial": [
        Run("spartune-plot", ["study.name=allfail"], "study.name", setup=_study_of_failures)],
    "`study.retries=-1` / `study.max_failures=0`": [
        Run("spartune-sweep", [*TOY, "study.retries=-1"], "study.retries"),
        Run("spartune-sweep", [*TOY, "study.max_failures=0"], "study.max_failures")],
    "`train.parallel=fsdp` without torchrun": [
        Run("spartune-train", [*SMOKE, "train.parallel=fsdp"], "train.parallel")],
    "`train.parallel=fsdp model.sparse_impl=compressed`": [
        Run("spartune-train", [*SMOKE, "train.parallel=fsdp", "model.density=0.25",
                               "model.sparse_impl=compressed"], "model.sparse_impl")],
    "`train.parallel=zero3`": [Run("spartune-train", [*SMOKE, "train.parallel=zero3"],
                                   "train.parallel")],
    "`parameterize(model, base=<same width>)`": [
        Call(lambda _: _parameterize(_Net(32), _Net(32)), "base")],
    "a weight with no width-like dim": [Call(lambda _: _parameterize(_Odd(32), _Odd(16)),
                                             "roles")],
    '`parameterize(..., density={"h.*.mlp.c_fcc": 0.25})`': [
        Call(lambda _: _parameterize(_Net(32), _Net(16), density={"h.*.mlp.c_fcc": 0.25}),
             "density.h.*.mlp.c_fcc")],
    "`train.micro_batch_size=3` with `train.batch_size=8`": [
        Run("spartune-train", [*SMOKE, "train.batch_size=8", "train.micro_batch_size=3"],
            "train.micro_batch_size")],
    "`torchrun --nproc_per_node=2 ... train.batch_size=5`": [Call(_rank_batch,
                                                                  "train.batch_size")],
    "`train.precision=fp8`": [Run("spartune-train", [*SMOKE, "train.precision=fp8"],
                                  "train.precision")],
    "`train.compile=true` where the model cannot compile": [
        Run("spartune-train", [*SMOKE, "train.steps=2", "train.compile=true"], "train.compile",
            setup=_compile_fails)],
    "`study.devices=[0]` on a machine without a GPU / `study.devices=[9]` on 8 GPUs": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.devices=[0]"], "study.devices",
            setup=_gpus(0)),
        Run("spartune-sweep", ["-cn", "proxy", "data=synthetic", "train=smoke",
                               "study.devices=[9]"], "study.devices", setup=_gpus(8))],
    "`study.nproc_per_trial=4` with 2 GPUs": [
        Run("spartune-sweep", ["-cn", "proxy", "data=synthetic", "train=smoke",
                               "study.nproc_per_trial=4"], "study.nproc_per_trial",
            setup=_gpus(2))],
    "a typo: `model.densty=0.2`, `study.n_trial=3`": [
        Run("spartune-train", [*SMOKE, "model.densty=0.2"], "model.densty"),
        Run("spartune-sweep", ["-cn", "proxy", "study.n_trial=3"], "study.n_trial")],
    "a value of the wrong type: `model.width=abc`, `train.steps=abc`, `seed=abc`, "
    "`optim.lr=1e-2x`": [Run("spartune-train", [f"{f}={v}"], f) for f, v in (
        ("model.width", "abc"), ("train.steps", "abc"), ("seed", "abc"),
        ("optim.lr", "1e-2x"))],
    "`model.width=[` (an override Hydra cannot parse)": [
        Run("spartune-train", ["model.width=["], "model.width")],
    "`sparsity=rigl` (no such group)": [Run("spartune-sweep", ["-cn", "proxy", "sparsity=rigl"],
                                            "sparsity")],
    "`model.layer_density={attn_qkv: 2}`": [
        Run("spartune-train", [*SMOKE, "model.layer_density={attn_qkv: 2}"],
            "model.layer_density.attn_qkv")],
    "`-cd /nonexistent`": [Run("spartune-sweep", ["-cd", "/nonexistent", "-cn", "proxy"],
                               "--config-dir")],
    "`SPARTUNE_HOME` naming a folder with neither `sweeps/` nor `conf/`": [
        Run("spartune-sweep", ["-cn", "proxy"], "SPARTUNE_HOME", setup=_empty_home)],
    "`study.seeds=[0,0]` (any axis: seeds, widths, densities, params, grid values)": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.seeds=[0,0]"], "study.seeds"),
        Run("spartune-sweep", ["-cn", "lr_stability", *SWEEP, "study.densities=[1,0.25,1.0]"],
            "study.densities"),
        Run("spartune-transfer", [*SWEEP, "transfer.widths=[256,256]"], "transfer.widths"),
        Run("spartune-sweep", ["-cn", "lr_stability", *SWEEP, "study.params=[sp,sp]"],
            "study.params")],
    "`study.space.lr.high=nan` (NaN or inf in any number)": [
        Run("spartune-sweep", ["-cn", "proxy", *SWEEP, "study.space.lr.high=nan"],
            "study.space.lr.high"),
        Run("spartune-train", [*SMOKE, "optim.lr=inf"], "optim.lr"),
        Run("spartune-coord", ["coord.densities=[1,-inf]"], "coord.densities")],
    "`results_dir=/proc/nope` (cannot be created or written)": [
        Run("spartune-train", [*SMOKE, "results_dir=/proc/nope"], "results_dir", code=3)],
    "`study.space.beta={low:0.1,high:0.2}` (a new HP on the command line)": [
        Run("spartune-sweep", ["-cn", "proxy", "study.space.beta={low:0.1,high:0.2}"],
            "study.space.beta")],
    "`spartune-sweep -cn lr_stability model.width=64` (the study's axis is "
    "`study.widths=[128]`)": [Run("spartune-sweep", ["-cn", "lr_stability", "model.width=64"],
                                  "model.width")],
}


def table_rows() -> list[str]:
    """The first cell of every row of the README's "Bad input" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Bad input\n", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ")][1:]  # past the header
    return [ln.split(" | ", 1)[0].removeprefix("| ").strip() for ln in rows]


def test_every_row_of_the_table_has_a_case():
    rows = table_rows()
    assert len(rows) == len(set(rows)), "two rows of the table have the same input"
    missing = [r for r in rows if r not in CASES]
    stale = [c for c in CASES if c not in rows]
    assert not missing, f"rows of README 'Bad input' without a case here: {missing}"
    assert not stale, f"cases here whose row left README 'Bad input': {stale}"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder, the checkout's configs, and the process left as it was: argv,
    signal handlers, logging handlers (Hydra configures logging on every run)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SPARTUNE_HOME", str(ROOT))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    sigterm, root = signal.getsignal(signal.SIGTERM), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield work
    signal.signal(signal.SIGTERM, sigterm)
    root.handlers[:], root.level = handlers, level


def _run(run: Run, work: Path, mp: pytest.MonkeyPatch, capsys) -> tuple[int, str, str]:
    if run.setup is not None:
        run.setup(work, mp)
    mp.setattr(sys, "argv", [str(Path(sys.executable).with_name(run.command)), *run.args])
    capsys.readouterr()
    try:
        ENTRIES[run.command]()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


# Rows that train a model (seconds each): run by the whole suite, not by -m "not slow".
SLOW = {"a checkpoint from another configuration"}


@pytest.mark.parametrize("row", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW else r
                                 for r in CASES],
                         ids=[re.sub(r"[`'\" ]+", "_", r)[:60] for r in CASES])
def test_each_row_ends_as_the_table_says(row, workdir, monkeypatch, capsys):
    for case in CASES[row]:
        if isinstance(case, Call):
            with pytest.raises(ConfigError) as e:
                case.call(workdir)
            assert e.value.field == case.field, str(e.value)
            assert "\n" not in str(e.value)
            continue
        code, out, err = _run(case, workdir, monkeypatch, capsys)
        shown = f"{case.command} {' '.join(case.args)}\nstdout: {out[-1500:]}\nstderr: {err}"
        assert code == case.code, shown
        assert "Traceback" not in out + err, shown
        if case.code == 4:  # the failing command: its trials FAIL with the command's last line
            _assert_trial_failed_with_its_last_line(workdir)
        # one line: Hydra's INFO log lines (the sweep's start line) are progress, not errors
        lines = [ln for ln in err.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
        if case.code == 4:  # each failed trial said so as it ended; the error line comes last
            assert all(TRIAL_FAILED.match(ln) for ln in lines[:-1]), shown
            lines = lines[-1:]
        assert len(lines) == 1, shown
        assert lines[0].startswith(f"spartune: error: {case.field}: "), shown
        assert "To append to your config" not in err  # never Hydra's advice to add a key
        runs = workdir / "results" / "train"
        assert not runs.exists() or not any(runs.iterdir()), shown  # no run folder left


def _assert_trial_failed_with_its_last_line(work: Path) -> None:
    import optuna
    import pandas as pd

    from spartune import collect

    trials = pd.read_csv(work / "results" / "proxy" / "trials.csv")
    assert 1 <= len(trials) <= 3 and set(trials["state"]) == {"FAIL"}  # study.max_failures
    storage = collect.storage_for(work / "results" / "proxy")
    [summary] = optuna.get_all_study_summaries(storage)
    for trial in optuna.load_study(study_name=summary.study_name, storage=storage).trials:
        assert trial.user_attrs["error"].startswith("command exited 3: it broke")
