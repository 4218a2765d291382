#!/usr/bin/env bash
# GPU check for one H100/H200, under 8 minutes in all:
#   1. `graftlm bench --device cuda --size small`: every architecture against stock GPT-2 at GPT-2-small shapes
#      (12 layers x 768 wide x 12 heads), float32, the suite's default points (about 4 minutes at most);
#   2. GPT2-BSBR against stock GPT-2 (SDPA) at 1k..32k tokens, GPT-2-small shapes, bfloat16: forward time, peak
#      memory, decoding ms/token and cache size (bench/bench_bsbr.py; about 3 minutes at most).
# Each part has its own time limit, so a slow one leaves the other its time; each prints its table and logs its
# per-point figures as it goes (kept in its .log if the limit cuts it short). Results: $OUT if set, else
# bench/results/gpu_check. Run from the repository root, in a Python environment where graftlm is installed and
# torch sees the GPU:
#   bash bench/gpu_check.sh
# The same Python parts run on a CPU as a smoke test (seconds to minutes, numbers meaningless):
#   python bench/bench_bsbr.py --size small --dtype bfloat16 --device cpu --quick
#   graftlm bench --device cpu --quick
set -u
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT_DIR"

python - <<'EOF' || { echo "gpu_check: torch sees no CUDA device (or graftlm is not installed): nothing run"; exit 2; }
import torch, transformers, graftlm
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"graftlm {graftlm.__version__}, {torch.cuda.get_device_name(0)}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
run() {  # run NAME SECONDS COMMAND...: at most SECONDS, output shown and kept in $OUT_DIR/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit code $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

run bench_small 250 python -m graftlm.cli bench --device cuda --size small --output-dir "$OUT_DIR/bench_small"
run bsbr_long_context 190 python bench/bench_bsbr.py --size small --dtype bfloat16 --device cuda \
    --lengths 1024 2048 4096 8192 16384 32768 --decode-steps 128 --repeats 2 --output-dir "$OUT_DIR/bsbr_long_context"
exit $status
