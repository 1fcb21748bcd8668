#!/usr/bin/env bash
# The GPU numbers of docs/smooth-control.md: pi0's denoise cost with each real-time chunking mode.
# Usage: scripts/rtc_bench.sh OUT_DIR
#   1. default build (prefill and denoise torch.compile'd, CUDA graphs): off, inpaint, guided
#   2. denoise not compiled (graphs only): what guided costs where torch.compile is unavailable
# Targets (issue 12): inpaint within 5% of off, guided at most 2.5x off.
set -uo pipefail
out=${1:?usage: rtc_bench.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
clean() { tr '\r' '\n' | grep -v 'it/s\|s/it\|%|\|^ *$\|WARNING'; }
bench() {  # name, then bench arguments
  local name=$1; shift
  python -m pi_policy bench --json "$out/$name.json" "$@" 2>&1 | clean | tee "$out/$name.txt"
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
bench pi0_rtc --preset pi0 --backend bf16 --rtc off --rtc inpaint --rtc guided --iters 200
bench pi0_rtc_denoise_uncompiled --preset pi0 --backend bf16 --compile prefill --rtc off --rtc inpaint \
  --rtc guided --iters 100
grep -h "real-time chunking" "$out"/pi0_rtc*.txt
