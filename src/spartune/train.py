"""One training run: `run(cfg, report=None, out_dir=None) -> metrics`.

This is the unit every sweep, transfer target and benchmark is made of, so it knows nothing of
Optuna or Hydra: a sweep passes a `report(step, val_loss)` callback and turns it into
`trial.report` + pruning; any exception raised by the callback stops the run and propagates.

A run never crashes on divergence: if the train loss goes NaN/inf, or above both
`train.loss_ceiling` and 1.5x the loss at initialization, it stops and returns
`diverged=True`. (A large alpha_output or init std can start a run above the ceiling: that run
is not diverging unless training makes it markedly worse.) Same seed, same losses on the CPU.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from spartune import atomic, distributed, sharding
from spartune.config import Config, ConfigError, OptimConfig, validate
from spartune.data import Corpus, load_corpus
from spartune.distributed import Dist
from spartune.layouts import describe
from spartune.model import GPT, build_model

log = logging.getLogger(__name__)

Report = Callable[[int, float], None]


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from spartune.config import ConfigError

        raise ConfigError("train.device", "cuda requested but no CUDA device is visible; "
                                          "use train.device=auto or cpu")
    return torch.device(name)


def flush_denormals() -> None:
    """Flush denormal floats to zero (FTZ/DAZ) on this thread and on threads started after it.

    Why: on x86 CPUs every op that reads or writes a denormal (|x| < 1.2e-38) takes a
    microcode slow path, and SμPar training produces them (tiny gradients squared in AdamW's
    second moment, decaying moments of rows that get no gradient). `benchmarks/mask_overhead.py
    --denormals keep` (vs the default flush) shows what they cost. Flushing changes only values
    below 1.2e-38, which are 0 to every figure spartune reports; same seed, same losses still
    holds. torch's setting is per thread and worker threads inherit it when they start, so the
    entry points (CLI, sweep workers) call this before any torch op; `run` calls it too, which
    covers the main thread of library use.
    """
    torch.set_flush_denormal(True)


def lr_factor(step: int, steps: int, o: OptimConfig) -> float:
    """Multiplier of eta_base at `step` (0-based): warm-up, then the chosen decay.

    `linear` is the paper's schedule: linear warm-up, then linear decay to `min_lr_frac` of the
    peak at the last step (SUPAR.md §3.1).
    """
    warmup = int(o.warmup_frac * steps)
    if step < warmup:
        return (step + 1) / warmup
    if o.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    progress = min(1.0, max(0.0, progress))
    if o.schedule == "linear":
        return 1.0 - (1.0 - o.min_lr_frac) * progress
    # cosine
    return o.min_lr_frac + (1.0 - o.min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Setup:
    """What a run (or a coordinate check) trains: built once from the config."""

    model: GPT
    optimizer: torch.optim.Optimizer
    corpus: Corpus
    device: torch.device


def setup(cfg: Config, *, corpus: Corpus | None = None, root: str | Path = ".") -> Setup:
    """Validate, load data, build the model and the AdamW optimizer with per-group LR mults."""
    validate(cfg)
    if corpus is None:
        corpus = corpus_for(cfg, root=root)
    corpus.check_seq_len(cfg.train.seq_len)
    device = resolve_device(cfg.train.device)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < corpus.vocab_size:
        from spartune.config import ConfigError

        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the data "
                          f"set's vocabulary ({corpus.vocab_size}); leave it unset")
    vocab = cfg.model.vocab_size or corpus.vocab_size
    m = cfg.model
    if cfg.train.parallel == "fsdp" and m.sparse_impl == "auto":
        if distributed.env_rank() == 0:
            print("spartune: note: model.sparse_impl=auto is masked under train.parallel=fsdp "
                  "(fully_shard shards dense weights; compressed layers are not sharded)",
                  file=sys.stderr)
        m = replace(m, sparse_impl="masked")
    model = build_model(m, cfg.param, vocab_size=vocab, max_len=cfg.train.seq_len,
                        seed=cfg.seed, mask_seed=cfg.mask_seed, device=device)
    if cfg.train.parallel != "fsdp":  # fsdp moves each block's shards there as it shards
        model = model.to(device)
    o = cfg.optim
    groups = model.param_groups(o.weight_decay, wd_independent=o.wd_independent_of_lr_mult)
    optimizer = make_adamw(groups, o, device)
    return Setup(model, optimizer, corpus, device)


def make_adamw(groups: list[dict], o: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has one for the device.

    Why: the default (foreach) AdamW launches several ops per parameter group and step; the
    fused kernel does the whole update in one pass (benchmarks/trainer_throughput.py measures
    the effect on whole runs against a plain loop on the default AdamW). Same math, and same
    seed still gives the same losses; a torch without a fused kernel for this device gets the
    default implementation.
    """
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass  # an older torch: no fused kernel for this device
    return torch.optim.AdamW(groups, **kw)


