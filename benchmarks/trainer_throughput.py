"""spartune's training step vs a minimal plain PyTorch GPT loop: tokens/s ratio (target >= 1.0).

Why: SμPar must cost nothing at train time. Its machinery (role-tagged layers, forward
multipliers on embedding/logits, per-group LR multipliers set every step, SparseLinear with no
mask at density 1) should run as fast as the nanoGPT-style loop anyone would write by hand.

Side A is `spartune.train.run(cfg)` itself, timed as a whole (model build and init, the step
loop with its per-step LR loop over param groups and `loss.item()`, and the final evaluation),
at SμPar, density 1. Side B is `plain_run` below: the same shapes (pre-LN GPT, learned
positions, GELU MLP 4x, SDPA causal attention, tied embeddings, AdamW with the same betas/eps/
decay, grad clip 1.0, the same LR schedule set per step, `loss.item()` per step, one final
evaluation on the same batches) with no parameterization machinery. Both draw batches from the
same `Corpus` (synthetic, vocab 256) with `train_batch`, so data costs are equal; batch 16 x 64;
torch threads fixed to 2 on both sides. Sides alternate A B A B; the figure per width is the
median of the per-round ratios. The last line reports the minimum over widths.

Optimizer implementation: spartune builds AdamW with torch's fused kernel where the device has
one (`train.make_adamw`); the plain loop uses `torch.optim.AdamW`'s default (foreach), as a
hand-written loop would. Same update rule and hyperparameters; the kernel is part of what
spartune's step costs, so it counts.

Denormals: by default the process runs with flush-to-zero (`torch.set_flush_denormal(True)`
before any torch op, so torch's worker threads inherit it). Without it, the plain loop (SP
numerics: one LR for every layer, unscaled logits) drifts into denormal floats at width 512
after ~10 steps and its step time nearly doubles, which would credit spartune with a speed-up
that is numerics, not machinery. `--denormals keep` measures with the CPU's default.

Large-target rows (`--modes`, default `compile bf16`; `--quick` runs bf16 only): the same
`train.run` with `train.compile=true` and with `train.precision=bf16`, against eager fp32
`train.run`, alternating with the other sides. These rows compare the step loop's steady state:
tokens/s over all steps but the first (`train_seconds - first_step_seconds`), since the first
compiled step includes the compile itself (tens of seconds on a CPU; reported apart). Goals:
compile >= 1.1x eager at width 128 on a CPU. `--breakdown` prints instead where the step's
time goes, phase by phase (`train.phase_times`: LR groups, data, forward+backward, clip,
optimizer, the loss sync), eager against each mode: what compile can and cannot speed up.

MFU: model FLOPs per token = 6 N + 12 depth seq_len width, with N the weights that enter a
matmul (12 width^2 per block, plus the vocab x width unembedding; masked weights count, as the
masked layout computes them densely) and the attention term counting QK^T and AV forward and
backward without the causal discount (PaLM's convention). Achieved FLOP/s = tokens/s x that;
the peak is this machine's fp32 matmul rate, measured in the same run (`matmul_peak`: the best
of several square fp32 matmuls at the benchmark's thread count). Goal: MFU >= 80 % at width 512
(eager fp32).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    add_step_options,
    alternate,
    bench_config,
    configure_process,
    median,
    paired_ratios,
    parser,
    print_machine,
    print_table,
    quiet_logs,
    timed,
    verdict,
)
from torch import Tensor, nn  # noqa: E402

from spartune import train  # noqa: E402
from spartune.config import Config  # noqa: E402
from spartune.data import Corpus, load_corpus  # noqa: E402

NAME = "trainer_throughput"
TARGET = 1.0
COMPILE_GOAL = 1.1  # compile vs eager tokens/s at width 128 (CPU)
MFU_GOAL = 0.8  # eager fp32 at width 512, vs the measured fp32 matmul peak


def matmul_peak(n: int = 1024, repeats: int = 5, min_seconds: float = 0.3) -> float:
    """The machine's fp32 matmul FLOP/s at the current thread count: best of `repeats` bursts."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm the kernel and the thread pool
    best = 0.0
    for _ in range(repeats):
        k, tic = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            k += 1
            secs = time.perf_counter() - tic
            if secs >= min_seconds:
                break
        best = max(best, 2 * n**3 * k / secs)
    return best


def flops_per_token(cfg: Config, vocab: int) -> float:
    """6 N + 12 L T d (see the module docstring)."""
    m, t = cfg.model, cfg.train
    n_matmul = m.depth * 12 * m.width**2 + vocab * m.width
    return 6 * n_matmul + 12 * m.depth * t.seq_len * m.width


def steady_tok_s(m: dict[str, Any], cfg: Config) -> float:
    """Tokens/s of the step loop without its first step (which compiles when compile is on)."""
    steps = m["steps"] - 1
    secs = m["train_seconds"] - m["first_step_seconds"]
    return steps * cfg.train.batch_size * cfg.train.seq_len / max(secs, 1e-9)


