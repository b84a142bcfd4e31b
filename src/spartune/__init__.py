"""spartune: tune sparse transformers once, on a small dense proxy (SμPar hyperparameter transfer).

Kept tiny on purpose: `import spartune` must not pull in Hydra, Optuna or torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spartune")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

del PackageNotFoundError, version
