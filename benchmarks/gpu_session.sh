#!/usr/bin/env bash
# One call on a GPU machine (about 8 minutes at most): DP / non-DP time and memory per step (throughput.py) at the
# benchmark's small batch and at a realistic DP physical batch, with the flat noise draw (the default) and with one
# draw per parameter tensor, then the noise cost alone (noise_cost.py). Each part runs under its own `timeout` and
# streams its rows to a log as they are measured, so a part cut short still leaves what it measured.
#
#   bash benchmarks/gpu_session.sh OUT_DIR            # on a GPU; OUT_DIR defaults to $OUT, then ./gpu_session_out
#   bash benchmarks/gpu_session.sh OUT_DIR --tiny     # CPU check of the script: two small networks, tiny inputs
#
# Sizes (override by environment): BATCH_2D=32 BATCH_3D=4 (small), BIG_BATCH_2D=256 BIG_BATCH_3D=8 (realistic),
# SIZE_2D=224 SIZE_3D=96.
set -u
OUT_DIR=${1:-${OUT:-gpu_session_out}}
TINY=${GPU_SESSION_TINY:-0}
[ "${2:-}" = "--tiny" ] && TINY=1
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")" || exit 1

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  python -c "import torch, monai, opacus; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai',
monai.__version__, 'opacus', opacus.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available()
else 'cpu')"; } 2>&1 | tee "$OUT_DIR/versions.txt"

NETS=("DenseNet-2D (dp_classification_2d)" "DenseNet-3D (dp_classification_3d)" "UNet-2D (dp_segmentation_2d)"
      "UNet-3D (dp_segmentation_3d)" "DenseNet121-2D (model-zoo scale)" "ResNet-3D 32-256 (model-zoo scale)"
      "SegResNet-3D (model-zoo scale)")  # UNet-2D 16-128 (model-zoo scale) is dp_segmentation_2d's network
B2=${BATCH_2D:-32}; B3=${BATCH_3D:-4}; BB2=${BIG_BATCH_2D:-256}; BB3=${BIG_BATCH_3D:-8}; S2=${SIZE_2D:-224}
S3=${SIZE_3D:-96}; T_SMALL=130; T_BIG=150; T_PER_TENSOR=70; T_NOISE=40; STEPS=(--warmup 2 --repeats 5)
if [ "$TINY" = 1 ]; then
  NETS=("DenseNet-2D (dp_classification_2d)" "UNet-3D (dp_segmentation_3d)")
  B2=2; B3=1; BB2=4; BB3=2; S2=32; S3=16; T_SMALL=300; T_BIG=300; T_PER_TENSOR=300; T_NOISE=120
  STEPS=(--warmup 1 --repeats 1)
fi

part() {  # part NAME SECONDS ARGS...: one throughput.py run, rows streamed to NAME.log, the table to NAME.md
  local name=$1 seconds=$2; shift 2
  echo "== $name (timeout $seconds s)"
  timeout -k 5 "$seconds" python throughput.py --networks "${NETS[@]}" --sizes-2d "$S2" --sizes-3d "$S3" \
    "${STEPS[@]}" --out "$OUT_DIR/$name.md" "$@" 2>&1 | tee "$OUT_DIR/$name.log" | grep -E "^\| |rror"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

part small_batch_flat "$T_SMALL" --batch-2d "$B2" --batch-3d "$B3" \
  --methods non-DP per-sample ghost "non-DP bf16" "ghost bf16"
part big_batch_flat "$T_BIG" --batch-2d "$BB2" --batch-3d "$BB3" \
  --methods non-DP ghost "non-DP bf16" "ghost bf16" per-sample
part small_batch_per_tensor "$T_PER_TENSOR" --batch-2d "$B2" --batch-3d "$B3" --methods non-DP ghost --noise per-tensor
DEV=cuda; [ "$TINY" = 1 ] && DEV=cpu
echo "== noise_cost (timeout $T_NOISE s)"
REP=5; [ "$TINY" = 1 ] && REP=1
timeout -k 5 "$T_NOISE" python noise_cost.py --device "$DEV" --repeats "$REP" 2>&1 | tee "$OUT_DIR/noise_cost.md"
ls -l "$OUT_DIR"
