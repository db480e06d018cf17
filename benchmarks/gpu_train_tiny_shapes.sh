#!/usr/bin/env bash
# Train tiny-shapes on a CUDA GPU in resumable pieces (a device session allows ~10 minutes per command): each call
# trains for at most MINUTES, checkpoints into runs/tiny-shapes-gpu (carry this folder to the next call), and the
# call that reaches STEPS exports the EMA weights into the package folder. Batches are drawn by CPU workers.
#
#   bash benchmarks/gpu_train_tiny_shapes.sh [STEPS=8000] [MINUTES=8.5]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-8000}"
minutes="${2:-8.5}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'"
python -m pip install --quiet -e .
ckpt=runs/tiny-shapes-gpu
# --max-minutes counts the whole run's wall time: allow this call MINUTES more than what the checkpoint holds.
elapsed=$(python -c "import torch; print(torch.load('$ckpt/checkpoint.pt', map_location='cpu', weights_only=False)['elapsed'] / 60)" 2>/dev/null || echo 0)
budget=$(python -c "print($elapsed + $minutes)")
# Coordinate input channels: without them motion stays at chance (zoo README, "Found"). Larger shapes, the
# object-weighted loss (26% -> 50% held-out on CPU, zoo README "larger objects") and the shape weight (50% -> 74%,
# zoo README "shape-weighted loss").
python tools/train_tiny_shapes.py --device cuda --workers 12 --threads 4 --batch-size 64 \
  --config '{"coordinate_channels": true}' --half-size 7.5,9.5 --object-weight 4 --shape-weight 10 --steps "$steps" --mixed-from 0 --out "$ckpt" --resume --max-minutes "$budget" --no-export
last=$(python -c "import torch; print(torch.load('$ckpt/checkpoint.pt', map_location='cpu', weights_only=False)['step'])")
# Does the run tie words to what they show yet? Motion is the word CPU runs never learned (zoo README).
python -m dit_sparse.zoo.conditioning --checkpoint "$ckpt/checkpoint.pt" --device cuda --word-choice --clips 48 \
  --sigmas 0.98,0.9 > "$ckpt/word_choice-step$last.json"
if [ "$last" -ge "$steps" ]; then
  python tools/train_tiny_shapes.py --out "$ckpt" --export-only
  echo "trained $steps steps; exported to dit_sparse/zoo/weights/tiny-shapes"
else
  echo "at step $last of $steps: run this script again with $ckpt carried"
fi
