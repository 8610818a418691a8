#!/usr/bin/env bash
# Prepared GPU check (issue 19 part 5): visiontune's CUDA paths on random-init weights (no hub needed), in
# under 8 minutes on one GPU: LoRA/DoRA/QLoRA/Mona/full bf16 steps on DINOv3 ViT-S/B shapes, a QLoRA
# all-linear r64 step on vit_7b_patch16_dinov3 with gradient checkpointing, estimate vs measured peak memory,
# merged vs unmerged eval throughput, DDP on the GPUs present. Writes benchmarks/results/gpu/gpu_check.{json,md}.
#
#   make install && benchmarks/gpu_check.sh            # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run                  # anywhere: the same script on CPU with tiny backbones
#   benchmarks/gpu_check.sh --sections steps,eval      # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "gpu_check: $PY not found; run 'make install' first (or set PY=/path/to/python)" >&2
  exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # random-init weights only: never wait on the network
exec "$PY" benchmarks/gpu_check.py "$@"
