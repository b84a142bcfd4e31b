"""The coordinate check: does activation scale stay put across widths and densities?

SμPar's claim (SUPAR.md §1.3) is that with its init and LR rules, every hidden activation has the
same scale at any width and any density, at init *and* after training steps. A wrong exponent in
`params.RULES`, a mask that is not applied, an LR multiplier that never reaches AdamW: each
shows up here as activations that grow or vanish along one axis. So this module trains every
(width, density) cell for a few steps at a large constant LR, through the same `train.setup`
code path a real run uses, and records mean |output| of the embedding, each block's attention
and MLP output (before the residual add) and the logits (SUPAR.md §4.3, paper Fig. 5).

    measure(cfg)        -> tidy DataFrame, columns COORD_COLUMNS, one row per
                           param x cell x seed x step x module
    spreads(df)         -> max/min across cells per (param, hidden module): the verdict numbers
    verdict(spreads, t) -> (pass, lines to print)
    main(cfg, out_dir)  -> what `spartune-coord` runs: csvs, figure, verdict
    coord_check(make_model, widths, densities, data=...) -> the same table and verdict for a
                           model of the user's own (`spartune.parameterize`d); both checks
                           measure through one `_trace`
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from spartune.columns import COORD_COLUMNS, COORD_MODULES, HIDDEN_MODULES
from spartune.config import (
    Config,
    ConfigError,
    CoordConfig,
    ModelConfig,
    validate_coord,
)
from spartune.coord_cells import cell_config, cells
from spartune.coord_cells import check as check_cells
from spartune.data import Corpus

log = logging.getLogger(__name__)

# Parameterizations that are *supposed* to drift (the baselines SμPar is compared with).
BASELINES = ("sp", "mup")


def _progress(total: int, enabled: bool) -> Any:
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", leave=False, dynamic_ncols=True, desc="coord")


def _measure_cell(cfg: Config, corpus: Corpus) -> list[dict[str, Any]]:
    """Train one fresh model for coord.steps steps; mean |output| per module kind per step.

    Imported lazily so that `spreads` / `verdict` (pure pandas) do not pull in the trainer.
    """
    from spartune.train import setup

    c, o = cfg.coord, cfg.optim
    s = setup(cfg, corpus=corpus)
    taps = s.model.tap_modules()
    missing = [k for k in COORD_MODULES if k not in taps]
    assert not missing, f"GPT.tap_modules() lacks {missing}"
    # Same seed -> same batches in every cell, so cells differ only in shape and parameterization.
    data_gen = torch.Generator().manual_seed(cfg.seed)
    device = s.device

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = corpus.train_batch(c.batch_size, c.seq_len, data_gen)
        return x.to(device), y.to(device)

    def loss_of(model: torch.nn.Module, xy: Any) -> torch.Tensor:
        return model(*xy)[1]

    rows = _trace(s.model, s.optimizer, taps, batch, loss_of, steps=c.steps, lr=c.lr,
                  grad_clip=o.grad_clip)
    cell = {"param": cfg.param.name, "width": cfg.model.width, "density": cfg.model.density,
            "seed": cfg.seed}
    return [{**cell, **r} for r in rows]


def _trace(model: torch.nn.Module, opt: torch.optim.Optimizer,
           taps: dict[str, list[torch.nn.Module]], batch: Callable[[], Any],
           loss_of: Callable[[torch.nn.Module, Any], torch.Tensor], *, steps: int, lr: float,
           grad_clip: float) -> list[dict[str, Any]]:
    """The measurement both checks share: `steps` updates at a constant LR (times each group's
    `lr_mult`), mean |output| of every tapped module kind at the forward pass of each step.

    Rows: step, module, l1; step 1 is the forward pass at init, step t the one before update t.
    """
    # One list of scalar tensors per kind, refilled by every forward pass. Kept on the device
    # until the step ends: one host sync per step, not one per hook.
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in taps}

    def hook_for(kind: str) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is not None:
                seen[kind].append(t.detach().abs().mean())

        return hook

    handles = [mod.register_forward_hook(hook_for(kind))
               for kind, mods in taps.items() for mod in mods]
    rows: list[dict[str, Any]] = []
    try:
        model.train()
        for step in range(1, steps + 1):
            # Constant LR, no warm-up: the check wants the large-LR regime from the first update.
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            for v in seen.values():
                v.clear()
            loss = loss_of(model, batch())  # the row for `step`: before update `step`
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            for kind in taps:
                l1 = float(torch.stack(seen[kind]).mean()) if seen[kind] else math.nan
                rows.append({"step": step, "module": kind, "l1": l1})
    finally:
        for h in handles:
            h.remove()
    return rows


def measure(cfg: Config, *, corpus: Corpus | None = None, progress: bool = True) -> pd.DataFrame:
    """Run the coordinate check and return the tidy table (columns COORD_COLUMNS).

    Every param x cell x seed gets a fresh model built by `train.setup` (the real code path,
    so a bug in init, masks or LR groups is measured, not bypassed). The corpus is loaded once
    and shared. Rows: one per param x cell x seed x step x module; step 1 is the forward pass at
    init, step t the forward pass before update t.
    """
    check_cells(cfg)
    c = cfg.coord
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if corpus is None:
        from spartune.train import corpus_for

        corpus = corpus_for(cfg)
    grid = cells(c)
    runs = [(p, w, d, s) for p in c.params for (w, d) in grid for s in c.seeds]
    bar = _progress(len(runs) * c.steps, progress)
    rows: list[dict[str, Any]] = []
    try:
        for param, width, density, seed in runs:
            cell_cfg = cell_config(cfg, param, width, density, seed)
            if bar is not None:
                bar.set_postfix_str(f"{param} w={width} d={density:g} seed={seed}", refresh=False)
            rows += _measure_cell(cell_cfg, corpus)
            if bar is not None:
                bar.update(c.steps)
    finally:
        if bar is not None:
            bar.close()
    df = pd.DataFrame(rows, columns=COORD_COLUMNS)
    return df.astype({"width": int, "density": float, "seed": int, "step": int, "l1": float})


# -- the verdict (pure pandas: works on a coord.csv read back from disk) ------------------------


def _ratio(values: Iterable[float]) -> float:
    """max/min of positive values; inf if any is non-finite or <= 0 (a blow-up or a collapse)."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return math.nan
    if not np.all(np.isfinite(v)) or v.min() <= 0:
        return math.inf
    return float(v.max() / v.min())


