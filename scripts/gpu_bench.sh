#!/usr/bin/env bash
# The GPU benchmark behind docs/performance.md. Usage: scripts/gpu_bench.sh OUT_DIR PART
#   part a: pi0, 3 views: {bf16, fp8} prefill x {bf16 (compiled PyTorch), triton, fp8 weights} denoise, with the
#           roofline; then pi0.5 with the PyTorch and the fused denoise
#   part b: pi0 with 1 and 2 views
#   part c: where the host's time goes (1 and 3 views); the openpi server's overhead over in-process infer; the
#           denoise cost of each real-time chunking mode
#   part d: the persistent action expert: its own benchmark (accuracy, whole denoise, each task kind, tile and
#           program-count sweep; pi0 and pi0.5, batch 1/4/16), then bench with every denoise backend
#   part e: many robots on one GPU, the per-stage cost: bench at batch 1, 4 and 8
#   part f: many robots on one GPU, served: 8 robots at 10 Hz through `pi-policy serve` with dynamic batching,
#           and the same with max_batch 1
#   part g: the FP8 prefill's variants: fused vs separate activation quantization, per-row vs per-tensor scales
#   part h: static FP8 scales from calibrate, FP8 vision, and verify's every FP8 combination against one baseline
# Each part fits one 10-minute device call.
# Every comparison's baseline (the first configuration) runs in the same process, on the same card.
set -uo pipefail
out=${1:?usage: gpu_bench.sh OUT_DIR PART}; part=${2:?part: a to h}; iters=${ITERS:-100}
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
elif [ "$part" = d ]; then
  timeout 420 python scripts/persistent_bench.py "$out/persistent" --presets pi0,pi05 --batches 1,4,16 --sweep 2>&1 \
    | clean | tail -40 | tee "$out/persistent_bench.txt"
  bench pi0_denoise_backends --preset pi0 --denoise bf16 --denoise triton --denoise persistent \
    --denoise persistent-fp8 --roofline
elif [ "$part" = e ]; then
  for batch in 1 4 8; do bench "pi0_batch$batch" --preset pi0 --batch "$batch"; done
elif [ "$part" = f ]; then
  for max_batch in 8 1; do
    timeout 290 python scripts/fleet_load.py --preset pi0 --device cuda --robots 8 --rate 10 --duration 30 \
      --max-batch "$max_batch" --json "$out/fleet_pi0_8robots_max_batch$max_batch.json" 2>&1 | clean | tail -14 \
      | tee "$out/fleet_pi0_8robots_max_batch$max_batch.txt"
  done
elif [ "$part" = g ]; then
  bench pi0_fp8 --preset pi0 --backend bf16 --backend fp8 --roofline
  bench pi0_fp8_fused_quant --preset pi0 --backend bf16 --backend fp8 --roofline --fp8-fused-quant
  bench pi0_fp8_row --preset pi0 --backend bf16 --backend fp8 --fp8-dynamic row
elif [ "$part" = h ]; then
  timeout 240 python -m pi_policy calibrate --preset pi0 --device cuda --samples 8 --out "$out/calib_pi0.json" 2>&1 \
    | clean | tail -5
  bench pi0_fp8_static --preset pi0 --backend bf16 --backend fp8 --fp8-calibration "$out/calib_pi0.json"
  bench pi0_fp8_vision --preset pi0 --backend fp8 --vision bf16 --vision fp8
  timeout 420 python -m pi_policy verify --preset pi0 --device cuda --combinations --check-baseline \
    --json "$out/verify_pi0_combinations.json" 2>&1 | clean | tail -30 | tee "$out/verify_pi0_combinations.txt"
fi
