"""`parameterize`: SP, µP or SμPar applied in place to any `torch.nn.Module`.

The rules are `params.py`'s table; this module only finds out, for a model it did not build,
which rule row each parameter is (its role), how far it is from the proxy (m_d, m_rho), and then
does what the row says: init std, Adam LR multiplier, forward multiplier, static mask. The
built-in GPT goes through here too (`model.build_model`), so there is one implementation.

Roles are inferred the way microsoft/mup's `set_base_shapes` does it: the same architecture built
at the proxy's width (`base`, shapes only, meta device is fine) is compared parameter by
parameter, and a dim that differs is width-like. Which dim of a weight is its fan-in is a fact
of its module (fanin.py: nn.Linear and convs (out, in, ...), HF's Conv1D (in, out), embedding
tables (num, dim)) or declared (`fan_in={glob: dim}`); roles, m_d and the `per_row` masks all
read it. For a weight with fan_out and fan_in dims:

    both dims width-like               hidden (masked, SμPar init and LR)
    only fan_in width-like             output: the readout mapping width to a fixed size
    only fan_out width-like            embedding: an input layer (a Linear from fixed features)
    owned by nn.Embedding              embedding (its table is (num, dim): no shape rule)
    vectors and scalars                bias if named *bias, else norm

A weight tied to an embedding is that embedding (one parameter, one group, embedding init and
LR); a module other than an nn.Embedding that also holds it is the readout (it gets the output
multiplier). `roles={glob: role}` overrides, `delta=` (a third width) finds width-like dims when
the model itself is at the base width (mup's `delta`), and anything left undecided ends in one
line naming the parameter and the override to use. A readout inside the network (width-like
fan-in, fixed fan-out in a block: GQA's key/value projections) is said in one line.

What stays the user's: the modules and their forward. Masks are buffers `<param>_mask` beside
the weight and gradients are masked by a hook (`sparsity.install_mask`), so every hidden
layer's `.weight` is still its dense weight with zeros at the masked positions; the forward
multipliers are forward hooks on the embedding and readout modules (or, with
`forward_hooks=False`, numbers the model applies itself: the built-in GPT does, to scale
whichever side of the readout matmul is smaller). `sparse_impl="compressed"` (or `auto`'s
pick) replaces a masked nn.Linear / Conv1D by a `layouts.CompressedLinear` that answers the same
questions (`.weight`, `.weight_mask`, the same state dict keys). A `state_dict` round trip needs
nothing special: call `parameterize` on the fresh model (roles, multipliers and mask buffers
appear), then `load_state_dict` (the saved masks replace the drawn ones, masked entries are
re-zeroed). A checkpoint that lost its mask buffers (HF's `from_pretrained`) keeps its zeros:
`parameterize(init=False)` takes the masks from them (`_adopted`). HF attention modules get
their softmax scale (`attention="auto"`).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from spartune.config import MASK_KINDS, PARAMETERIZATIONS, ConfigError
from spartune.fanin import fan_dims, fan_in_size, is_hf_conv1d
from spartune.layouts import IMPLS, CompressedLinear, choose
from spartune.params import (
    MIN_WEIGHTS_PER_NEURON,
    ROLES,
    Role,
    attention_scale,
    expected_fan_in,
    layer_scale,
)
from spartune.sparsity import LAYOUTS, mask_name, random_mask

if TYPE_CHECKING:
    import pandas as pd

_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
ATTENTION_MODES = ("auto", "none")
log = logging.getLogger(__name__)
_WARNED: set[tuple[Any, ...]] = set()  # lines said once per process (a sweep's every trial)
_HANDLES: weakref.WeakKeyDictionary[nn.Module, Parameterization] = weakref.WeakKeyDictionary()


@dataclass
class ParamInfo:
    """What the parameterization does to one parameter: a row of `Parameterization.table()`."""

    name: str  # the parameter's first name in model.named_parameters()
    role: Role
    shape: tuple[int, ...]
    module: str  # the module that owns `name`
    width_mult: float  # m_d: fan_in / base fan_in (hidden, output); 1 otherwise
    density: float
    density_mult: float  # m_rho = density / base_density (hidden); 1 otherwise
    init_std: float  # nan: constant init (norm 1, bias 0), or a tied alias
    lr_mult: float
    forward_mult: float  # multiplier of the owning module's output (embedding, output)
    residual: bool = False
    tied_to: str = ""  # set on a readout row whose weight is an embedding's
    layout: str = ""  # sparse layout of a masked hidden layer
    fan_in_dim: int = 1  # the weight's fan-in dim (fanin.py): 1 for (out, in), 0 for (in, out)

    @property
    def decays(self) -> bool:
        """Weight decay on matrices (hidden, embedding, output), never on vectors."""
        return self.role in ("hidden", "embedding", "output")


class Parameterization:
    """The handle `parameterize` returns: groups for any optimizer, the table, the scales."""

    def __init__(self, model: nn.Module, param: str, rows: list[ParamInfo],
                 params: dict[str, nn.Parameter], modules: dict[str, nn.Module]) -> None:
        self.param = param
        self.rows = rows
        self._params = params
        # Not the root: the registry maps model -> handle (and the built-in GPT holds its
        # handle), so a reference back to it would keep every model of a sweep alive. No weak
        # reference either: `torch.save(model)` must be able to pickle the handle.
        self._modules = {k: v for k, v in modules.items() if v is not model}
        self.attention_modules: list[str] = []  # where attention="auto" set `scaling`

    # -- for the optimizer ---------------------------------------------------------------------

    def param_groups(self, lr: float, weight_decay: float = 0.0, *,
                     wd_independent: bool = True) -> list[dict[str, Any]]:
        """Plain dicts (`params`, `lr`, `lr_mult`, `weight_decay`) for any torch optimizer.

        `lr` is eta_base, the proxy's tuned LR; each group's `lr` is eta_base * `lr_mult`.
        A schedule must multiply `lr_mult`, never overwrite the groups with one LR (the most
        common way to lose µP's LR rule):

            for g in opt.param_groups:
                g["lr"] = base_lr * schedule(step) * g["lr_mult"]

        Weight decay applies to matrices only. With `wd_independent` (spartune's default),
        a group's decay is `weight_decay / lr_mult`, so AdamW's per-step decay lr * wd is
        eta_base * wd in every group, as on the dense proxy; False gives torch's coupling.
        Tied weights are one parameter in one group.
        """
        buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for r in self.rows:
            if r.tied_to:
                continue  # the readout holding an embedding's weight: that group has it
            buckets.setdefault((r.lr_mult, r.decays), []).append(self._params[r.name])
        groups = []
        for (lr_mult, decay), ps in buckets.items():
            wd = weight_decay if decay else 0.0
            if wd_independent and decay:
                wd = weight_decay / lr_mult
            groups.append({"params": ps, "lr": lr * lr_mult, "lr_mult": lr_mult,
                           "weight_decay": wd})
        return groups

    def relayout(self, name: str, module_name: str, module: nn.Module, param: nn.Parameter,
                 layout: str) -> None:
        """A layout that replaced a hidden layer's module (layouts.apply_layout: a compressed
        layer trains its non-zero `values`, not a dense `weight`) registers the new module and
        parameter here, so `param_groups` hands the optimizer what trains. The rules do not
        change: the row keeps its role, init and LR multiplier."""
        self._params[name] = param
        self._modules[module_name] = module
        for r in self.rows:
            if r.name == name:
                r.layout = layout

    def rebind(self, model: nn.Module) -> None:
        """Re-read every parameter from `model` by its name, after something replaced the
        parameter objects: FSDP2's `fully_shard` swaps each for a DTensor shard, so groups
        built from the old objects would train tensors the model no longer uses. Roles, LR
        and forward multipliers are per name (the rows), so they carry over unchanged.
        `spartune.sharding.shard` calls this; a name the model does not have as a parameter
        (a compressed layer's `values`, registered by `relayout`) keeps its binding."""
        for name in self._params:
            try:
                self._params[name] = model.get_parameter(name)
            except AttributeError:
                pass

    # -- what it did ---------------------------------------------------------------------------

    def table(self) -> pd.DataFrame:
        """One row per parameter (and per tied readout): name, role, shape, density, init_std,
        lr_mult, forward_mult, plus width_mult, density_mult, residual, tied_to, layout and
        fan_in_dim (the dim m_d and the per-neuron mask count are read along)."""
        import pandas as pd

        return pd.DataFrame([{
            "name": r.name, "role": r.role, "shape": r.shape, "density": r.density,
            "init_std": r.init_std, "lr_mult": r.lr_mult, "forward_mult": r.forward_mult,
            "width_mult": r.width_mult, "density_mult": r.density_mult, "residual": r.residual,
            "tied_to": r.tied_to, "layout": r.layout, "fan_in_dim": r.fan_in_dim,
        } for r in self.rows])

    def attention_scale(self, head_dim: int) -> float:
        """Softmax scale of QK^T: 1/sqrt(head_dim) under SP, 1/head_dim under the µP family."""
        return attention_scale(self.param, head_dim)

    @property
    def input_mult(self) -> float:
        """The embedding output's forward multiplier (alpha_input)."""
        return next((r.forward_mult for r in self.rows if r.role == "embedding"), 1.0)

    @property
    def output_mult(self) -> float:
        """The readout's forward multiplier (alpha_output / m_d under µP and SμPar)."""
        return next((r.forward_mult for r in self.rows if r.role == "output"), 1.0)

    def hidden(self) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
        """(module name, module, weight) of every hidden layer, in model order."""
        for r in self.rows:
            if r.role == "hidden":
                yield r.module, self._modules[r.module], self._params[r.name]

    def readouts(self) -> list[str]:
        """Names of the modules whose output gets the output multiplier."""
        return [r.module for r in self.rows if r.role == "output"]

    def embeddings(self) -> list[str]:
        """Names of the modules whose output gets the input multiplier."""
        return list(dict.fromkeys(r.module for r in self.rows if r.role == "embedding"))

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Zero the masked entries again: for code that writes hidden weights directly (a
        compressed layer stores only its non-zeros: nothing to zero)."""
        for r in self.rows:
            if r.role == "hidden" and r.layout != "compressed":
                m = self._modules[r.module]._buffers.get(mask_name(_leaf(r.name)))
                if m is not None:
                    self._params[r.name].mul_(m)

    def n_params(self) -> int:
        """Parameters of the architecture (a compressed layer counts its dense shape)."""
        return sum(math.prod(r.shape) for r in self.rows if not r.tied_to)

    def n_nonzero_params(self) -> int:
        """Parameters that can be non-zero: masked entries of hidden weights do not count."""
        masked = 0
        for r in self.rows:
            m = getattr(self._modules[r.module], mask_name(_leaf(r.name)), None)
            if r.role == "hidden" and isinstance(m, Tensor):
                masked += int(m.numel() - m.sum())
        return self.n_params() - masked


def parameterization(model: nn.Module) -> Parameterization | None:
    """The handle of a model `parameterize` has been applied to, else None."""
    return _HANDLES.get(model)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _matches(pattern: str, *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def _names_by_param(module: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter (a tied one has several), in model order."""
    out: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _shapes(module: nn.Module, field: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(module, nn.Module):
        raise ConfigError(field, f"must be an nn.Module (the same architecture at the proxy's "
                                 f"width), got {type(module).__name__}")
    return {n: tuple(p.shape) for n, p in module.named_parameters(remove_duplicate=False)}


def _check_float(value: Any, field: str, *, low_open: float = 0.0, high: float = math.inf) -> None:
    ok = isinstance(value, int | float) and math.isfinite(value) and low_open < value <= high
    if not ok:
        bound = f"({low_open:g}, {high:g}]" if math.isfinite(high) else f"> {low_open:g}"
        raise ConfigError(field, f"must be {bound}, got {value!r}")


def parameterize(
    model: nn.Module,
    *,
    base: nn.Module,
    param: str = "supar",
    density: float | Mapping[str, float] = 1.0,
    init_std: float = 0.02,
    alpha_input: float = 1.0,
    alpha_output: float = 1.0,
    base_density: float = 1.0,
    roles: Mapping[str, str] | None = None,
    delta: nn.Module | None = None,
    readout: str | None = None,
    residual: tuple[str, ...] | list[str] = (),
    depth: int | None = None,
    mask_kind: str = "per_row",
    mask_seed: int = 0,
    seed: int | None = 0,
    init: bool = True,
    forward_hooks: bool = True,
    sparse_impl: str | Mapping[str, str] = "masked",
    fan_in: Mapping[str, int] | None = None,
    attention: str = "auto",
) -> Parameterization:
    """Apply a parameterization to `model` in place; return its handle.

    model         built at the target width (on any device)
    base          the same architecture at the proxy's width: shapes only (meta device is fine);
                  m_d of a layer is its fan_in over the base's
    param         sp | mup | supar | supar_init_only | supar_lr_only (params.RULES)
    density       one float for every hidden layer, or {glob: density} over module (or
                  parameter) names, first match wins, unmatched hidden layers stay dense
    init_std      sigma_base; alpha_input / alpha_output: the tuned forward multipliers
    base_density  the proxy's density (m_rho = density / base_density)
    roles         {glob over parameter names: role} overriding the inference
    delta         a third width of the architecture: width-like dims are where base and delta
                  differ (needed when the model is itself at the base width)
    readout       the module whose output is the logits, when no module holds the readout
                  weight (a functional `h @ wte.weight.T`)
    residual, depth  hidden layers (globs) writing into the residual stream get GPT-2's
                  1/sqrt(2 depth) init factor
    mask_kind, mask_seed  static masks (sparsity.random_mask) drawn in model order from one
                  seeded CPU generator: the same seed gives the same masks on any device
    seed          init generator seed (None: torch's global RNG); init=False keeps the values
                  (then parameterize a fresh model and load a state dict)
    forward_hooks False: install no hooks; the model applies `input_mult` / `output_mult`
    sparse_impl   layout of the masked hidden layers, one name or {glob: name}: masked (dense
                  weight, masked gradient) | compressed (non-zeros only, layouts.py; nn.Linear
                  and HF Conv1D layers) | auto (compressed where layouts.choose measured it
                  faster, on the weight's device)
    fan_in        {glob over parameter names: dim}: the fan-in dim of weights whose module
                  does not say it (fanin.py knows nn.Linear / conv (out, in, ...), HF Conv1D
                  (in, out), nn.Embedding (num, dim)); m_d, roles and per_row masks read it
    attention     auto: set the softmax scale (1/head_dim under the µP family, 1/sqrt(head_dim)
                  under SP) on every module exposing HF's `scaling` and `head_dim`, and log how
                  many (a warning, once, when none is found under the µP family); none: leave
                  them (the model applies `handle.attention_scale(head_dim)`)

    With init=False, a hidden weight that already holds a sparsity pattern (a trained sparse
    checkpoint loaded without its mask buffers, e.g. through HF's from_pretrained) keeps it as
    its mask; a pattern that the requested density cannot hold is refused, naming the layer.
    """
    if parameterization(model) is not None:
        raise ConfigError("model", "is already parameterized; build a fresh model (to restore "
                                   "a checkpoint: parameterize the fresh model, then load it)")
    if param not in PARAMETERIZATIONS:
        raise ConfigError("param", f"unknown parameterization {param!r}; choose one of "
                                   f"{', '.join(PARAMETERIZATIONS)}")
    if mask_kind not in MASK_KINDS:
        raise ConfigError("mask_kind", f"unknown mask kind {mask_kind!r}; choose one of "
                                       f"{', '.join(MASK_KINDS)}")
    for value, field in [(init_std, "init_std"), (alpha_input, "alpha_input"),
                         (alpha_output, "alpha_output")]:
        _check_float(value, field)
    _check_float(base_density, "base_density", high=1.0)
    if attention not in ATTENTION_MODES:
        raise ConfigError("attention", f"unknown mode {attention!r}; choose one of "
                                       f"{', '.join(ATTENTION_MODES)}")

    names = _names_by_param(model)
    params = {n[0]: p for p in model.parameters() for n in [names[id(p)]]}
    modules = dict(model.named_modules(remove_duplicate=False))
    base_shapes = _shapes(base, "base")
    delta_shapes = _shapes(delta, "delta") if delta is not None else None
    for name, p in params.items():
        if name not in base_shapes:
            raise ConfigError("base", f"has no parameter {name!r}: build the same architecture "
                                      "at the proxy's width")
        if p.dim() != len(base_shapes[name]):
            raise ConfigError("base", f"{name} has {len(base_shapes[name])} dims in base, "
                                      f"{p.dim()} in the model: not the same architecture")

    fans = _fans(params, names, modules, fan_in or {})
    role_of, inferred = _roles(params, names, modules, base_shapes, delta_shapes, roles or {},
                               fans)
    _say_fixed_fan_out(role_of, inferred, params)
    readouts = _readouts(params, names, modules, role_of, readout)
    dens = _densities(params, role_of, density)
    impls = _layouts(params, role_of, dens, sparse_impl, names, modules, fans)
    residual = list(residual)
    _unused(residual, [n for n, r in role_of.items() if r == "hidden"], "residual")
    if residual and depth is None:
        raise ConfigError("depth", "residual layers need depth= (the number of blocks) for "
                                   "their 1/sqrt(2 depth) init factor")

    rows: list[ParamInfo] = []
    for name, p in params.items():
        role = role_of[name]
        shape = tuple(p.shape)
        fi = fans[name][1]
        m_d = _width_mult(shape, base_shapes[name], fi) if role in ("hidden", "output") else 1.0
        d = dens.get(name, 1.0)
        m_rho = d / base_density if role == "hidden" else 1.0
        is_res = role == "hidden" and any(_matches(g, name, _owner(name)) for g in residual)
        s = layer_scale(param, role, width_mult=m_d, density_mult=m_rho,
                        alpha_input=alpha_input, alpha_output=alpha_output,
                        residual_depth=depth if is_res else None)
        std = init_std * s.init if role in ("hidden", "embedding", "output") else math.nan
        fwd = s.out if role in ("embedding", "output") else 1.0
        owner = _embedding_owner(names[id(p)], modules) if role == "embedding" else _owner(name)
        rows.append(ParamInfo(name, role, shape, owner, m_d, d, m_rho, std, s.lr, fwd,
                              is_res, layout=impls.get(name, ""), fan_in_dim=fi))
    for module_name, weight_name in readouts:
        shape = tuple(params[weight_name].shape)
        # h @ table^T: the readout's fan-in is the embedding's output dim
        fi = fans[weight_name][0]
        m_d = _width_mult(shape, base_shapes[weight_name], fi)
        s = layer_scale(param, "output", width_mult=m_d, alpha_output=alpha_output)
        emb = next(r for r in rows if r.name == weight_name)
        rows.append(ParamInfo(f"{module_name}.{_leaf(weight_name)}" if module_name else
                              weight_name, "output", shape, module_name, m_d, 1.0, 1.0,
                              math.nan, emb.lr_mult, s.out, tied_to=weight_name,
                              fan_in_dim=fi))

    _warn_few_weights(rows, mask_kind)
    _install_masks(rows, params, modules, mask_kind, mask_seed, adopt=not init)
    if init:
        _init(rows, params, modules, seed)
    if forward_hooks:
        _install_hooks(rows, modules)
    handle = Parameterization(model, param, rows, params, modules)
    _compress(model, handle, rows, params, modules)
    handle.attention_modules = _set_attention(model, param, attention)
    _HANDLES[model] = handle
    return handle


# -- roles ------------------------------------------------------------------------------------


def _roles(params: dict[str, nn.Parameter], names: dict[int, list[str]],
           modules: dict[str, nn.Module], base: dict[str, tuple[int, ...]],
           delta: dict[str, tuple[int, ...]] | None, overrides: Mapping[str, str],
           fans: dict[str, tuple[int, int]]) -> tuple[dict[str, Role], set[str]]:
    """Every parameter's role, and the names whose role was inferred (not given)."""
    for glob, role in overrides.items():
        if role not in ROLES:
            raise ConfigError(f"roles.{glob}", f"{role!r} is not a role; choose one of "
                                               f"{', '.join(ROLES)}")
    all_names = [n for p in params.values() for n in names[id(p)]]
    _unused(list(overrides), all_names, "roles")
    undecided = []
    out: dict[str, Role] = {}
    for name, p in params.items():
        first = names[id(p)][0]
        given = next((r for g, r in overrides.items() if _matches(g, first)), None)
        if given is None:
            given = next((r for g, r in overrides.items()
                          for alias in names[id(p)][1:] if _matches(g, alias) and r != "output"),
                         None)
        if given is not None:
            out[name] = given  # type: ignore[assignment]
            continue
        role = _infer(names[id(p)], tuple(p.shape), modules, base[name],
                      delta[name] if delta is not None and name in delta else None, fans[name])
        if role is None:
            undecided.append(name)
        else:
            out[name] = role
    if undecided:
        name = undecided[0]
        same_everywhere = delta is None and all(
            tuple(p.shape) == base[n] for n, p in params.items())
        if same_everywhere:
            raise ConfigError("base", "has the same shape as the model in every parameter, so "
                              "no dimension is width-like: build base at the proxy's width "
                              "(different from the model's), or pass delta= the architecture "
                              "at a third width when the model is at the base width")
        shape = "x".join(map(str, params[name].shape))
        raise ConfigError("roles", f"cannot infer the role of {name} ({shape}): no dimension "
                          "differs from base's, so it is not width-like; say which it is, e.g. "
                          f"roles={{'{_glob_of(name)}': 'hidden'}} (roles: {', '.join(ROLES)})")
    inferred = {n for n in out if not any(_matches(g, *names[id(params[n])]) for g in overrides)}
    return out, inferred


def _fans(params: dict[str, nn.Parameter], names: dict[int, list[str]],
          modules: dict[str, nn.Module], declared: Mapping[str, int]
          ) -> dict[str, tuple[int, int]]:
    """(fan_out dim, fan_in dim) of every parameter: declared by `fan_in=`, else what its
    module's type says (fanin.py). A tied weight is read as its embedding's table."""
    for g, d in declared.items():
        if not isinstance(d, int) or isinstance(d, bool):
            raise ConfigError(f"fan_in.{g}", f"must be a dim (0 or 1), got {d!r}")
    _unused(list(declared), [n for p in params.values() for n in names[id(p)]], "fan_in")
    out = {}
    for name, p in params.items():
        aliases = names[id(p)]
        g = next((g for g in declared if _matches(g, *aliases)), None)
        try:
            out[name] = fan_dims(modules.get(_embedding_owner(aliases, modules)), p.dim(),
                                 declared[g] if g is not None else None)
        except ValueError as e:
            raise ConfigError(f"fan_in.{g}", f"{name}: {e}") from None
    return out


def _say_fixed_fan_out(role_of: dict[str, Role], inferred: set[str],
                       params: dict[str, nn.Parameter]) -> None:
    """One line when a width-like fan-in meets a fixed fan-out inside the network (a block's
    layer: GQA's k/v projections with a fixed number of key/value heads), saying what it gets.
    """
    inside = [n for n in params if n in inferred and role_of[n] == "output"
              and _glob_of(n) != n]
    if not inside:
        return
    globs = list(dict.fromkeys(_glob_of(n) for n in inside))
    log.warning("%d weights inside the network (%s) have a width-like fan-in and a fixed "
                "fan-out (e.g. GQA's key/value heads): they get µP's readout rule (dense, init "
                "sigma_base, LR eta_base, output x alpha_output/m_d); to treat them as hidden "
                "layers pass roles={%s}", len(inside), ", ".join(globs),
                ", ".join(f"'{g}': 'hidden'" for g in globs))


def _glob_of(name: str) -> str:
    """A glob for every block's copy of a parameter: digits-only components become '*'."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _infer(aliases: list[str], shape: tuple[int, ...], modules: dict[str, nn.Module],
           base: tuple[int, ...], delta: tuple[int, ...] | None,
           fan: tuple[int, int]) -> Role | None:
    name = aliases[0]
    if any(isinstance(modules.get(_owner(a)), _EMBEDDING_TYPES) for a in aliases):
        return "embedding"
    if len(shape) <= 1:
        return "bias" if _leaf(name) == "bias" else "norm"
    other = delta if delta is not None else shape
    fo, fi = fan
    fan_out, fan_in = base[fo] != other[fo], base[fi] != other[fi]
    if fan_out and fan_in:
        return "hidden"
    if fan_in:
        return "output"
    if fan_out:
        return "embedding"
    return None


def _width_mult(shape: tuple[int, ...], base: tuple[int, ...], fan_in_dim: int) -> float:
    """m_d of a weight: its fan_in over the base's, along the weight's own fan-in dim (fanin.py:
    1 for Linear's (out, in), 0 for HF Conv1D's (in, out); an embedding table used as a readout
    is read along its `dim`)."""
    return shape[fan_in_dim] / base[fan_in_dim] if len(shape) >= 2 else 1.0


def _embedding_owner(aliases: list[str], modules: dict[str, nn.Module]) -> str:
    """The module an embedding weight's input multiplier goes on: its nn.Embedding if any."""
    return next((_owner(a) for a in aliases
                 if isinstance(modules.get(_owner(a)), _EMBEDDING_TYPES)), _owner(aliases[0]))


def _readouts(params: dict[str, nn.Parameter], names: dict[int, list[str]],
              modules: dict[str, nn.Module], role_of: dict[str, Role],
              readout: str | None) -> list[tuple[str, str]]:
    """(module, weight) of every readout holding an embedding's weight (tied)."""
    out = []
    for name, p in params.items():
        if role_of[name] != "embedding":
            continue
        home = _embedding_owner(names[id(p)], modules)
        for alias in names[id(p)]:
            owner = _owner(alias)
            if owner != home and not isinstance(modules.get(owner), _EMBEDDING_TYPES):
                out.append((owner, name))
    has_output = any(r == "output" for r in role_of.values()) or out
    if readout is not None:
        if readout not in modules:
            raise ConfigError("readout", f"no module named {readout!r}")
        if any(_owner(n) == readout for n, r in role_of.items() if r == "output"):
            return out  # already the untied readout
        emb = next((n for n, r in role_of.items() if r == "embedding"
                    and not isinstance(modules.get(_owner(n)), nn.EmbeddingBag)), None)
        if emb is None:
            raise ConfigError("readout", "needs an embedding whose weight the readout uses")
        out = [o for o in out if o[0] != readout] + [(readout, emb)]
    elif not has_output:
        raise ConfigError("readout", "the model has no output layer (a weight whose fan_in "
                          "scales with width and fan_out does not, or a module tied to an "
                          "embedding): pass readout='NAME', the module whose output is the "
                          "logits, or roles={'NAME.weight': 'output'}")
    return out


# -- densities and layouts --------------------------------------------------------------------


def _unused(globs: list[str], names: list[str], field: str) -> None:
    """A glob that matches nothing is a typo: say so, with the names it could have matched."""
    owners = list(dict.fromkeys(_owner(n) for n in names))
    for g in globs:
        if not any(_matches(g, n, _owner(n)) for n in names):
            shown = ", ".join(dict.fromkeys(_glob_of(o) for o in owners if o)) or "none"
            what, have = (("parameter", "modules") if field in ("roles", "fan_in")
                          else ("hidden layer", "hidden layers"))
            raise ConfigError(f"{field}.{g}", f"matches no {what}; {have}: {shown}")


def _densities(params: dict[str, nn.Parameter], role_of: dict[str, Role],
               density: float | Mapping[str, float]) -> dict[str, float]:
    hidden = [n for n, r in role_of.items() if r == "hidden"]
    if isinstance(density, Mapping):
        _unused(list(density), hidden, "density")
        out = {}
        for g, d in density.items():
            _check_float(d, f"density.{g}", high=1.0)
        for n in hidden:
            out[n] = next((float(d) for g, d in density.items() if _matches(g, n, _owner(n))),
                          1.0)
        return out
    _check_float(density, "density", high=1.0)
    return {n: float(density) for n in hidden}


def _layouts(params: dict[str, nn.Parameter], role_of: dict[str, Role], dens: dict[str, float],
             impl: str | Mapping[str, str], names: dict[int, list[str]],
             modules: dict[str, nn.Module], fans: dict[str, tuple[int, int]]) -> dict[str, str]:
    """masked | compressed per masked hidden layer; `auto` asks layouts.choose (measured on the
    CPU) for the layer's (out, in) shape on its weight's device."""
    hidden = [n for n, r in role_of.items() if r == "hidden"]
    if isinstance(impl, Mapping):
        _unused(list(impl), hidden, "sparse_impl")
    out = {}
    for n in hidden:
        if dens[n] >= 1.0:
            continue
        field = "sparse_impl"
        choice = impl if isinstance(impl, str) else "masked"
        if isinstance(impl, Mapping):
            g = next((g for g in impl if _matches(g, n, _owner(n))), None)
            if g is not None:
                choice, field = impl[g], f"sparse_impl.{g}"
        if choice not in IMPLS:
            raise ConfigError(field, f"unknown sparse_impl {choice!r}; choose one of "
                                     f"{', '.join(IMPLS)}")
        owner = _owner(n)
        why = _not_compressible(n, params[n], modules.get(owner), len(names[id(params[n])]))
        if choice == "compressed" and why:
            raise ConfigError(field, f"compressed needs an nn.Linear or HF Conv1D layer, and "
                                     f"{owner or n} {why}: use masked for it")
        if choice == "auto":
            shape = tuple(params[n].shape)
            fo, fi = fans[n]
            choice = "masked" if why else choose((shape[fo], shape[fi]), dens[n],
                                                 params[n].device)
        out[n] = choice
    return out


def _not_compressible(name: str, p: nn.Parameter, module: nn.Module | None,
                      n_names: int) -> str:
    """Why the compressed layout cannot hold this weight ('' when it can): it replaces a
    Linear-like module (y = x W^T + b, or HF Conv1D's x W + b) by a CompressedLinear."""
    if module is not None and type(module) is not nn.Linear and not is_hf_conv1d(module):
        return f"is a {type(module).__name__}"
    if module is None or _leaf(name) != "weight" or p.dim() != 2:
        return "is not a module's 2-dim `weight`"
    if n_names > 1:
        return "shares its weight with another module"
    return ""


# -- what it does to the model -----------------------------------------------------------------


def _warn_few_weights(rows: list[ParamInfo], kind: str) -> None:
    """Below MIN_WEIGHTS_PER_NEURON non-zero inputs per neuron SμPar's law-of-large-numbers
    argument is weak (SUPAR.md §2.3): one line per layer shape, once per process (a sweep
    builds the same shapes in every trial)."""
    worst: dict[str, tuple[float, ParamInfo]] = {}
    for r in rows:
        if r.role != "hidden":
            continue
        wpn = expected_fan_in(fan_in_size(r.shape, r.fan_in_dim), r.density, kind)
        g = _glob_of(r.module)
        if wpn < MIN_WEIGHTS_PER_NEURON and (g not in worst or wpn < worst[g][0]):
            worst[g] = (wpn, r)
    lines = []
    for g, (wpn, r) in worst.items():
        key = (g, r.shape, r.density, kind)
        if key not in _WARNED:
            _WARNED.add(key)
            lines.append(f"{g} {wpn:.0f} (fan-in {fan_in_size(r.shape, r.fan_in_dim)} at "
                         f"density {r.density:g})")
    if lines:
        log.warning("hidden layers keeping fewer than %d weights per neuron: %s; SμPar's "
                    "law-of-large-numbers argument is weak there (SUPAR.md §2.3)",
                    MIN_WEIGHTS_PER_NEURON, ", ".join(lines))


def _compress(model: nn.Module, handle: Parameterization, rows: list[ParamInfo],
              params: dict[str, nn.Parameter], modules: dict[str, nn.Module]) -> None:
    """Replace every hidden layer whose layout is `compressed` (masks and init in place) by a
    CompressedLinear holding the same non-zeros, under every name the layer had; the handle
    then hands the optimizer its `values`."""
    for r in rows:
        if r.role != "hidden" or r.layout != "compressed":
            continue
        old = modules[r.module]
        new = CompressedLinear.from_module(old, transposed=r.fan_in_dim == 0)
        new.role, new.residual, new.density = "hidden", r.residual, r.density
        for name, m in list(model.named_modules(remove_duplicate=False)):
            if m is old:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
        handle.relayout(r.name, r.module, new, new.values, "compressed")
        for leaf, q in new.named_parameters(recurse=False):  # the bias: the new module's now
            key = f"{r.module}.{leaf}" if r.module else leaf
            if leaf != "values" and key in params:
                params[key] = q


def _set_attention(model: nn.Module, param: str, mode: str) -> list[str]:
    """attention="auto": the softmax scale of every module exposing HF's `scaling` and
    `head_dim` (BERT's: `attention_head_size`; transformers' attention modules read
    `self.scaling`): 1/head_dim under the µP family (SUPAR.md §1.2, last row), 1/sqrt(head_dim)
    under SP. GPT-2's `scale_attn_by_inverse_layer_idx` factor 1/(layer_idx + 1) is kept.
    Logs how many it set."""
    if mode == "none":
        return []
    done = []
    for name, m in model.named_modules():
        hd = getattr(m, "head_dim", getattr(m, "attention_head_size", None))
        sc = getattr(m, "scaling", None)
        if (isinstance(hd, int) and not isinstance(hd, bool) and hd > 0
                and isinstance(sc, int | float) and not isinstance(sc, bool)):
            scale = attention_scale(param, hd)
            if getattr(m, "scale_attn_by_inverse_layer_idx", False):
                scale /= float(getattr(m, "layer_idx", 0) + 1)
            m.scaling = scale
            done.append(name)
    rule = "1/sqrt(head_dim)" if attention_scale(param, 4) == 0.5 else "1/head_dim"
    if done:
        log.info("attention='auto': set the softmax scale %s on %d module(s) exposing "
                 "`scaling` and `head_dim`", rule, len(done))
    elif rule == "1/head_dim" and ("attention", param) not in _WARNED:
        _WARNED.add(("attention", param))  # once per process: a sweep builds it every trial
        log.warning("attention='auto' found no module exposing `scaling` and `head_dim`: the "
                    "model must apply the softmax scale %s itself (handle.attention_scale("
                    "head_dim)); pass attention='none' to say it does", rule)
    return done


def _install_masks(rows: list[ParamInfo], params: dict[str, nn.Parameter],
                   modules: dict[str, nn.Module], kind: str, seed: int, *, adopt: bool) -> None:
    """One mask per hidden layer below density 1, drawn in model order from one generator
    (per output neuron along the weight's fan-in dim). `adopt` (init=False): a weight that
    already holds a sparsity pattern keeps it (`_adopted`). Every layout starts masked; the
    compressed ones are converted after init (`_compress`)."""
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for r in rows:
        if r.role != "hidden" or r.density >= 1.0:
            continue
        mask = random_mask(r.shape, r.density, gen, kind, r.fan_in_dim)
        if adopt:
            mask = _adopted(r, params[r.name], mask, kind, seed)
        masks.append((r, mask))
    for r, mask in masks:  # only once every layer is decided: a refusal leaves the model as it was
        LAYOUTS["masked"](modules[r.module], _leaf(r.name), mask)


@torch.no_grad()
def _adopted(r: ParamInfo, w: Tensor, drawn: Tensor, kind: str, seed: int) -> Tensor:
    """The mask of a weight kept as it is (init=False): never a silent zero of a trained value.

    A drawn mask that keeps every non-zero is used as drawn (a dense fresh weight, or a sparse
    one saved with the same mask_seed). A weight with exact zeros is a sparse checkpoint that
    lost its mask buffers (HF's from_pretrained drops them): its non-zeros are the mask when
    their count is what `density` keeps (per_row: at most round(rho d_in) per output neuron);
    any other pattern is refused, naming the layer. A dense weight (no zero at all) is being
    sparsified on purpose: the drawn mask applies, and one log line says so.
    """
    if w.device.type == "meta":
        return drawn
    nz = (w != 0).cpu()
    lost = int((nz & ~drawn).sum())
    if lost == 0:
        return drawn
    if bool(nz.all()):
        log.info("%s: init=False on a dense weight: the drawn mask (density %g) zeroes %d of its "
                 "entries", r.module, r.density, lost)
        return drawn
    nnz, want = int(nz.sum()), int(drawn.sum())
    rows_nz = nz.movedim(1 - r.fan_in_dim, 0).reshape(nz.shape[1 - r.fan_in_dim], -1).sum(1)
    rows_want = drawn.movedim(1 - r.fan_in_dim, 0).reshape(rows_nz.shape[0], -1).sum(1)
    fits = nnz <= want and nnz >= 0.99 * want - 1
    if kind == "per_row":
        fits = fits and bool((rows_nz <= rows_want).all())
    elif kind == "bernoulli":  # another seed's draw: its count is within binomial noise
        mean = r.density * nz.numel()
        fits = abs(nnz - mean) <= 5 * math.sqrt(mean * (1 - r.density)) + 1
    if fits:
        return nz
    raise ConfigError("init", f"{r.module}: the weight holds a sparsity pattern of {nnz} "
                      f"non-zeros (density {nnz / nz.numel():.4g}) that a mask at density "
                      f"{r.density:g} ({kind}, mask_seed {seed}) would cut, zeroing {lost} "
                      "trained non-zeros; pass the density it was trained at, or restore its "
                      "weight_mask buffers (parameterize a fresh model, then load_state_dict)")


@torch.no_grad()
def _init(rows: list[ParamInfo], params: dict[str, nn.Parameter], modules: dict[str, nn.Module],
          seed: int | None) -> None:
    """Init every parameter from sigma_base and its role (SUPAR.md §6 step 3), in model order
    from one seeded generator (per device), masked entries zeroed."""
    gens: dict[torch.device, torch.Generator] = {}
    for r in rows:
        if r.tied_to:
            continue
        p = params[r.name]
        if p.device.type == "meta":
            continue
        if r.role == "norm":
            nn.init.ones_(p)
            continue
        if r.role == "bias":
            nn.init.zeros_(p)
            continue
        gen = None
        if seed is not None:
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            gen = gens[p.device]
        nn.init.normal_(p, mean=0.0, std=r.init_std, generator=gen)
        mask = modules[r.module]._buffers.get(mask_name(_leaf(r.name)))
        if mask is not None:
            p.mul_(mask)


def _install_hooks(rows: list[ParamInfo], modules: dict[str, nn.Module]) -> None:
    """Forward multipliers as output hooks on the embedding and readout modules (none at 1)."""
    done: set[str] = set()
    for r in rows:
        if r.role not in ("embedding", "output") or r.forward_mult == 1.0 or r.module in done:
            continue
        done.add(r.module)
        modules[r.module].register_forward_hook(_Scale(r.forward_mult))


class _Scale:
    """A forward hook multiplying a module's output by a constant (picklable, compile-safe)."""

    def __init__(self, mult: float) -> None:
        self.mult = mult

    def __call__(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        return output * self.mult