def spreads(df: pd.DataFrame, *, steps: Iterable[int] | None = None,
            hidden: Sequence[str] = HIDDEN_MODULES) -> pd.DataFrame:
    """Per (param, hidden module): the worst max/min ratio of mean |activation| across cells.

    Seeds are averaged first (per cell and step), so the spread measures a systematic trend with
    width or density, not seed noise. The worst step counts because SμPar must hold after
    updates too, not just at init. `width_spread` uses only the cells at the densest density
    (1.0 under the cross grid), `density_spread` only the cells at the largest width, so a
    failure says which rule (width or density) is off. `steps` restricts the steps considered
    (e.g. `steps=[1]` for init only). A non-finite or zero activation makes the spread inf.

    Columns: param, module, spread, worst_step, width_spread, density_spread.
    """
    out_cols = ["param", "module", "spread", "worst_step", "width_spread", "density_spread"]
    h = df[df["module"].isin(list(hidden))].copy()
    if steps is not None:
        h = h[h["step"].isin(list(steps))]
    if h.empty:
        return pd.DataFrame(columns=out_cols)
    # NaN would be skipped by mean(); a diverged seed must instead poison its cell.
    h["l1"] = h["l1"].where(np.isfinite(h["l1"]), np.inf)
    cell = (h.groupby(["param", "module", "step", "width", "density"], sort=False)["l1"]
            .mean().reset_index())
    wmax, dmax = cell["width"].max(), cell["density"].max()
    rows = []
    params = list(dict.fromkeys(cell["param"]))
    for param in params:
        for module in hidden:
            g = cell[(cell["param"] == param) & (cell["module"] == module)]
            if g.empty:
                continue
            by_step = {int(s): _ratio(gs["l1"]) for s, gs in g.groupby("step")}
            # worst step: the largest spread (nan counts as worst, so it cannot hide).
            worst = max(by_step, key=lambda s: math.inf if math.isnan(by_step[s]) else by_step[s])
            width_sp = [_ratio(gs.loc[gs["density"] == dmax, "l1"]) for _, gs in g.groupby("step")]
            dens_sp = [_ratio(gs.loc[gs["width"] == wmax, "l1"]) for _, gs in g.groupby("step")]
            rows.append({
                "param": param, "module": module, "spread": by_step[worst], "worst_step": worst,
                "width_spread": _worst(width_sp), "density_spread": _worst(dens_sp),
            })
    return pd.DataFrame(rows, columns=out_cols)


