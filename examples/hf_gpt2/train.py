"""The training loop for HF GPT-2, as a sweep's Python objective or a script.

    python train.py lr=0.01 init_std=0.02 width=128 density=0.25   (JSON lines on stdout)
    study.objective._target_: train.run                            (a sweep calls run())

Data: bytes of a few standard-library modules' source (vocab 256, no download), 90/10 split.
The loss is HF's own (`model(input_ids, labels=input_ids).loss`, which shifts the labels).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import sys
import time
from typing import Any

import torch
from hf_model import build

DEFAULTS: dict[str, Any] = {
    "width": 64, "base_width": 64, "param": "supar", "density": 1.0, "base_density": 1.0,
    "lr": 0.01, "init_std": 0.02, "alpha_input": 1.0, "alpha_output": 1.0, "seed": 0,
    "steps": 100, "batch_size": 8, "seq_len": 64, "eval_every": 25, "weight_decay": 0.1,
    "sparse_impl": "auto",
}
_MODULES = ("argparse", "textwrap", "string", "dataclasses", "functools", "json.decoder")
_DATA: tuple[torch.Tensor, torch.Tensor] | None = None


def data() -> tuple[torch.Tensor, torch.Tensor]:
    global _DATA
    if _DATA is None:
        text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in _MODULES)
        tokens = torch.tensor(list(text.encode()), dtype=torch.long)
        cut = int(0.9 * len(tokens))
        _DATA = tokens[:cut], tokens[cut:]
    return _DATA


def batch(tokens: torch.Tensor, n: int, t: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - t, (n,), generator=gen)
    return torch.stack([tokens[s:s + t] for s in starts])


def train(hp: dict[str, Any], report=None) -> dict[str, Any]:
    """Train one model; call report(step, val_loss) at each evaluation; return metrics."""
    hp = {**DEFAULTS, **hp}
    torch.manual_seed(hp["seed"])
    model, sm = build(int(hp["width"]), base_width=int(hp["base_width"]), param=hp["param"],
                      density=float(hp["density"]), base_density=float(hp["base_density"]),
                      init_std=float(hp["init_std"]), alpha_input=float(hp["alpha_input"]),
                      alpha_output=float(hp["alpha_output"]), seed=int(hp["seed"]),
                      n_positions=int(hp["seq_len"]), sparse_impl=hp["sparse_impl"])
    lr, steps = float(hp["lr"]), int(hp["steps"])
    opt = torch.optim.AdamW(sm.param_groups(lr=lr, weight_decay=float(hp["weight_decay"])),
                            betas=(0.9, 0.95))
    train_tok, val_tok = data()
    gen = torch.Generator().manual_seed(int(hp["seed"]) + 1)
    val_gen = torch.Generator().manual_seed(1234)
    val = [batch(val_tok, int(hp["batch_size"]), int(hp["seq_len"]), val_gen) for _ in range(4)]
    warmup = max(1, steps // 10)
    losses, final_val, tic = [], math.nan, time.perf_counter()
    for step in range(1, steps + 1):
        factor = step / warmup if step <= warmup else 1 - 0.9 * (step - warmup) / (steps - warmup)
        for g in opt.param_groups:
            g["lr"] = lr * factor * g["lr_mult"]  # schedules multiply lr_mult, never overwrite
        x = batch(train_tok, int(hp["batch_size"]), int(hp["seq_len"]), gen)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            return {"final_val_loss": math.nan, "diverged": True, "steps": step}
        if step % int(hp["eval_every"]) == 0 or step == steps:
            with torch.no_grad():
                final_val = sum(model(v, labels=v).loss.item() for v in val) / len(val)
            if report is not None:
                report(step, final_val)
    return {"final_val_loss": final_val, "final_train_loss": sum(losses[-10:]) / 10,
            "steps": steps, "n_params": sm.n_params(), "n_nonzero_params": sm.n_nonzero_params(),
            "train_seconds": time.perf_counter() - tic}


def run(cfg: Any, report) -> dict[str, Any]:
    """A sweep's objective: the trial's composed spartune config -> this loop's HPs."""
    m, p, o, t = cfg.model, cfg.param, cfg.optim, cfg.train
    return train({"width": m.width, "base_width": m.base_width, "param": p.name,
                  "density": m.density, "base_density": p.base_density, "lr": o.lr,
                  "init_std": m.init_std, "alpha_input": p.alpha_input,
                  "alpha_output": p.alpha_output, "seed": cfg.seed, "steps": t.steps,
                  "batch_size": t.batch_size, "seq_len": t.seq_len, "eval_every": t.eval_every,
                  "weight_decay": o.weight_decay, "sparse_impl": m.sparse_impl}, report)


def main(argv: list[str]) -> None:
    hp: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in DEFAULTS:
            sys.exit(f"train.py: error: {arg!r}: expected key=value with key one of "
                     f"{', '.join(DEFAULTS)}")
        hp[key] = type(DEFAULTS[key])(value) if not isinstance(DEFAULTS[key], str) else value

    def report(step: int, val_loss: float) -> None:
        print(json.dumps({"step": step, "val_loss": val_loss}), flush=True)

    metrics = train(hp, report)
    print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                      for k, v in metrics.items()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
