#!/usr/bin/env bash
# The GPU benchmark behind docs/performance.md. Usage: scripts/gpu_bench.sh OUT_DIR PART
#   part a: eager vs graph-captured (uncompiled) pi0, then bf16 vs fp8 (compiled, the default) pi0
#   part b: verify fp8 (all linears, and with wqkv kept bf16), pi0.5 bench, the pi0 demo on CUDA
set -uo pipefail
out=${1:?usage: gpu_bench.sh OUT_DIR a|b}; part=${2:?part a or b}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
clean() { tr '\r' '\n' | grep -v 'it/s\|s/it\|%|\|^ *$\|WARNING'; }
bench() {  # name, then bench arguments
  local name=$1; shift
  python -m pi_policy bench --json "$out/$name.json" "$@" 2>&1 | clean | tee "$out/$name.txt"
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu_$part.txt"
if [ "$part" = a ]; then
  bench pi0_eager_vs_graph --preset pi0 --backend eager --backend bf16 --compile none --iters 100
  bench pi0_bf16_vs_fp8 --preset pi0 --backend bf16 --backend fp8 --iters 200
else
  python -m pi_policy verify --preset pi0 --backend fp8 --check-baseline --json "$out/verify_fp8.json" \
    2>&1 | clean | tee "$out/verify_fp8.txt"
  python -m pi_policy verify --preset pi0 --backend fp8 --fp8-keep-bf16 wqkv --json "$out/verify_fp8_wqkv_bf16.json" \
    2>&1 | clean | tail -12 | tee "$out/verify_fp8_wqkv_bf16.txt"
  bench pi05_bf16 --preset pi05 --backend bf16 --iters 200
  python -m pi_policy demo --preset pi0 --device cuda --out "$out/demo" 2>&1 | clean | tee "$out/demo_pi0.txt"
fi
