"""`parameterize`: SP, µP or SμPar applied in place to any `torch.nn.Module`.

The rules are `params.py`'s table; this module only finds out, for a model it did not build,
which rule row each parameter is (its role), how far it is from the proxy (m_d, m_rho), and then
does what the row says: init std, Adam LR multiplier, forward multiplier, static mask. The
built-in GPT goes through here too (`model.build_model`), so there is one implementation.

Roles are inferred the way microsoft/mup's `set_base_shapes` does it: the same architecture built
at the proxy's width (`base`, shapes only, meta device is fine) is compared parameter by
parameter, and a dim that differs is width-like. For a weight (fan_out, fan_in, ...):

    both dims width-like               hidden (masked, SμPar init and LR)
    only fan_in width-like             output: the readout mapping width to a fixed size
    only fan_out width-like            embedding: an input layer (a Linear from fixed features)
    owned by nn.Embedding              embedding (its table is (num, dim): no shape rule)
    vectors and scalars                bias if named *bias, else norm

A weight tied to an embedding is that embedding (one parameter, one group, embedding init and
LR); a module other than an nn.Embedding that also holds it is the readout (it gets the output
multiplier). `roles={glob: role}` overrides, `delta=` (a third width) finds width-like dims when
the model itself is at the base width (mup's `delta`), and anything left undecided ends in one
line naming the parameter and the override to use.

What stays the user's: the modules and their forward. Masks are buffers `<param>_mask` beside
the weight and gradients are masked by a hook (`sparsity.install_mask`), so every hidden
layer's `.weight` is still its dense weight with zeros at the masked positions; the forward
multipliers are forward hooks on the embedding and readout modules (or, with
`forward_hooks=False`, numbers the model applies itself: the built-in GPT does, to scale
whichever side of the readout matmul is smaller). A `state_dict` round trip needs nothing
special: call `parameterize` on the fresh model (roles, multipliers and mask buffers appear),
then `load_state_dict` (the saved masks replace the drawn ones, masked entries are re-zeroed).
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from spartune.config import MASK_KINDS, PARAMETERIZATIONS, ConfigError
from spartune.params import ROLES, Role, attention_scale, layer_scale
from spartune.sparsity import LAYOUTS, mask_name, random_mask, resolve_layout

if TYPE_CHECKING:
    import pandas as pd

_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
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
        lr_mult, forward_mult, plus width_mult, density_mult, residual, tied_to, layout."""
        import pandas as pd

        return pd.DataFrame([{
            "name": r.name, "role": r.role, "shape": r.shape, "density": r.density,
            "init_std": r.init_std, "lr_mult": r.lr_mult, "forward_mult": r.forward_mult,
            "width_mult": r.width_mult, "density_mult": r.density_mult, "residual": r.residual,
            "tied_to": r.tied_to, "layout": r.layout,
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
        """Zero the masked entries again: for code that writes hidden weights directly."""
        for r in self.rows:
            if r.role == "hidden":
                mod = self._modules[r.module]
                m = mod._buffers.get(mask_name(r.name.rsplit(".", 1)[-1]))
                if m is not None:
                    self._params[r.name].mul_(m)

    def n_params(self) -> int:
        return sum(p.numel() for p in self._params.values())

    def n_nonzero_params(self) -> int:
        """Parameters that can be non-zero: masked entries of hidden weights do not count."""
        masked = 0
        for r in self.rows:
            m = self._modules[r.module]._buffers.get(mask_name(_leaf(r.name)))
            if r.role == "hidden" and m is not None:
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
                  weight, masked gradient) | auto; compressed is reserved for a sparse layout

    The attention softmax scale is the model's to apply: `handle.attention_scale(head_dim)`.
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

    role_of = _roles(params, names, modules, base_shapes, delta_shapes, roles or {})
    readouts = _readouts(params, names, modules, role_of, readout)
    dens = _densities(params, role_of, density)
    impls = _layouts(params, role_of, dens, sparse_impl)
    residual = list(residual)
    _unused(residual, [n for n, r in role_of.items() if r == "hidden"], "residual")
    if residual and depth is None:
        raise ConfigError("depth", "residual layers need depth= (the number of blocks) for "
                                   "their 1/sqrt(2 depth) init factor")

    rows: list[ParamInfo] = []
    for name, p in params.items():
        role = role_of[name]
        shape = tuple(p.shape)
        m_d = _width_mult(shape, base_shapes[name]) if role in ("hidden", "output") else 1.0
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
                              is_res, layout=impls.get(name, "")))
    for module_name, weight_name in readouts:
        shape = tuple(params[weight_name].shape)
        m_d = _width_mult(shape, base_shapes[weight_name])
        s = layer_scale(param, "output", width_mult=m_d, alpha_output=alpha_output)
        emb = next(r for r in rows if r.name == weight_name)
        rows.append(ParamInfo(f"{module_name}.{_leaf(weight_name)}" if module_name else
                              weight_name, "output", shape, module_name, m_d, 1.0, 1.0,
                              math.nan, emb.lr_mult, s.out, tied_to=weight_name))

    _install_masks(rows, params, modules, mask_kind, mask_seed)
    if init:
        _init(rows, params, modules, seed)
    if forward_hooks:
        _install_hooks(rows, modules)
    handle = Parameterization(model, param, rows, params, modules)
    _HANDLES[model] = handle
    return handle


