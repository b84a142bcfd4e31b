"""spartune: tune sparse transformers once, on a small dense proxy (SμPar hyperparameter transfer).

The library face, for a model of your own:

    sm = spartune.parameterize(model, base=base_model, param="supar", density=1/16)
    spartune.shard(model, blocks=model.blocks)  # only under torchrun: FSDP2 shards
    opt = torch.optim.AdamW(sm.param_groups(lr=1e-2, weight_decay=0.1))  # after shard
    spartune.coord_check(make_model, widths=[64, 128, 256], densities=[1.0, 0.25])

The module behind `parameterize` is `spartune.parameterizer` (a submodule named like the
function would shadow it on first import). Names are imported on first use, so
`import spartune` costs nothing and never imports torch, Hydra or Optuna (the commands and
`spartune.sweep` do, when they are used).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("spartune")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

# public name -> module that defines it
_LAZY = {
    "parameterize": "spartune.parameterizer",
    "parameterization": "spartune.parameterizer",
    "Parameterization": "spartune.parameterizer",
    "coord_check": "spartune.coord",
    "CoordResult": "spartune.coord",
    "attention_scale": "spartune.params",
    "layer_scale": "spartune.params",
    "ConfigError": "spartune.config",
    "shard": "spartune.sharding",
}

__all__ = [
    "ConfigError", "CoordResult", "Parameterization", "__version__", "attention_scale",
    "coord_check", "layer_scale", "parameterization", "parameterize", "shard",
]

if TYPE_CHECKING:
    from spartune.config import ConfigError
    from spartune.coord import CoordResult, coord_check
    from spartune.parameterizer import Parameterization, parameterization, parameterize
    from spartune.params import attention_scale, layer_scale
    from spartune.sharding import shard


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spartune' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
