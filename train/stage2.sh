#!/usr/bin/env bash
# COMM stage 2 (paper recipe): starts from stage 1's export; towers frozen; mergers, aligners, projection AND the
# LLM train on LLaVA-Instruct and Shikra-RD, each sampled at 50%. AdamW, cosine, lr 2e-5, warmup 3%,
# global batch 64, bf16, gradient checkpointing, 2048 tokens. Settings are environment variables; extra
# arguments go to train/train.py, e.g.
#   STAGE1=checkpoints/comm-stage1/final DATA=instruct.json:0.5,shikra_rd.json:0.5 bash train/stage2.sh --lora_r 128
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE1=${STAGE1:-checkpoints/comm-stage1/final}
DATA=${DATA:-data/stage2/llava_instruct_150k.json:0.5,data/stage2/shikra_rd.json:0.5}
IMAGE_FOLDER=${IMAGE_FOLDER:-}
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints/comm-stage2}
# Shared settings, defaults in train/launch_common.sh: ZERO (zero_configs/zero2.json), NUM_NODES (1), NUM_GPUS (8),
# PER_DEVICE_BATCH (8), GLOBAL_BATCH (64), EPOCHS (1), LR (2e-5), MODEL_MAX_LENGTH (2048), WORKERS (4), HOSTFILE,
# DEEPSPEED (deepspeed).
source train/launch_common.sh

if [[ ! -f "$STAGE1/config.json" ]]; then
    echo "STAGE1=$STAGE1 is not a COMM model folder: run train/stage1.sh first (its export is OUTPUT_DIR/final)" >&2
    exit 1
fi
comm_launch_setup 2

"${LAUNCHER[@]}" train/train.py \
    --stage 2 \
    --deepspeed "$ZERO" \
    --model_name_or_path "$STAGE1" \
    --data "$DATA" ${IMAGE_ARGS[@]+"${IMAGE_ARGS[@]}"} \
    "${TRAIN_ARGS[@]}" \
    "$@"
