"""What spartune reads off HF GPT-2's Conv1D weights, printed (the README's numbers).

    python layout.py

1. At width 128 and density 1/32, the min and max inputs kept per *output* neuron of each hidden
   projection (a per_row mask keeps exactly round(rho d_in) each; Conv1D stores (in, out)).
2. The µP LR multipliers of mlp.c_fc and mlp.c_proj when fan-in and fan-out grow differently:
   width 256 with n_inner 1024 against a base of width 64 with n_inner 512 (c_fc's fan-in
   grows 4x, c_proj's 2x).
"""

from __future__ import annotations

from hf_model import build


def per_neuron(width: int = 128, density: float = 1 / 32) -> dict[str, tuple[int, int, int]]:
    """{projection: (d_in, min, max)} of non-zero inputs per output neuron, over all blocks."""
    model, sm = build(width, base_width=32, density=density)
    out: dict[str, tuple[int, int, int]] = {}
    for r in sm.rows:
        if r.role != "hidden":
            continue
        mod = model.get_submodule(r.module)
        counts = mod.weight_mask.sum(r.fan_in_dim)  # one count per output neuron
        kind = r.module.split(".", 3)[-1]
        d_in, lo, hi = out.get(kind, (mod.weight.shape[r.fan_in_dim], 10**9, 0))
        out[kind] = (d_in, min(lo, int(counts.min())), max(hi, int(counts.max())))
    return out


def unequal_mlp_lr(param: str = "mup") -> dict[str, float]:
    """LR multipliers of mlp.c_fc and mlp.c_proj, width 256 / n_inner 1024 vs 64 / 512."""
    _, sm = build(256, base_width=64, n_inner=1024, base_n_inner=512, param=param)
    rows = {r.name: r for r in sm.rows}
    return {k: rows[f"transformer.h.0.mlp.{k}.weight"].lr_mult for k in ("c_fc", "c_proj")}


def main() -> None:
    print("HF GPT-2, width 128, density 1/32: inputs per output neuron (want round(d_in/32))")
    for kind, (d_in, lo, hi) in per_neuron().items():
        print(f"  {kind:12s} d_in {d_in:4d}  min {lo}  max {hi}  (want {round(d_in / 32)})")
    for param in ("mup", "supar"):
        lr = unequal_mlp_lr(param)
        print(f"{param}: width 256 n_inner 1024 vs base 64 n_inner 512: LR multiplier "
              f"mlp.c_fc {lr['c_fc']:g} (want 0.25), mlp.c_proj {lr['c_proj']:g} (want 0.5)")


if __name__ == "__main__":
    main()