def _worst(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return max(vals) if vals else math.nan


def verdict(spreads_df: pd.DataFrame, tolerance: float, param: str = "supar", *,
            hidden: Sequence[str] = HIDDEN_MODULES) -> tuple[bool, list[str]]:
    """Pass iff every hidden module of `param` spreads at most `tolerance` (max/min).

    The other parameterizations are reported for contrast only: SP and µP are expected to drift
    with density (and SP with width), which is what makes a flat SμPar line meaningful. A
    missing or NaN spread fails: an unmeasured check must never read as a pass.
    """
    lines: list[str] = []
    ok, found = True, False
    pw = max([len(str(p)) for p in spreads_df["param"]] + [len(param)])
    mw = max(len(m) for m in hidden)
    for r in spreads_df.itertuples(index=False):
        line = (f"{r.param:<{pw}}  {r.module:<{mw}}  spread {r.spread:.2f}x "
                f"(width {r.width_spread:.2f}x, density {r.density_spread:.2f}x, "
                f"worst at step {r.worst_step})")
        if r.param == param:
            found = True
            passed = bool(r.spread <= tolerance)  # NaN compares False: fails
            ok &= passed
            line += "  PASS" if passed else f"  FAIL (tolerance {tolerance:g}x)"
        elif r.param in BASELINES:
            line += "  expected to drift"
        else:
            line += "  (not counted)"
        lines.append(line)
    present = set(spreads_df.loc[spreads_df["param"] == param, "module"])
    for module in hidden:
        if module not in present:
            found = False
            lines.append(f"{param:<{pw}}  {module:<{mw}}  not measured  FAIL")
    return ok and found, lines


def diagnosis(df: pd.DataFrame, param: str = "supar", min_weights: int = 16) -> str | None:
    """The spreads again without the base width (m_d = 1) and the cells whose hidden neurons
    keep fewer than `min_weights` weights: what is left once the regimes the rules do not
    promise are out (SUPAR.md §1: the derivation assumes many weights per neuron). None when
    nothing would be left out or nothing would remain."""
    d = df[df["param"] == param]
    if d.empty:
        return None
    base, wmax = d["width"].min(), d["width"].max()
    keep = d[(d["width"] > base) & (d["width"] * d["density"] >= min_weights)]
    if keep.empty or len(keep) == len(d):
        return None
    return (f"diagnosis: {param} without the base width {base} (m_d = 1) and the cells with "
            f"fewer than {min_weights} weights per neuron in qkv/mlp_up (width {wmax} at density "
            f"< {min_weights / wmax:g}): " + ", ".join(f"{r.module} {r.spread:.2f}x"
                                                      for r in spreads(keep).itertuples()))


def main(cfg: Config, out_dir: Path) -> bool:
    """`spartune-coord`: measure, write coord.csv, coord_spreads.csv and the figure, judge.

    Returns whether SμPar passed (the CLI exits 1 otherwise); SP and µP are measured alongside
    as the contrast. If `supar` is not among `coord.params`, the first listed one is judged.
    """
    from spartune import plot

    check_cells(cfg)
    c = cfg.coord
    judged = "supar" if "supar" in c.params else c.params[0]
    out_dir = Path(out_dir)
    tic = time.perf_counter()
    df = measure(cfg, progress=cfg.train.progress)
    seconds = time.perf_counter() - tic
    sp = spreads(df)
    ok, lines = verdict(sp, c.tolerance, param=judged)

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, spreads_path = out_dir / "coord.csv", out_dir / "coord_spreads.csv"
    df.to_csv(csv_path, index=False)
    sp.to_csv(spreads_path, index=False)
    fig_paths = plot.save(plot.coord_figure(df), out_dir / "figures" / "coord_check")

    n_cells = len(cells(c))
    print(f"coordinate check: {len(c.params)} params x {n_cells} cells x {len(c.seeds)} seeds x "
          f"{c.steps} steps, lr {c.lr:g}, in {seconds:.1f} s")
    print(f"spread = max/min of mean |activation| across cells, worst step; "
          f"tolerance {c.tolerance:g}x for {judged}")
    for line in lines:
        print(line)
    for module in HIDDEN_MODULES:
        per_step = [spreads(df, steps=[t]) for t in range(1, c.steps + 1)]
        vals = [float(p.loc[(p["param"] == judged) & (p["module"] == module), "spread"].iloc[0])
                for p in per_step if not p.empty and (p["param"] == judged).any()]
        print(f"{judged} {module} spread by step: " + " ".join(f"{v:.2f}" for v in vals))
    note = diagnosis(df, judged)
    if note:
        print(note)
    print(f"coordinate check {'PASSED' if ok else 'FAILED'} for {judged}")
    for path in [csv_path, spreads_path, *fig_paths]:
        print(f"wrote {path}")
    return ok


# -- the same check on any model factory --------------------------------------------------------


@dataclass
class CoordResult:
    """What `coord_check` measured: the tidy table (COORD_COLUMNS), the spreads, the verdict."""

    table: pd.DataFrame
    spreads: pd.DataFrame
    passed: bool
    lines: list[str]

    def __str__(self) -> str:
        judged = "PASSED" if self.passed else "FAILED"
        return "\n".join([*self.lines, f"coordinate check {judged}"])


def coord_check(
    make_model: Callable[..., Any],
    widths: Sequence[int],
    densities: Sequence[float],
    *,
    data: Callable[[torch.Generator], Any],
    loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    params: Sequence[str] = ("sp", "mup", "supar"),
    taps: dict[str, list[str]] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 10,
    lr: float = 0.01,
    grid: str = "cross",
    tolerance: float = 2.5,
    grad_clip: float = 1.0,
    optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
    judge: str = "supar",
) -> CoordResult:
    """`spartune-coord` on a model of your own: is activation scale flat in width and density?

    make_model(width=, density=, param=, seed=) returns a model `spartune.parameterize` has
        been applied to (or the pair (model, handle)); it is called once per param x cell x seed
    data(generator) returns one batch; every cell draws from a generator seeded with the seed,
        so cells differ only in shape and parameterization
    loss(model, batch) -> scalar; default: model(**batch) for a dict, model(x, labels=y) when
        the forward takes `labels` (HF), else model(*batch); the output's `.loss` if it has
        one, else [1] of a tuple (logits, loss)
    taps {kind: [module-name globs]}: whose outputs to measure; default: the embeddings, each
        hidden layer (digit components of its name as '*'), the readout ("logits"). A module
        returning a tuple, dict or ModelOutput is measured by its first tensor. Kinds
        other than embedding and logits are judged; name them attn / mlp (the blocks' outputs)
        to get the built-in check's figure from `spartune.plot.coord_figure(result.table)`
    optimizer(groups) builds the optimizer from `handle.param_groups(lr)`; default AdamW
        (betas 0.9, 0.95, no weight decay)

    Returns the tidy table (columns COORD_COLUMNS), the spreads and the verdict on `judge`
    (SμPar by default; SP and µP are measured as the drift it is compared with).
    """
    from spartune.parameterizer import parameterization

    c = CoordConfig(params=list(params), widths=list(widths), densities=list(densities),
                    grid=grid, seeds=list(seeds), steps=steps, lr=lr, tolerance=tolerance)
    validate_coord(c, ModelConfig(head_size=1))
    rows: list[dict[str, Any]] = []
    kinds: list[str] = []
    for param in params:
        for width, density in cells(c):
            for seed in seeds:
                built = make_model(width=width, density=density, param=param, seed=seed)
                model, sm = built if isinstance(built, tuple) else (built, None)
                sm = sm or parameterization(model)
                if sm is None:
                    raise ConfigError("make_model", "must return a model spartune.parameterize "
                                      "was applied to (or the pair (model, handle))")
                groups = sm.param_groups(lr)
                opt = (optimizer(groups) if optimizer is not None
                       else torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0))
                tapped = _taps(model, sm, taps)
                kinds = list(dict.fromkeys([*kinds, *tapped]))
                gen = torch.Generator().manual_seed(seed)
                cell = {"param": param, "width": width, "density": density, "seed": seed}
                trace = _trace(model, opt, tapped, lambda g=gen: data(g), loss or _default_loss,
                               steps=steps, lr=lr, grad_clip=grad_clip)
                rows += [{**cell, **r} for r in trace]
    df = pd.DataFrame(rows, columns=COORD_COLUMNS)
    df = df.astype({"width": int, "density": float, "seed": int, "step": int, "l1": float})
    hidden = [k for k in kinds if k not in ("embedding", "logits")]
    sp = spreads(df, hidden=hidden)
    judged = judge if judge in params else params[0]
    ok, lines = verdict(sp, tolerance, param=judged, hidden=hidden)
    return CoordResult(df, sp, ok, lines)