def corpus_for(cfg: Config, *, root: str | Path = ".") -> Corpus:
    """The run's corpus; the default cache folder follows `results_dir` (also without Hydra)."""
    cache = cfg.data.cache_dir.replace("${results_dir}", cfg.results_dir)
    return load_corpus(replace(cfg.data, cache_dir=cache), root=root)


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, *, dist: Dist | None = None,
             precision: str = "fp32") -> float:
    """Mean over the batches of each batch's mean token loss.

    Under DDP each rank takes its rows of every batch and the per-batch sums are added over
    the ranks in one all-reduce: the same number one process computes (up to float rounding).
    """
    d = dist or Dist()
    parts = []
    for x, y in batches:
        xs, ys = distributed.shard(x, d), distributed.shard(y, d)
        with autocast(device, precision):
            _, loss = model(xs.to(device), ys.to(device))
        parts.append(loss.float() * (xs.shape[0] / x.shape[0]))
    sharding.reshard(model)  # fsdp: the root's gathered weights go back to shards
    per_batch = distributed.all_sum(torch.stack(parts), d)
    # summed in double, batch by batch, as one process always has: same number, same bits
    return sum(float(v) for v in per_batch.tolist()) / len(batches)


def autocast(device: torch.device, precision: str) -> Any:
    """Autocast to bf16 / fp16 for the forward and the loss; nothing for fp32.

    The weights stay fp32 (autocast casts them per op, and the cast's backward hands fp32
    gradients to the fp32 parameters), so AdamW updates fp32 master weights with fp32 state.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_PHASES: dict[str, list[float]] | None = None  # set inside `phase_times()`
_NO_PHASE = contextlib.nullcontext()


def phase(name: str) -> Any:
    """A named span of the training step, timed only inside `phase_times()`: where a step's
    time goes (benchmarks/trainer_throughput.py --breakdown). Otherwise a shared no-op.
    On a CPU every op is synchronous, so wall time per span is exact; on a GPU the spans see
    launch time, and the wait lands in `loss_item` (the step's one host sync)."""
    if _PHASES is None:
        return _NO_PHASE
    return _timed_phase(name, _PHASES)


@contextlib.contextmanager
def _timed_phase(name: str, into: dict[str, list[float]]) -> Iterator[None]:
    tic = time.perf_counter()
    try:
        yield
    finally:
        into.setdefault(name, []).append(time.perf_counter() - tic)


@contextlib.contextmanager
def phase_times() -> Iterator[dict[str, list[float]]]:
    """Record every step phase's seconds (one entry per step, in order) while inside."""
    global _PHASES
    _PHASES = {}
    try:
        yield _PHASES
    finally:
        _PHASES = None


def compile_model(net: torch.nn.Module) -> torch.nn.Module:
    """torch.compile of the (possibly DDP-wrapped) model; it compiles lazily at the first step."""
    return torch.compile(net)


def compile_error(e: Exception) -> ConfigError:
    """A failed compile as one line that names the way out."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return ConfigError("train.compile", f"torch.compile could not compile the model "
                       f"({type(e).__name__}: {first[:200]}); use train.compile=false")


def _progress(total: int, enabled: bool) -> Any:
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)


def config_fingerprint(cfg: Config) -> str:
    """Hash of everything that shapes a run's trajectory: a checkpoint only resumes its own run."""
    keep = {k: v for k, v in asdict(cfg).items()
            if k in ("model", "param", "data", "optim", "seed")}
    keep["train"] = {k: v for k, v in asdict(cfg.train).items()
                     if k in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches",
                              "loss_ceiling")}
    if cfg.train.precision != "fp32":  # fp32 runs keep the fingerprint they always had
        keep["train"]["precision"] = cfg.train.precision
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write then rename: a run killed mid-save leaves the previous checkpoint intact, and a
    full disk leaves no half file (atomic.WriteError names the checkpoint)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic.write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint's state, or None (with one warning line) when it cannot be read: a file
    cut short or garbled is not worth a failed trial, the run starts from step 0 instead."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a spartune checkpoint")
        return state
    except Exception as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        print(f"spartune: warning: {path}: unreadable checkpoint ({reason}); starting this run "
              "from step 0", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None


def run(cfg: Config, report: Report | None = None, out_dir: str | Path | None = None, *,
        corpus: Corpus | None = None, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Train one model and return its metrics; write metrics.json and curve.csv to `out_dir`.

    With `train.checkpoint_every > 0`, the model (masks included), optimizer, data-sampler RNG,
    curve and step are saved every that many steps to `checkpoint` (default
    `out_dir/checkpoint.pt`); a rerun with the same config resumes there and ends with the same
    losses as an uninterrupted run.

    Under torchrun (WORLD_SIZE > 1) this is one rank of a data-parallel run (distributed.py):
    rank 0's `out_dir` and checkpoint are the run's, and only rank 0 writes; `report` is called
    on every rank with the same value (a callback that talks to a sweep storage does so from
    one rank, e.g. through optuna-integration's TorchDistributedTrial).
    """
    return run_and_keep(cfg, report, out_dir, corpus=corpus, checkpoint=checkpoint)[0]


def run_and_keep(cfg: Config, report: Report | None = None, out_dir: str | Path | None = None,
                 *, corpus: Corpus | None = None,
                 checkpoint: str | Path | None = None) -> tuple[dict[str, Any], Setup]:
    """`run`, also returning what it trained (model, optimizer with its state): for checks of
    the final state (masked weights and moments exactly zero, equal across ranks)."""
    flush_denormals()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    validate(cfg)
    fsdp = cfg.train.parallel == "fsdp"
    if fsdp and not distributed.under_torchrun():
        raise ConfigError("train.parallel", "fsdp shards the model over the processes torchrun "
                          "starts; launch with `torchrun --nproc_per_node=N --no-python "
                          "spartune-train ...` (or study.nproc_per_trial=N), or use "
                          "train.parallel=ddp for one process")
    d = distributed.init(resolve_device(cfg.train.device), group=fsdp)
    try:
        return _run(cfg, report, out_dir, corpus, checkpoint, d)
    finally:
        distributed.close(d)


def _run(cfg: Config, report: Report | None, out_dir: str | Path | None,
         corpus: Corpus | None, checkpoint: str | Path | None,
         d: Dist) -> tuple[dict[str, Any], Setup]:
    s = setup(cfg, corpus=corpus)
    t, o = cfg.train, cfg.optim
    local_rows, micro = distributed.per_rank_batch(t.batch_size, t.micro_batch_size, d)
    n_micro = local_rows // micro
    ceiling = t.loss_ceiling if t.loss_ceiling is not None else 1.5 * math.log(s.corpus.vocab_size)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    val = s.corpus.val_batches(t.eval_batches, t.batch_size, t.seq_len, cfg.data.val_seed)
    model, opt, device = s.model, s.optimizer, s.device
    distributed.check_same_masks(model, d)
    fsdp = t.parallel == "fsdp"
    counts = {"n_params": model.n_params(), "n_nonzero_params": model.n_nonzero_params()}
    layers = None
    if fsdp:  # shard, then the optimizer on the shards: param groups re-bound by name
        layers = describe(model)  # what each layer is; its bytes are read from the shards
        sharding.shard(model, blocks=model.blocks, precision=t.precision,
                       reshard_after_forward=t.fsdp_reshard_after_forward, device=device)
        opt = make_adamw(model.param_groups(o.weight_decay,
                                            wd_independent=o.wd_independent_of_lr_mult),
                         o, device)
        s = replace(s, optimizer=opt)
        ddp = model
    else:
        ddp = distributed.wrap(model, device, d)
    net = compile_model(ddp) if t.compile else ddp
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None

    curve: list[dict[str, float | int]] = []
    window: list[float] = []  # train losses since the last evaluation
    diverged_at: int | None = None
    init_loss = -math.inf  # first step's loss: diverged only above 1.5x it and the ceiling
    train_seconds, step, start, skipped = 0.0, 0, 0, 0
    first_step_seconds = 0.0
    ckpt = None
    if t.checkpoint_every > 0 and (checkpoint is not None or out_dir is not None):
        ckpt = Path(checkpoint) if checkpoint is not None else Path(out_dir) / "checkpoint.pt"
    ckpt = distributed.broadcast_object(ckpt, d)  # rank 0's run folder is the run's
    # A sharded run's checkpoint is a DCP folder beside where the one file would be; a run of
    # one process (or ddp) resumes from such a folder when it has no file of its own.
    dcp_dir = sharding.checkpoint_dir(ckpt) if ckpt is not None else None
    from_dcp = distributed.broadcast_object(
        dcp_dir is not None and sharding.exists(dcp_dir)
        and (fsdp or not (ckpt is not None and ckpt.exists())), d)
    resume = distributed.broadcast_object(ckpt is not None and ckpt.exists(), d) or from_dcp
    fingerprint = config_fingerprint(cfg)
    if fsdp and resume and not from_dcp:
        raise ConfigError("train.parallel", f"{ckpt} is a checkpoint of a run that was not "
                          "sharded, and an fsdp run resumes only from its DCP folder "
                          f"({dcp_dir.name}); resume it with train.parallel=ddp, or move it away "
                          "to start this run from step 0")
    state = None
    if from_dcp:
        state = {"dcp": True, **sharding.load(dcp_dir, model, opt)}
    elif resume and ckpt is not None and not fsdp:
        state = load_checkpoint(ckpt, device)
    if state is not None:
        if state.get("fingerprint") != fingerprint:
            raise ConfigError("train.checkpoint_every", f"{ckpt} was written by a different "
                              "configuration; move it away or use another run folder")
        if not state.get("dcp"):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_gen"])
        curve, window = state["curve"], state["window"]
        start = step = state["step"]
        train_seconds = state["train_seconds"]
        init_loss = state.get("init_loss", -math.inf)
        skipped = state.get("skipped_steps", 0)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log.info("resumed from %s at step %d", dcp_dir if from_dcp else ckpt, start)
    bar = _progress(t.steps, t.progress and d.is_main)
    if bar is not None and start:
        bar.update(start)

    def forward_backward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of the mean loss over this rank's rows, micro-batch by micro-batch; DDP
        all-reduces once, in the last micro-batch's backward. Returns the mean loss."""
        total = torch.zeros((), device=device)
        for i in range(n_micro):
            xs = x[i * micro:(i + 1) * micro].to(device, non_blocking=True)
            ys = y[i * micro:(i + 1) * micro].to(device, non_blocking=True)
            last = i == n_micro - 1
            # ddp all-reduces once, in the last micro-batch; fsdp reduce-scatters each one
            # into the fp32 sharded gradient (no full-size gradient kept between them)
            sync = (ddp.no_sync() if d.active and not last and not fsdp
                    else contextlib.nullcontext())
            with sync:
                with autocast(device, t.precision):
                    _, loss = net(xs, ys)
                part = loss / n_micro if n_micro > 1 else loss
                (scaler.scale(part) if scaler is not None else part).backward()
            total += part.detach().float()
        return distributed.all_mean(total, d)

    try:
        for step in range(start + 1, t.steps + 1):
            tic = time.perf_counter()
            with phase("lr_groups"):
                factor = lr_factor(step - 1, t.steps, o)
                for g in opt.param_groups:
                    g["lr"] = o.lr * factor * g["lr_mult"]  # STYLE rule 5: groups x the base
            with phase("data"):
                x, y = s.corpus.train_batch(t.batch_size, t.seq_len, data_gen)
                x, y = distributed.shard(x, d), distributed.shard(y, d)
                opt.zero_grad(set_to_none=True)
            with phase("forward_backward"):
                if t.compile and step == start + 1:
                    try:  # the first call compiles: a failure is the user's to switch off
                        loss = forward_backward(x, y)
                    except (KeyboardInterrupt, ConfigError):
                        raise
                    except Exception as e:
                        raise compile_error(e) from None
                else:
                    loss = forward_backward(x, y)
            with phase("clip"):
                if scaler is not None and o.grad_clip > 0:
                    scaler.unscale_(opt)  # clip the true gradient, not the scaled one
                if o.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            with phase("optimizer"):
                if scaler is not None:
                    before = scaler.get_scale()
                    scaler.step(opt)  # skipped when the scaled gradient has an inf or a NaN
                    scaler.update()
                    skipped += scaler.get_scale() < before  # the scale drops on a skip
                else:
                    opt.step()
            with phase("loss_item"):
                value = loss.item()  # the one host sync per step: the logged loss
            train_seconds += time.perf_counter() - tic
            if step == start + 1:
                first_step_seconds = time.perf_counter() - tic  # compiles, when compile is on
            window.append(value)
            if step == 1:
                init_loss = value
            if not math.isfinite(value) or value > max(ceiling, 1.5 * init_loss):
                diverged_at = step
                curve.append({"step": step, "train_loss": value, "val_loss": math.nan,
                              "lr": o.lr * factor})
                break
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            if step % t.eval_every == 0 or step == t.steps:
                val_loss = evaluate(model, val, device, dist=d, precision=t.precision)
                curve.append({"step": step, "train_loss": sum(window) / len(window),
                              "val_loss": val_loss, "lr": o.lr * factor})
                window = []
                if not math.isfinite(val_loss):
                    diverged_at = step
                    break
                if report is not None:
                    report(step, val_loss)
            if ckpt is not None and step % t.checkpoint_every == 0 and step < t.steps:
                extra = {"fingerprint": fingerprint, "step": step,
                         "data_gen": data_gen.get_state(), "curve": curve, "window": window,
                         "train_seconds": train_seconds, "init_loss": init_loss,
                         "skipped_steps": skipped,
                         "scaler": scaler.state_dict() if scaler is not None else None}
                if fsdp:  # every rank writes its shards
                    sharding.save(dcp_dir, model, opt, extra, is_main=d.is_main)
                elif d.is_main:
                    save_checkpoint(ckpt, {**extra, "model": model.state_dict(),
                                           "optimizer": opt.state_dict()})
    finally:
        if bar is not None:
            bar.close()

    evals = [r for r in curve if math.isfinite(r["val_loss"])]
    diverged = diverged_at is not None
    metrics: dict[str, Any] = {
        "final_train_loss": math.nan if diverged else curve[-1]["train_loss"],
        "final_val_loss": math.nan if diverged else curve[-1]["val_loss"],
        "best_val_loss": min((r["val_loss"] for r in evals), default=math.nan),
        "diverged": diverged,
        "diverged_step": diverged_at,
        "steps": step,
        "tokens": step * t.batch_size * t.seq_len,
        "tokens_per_second": step * t.batch_size * t.seq_len / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "first_step_seconds": first_step_seconds,  # includes torch.compile's compile time
        **counts,
        "device": str(device),
        "world_size": d.world_size,
        "parallel": t.parallel,
        "resumed_step": start,  # 0: trained from scratch; else the checkpoint's step
        **sharding.rank_bytes(model, opt),  # this rank's: 1/N of ddp's under fsdp
        "precision": t.precision,
        "compile": t.compile,
        "micro_batch_size": micro,
        "grad_accum_steps": n_micro,
        "skipped_steps": skipped,
        "data": s.corpus.name,
        "data_fingerprint": s.corpus.fingerprint,
        "param": cfg.param.name,
        "width": cfg.model.width,
        "base_width": cfg.model.base_width,
        "depth": cfg.model.depth,
        "density": cfg.model.density,
        "seed": cfg.seed,
        "lr": o.lr,
        "init_std": cfg.model.init_std,
        "alpha_input": cfg.param.alpha_input,
        "alpha_output": cfg.param.alpha_output,
        "loss_ceiling": ceiling,
        **hidden_layer_metrics(cfg, model, opt, layers),
    }
    if out_dir is not None and d.is_main:
        write_outputs(Path(out_dir), metrics, curve)
    metrics["curve"] = curve
    return metrics, s


def hidden_layer_metrics(cfg: Config, model: GPT, opt: torch.optim.Optimizer,
                         layers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Which layout each hidden layer got (model.sparse_impl) and what it holds in memory.

    Under fsdp, `layers` is `describe` of the model before sharding (layout, shape, non-zeros)
    and the bytes are this rank's shards'."""
    if layers is None:
        layers = describe(model, opt)
    else:
        layers = [{**r, **sharding.layer_rank_bytes(model.get_submodule(r["name"]), opt)}
                  for r in layers]
    return {
        "sparse_impl": cfg.model.sparse_impl,
        "hidden_layers": layers,
        "hidden_param_bytes": sum(r["param_bytes"] for r in layers),
        "hidden_grad_bytes": sum(r["grad_bytes"] for r in layers),
        "hidden_optimizer_bytes": sum(r["optimizer_bytes"] for r in layers),
    }


def write_outputs(out: Path, metrics: dict[str, Any], curve: list[dict[str, float | int]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in metrics.items()}
    atomic.write_text(out / "metrics.json", json.dumps(clean, indent=2) + "\n")
    with atomic.replacing(out / "curve.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "train_loss", "val_loss", "lr"])
        w.writeheader()
        w.writerows(curve)
