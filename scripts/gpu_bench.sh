#!/usr/bin/env bash
# The GPU benchmark behind docs/performance.md. Usage: scripts/gpu_bench.sh OUT_DIR PART
#   part a: pi0, 3 views: {bf16, fp8} prefill x {bf16 (compiled PyTorch), triton, fp8 weights} denoise, with the
#           roofline; then pi0.5 with the PyTorch and the fused denoise
#   part b: pi0 with 1 and 2 views
#   part c: where the host's time goes (1 and 3 views); the openpi server's overhead over in-process infer; the
#           denoise cost of each real-time chunking mode
# Every comparison's baseline (the first configuration) runs in the same process, on the same card.
set -uo pipefail
out=${1:?usage: gpu_bench.sh OUT_DIR a|b}; part=${2:?part a or b}; iters=${ITERS:-100}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
clean() { tr '\r' '\n' | grep -v 'it/s\|s/it\|%|\|^ *$\|WARNING'; }
bench() {  # name, then bench arguments
  local name=$1; shift
  timeout 420 python -m pi_policy bench --iters "$iters" --json "$out/$name.json" "$@" 2>&1 | clean > "$out/$name.txt"
  grep -A9 '^| Component' "$out/$name.txt" | head -60; grep 'vs \|backend ' "$out/$name.txt"
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu_$part.txt"
if [ "$part" = a ]; then
  bench pi0_3views --preset pi0 --backend bf16 --backend fp8 --denoise bf16 --denoise triton --denoise fp8 --roofline
  bench pi05_3views --preset pi05 --denoise bf16 --denoise triton
elif [ "$part" = b ]; then
  bench pi0_1view --preset pi0 --cameras 1
  bench pi0_2views --preset pi0 --cameras 2
elif [ "$part" = c ]; then
  for views in 3 1; do
    timeout 120 python scripts/host_breakdown.py --preset pi0 --cameras $views --iters 300 2>&1 | clean | tail -8 \
      | tee "$out/host_breakdown_pi0_${views}views.txt"
  done
  timeout 240 python scripts/serve_overhead.py --preset pi0 --device cuda --iters 200 --json "$out/serve_overhead_pi0.json" \
    2>&1 | clean | tail -12 | tee "$out/serve_overhead_pi0.txt"
  bench pi0_rtc_inpaint --preset pi0 --rtc off --rtc inpaint
  bench pi0_rtc_guided --preset pi0 --rtc off --rtc guided
fi
