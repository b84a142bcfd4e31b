"""Typed configuration: one dataclass per Hydra config group, plus validation.

The YAML files in `conf/` hold values only; the schema lives here so that a misspelled key
fails at compose time and tests can build a `Config` without Hydra. Derived quantities
(`width_mult`, `density_mult`, `n_head`) are properties: the config holds one dial per axis
(STYLE_ANCHORS rule 1) and code derives the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PARAMETERIZATIONS = ("sp", "mup", "supar", "supar_init_only", "supar_lr_only")
HIDDEN_LAYERS = ("qkv", "attn_out", "mlp_up", "mlp_down")
DATASETS = ("pystdlib", "text", "memmap", "synthetic")
SCHEDULES = ("linear", "cosine", "constant")
MASK_KINDS = ("per_row", "exact", "bernoulli")
DEVICES = ("auto", "cpu", "cuda")
SPARSE_IMPLS = ("masked", "compressed", "auto")  # layouts.py
PRECISIONS = ("fp32", "bf16", "fp16")
# How a multi-process run splits the work (distributed.py): ddp replicates the model on every
# rank; fsdp shards parameters, gradients and AdamW state over the ranks (sharding.py).
PARALLEL = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A user mistake in the configuration: `field` names it, the message says the fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class ModelConfig:
    """The GPT's shape and its sparsity. `width` and `density` are the two transfer axes."""

    width: int = 128  # d_model
    base_width: int = 64  # width of the proxy the HPs were tuned on (m_d = width / base_width)
    depth: int = 2  # number of transformer blocks
    head_size: int = 32  # d_head, fixed; heads grow with width (n_head = width / head_size)
    mlp_ratio: int = 4
    density: float = 1.0  # fraction of non-zero weights in every hidden projection (1 - sparsity)
    # Per-layer densities override `density` for one kind of hidden projection,
    # e.g. {mlp_up: 0.25}; SμPar then uses that layer's own m_rho (SUPAR.md §1.3, App. D.4).
    layer_density: dict[str, float] = field(default_factory=dict)
    mask_kind: str = "per_row"  # per_row | exact | bernoulli (see sparsity.py)
    mask_seed: int | None = None  # None: derived from the run's `seed`
    # How sparse hidden layers are stored and computed (layouts.py): masked (dense weight with
    # zeros), compressed (non-zeros only, CSR kernels), auto (compressed where measured faster).
    sparse_impl: str = "auto"
    init_std: float = 0.02  # sigma_base, tuned on the proxy
    tie_embeddings: bool = True  # the paper's Table 1 writes the unembedding with the tied W_emb
    bias: bool = False
    vocab_size: int | None = None  # None: taken from the data set

    @property
    def width_mult(self) -> float:
        return self.width / self.base_width

    @property
    def n_head(self) -> int:
        return self.width // self.head_size

    def density_of(self, layer: str) -> float:
        return self.layer_density.get(layer, self.density)


@dataclass
class ParamConfig:
    """Which parameterization maps (sigma_base, eta_base) onto this shape, and its knobs."""

    name: str = "supar"  # sp | mup | supar | supar_init_only | supar_lr_only
    alpha_input: float = 1.0  # multiplies the embedding output
    alpha_output: float = 1.0  # multiplies the logits (divided by m_d under µP / SμPar)
    base_density: float = 1.0  # rho_base: density of the proxy (m_rho = density / base_density)
    # UNVERIFIED in the paper (SUPAR.md §1.2): GPT-2's 1/sqrt(2*depth) on residual output
    # projections. nanoGPT-mup and Cerebras modelzoo both apply it, so it is on by default.
    depth_init_scale: bool = True


@dataclass
class DataConfig:
    """Where the tokens come from. Every source is local: nothing is downloaded."""

    name: str = "pystdlib"  # pystdlib | text | memmap | synthetic
    path: str | None = None  # text: file or glob; memmap: folder with train.bin / val.bin
    vocab_size: int = 256  # bytes; memmap data sets give their own
    max_bytes: int = 8_000_000  # pystdlib / text: size cap
    val_fraction: float = 0.1  # tail of the corpus held out for validation
    val_seed: int = 1234  # fixed: every run of a study is evaluated on the same batches
    cache_dir: str = "${results_dir}/.cache"  # the built-in corpus is built once, here


