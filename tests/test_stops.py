"""The pieces the fault matrix (tests/faults) relies on, each on its own: held signals, atomic
writes under a full disk, a torn journal record, an unreadable checkpoint, a lost database,
and sweep overrides that the study's axes would silently replace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch

from conftest import cli, tiny_config
from spartune import atomic, stops, sweep, train
from spartune.config import ConfigError

# -- signals ------------------------------------------------------------------------------------


def test_a_signal_inside_deferred_is_delivered_when_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with stops.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block finished first")
    assert done == ["the block finished first"]


def test_the_first_shield_of_the_command_says_the_cleanup_began_once():
    """Its one line is what tells a user (and the sigint_twice fault case) that a second
    Ctrl-C now lands in the cleanup; a local worker (a multiprocessing child) says nothing."""
    code = textwrap.dedent("""
        import multiprocessing as mp
        from spartune import stops
        p = mp.get_context("fork").Process(target=stops.shield); p.start(); p.join()
        print("child done", flush=True)
        stops.shield(); stops.shield()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "child done\n", r.stderr
    assert r.stderr.splitlines() == ["spartune: stopping: marking the running trials FAIL; "
                                     "further Ctrl-C and SIGTERM are ignored until that is done"]


def test_sigterm_becomes_terminated_with_exit_code_143():
    old = signal.getsignal(signal.SIGTERM)
    try:
        stops.obey_sigterm()
        with pytest.raises(stops.Terminated) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stops.exit_code(e.value) == 143
        assert stops.exit_code(KeyboardInterrupt()) == 130
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_database_error_is_recognised_through_its_wrappers(tmp_path):
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/no/such/dir/db.sqlite")
    with pytest.raises(sqlalchemy.exc.OperationalError) as e:
        engine.connect()
    try:
        raise RuntimeError("a trial's write failed") from e.value
    except RuntimeError as wrapped:
        assert "unable to open database file" in stops.storage_gone(wrapped)
    assert stops.storage_gone(ValueError("not a storage error")) is None


# -- atomic writes ------------------------------------------------------------------------------


def test_a_failed_write_leaves_nothing_and_names_the_file(tmp_path):
    target = tmp_path / "trials.csv"
    target.write_text("old\n")
    with pytest.raises(atomic.WriteError) as e:
        with atomic.replacing(target) as tmp:
            tmp.write_text("half a ta")
            raise OSError(28, "No space left on device")
    assert e.value.filename == str(target) and atomic.no_space(e.value)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]


