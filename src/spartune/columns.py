"""Column names of the tidy tables: the shared vocabulary of collect, transfer and plot.

Defined once here (DESIGN.md, results contract). Nothing here imports torch or Optuna.
"""

from __future__ import annotations

# One row per width x density x param x seed x step x module: results/<study>/coord.csv
COORD_COLUMNS = ["param", "width", "density", "seed", "step", "module", "l1"]
# Hidden quantities whose scale must not depend on width or density under SμPar.
HIDDEN_MODULES = ["attn", "mlp"]
COORD_MODULES = ["embedding", "attn", "mlp", "logits"]

# Hyperparameters a sweep may search, by short name: the config field each one sets.
# Trials store the value under the short name and its log2 under `log2_<name>`.
HP_FIELDS = {
    "lr": "optim.lr",
    "init_std": "model.init_std",
    "alpha_input": "param.alpha_input",
    "alpha_output": "param.alpha_output",
}

# What kind of run a trial is: a proxy search / stability grid point, a transferred target, or
# a point of the local LR grid around a transferred value (`transfer.check`).
TRIAL_ROLES = ["search", "target", "check"]

# One row per trial: results/<study>/trials.csv. Trials of every cell of a study share it.
TRIAL_COLUMNS = [
    "study", "cell", "number", "state", "role", "param", "width", "base_width", "depth",
    "density", "seed",
    "lr", "log2_lr", "init_std", "log2_init_std",
    "alpha_input", "log2_alpha_input", "alpha_output", "log2_alpha_output",
    "final_train_loss", "final_val_loss", "best_val_loss", "value", "diverged", "steps",
    "tokens_per_second", "n_params", "n_nonzero_params", "duration_s",
    # how the run was trained: processes, ddp | fsdp, autocast dtype, torch.compile, micro-batch
    "world_size", "parallel", "precision", "compile", "micro_batch_size",
]

# One row per trial x evaluation step: results/<study>/curves.csv.
CURVE_COLUMNS = [
    "study", "cell", "number", "role", "param", "width", "density", "seed", "lr", "init_std",
    "step", "train_loss", "val_loss", "lr_now",
]

# Trial states as Optuna names them (collect writes these strings).
STATES = ["COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"]
