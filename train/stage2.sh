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
ZERO=${ZERO:-zero_configs/zero2.json}
NUM_NODES=${NUM_NODES:-1}
NUM_GPUS=${NUM_GPUS:-8}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
EPOCHS=${EPOCHS:-1}
LR=${LR:-2e-5}
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-2048}
WORKERS=${WORKERS:-4}
DEEPSPEED=${DEEPSPEED:-deepspeed}

if [[ ! -f "$STAGE1/config.json" ]]; then
    echo "STAGE1=$STAGE1 is not a COMM model folder: run train/stage1.sh first (its export is OUTPUT_DIR/final)" >&2
    exit 1
fi
WORLD=$((NUM_NODES * NUM_GPUS))
if (( GLOBAL_BATCH % (WORLD * PER_DEVICE_BATCH) != 0 )); then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of $WORLD GPUs x PER_DEVICE_BATCH=$PER_DEVICE_BATCH" >&2
    exit 1
fi
GRAD_ACCUM=$((GLOBAL_BATCH / (WORLD * PER_DEVICE_BATCH)))
echo "stage 2: $WORLD GPUs x $PER_DEVICE_BATCH per device x $GRAD_ACCUM accumulation = global batch $GLOBAL_BATCH"

LAUNCHER=("$DEEPSPEED" --num_gpus "$NUM_GPUS")
if [[ -n "${HOSTFILE:-}" ]]; then
    LAUNCHER=("$DEEPSPEED" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS")
fi
IMAGE_ARGS=()
if [[ -n "$IMAGE_FOLDER" ]]; then
    IMAGE_ARGS=(--image_folder "$IMAGE_FOLDER")
fi

"${LAUNCHER[@]}" train/train.py \
    --stage 2 \
    --deepspeed "$ZERO" \
    --model_name_or_path "$STAGE1" \
    --data "$DATA" ${IMAGE_ARGS[@]+"${IMAGE_ARGS[@]}"} \
    --output_dir "$OUTPUT_DIR" \
    --tune all \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps 0.03 --weight_decay 0.0 \
    --optim adamw_torch \
    --bf16 True \
    --gradient_checkpointing True \
    --model_max_length "$MODEL_MAX_LENGTH" \
    --group_by_length True \
    --dataloader_num_workers "$WORKERS" \
    --logging_steps 1 \
    --save_strategy steps --save_steps 1000 --save_total_limit 2 \
    --resume_from_checkpoint auto \
    "$@"