def test_file_size_limit_during_a_checkpoint_is_a_write_error(tmp_path):
    """torch.save itself reports a full disk as its own RuntimeError: save_checkpoint must
    still give the OS error, the checkpoint's name, and leave no file."""
    code = textwrap.dedent(f"""
        import resource, signal, torch
        from pathlib import Path
        from spartune import atomic, train
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            train.save_checkpoint(Path({str(tmp_path / "c.pt")!r}), {{"x": torch.zeros(50_000)}})
        except atomic.WriteError as e:
            print(e.filename, atomic.no_space(e))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == [str(tmp_path / "c.pt"), "True"], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_new_files_keep_the_umask_mode(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


# -- the journal --------------------------------------------------------------------------------


def _journal_with_trials(tmp_path, n: int = 2):
    cfg = tiny_config()
    cfg.results_dir, cfg.study.name = str(tmp_path), "j"
    study = optuna.create_study(study_name="j/c", storage=sweep.open_storage(cfg))
    for i in range(n):
        study.add_trial(optuna.trial.create_trial(value=float(i)))
    return cfg, tmp_path / "j" / sweep.JOURNAL


@pytest.mark.parametrize("tail", [b'{"op_code":6,"worker_id":"x","trial_id"', b'{'])
def test_a_torn_last_record_is_cut_and_the_study_goes_on(tmp_path, tail, capsys):
    cfg, path = _journal_with_trials(tmp_path)
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(tail)
    storage = sweep.open_storage(cfg)  # repairs, with one warning line
    err = capsys.readouterr().err
    assert err.count("torn last record") == 1 and str(path) in err
    assert path.read_bytes() == whole
    study = optuna.load_study(study_name="j/c", storage=storage)
    study.add_trial(optuna.trial.create_trial(value=9.0))  # the next append is not glued on
    again = optuna.load_study(study_name="j/c", storage=sweep.open_storage(cfg))
    assert [t.value for t in again.get_trials()] == [0.0, 1.0, 9.0]
    assert "torn" not in capsys.readouterr().err


def test_a_garbled_journal_is_not_cut(tmp_path, capsys):
    """Damage that is not a torn append (whole lines that are not records) is left as it is:
    cutting it would destroy the study; the command says it cannot read the file instead."""
    cfg, path = _journal_with_trials(tmp_path)
    with open(path, "ab") as f:
        f.write(b"not a record\n{\"op_code\": 5")
    damaged = path.read_bytes()
    with pytest.raises(ConfigError, match="cannot read"):
        sweep.open_storage(cfg)
    assert path.read_bytes() == damaged and "torn" not in capsys.readouterr().err


def test_an_intact_journal_is_not_touched(tmp_path, capsys):
    cfg, path = _journal_with_trials(tmp_path)
    whole = path.read_bytes()
    sweep.open_storage(cfg)
    assert path.read_bytes() == whole and capsys.readouterr().err == ""


def test_the_journal_lock_points_at_the_journal_from_a_relative_results_dir(tmp_path,
                                                                          monkeypatch):
    """Optuna's lock is a symlink to the journal, and its grace period (which frees a lock left
    by a process killed mid-append) stats the link's target: a link made from a relative path
    dangles, and a rerun after such a kill waited forever (found by tests/faults)."""
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config()
    cfg.results_dir, cfg.study.name = "results", "rel"
    storage = sweep.open_storage(cfg)
    journal = tmp_path / "results" / "rel" / sweep.JOURNAL
    lock = storage._backend._lock  # the lock its appends take (no public accessor)
    lock.acquire()  # held, as a process killed while appending would leave it
    try:
        link = Path(str(journal) + ".lock")
        assert link.is_symlink() and link.resolve() == journal.resolve() and link.exists()
    finally:
        lock.release()


# -- checkpoints --------------------------------------------------------------------------------


def test_an_unreadable_checkpoint_restarts_the_run_with_one_warning(tmp_path, capsys):
    cfg = tiny_config(train__steps=20, train__checkpoint_every=10)
    ckpt = tmp_path / "c.pt"
    fresh = train.run(cfg)
    ckpt.write_bytes(b"PK\x03\x04 not a checkpoint at all")
    resumed = train.run(cfg, checkpoint=ckpt)
    err = capsys.readouterr().err
    assert err.count("unreadable checkpoint") == 1 and str(ckpt) in err
    assert resumed["final_val_loss"] == fresh["final_val_loss"]  # from step 0, same seed
    assert isinstance(torch.load(ckpt, weights_only=False), dict)  # a good one replaced it


# -- overrides the study's axes replace ---------------------------------------------------------


@pytest.mark.parametrize(("override", "axis"), [
    ("model.width=64", "study.widths"), ("model.density=0.25", "study.densities"),
    ("param=sp", "study.params"), ("seed=3", "study.seeds")])
def test_an_override_the_study_axes_replace_is_an_error(override, axis):
    cfg = tiny_config()
    cfg.study.widths, cfg.study.densities, cfg.study.params = [128], [1.0], ["supar"]
    with pytest.raises(ConfigError) as e:
        sweep.check_overrides(cfg, ["data=synthetic", override])
    assert e.value.field == override.split("=")[0] and axis in str(e.value)


def test_an_override_equal_to_the_only_axis_value_is_fine():
    cfg = tiny_config()
    cfg.study.widths, cfg.study.densities = [32], [1.0]
    sweep.check_overrides(cfg, ["model.width=32", "model.density=1", "model.base_width=32"])
    cfg.transfer.widths = [256]
    with pytest.raises(ConfigError, match="transfer.widths"):
        sweep.check_overrides(cfg, ["model.width=512"], axes="transfer")


def test_sweep_command_names_the_axis_to_set(workdir):
    r = cli("spartune-sweep", "-cn", "lr_stability", "data=synthetic", "train=smoke",
            "model.width=64", cwd=workdir)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(
        "spartune: error: model.width: every trial takes it from study.widths (now [128])")
    assert "set study.widths=[64] instead" in r.stderr
    assert not (workdir / "results" / "lr_stability" / sweep.JOURNAL).exists()