# -- roles ------------------------------------------------------------------------------------


def _roles(params: dict[str, nn.Parameter], names: dict[int, list[str]],
           modules: dict[str, nn.Module], base: dict[str, tuple[int, ...]],
           delta: dict[str, tuple[int, ...]] | None, overrides: Mapping[str, str]) -> dict:
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
                      delta[name] if delta is not None and name in delta else None)
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
    return out


def _glob_of(name: str) -> str:
    """A glob for every block's copy of a parameter: digits-only components become '*'."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _infer(aliases: list[str], shape: tuple[int, ...], modules: dict[str, nn.Module],
           base: tuple[int, ...], delta: tuple[int, ...] | None) -> Role | None:
    name = aliases[0]
    if any(isinstance(modules.get(_owner(a)), _EMBEDDING_TYPES) for a in aliases):
        return "embedding"
    if len(shape) <= 1:
        return "bias" if _leaf(name) == "bias" else "norm"
    other = delta if delta is not None else shape
    fan_out, fan_in = base[0] != other[0], base[1] != other[1]
    if fan_out and fan_in:
        return "hidden"
    if fan_in:
        return "output"
    if fan_out:
        return "embedding"
    return None


def _width_mult(shape: tuple[int, ...], base: tuple[int, ...]) -> float:
    """m_d of a weight: its fan_in over the base's (dim 1: (out, in) for Linear, (num, dim) for
    an embedding table used as a readout)."""
    return shape[1] / base[1] if len(shape) >= 2 else 1.0


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
            what, have = ("parameter", "modules") if field == "roles" else ("hidden layer",
                                                                            "hidden layers")
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
             impl: str | Mapping[str, str]) -> dict[str, str]:
    hidden = [n for n, r in role_of.items() if r == "hidden"]
    if isinstance(impl, Mapping):
        _unused(list(impl), hidden, "sparse_impl")
    out = {}
    for n in hidden:
        if dens[n] >= 1.0:
            continue
        choice = impl if isinstance(impl, str) else next(
            (v for g, v in impl.items() if _matches(g, n, _owner(n))), "masked")
        try:
            out[n] = resolve_layout(choice, tuple(params[n].shape), dens[n])
        except ValueError as e:
            raise ConfigError("sparse_impl", str(e)) from None
    return out


# -- what it does to the model -----------------------------------------------------------------


def _install_masks(rows: list[ParamInfo], params: dict[str, nn.Parameter],
                   modules: dict[str, nn.Module], kind: str, seed: int) -> None:
    """One mask per hidden layer below density 1, drawn in model order from one generator."""
    gen = torch.Generator().manual_seed(seed)
    for r in rows:
        if r.role != "hidden" or r.density >= 1.0:
            continue
        mask = random_mask(r.shape, r.density, gen, kind)
        LAYOUTS[r.layout](modules[r.module], _leaf(r.name), mask)


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
