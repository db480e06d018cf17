#!/usr/bin/env bash
# The protocol for a session lent a CUDA GPU (e.g. through the device tool): install, run the CUDA kernel tests,
# the kernel benchmark and the speed-only end-to-end benchmark, all within about 20 minutes, and leave every
# result file in one folder (default benchmarks/results/gpu-<date>), with hardware and versions inside each file.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'"
python -m pip install --quiet -e ".[test]"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
} > "$out/environment.txt" 2>&1
# 1. Kernel tests on the GPU (fp16/bf16 against SDPA's own error, backward, fp8, compile).
timeout 420 pytest -q tests/kernels -m "cuda or not cuda" --timeout=300 --junitxml="$out/kernel-tests.xml" \
  | tee "$out/kernel-tests.txt" || true
# 2. Kernel benchmark (dense-equivalent and executed TFLOP/s, linearity, mask estimation, fp8, backward).
timeout 420 dit-sparse bench kernels --quick --out "$out" | tee "$out/bench-kernels.txt" || true
# 3. Speed-only end to end: Wan 2.1 1.3B architecture at 480p, 81 frames (32,760 tokens), bf16, random weights.
timeout 420 dit-sparse bench speed --arch wan2.1-1.3b --device cuda --dtype bfloat16 --repeats 3 \
  --plans "diagonal:window=[1,0.125,0.125]" "diagonal:window=[2,0.25,0.25]" --out "$out/speed-wan2.1-1.3b" \
  | tee "$out/bench-speed.txt" || true
echo "results in $out"