@dataclass
class OptimConfig:
    """AdamW with one base LR; each parameter group multiplies it by its `lr_mult`."""

    lr: float = 0.01  # eta_base, tuned on the proxy
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on >= 2-D weights only
    # True (default): decay per step = eta_base * wd in every group, as the dense proxy had it
    # (microsoft/mup's MuAdamW scales wd by the width multiplier to the same end). False:
    # PyTorch AdamW as nanoGPT-mup uses it, decay per step = lr_group * wd, which under SμPar is
    # 1/(m_d m_rho) times the proxy's (32x at width 128, density 1/64) and, measured by
    # benchmarks/science.py, moves SμPar's LR and init optima at low density (README).
    wd_independent_of_lr_mult: bool = True
    grad_clip: float = 1.0  # global norm; 0 disables
    # linear (the paper's: warm-up, then linear down to min_lr_frac) | cosine | constant
    schedule: str = "linear"
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.1


@dataclass
class TrainConfig:
    """How long and how one run trains, and what it writes."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    eval_every: int = 50
    eval_batches: int = 8
    # A run whose train loss is NaN/inf, or above this and 1.5x its loss at initialization,
    # stops early and is reported diverged. None: 1.5 * ln(vocab_size), half again the loss of
    # a uniform guess.
    loss_ceiling: float | None = None
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    progress: bool = True  # a bar on a terminal; never in logs or pipes
    # Save model, masks, optimizer and RNG state every this many steps (0: never); a rerun
    # resumes from the last checkpoint. Sweeps keep one per trial under results/<study>/.
    checkpoint_every: int = 0
    # fp32 | bf16 | fp16: autocast for the forward and the loss; weights and AdamW state stay
    # fp32 (fp16 adds a gradient scaler; its skipped steps are counted in metrics.json).
    precision: str = "fp32"
    compile: bool = False  # torch.compile the model (CPU: needs the machine's C++ compiler)
    # Rows per forward/backward pass on one process; None: the process's whole share of the
    # batch. `batch_size` stays the global batch (what HP transfer depends on): smaller
    # micro-batches only trade memory for gradient-accumulation steps, same math.
    micro_batch_size: int | None = None
    # Under torchrun: ddp (a replica per rank, gradients all-reduced) | fsdp (FSDP2's
    # fully_shard per block and on the model: each rank holds 1/N of every weight, gradient and
    # AdamW moment). Same math, same losses; fsdp is what a target too big for one device needs.
    parallel: str = "ddp"
    # fsdp: free each block's gathered weights after its forward (gathered again in backward):
    # less memory, one more all-gather per block and step. The root's stay (backward needs them
    # first). No effect under ddp.
    fsdp_reshard_after_forward: bool = True


@dataclass
class CoordConfig:
    """The coordinate check: activation scale vs width and density over the first steps."""

    params: list[str] = field(default_factory=lambda: ["sp", "mup", "supar"])
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    densities: list[float] = field(default_factory=lambda: [1.0, 0.25, 0.0625, 0.015625])
    # cross: widths at density 1 plus densities at the largest width (the paper's Fig. 5 layout);
    # product: every width x density pair.
    grid: str = "cross"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 10  # as the reference coordinate check (SUPAR.md §4.3)
    lr: float = 0.01
    batch_size: int = 8
    seq_len: int = 64
    # Pass if max/min of every hidden quantity, at every step, stays under this. Measured at the
    # defaults (README): correct SμPar <= 2.2x (a transient at steps 2-3, driven by the 8
    # weights per neuron of width 512 at density 1/64); SP, µP and a broken SμPar >= 24x.
    tolerance: float = 2.5


@dataclass
class SearchDim:
    """One searched hyperparameter. With `log` (the default) it is searched on a log2 scale and
    stored in Optuna as `log2_<name>`; `low`/`high`/`values` are always in natural units."""

    low: float | None = None
    high: float | None = None
    log: bool = True
    step: float | None = None  # grid spacing, in octaves when `log` (0.5 = half-octave grid)
    values: list[float] | None = None  # explicit grid points (natural units)
    field: str | None = None  # config field it sets; None: the name's entry in HP_FIELDS


@dataclass
class StudyConfig:
    """A sweep: cells (param x width x density x seed), a search space, sampler, pruner, storage.

    One Optuna study per cell (a pruner must not compare a width-64 trial with a width-1024
    one), all cells in one storage: `results/<name>/optuna.journal` unless `storage` is a URL.
    """

    name: str = "study"
    params: list[str] = field(default_factory=lambda: ["supar"])
    widths: list[int] = field(default_factory=lambda: [64])
    densities: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    space: dict[str, SearchDim] = field(default_factory=dict)
    sampler: str = "tpe"  # tpe | grid | bracket | random | gp | cmaes
    sampler_seed: int = 0
    n_trials: int = 20  # per cell; the grid sampler runs its whole grid instead
    timeout: float | None = None  # seconds per worker process
    pruner: str = "none"  # none | median | hyperband
    pruner_startup_trials: int = 4  # median: trials that run to the end before pruning starts
    storage: str | None = None  # any Optuna storage URL; None: the journal file
    workers: int = 1  # local worker processes; more machines: run the same command there
    # Processes per trial: N > 1 makes every trial one N-process data-parallel run launched
    # through torch.distributed.run (one GPU per process on CUDA, gloo ranks on a CPU).
    nproc_per_trial: int = 1
    # GPUs the local workers share out, round robin (worker w gets the next nproc_per_trial of
    # them); None: every visible GPU. Ignored on a machine without CUDA.
    devices: list[int] | None = None
    role: str = "search"
    # What a trial runs (objectives.py). Empty and null: the built-in `train.run`. Else a
    # Python function named the Hydra way, {_target_: mypkg.train.run, **kwargs}, called as
    # fn(cfg, report, **kwargs) -> metrics; or a command template, e.g.
    # 'python train.py lr={lr} init_std={init_std}', whose stdout JSON lines
    # {"step": s, "val_loss": v} are reported and whose last JSON line is the final metrics.
    objective: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    # The bracketing search (sampler: bracket, one HP in `space`; see bracket.py). Its first
    # point is `centre` (natural units), else the best trial of the study `centre_from` (the
    # proxy), else the config's own value of the HP; snapped onto the axis low + k * step.
    centre: float | None = None
    centre_from: str | None = None
    continuation: bool = False  # each sparser cell starts at the next denser cell's optimum
    max_points: int = 10  # points per (param, width, density) before the search gives up
    step: float | None = None  # octaves (log axes) between points; None: space step, else 1
    # Refine by half a step towards the lower neighbour once bracketed; false: the optimum is
    # the parabola through the bracket on the step grid (cheaper; enough for flat curves).
    refine: bool = True
    # A trial the objective failed (an exception, a non-zero exit) is retried at most this
    # many times per grid or bracket point in one command; a cell whose last `max_failures`
    # trials all failed stops, and the command exits 4 (failures.py).
    retries: int = 1
    max_failures: int = 3
    # Fields (dotted, e.g. train.steps, or a group such as data) a rerun may change although
    # the study was created with other values: the change is recorded in the study
    # (fingerprint.py). Empty: a changed configuration is refused.
    allow_changes: list[str] = field(default_factory=list)


@dataclass
class TransferConfig:
    """Map the best proxy HPs through a parameterization onto large sparse targets."""

    source: str = "proxy"  # name of the proxy study (its folder under results/)
    source_storage: str | None = None  # its storage URL if not the journal file
    select: str = "best"  # best: the best trial | best_mean: best mean over seeds of one config
    hps: list[str] = field(default_factory=lambda: ["lr", "init_std", "alpha_input",
                                                     "alpha_output"])
    params: list[str] = field(default_factory=lambda: ["sp", "mup", "supar"])
    widths: list[int] = field(default_factory=lambda: [256])
    densities: list[float] = field(default_factory=lambda: [1.0, 0.25, 0.0625, 0.015625])
    seeds: list[int] = field(default_factory=lambda: [0])
    check: bool = False  # also run a local LR grid around each transferred value
    check_octaves: list[float] = field(default_factory=lambda: [-2.0, -1.0, 1.0, 2.0])
    # grid: every check point runs. bracket: the check points form a lattice (steps of the
    # smallest gap, 0 included) and only those needed to bracket the target's own best run:
    # half a step each side first, grown towards the best up to the outermost check point.
    check_sampler: str = "grid"


@dataclass
class TensorBoardConfig:
    enabled: bool = False
    dir: str | None = None  # None: results/<study>/tensorboard (one logdir per study)


@dataclass
class MLflowConfig:
    enabled: bool = False
    # None: $MLFLOW_TRACKING_URI if set, else sqlite:///results/<study>/mlflow.db (local)
    tracking_uri: str | None = None
    experiment: str | None = None  # None: the study's name


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: str = "offline"  # offline (local files only) | online | disabled
    project: str = "spartune"
    entity: str | None = None
    dir: str | None = None  # None: results/<study> (runs land in its wandb/ folder)


@dataclass
class LoggerConfig:
    """Experiment trackers, one run per trial and one group per study (trackers.py). Chosen
    with `logger=tensorboard` or several at once, `logger=[tensorboard,mlflow]`."""

    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    param: ParamConfig = field(default_factory=ParamConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    coord: CoordConfig = field(default_factory=CoordConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    name: str = "default"  # names the results folder
    results_dir: str = "results"

    @property
    def mask_seed(self) -> int:
        return self.seed if self.model.mask_seed is None else self.model.mask_seed


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(field, message)


def _positive(value: float, field: str, hint: str = "") -> None:
    good = isinstance(value, int | float) and math.isfinite(value) and value > 0
    _check(good, field, f"must be > 0, got {value!r}{hint}")


def validate_model(m: ModelConfig, p: ParamConfig) -> None:
    """Check the model and parameterization fields; raise ConfigError naming the first bad one."""
    _check(p.name in PARAMETERIZATIONS, "param",
           f"unknown parameterization {p.name!r}; choose one of {', '.join(PARAMETERIZATIONS)}")
    _positive(m.width, "model.width")
    _positive(m.base_width, "model.base_width", " (the width the HPs were tuned at)")
    _positive(m.depth, "model.depth")
    _positive(m.head_size, "model.head_size")
    _check(m.width % m.head_size == 0, "model.width",
           f"{m.width} is not divisible by model.head_size={m.head_size}; "
           f"use a multiple of {m.head_size} or change model.head_size")
    _positive(m.mlp_ratio, "model.mlp_ratio")
    hint = " (density is 1 - sparsity: 0.0625 means 93.75% sparse)"
    _check(0 < m.density <= 1, "model.density", f"must be in (0, 1], got {m.density}{hint}")
    for layer, d in m.layer_density.items():
        _check(layer in HIDDEN_LAYERS, f"model.layer_density.{layer}",
               f"unknown layer; choose among {', '.join(HIDDEN_LAYERS)}")
        _check(0 < d <= 1, f"model.layer_density.{layer}", f"must be in (0, 1], got {d}{hint}")
    _check(m.mask_kind in MASK_KINDS, "model.mask_kind",
           f"unknown mask kind {m.mask_kind!r}; choose one of {', '.join(MASK_KINDS)}")
    _check(m.sparse_impl in SPARSE_IMPLS, "model.sparse_impl",
           f"unknown implementation {m.sparse_impl!r}; choose one of {', '.join(SPARSE_IMPLS)}")
    if m.sparse_impl == "compressed":
        _check(any(m.density_of(layer) < 1 for layer in HIDDEN_LAYERS), "model.sparse_impl",
               "nothing to compress at density 1 (every hidden layer is dense); use "
               "model.sparse_impl=masked or auto")
    _positive(m.init_std, "model.init_std", " (sigma_base, e.g. 0.02)")
    _check(0 < p.base_density <= 1, "param.base_density",
           f"must be in (0, 1], got {p.base_density}")
    _positive(p.alpha_input, "param.alpha_input")
    _positive(p.alpha_output, "param.alpha_output")


def validate(cfg: Config) -> None:
    """Check every field a run depends on, before anything is built or written."""
    validate_model(cfg.model, cfg.param)
    d, o, t = cfg.data, cfg.optim, cfg.train
    _check(d.name in DATASETS, "data",
           f"unknown data set {d.name!r}; choose one of {', '.join(DATASETS)}")
    if d.name in ("text", "memmap"):
        _check(bool(d.path), "data.path", f"data={d.name} needs data.path=... (a file or folder)")
    _positive(d.max_bytes, "data.max_bytes")
    _check(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _positive(o.lr, "optim.lr", " (eta_base, e.g. 0.01)")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1",
           "beta1 and beta2 must be in [0, 1)")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(o.schedule in SCHEDULES, "optim.schedule",
           f"unknown schedule {o.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    _check(0 <= o.warmup_frac < 1, "optim.warmup_frac", f"must be in [0, 1), got {o.warmup_frac}")
    _check(0 <= o.min_lr_frac <= 1, "optim.min_lr_frac", f"must be in [0, 1], got {o.min_lr_frac}")
    _positive(t.steps, "train.steps")
    _positive(t.batch_size, "train.batch_size")
    _positive(t.seq_len, "train.seq_len")
    _positive(t.eval_every, "train.eval_every")
    _positive(t.eval_batches, "train.eval_batches")
    if t.loss_ceiling is not None:
        _positive(t.loss_ceiling, "train.loss_ceiling")
    _check(t.device in DEVICES, "train.device",
           f"unknown device {t.device!r}; choose one of {', '.join(DEVICES)}")
    _check(t.threads >= 0, "train.threads", "must be >= 0 (0 keeps torch's default)")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: no checkpoints)")
    _check(t.precision in PRECISIONS, "train.precision",
           f"unknown precision {t.precision!r}; choose one of {', '.join(PRECISIONS)}")
    _check(isinstance(t.compile, bool), "train.compile", "must be true or false")
    _check(t.parallel in PARALLEL, "train.parallel",
           f"unknown value {t.parallel!r}; choose one of {', '.join(PARALLEL)}")
    _check(isinstance(t.fsdp_reshard_after_forward, bool), "train.fsdp_reshard_after_forward",
           "must be true or false")
    if t.parallel == "fsdp":
        _check(cfg.model.sparse_impl != "compressed", "model.sparse_impl",
               "compressed layers cannot be sharded by train.parallel=fsdp (fully_shard splits "
               "dense parameters; a compressed layer's CSR indices are whole-layer buffers); "
               "use model.sparse_impl=masked (or auto, which is masked under fsdp)")
    if t.micro_batch_size is not None:
        _positive(t.micro_batch_size, "train.micro_batch_size",
                  " (rows per forward pass; null: the whole batch)")
        _check(t.batch_size % t.micro_batch_size == 0, "train.micro_batch_size",
               f"{t.micro_batch_size} does not divide train.batch_size={t.batch_size}; use a "
               f"divisor of it (e.g. {_divisor_below(t.batch_size, t.micro_batch_size)}) or "
               "null for the whole batch")
    check_name(cfg.name, "name")
    validate_objective(cfg.study)


def _divisor_below(n: int, k: int) -> int:
    """The largest divisor of n that is <= k: the nearest valid micro-batch to suggest."""
    return max(d for d in range(1, min(n, max(1, k)) + 1) if n % d == 0)


def check_name(name: str, field: str) -> None:
    """Names become folders under results/: relative, no '..', nothing that escapes."""
    parts = name.split("/")
    ok = (bool(name.strip()) and not name.startswith(("/", "~", "\\")) and "\\" not in name
          and all(p not in ("", ".", "..") for p in parts)
          and all(c.isalnum() or c in "-_.=+/" for c in name))
    _check(ok, field, f"{name!r} must be a relative folder name (letters, digits, -_.=+ and /, "
                      "no '..'): it names a folder under results/")


def check_axes(obj: Any, prefix: str, head_size: int) -> None:
    """The cell axes a study or a transfer declares: params, widths, densities, seeds."""
    for attr in ("params", "widths", "densities", "seeds"):
        _check(bool(getattr(obj, attr)), f"{prefix}.{attr}", "must list at least one value")
    for p in obj.params:
        _check(p in PARAMETERIZATIONS, f"{prefix}.params", f"unknown parameterization {p!r}; "
               f"choose among {', '.join(PARAMETERIZATIONS)}")
    for d in obj.densities:
        _check(0 < d <= 1, f"{prefix}.densities", f"density {d} is outside (0, 1] (density is "
               "1 - sparsity; 0 would be an empty layer)")
    for w in obj.widths:
        _check(w > 0 and w % head_size == 0, f"{prefix}.widths",
               f"width {w} is not a positive multiple of model.head_size={head_size}")


# What a `study.command` may name in braces, besides the searched names (study.space): the
# trial's own values (objectives.command_values fills them).
COMMAND_PLACEHOLDERS = (
    "python", "param", "width", "base_width", "density", "base_density", "seed", "mask_seed",
    "depth", "lr", "init_std", "alpha_input", "alpha_output", "steps", "batch_size", "seq_len",
    "eval_every", "trial", "study", "cell",
)


def command_fields(command: str) -> list[str]:
    """The placeholders of a command template, in order; a bad brace is a ConfigError."""
    import string

    try:
        return [f for _, f, _, _ in string.Formatter().parse(command) if f is not None]
    except ValueError as e:
        raise ConfigError("study.command", f"{e}; write a literal brace as {{{{ or }}}}") from None


def validate_objective(s: StudyConfig) -> None:
    """The objective's shape: one of built-in, `_target_` or command; known placeholders."""
    if s.objective and s.command:
        raise ConfigError("study.command", "a study runs one objective: set study.command or "
                          "study.objective._target_, not both")
    if s.objective:
        target = s.objective.get("_target_")
        _check(isinstance(target, str) and "." in target.strip(".") and " " not in target,
               "study.objective._target_", f"must name a function as module.function (e.g. "
               f"mypkg.train.run), got {target!r}")
    if (s.objective or s.command is not None) and s.nproc_per_trial > 1:
        raise ConfigError("study.nproc_per_trial", "multi-process trials run the built-in "
                          "objective only; launch torchrun inside your own objective instead, "
                          "or set study.nproc_per_trial=1")
    if s.command is not None:
        _check(bool(str(s.command).strip()), "study.command",
               "is empty; give a command, e.g. 'python train.py lr={lr}', or null")
        known = set(COMMAND_PLACEHOLDERS) | set(s.space)
        for name in command_fields(s.command):
            _check(name in known, "study.command", f"unknown placeholder {{{name}}}; use one of "
                   f"{', '.join(sorted(known))}")


