#!/usr/bin/env bash
# COMM stage 1 (paper recipe): towers frozen; LLN-Layerscale mergers, aligners, projection AND the LLM train.
# AdamW, cosine, lr 2e-5, warmup 3%, global batch 64, bf16, gradient checkpointing, 2048 tokens.
# Every setting below is an environment variable; extra arguments go to train/train.py, e.g.
#   DATA=my_pretrain.json,refcoco.jsonl IMAGE_FOLDER=/data/images bash train/stage1.sh --tune projector
#   NUM_GPUS=4 PER_DEVICE_BATCH=8 bash train/stage1.sh          # accumulation 2 keeps the global batch at 64
#   HOSTFILE=hostfile NUM_NODES=2 PER_DEVICE_BATCH=4 bash train/stage1.sh   # multi-node via the same launcher
set -euo pipefail
cd "$(dirname "$0")/.."

CLIP=${CLIP:-openai/clip-vit-large-patch14-336}
DINO=${DINO:-facebook/dinov2-large}
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
DATA=${DATA:-data/stage1/llava_pretrain.json,data/stage1/refcoco_rec.jsonl}
IMAGE_FOLDER=${IMAGE_FOLDER:-}
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints/comm-stage1}
# Shared settings, defaults in train/launch_common.sh: ZERO (zero_configs/zero2.json), NUM_NODES (1), NUM_GPUS (8),
# PER_DEVICE_BATCH (8), GLOBAL_BATCH (64), EPOCHS (1), LR (2e-5), MODEL_MAX_LENGTH (2048), WORKERS (4), HOSTFILE,
# DEEPSPEED (deepspeed).
source train/launch_common.sh
comm_launch_setup 1

"${LAUNCHER[@]}" train/train.py \
    --stage 1 \
    --deepspeed "$ZERO" \
    --clip "$CLIP" --dino "$DINO" --llm "$LLM" \
    --data "$DATA" ${IMAGE_ARGS[@]+"${IMAGE_ARGS[@]}"} \
    "${TRAIN_ARGS[@]}" \
    "$@"