# -- the plain baseline: nanoGPT-style, no parameterization ------------------------------------


class PlainBlock(nn.Module):
    def __init__(self, width: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.ln2 = nn.LayerNorm(width, bias=False)
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, width: int, depth: int, n_head: int, max_len: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(PlainBlock(width, n_head) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def plain_run(cfg: Config, corpus: Corpus) -> dict[str, float]:
    """The hand-written loop, same shapes and optimizer settings as `train.run(cfg)`."""
    torch.manual_seed(cfg.seed)
    m, t, o = cfg.model, cfg.train, cfg.optim
    model = PlainGPT(corpus.vocab_size, m.width, m.depth, m.n_head, t.seq_len)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    val = corpus.val_batches(t.eval_batches, t.batch_size, t.seq_len, cfg.data.val_seed)
    step_seconds, loss_value, val_loss = 0.0, math.nan, math.nan
    for step in range(1, t.steps + 1):
        tic = time.perf_counter()
        lr = o.lr * train.lr_factor(step - 1, t.steps, o)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = corpus.train_batch(t.batch_size, t.seq_len, gen)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        loss_value = loss.item()
        step_seconds += time.perf_counter() - tic
        if step % t.eval_every == 0 or step == t.steps:
            with torch.no_grad():
                val_loss = sum(float(model(vx, vy)) for vx, vy in val) / len(val)
    return {"train_seconds": step_seconds, "final_train_loss": loss_value, "val_loss": val_loss}


# -- the measurement -------------------------------------------------------------------------


def mode_config(width: int, steps: int, threads: int, mode: str) -> Config:
    cfg = bench_config(width=width, steps=steps, threads=threads)
    if mode == "compile":
        cfg.train.compile = True
    elif mode == "bf16":
        cfg.train.precision = "bf16"
    return cfg


def measure(width: int, steps: int, rounds: int, corpus: Corpus,
            threads: int, modes: list[str]) -> dict[str, Any]:
    cfg = bench_config(width=width, steps=steps, threads=threads)
    tokens = steps * cfg.train.batch_size * cfg.train.seq_len
    steady: dict[str, list[float]] = {mode: [] for mode in ["fp32", *modes]}
    first: dict[str, list[float]] = {mode: [] for mode in ["fp32", *modes]}

    def spartune_side() -> tuple[float, float]:
        wall, m = timed(lambda: train.run(cfg, corpus=corpus))
        steady["fp32"].append(steady_tok_s(m, cfg))
        first["fp32"].append(m["first_step_seconds"])
        return wall, m["train_seconds"]

    def plain_side() -> tuple[float, float]:
        wall, m = timed(lambda: plain_run(cfg, corpus))
        return wall, m["train_seconds"]

    def mode_side(mode: str):  # noqa: ANN202
        mcfg = mode_config(width, steps, threads, mode)

        def fn() -> float:
            m = train.run(mcfg, corpus=corpus)
            steady[mode].append(steady_tok_s(m, mcfg))
            first[mode].append(m["first_step_seconds"])
            return m["train_seconds"]
        return fn

    sides = {"spartune": spartune_side, "plain": plain_side}
    sides.update({mode: mode_side(mode) for mode in modes})
    res = alternate(sides, rounds)
    n_warm = len(steady["fp32"]) - rounds  # the untimed warm-up round(s)
    steady = {k: v[n_warm:] for k, v in steady.items()}
    first = {k: v[n_warm:] for k, v in first.items()}
    s_wall, s_loop = zip(*res["spartune"], strict=True)
    p_wall, p_loop = zip(*res["plain"], strict=True)
    return {
        "steady": steady,
        "first": first,
        "mode_ratio": {k: median(paired_ratios(v, steady["fp32"])) for k, v in steady.items()},
        "cfg": cfg,
        "width": width,
        "steps": steps,
        "spartune_tok_s": tokens / median(s_wall),
        "plain_tok_s": tokens / median(p_wall),
        # tokens/s ratio = time ratio inverted, per round: plain_time / spartune_time
        "ratio": median(paired_ratios(p_wall, s_wall)),
        "ratios": paired_ratios(p_wall, s_wall),
        "ratio_loop": median(paired_ratios(p_loop, s_loop)),
        "spartune_ms_step": 1000 * median(s_loop) / steps,
        "plain_ms_step": 1000 * median(p_loop) / steps,
    }


def breakdown(width: int, steps: int, corpus: Corpus, threads: int, modes: list[str]) -> None:
    """Where a step's time goes (`train.phase_times`), eager fp32 and each mode, all steps but
    the first (which compiles): ms per step of each phase, its share, the ratio to eager.
    Each mode runs once untimed first (thread pool, compile caches)."""
    per: dict[str, dict[str, float]] = {}
    for mode in ["fp32", *modes]:
        cfg = mode_config(width, steps, threads, mode)
        train.run(cfg, corpus=corpus)
        with train.phase_times() as ph:
            train.run(cfg, corpus=corpus)
        per[mode] = {k: 1000 * sum(v[1:]) / max(len(v) - 1, 1) for k, v in ph.items()}
    eager = per["fp32"]
    rows = []
    for name in eager:
        row = [name, eager[name], eager[name] / sum(eager.values())]
        for mode in modes:
            row += [per[mode].get(name, math.nan),
                    eager[name] / per[mode][name] if per[mode].get(name) else math.nan]
        rows.append(row)
    rows.append(["step", sum(eager.values()), 1.0,
                 *[v for m in modes for v in (sum(per[m].values()),
                                              sum(eager.values()) / sum(per[m].values()))]])
    print_table(["phase", "eager ms/step", "share",
                 *[c for m in modes for c in (f"{m} ms/step", f"speed-up ({m})")]], rows,
                title=f"where the step goes at width {width} ({steps} steps, all but the first)")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--widths", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="steps per run, one per width (default 100 at 128, 25 at 512)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--modes", nargs="*", choices=["compile", "bf16"], default=None,
                   help="large-target rows against eager fp32 (default: compile bf16; "
                        "--quick: bf16)")
    p.add_argument("--breakdown", action="store_true",
                   help="only the per-phase table of the step (eager vs --modes), first width")
    add_step_options(p)
    a = p.parse_args()
    configure_process(a.threads, a.denormals)
    quiet_logs()
    widths = a.widths or ([64] if a.quick else [128, 512])
    default_steps = {64: 10, 128: 100, 256: 50, 512: 25} if not a.quick else {64: 8}
    steps = a.steps or [default_steps.get(w, 20) for w in widths]
    rounds = a.rounds or (2 if a.quick else 7)
    print_machine(f"{NAME}: spartune train.run (SμPar, density 1) vs plain PyTorch loop, "
                  f"batch 16x64, {a.threads} threads, denormals {a.denormals}, "
                  f"{rounds} alternating rounds")
    modes = a.modes if a.modes is not None else (["bf16"] if a.quick else ["compile", "bf16"])
    corpus = load_corpus(bench_config().data)
    if a.breakdown:
        breakdown(widths[0], steps[0], corpus, a.threads, modes)
        return
    peak = matmul_peak(512 if a.quick else 1024)
    rows = [measure(w, s, rounds, corpus, a.threads, modes)
            for w, s in zip(widths, steps, strict=True)]
    print_table(
        ["width", "steps/run", "spartune tok/s", "plain tok/s", "ratio (whole run)",
         "ratio (step loop only)", "spartune ms/step", "plain ms/step"],
        [[r["width"], r["steps"], r["spartune_tok_s"], r["plain_tok_s"], r["ratio"],
          r["ratio_loop"], r["spartune_ms_step"], r["plain_ms_step"]] for r in rows],
        title="tokens/s, medians; ratio = spartune/plain tokens/s, median of per-round ratios",
    )
    for r in rows:
        print(f"# width {r['width']}: per-round ratios "
              + ", ".join(f"{x:.3f}" for x in r["ratios"]))
    mode_rows = []
    for r in rows:
        fpt = flops_per_token(r["cfg"], corpus.vocab_size)
        for mode, tok in r["steady"].items():
            tok_s = median(tok)
            mode_rows.append([r["width"], "eager fp32" if mode == "fp32" else mode, tok_s,
                              r["mode_ratio"][mode], median(r["first"][mode]),
                              tok_s * fpt / 1e9, tok_s * fpt / peak])
    print_table(
        ["width", "mode", "tok/s (steady)", "ratio vs eager fp32", "first step s",
         "model GFLOP/s", "MFU"],
        mode_rows,
        title=f"large-target modes: steady state (all steps but the first), medians; ratio = "
              f"median of per-round ratios; MFU vs the fp32 matmul peak measured now, "
              f"{peak / 1e9:.1f} GFLOP/s",
    )
    for r in rows:
        if "compile" in r["mode_ratio"] and r["width"] == 128:
            c = r["mode_ratio"]["compile"]
            print(f"# goal: compile/eager at width 128 = {c:.3f} (goal >= {COMPILE_GOAL}) "
                  f"{'pass' if c >= COMPILE_GOAL else 'missed'}")
        if r["width"] == 512:
            mfu = median(r["steady"]["fp32"]) * flops_per_token(r["cfg"], corpus.vocab_size)
            mfu /= peak
            print(f"# goal: MFU eager fp32 at width 512 = {mfu:.1%} (goal >= {MFU_GOAL:.0%}) "
                  f"{'pass' if mfu >= MFU_GOAL else 'missed'}")
    worst = min(r["ratio"] for r in rows)
    verdict(NAME, worst, f">={TARGET}", worst >= TARGET)


if __name__ == "__main__":
    main()