def validate_coord(c: CoordConfig, m: ModelConfig) -> None:
    for p in c.params:
        _check(p in PARAMETERIZATIONS, "coord.params",
               f"unknown parameterization {p!r}; choose among {', '.join(PARAMETERIZATIONS)}")
    _check(bool(c.widths) and bool(c.densities) and bool(c.seeds), "coord.widths",
           "coord.widths, coord.densities and coord.seeds must not be empty")
    for w in c.widths:
        _check(w > 0 and w % m.head_size == 0, "coord.widths",
               f"width {w} is not a positive multiple of model.head_size={m.head_size}")
    for d in c.densities:
        _check(0 < d <= 1, "coord.densities", f"density {d} is outside (0, 1]")
    _check(c.grid in ("cross", "product"), "coord.grid", "choose cross or product")
    _positive(c.steps, "coord.steps")
    _positive(c.lr, "coord.lr")
    _positive(c.tolerance, "coord.tolerance")


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (imported lazily: only the CLI needs Hydra)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


def to_config(obj: Any) -> Config:
    """Turn a composed DictConfig (or a Config) into a plain `Config` dataclass."""
    if isinstance(obj, Config):
        return obj
    from omegaconf import OmegaConf

    out = OmegaConf.to_object(obj)
    assert isinstance(out, Config), type(out)
    return out
