#!/usr/bin/env bash
# GPU check for large targets (one CUDA GPU, under 8 minutes). Prints:
#   1. tokens/s and MFU of `train.run` at widths 1024 and 2048: eager fp32 vs bf16 + compile
#      (goal: bf16 + compile >= 2x eager fp32 tokens/s at width 1024). MFU is model FLOPs
#      (6N + 12 L T d per token, as benchmarks/trainer_throughput.py counts them) over the
#      matmul peak measured here: fp32 (TF32 off, as `train.run` leaves it) and bf16.
#   2. a 4-worker proxy sweep on the GPU (workers pinned round robin over the visible GPUs:
#      all four share GPU 0 on a one-GPU machine), with its summary lines.
#   3. an FSDP run (train.parallel=fsdp, NCCL, one rank per visible GPU, bf16 mixed precision
#      policy) beside the same run under ddp: final losses, tokens/s and each rank's bytes.
# Run from a checkout: bash benchmarks/gpu_check.sh   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; \
print('# gpu:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

timeout 330 $PY - <<'PY'
import sys, time
sys.path.insert(0, "benchmarks")
import torch
from _common import bench_config, quiet_logs
from spartune import train

quiet_logs()

def peak(dtype, n=8192, reps=20):
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - tic)

p32, p16 = peak(torch.float32), peak(torch.bfloat16)
print(f"# matmul peak: fp32 {p32 / 1e12:.1f} TFLOP/s, bf16 {p16 / 1e12:.1f} TFLOP/s")
print("| width | mode | tok/s (steady) | ratio vs fp32 eager | first step s | MFU vs own-dtype peak | MFU vs fp32 peak |")
print("|---|---|---|---|---|---|---|")
goal = None
for width in (1024, 2048):
    base = None
    for mode in ("fp32 eager", "bf16 + compile"):
        cfg = bench_config(width=width, steps=40, batch_size=16, seq_len=512, eval_batches=1,
                           threads=0)
        cfg.model.depth, cfg.model.head_size, cfg.train.device = 4, 64, "cuda"
        if mode != "fp32 eager":
            cfg.train.precision, cfg.train.compile = "bf16", True
        m = train.run(cfg)
        tok = (m["steps"] - 1) * 16 * 512 / (m["train_seconds"] - m["first_step_seconds"])
        m_d = cfg.model
        fpt = 6 * (m_d.depth * 12 * width**2 + 256 * width) + 12 * m_d.depth * 512 * width
        base = base or tok
        own = p32 if mode == "fp32 eager" else p16
        print(f"| {width} | {mode} | {tok:,.0f} | {tok / base:.2f} | {m['first_step_seconds']:.1f} "
              f"| {tok * fpt / own:.1%} | {tok * fpt / p32:.1%} |", flush=True)
        if width == 1024 and mode != "fp32 eager":
            goal = tok / base
print(f"# goal: bf16 + compile / fp32 eager at width 1024 = {goal:.2f} (goal >= 2) "
      f"{'pass' if goal >= 2 else 'missed'}")
PY

echo "# 4-worker proxy sweep on the GPU"
start=$(date +%s)
SWEEP=${SWEEP:-$(command -v spartune-sweep || echo "$(dirname "$(command -v "$PY")")/spartune-sweep")}
timeout 150 "$SWEEP" -cn proxy \
  results_dir="$TMP/results" study.name=gpu_check study.workers=4 study.n_trials=8 \
  train.steps=200 train.device=cuda train.progress=false 2>&1 | grep -v "^wrote " | tail -8
echo "# sweep wall time: $(( $(date +%s) - start )) s"

echo "# fsdp vs ddp under torchrun (NCCL), one rank per visible GPU, width 1024, bf16"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
TRAIN=$(command -v spartune-train || echo "$(dirname "$(command -v "$PY")")/spartune-train")
for par in ddp fsdp; do
  timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node="$NGPU" --no-python \
    "$TRAIN" train.parallel=$par train.device=cuda train.precision=bf16 model.width=1024 \
    model.head_size=64 model.depth=4 model.density=0.0625 model.sparse_impl=masked \
    train.steps=40 train.batch_size=16 train.seq_len=512 train.eval_every=40 \
    train.eval_batches=1 train.progress=false results_dir="$TMP/results" name=gpu_$par \
    hydra.run.dir="$TMP/results/gpu_$par" > "$TMP/$par.log" 2>&1 || { tail -20 "$TMP/$par.log"; exit 1; }
  $PY - "$TMP/results/gpu_$par/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"| {m['parallel']} | ranks {m['world_size']} | final val loss {m['final_val_loss']:.4f} "
      f"| tok/s {m['tokens_per_second']:,.0f} | rank 0 params+masks "
      f"{m['rank_param_bytes'] / 2**20:.1f} MiB | AdamW {m['rank_optimizer_bytes'] / 2**20:.1f} MiB |")
PY
done
