"""Helpers shared by the benchmark scripts: configs, timing, alternation, medians, output.

Every figure a benchmark reports is a *ratio* of two sides measured side by side in one process
(or one parent process), alternating A B A B ... so that load from other jobs on a shared machine
hits both sides alike. Medians, never means, and never an absolute time in a test.

Each script ends with exactly one line `NAME: ratio=X target=Y pass|fail` (see `verdict`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing, too
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from spartune.config import Config  # noqa: E402

T = TypeVar("T")

THREADS = 2  # torch intra-op threads used by every in-process measurement


# -- configs ---------------------------------------------------------------------------------


def bench_config(
    *,
    width: int = 128,
    density: float = 1.0,
    steps: int = 50,
    batch_size: int = 16,
    seq_len: int = 64,
    eval_every: int | None = None,
    eval_batches: int = 2,
    data: str = "synthetic",
    threads: int = THREADS,
    seed: int = 0,
) -> Config:
    """A CPU run config: SμPar, base width 64, depth 2, vocab 256, no progress bar.

    `eval_every=None` evaluates once, at the last step (every run evaluates at its last step).
    `threads=0` leaves torch's thread count alone (what a multi-worker sweep needs).
    """
    cfg = Config()
    cfg.param.name = "supar"
    cfg.model.width, cfg.model.base_width, cfg.model.density = width, 64, density
    cfg.data.name, cfg.data.vocab_size = data, 256
    t = cfg.train
    t.steps, t.batch_size, t.seq_len = steps, batch_size, seq_len
    t.eval_every, t.eval_batches = eval_every or steps, eval_batches
    t.device, t.progress, t.threads = "cpu", False, threads
    cfg.seed = seed
    return cfg


def set_threads(n: int = THREADS) -> int:
    torch.set_num_threads(n)
    return torch.get_num_threads()


def add_step_options(p: argparse.ArgumentParser) -> None:
    """Options of the in-process step-time benchmarks: threads and denormal handling."""
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads, both sides (2)")
    p.add_argument("--denormals", choices=["flush", "keep"], default="flush",
                   help="flush (default): flush-to-zero / denormals-are-zero for the whole "
                        "process, so that neither side is slowed by denormal floats its "
                        "numerics happen to produce; keep: the CPU's default for the "
                        "benchmark's own code (spartune's train.run flushes regardless, as it "
                        "does for users: see train.flush_denormals)")


def configure_process(threads: int, denormals: str) -> None:
    """Set denormal handling, then the thread count. Call first: torch's OpenMP workers copy the
    FP control register of the main thread when the pool starts, so flush-to-zero set after any
    parallel op would hold on the main thread only."""
    torch.set_flush_denormal(denormals == "flush")
    set_threads(threads)


# -- timing and alternation ------------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(wall seconds, result) of one call."""
    tic = time.perf_counter()
    out = fn()
    return time.perf_counter() - tic, out


def alternate(sides: dict[str, Callable[[], T]], rounds: int, warmup: int = 1,
              log: bool = True) -> dict[str, list[T]]:
    """Call each side once per round, in order (A B A B ...), after `warmup` untimed rounds.

    Each callable does its own measuring and returns it (seconds, or a dict of figures).
    """
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    out: dict[str, list[T]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, fn in sides.items():
            out[name].append(fn())
        if log:
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return out


def median(values: Iterable[float]) -> float:
    vals = [v for v in values]
    return statistics.median(vals) if vals else float("nan")


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios num[i] / den[i]: each pair was measured back to back."""
    return [a / b for a, b in zip(num, den, strict=True)]


# -- output ----------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.{digits}f}"
        return f"{value:.{digits}g}"
    return str(value)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str = "") -> None:
    """A plain-text table (also valid Markdown)."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def verdict(name: str, ratio: float, target: str, passed: bool) -> str:
    """The last line of every benchmark: `NAME: ratio=X target=Y pass|fail`."""
    line = f"{name}: ratio={ratio:.3f} target={target} {'pass' if passed else 'fail'}"
    print(line, flush=True)
    return line


# -- the machine -----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, torch version, date, load average: the README's machine line."""
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 1
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": nproc,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load": " ".join(f"{x:.2f}" for x in load),
    }


def print_machine(title: str) -> dict[str, Any]:
    info = machine_info()
    print(f"# {title}")
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return info


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argparse parser with the common `--quick` flag, described by the script's docstring."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, a few seconds (the smoke test uses it)")
    return p


def quiet_logs() -> None:
    """Keep warnings of the library (e.g. Optuna's) out of the tables."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("spartune").setLevel(logging.ERROR)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
    except ImportError:  # pragma: no cover
        pass