def _first_tensor(output: Any) -> torch.Tensor | None:
    """What a tap measures of a module's output: the tensor itself, or the first tensor of a
    tuple, list, dict or HF `ModelOutput` (an attention module returns (output, weights))."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, tuple | list):
        for item in output:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """model(**batch) for a dict; model(x, labels=y) for a pair when the forward takes `labels`
    (HF: the second positional argument is the KV cache); else model(*batch). The loss is the
    output's `.loss` when it has one (HF's ModelOutput), else [1] of a tuple (logits, loss)."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, tuple | list):
        takes_labels = "labels" in inspect.signature(model.forward).parameters
        if takes_labels and len(batch) == 2:
            out = model(batch[0], labels=batch[1])
        else:
            out = model(*batch)
    else:
        out = model(batch)
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    return out[1] if isinstance(out, tuple) else out


def _taps(model: torch.nn.Module, sm: Any, taps: dict[str, list[str]] | None
          ) -> dict[str, list[torch.nn.Module]]:
    """Module kinds to measure: the user's globs, or embedding / each hidden layer / logits."""
    import fnmatch

    named = dict(model.named_modules())
    if taps is None:
        from spartune.parameterizer import _glob_of

        out: dict[str, list[torch.nn.Module]] = {"embedding": [named[n]
                                                               for n in sm.embeddings()]}
        for name, mod, _ in sm.hidden():
            out.setdefault(_glob_of(name), []).append(mod)
        out["logits"] = [named[n] for n in sm.readouts() if n in named]
        return {k: v for k, v in out.items() if v}
    result = {}
    for kind, globs in taps.items():
        mods = [m for n, m in named.items() if any(fnmatch.fnmatchcase(n, g) for g in globs)]
        if not mods:
            raise ConfigError(f"taps.{kind}", f"{globs} match no module of the model")
        result[kind] = mods
    return result
