#!/usr/bin/env bash
# The GPU benchmark behind docs/performance.md. Usage: scripts/gpu_bench.sh OUT_DIR [extra bench args]
set -uo pipefail
out=${1:?usage: gpu_bench.sh OUT_DIR}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # name, then bench arguments; progress bars stripped from the log
  local name=$1; shift
  python -m pi_policy bench --json "$out/$name.json" "$@" 2>&1 | tr '\r' '\n' | grep -v 'it/s\|s/it\|%|' | tee "$out/$name.txt"
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
run pi0_eager_vs_graph --preset pi0 --backend eager --backend bf16 --iters 200 "$@"
run pi0_compiled --preset pi0 --backend bf16 --compile vision,prefill,denoise --iters 200 "$@"
run pi05_compiled --preset pi05 --backend bf16 --compile vision,prefill,denoise --iters 200 "$@"
