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

WORLD=$((NUM_NODES * NUM_GPUS))
if (( GLOBAL_BATCH % (WORLD * PER_DEVICE_BATCH) != 0 )); then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of $WORLD GPUs x PER_DEVICE_BATCH=$PER_DEVICE_BATCH" >&2
    exit 1
fi
GRAD_ACCUM=$((GLOBAL_BATCH / (WORLD * PER_DEVICE_BATCH)))
echo "stage 1: $WORLD GPUs x $PER_DEVICE_BATCH per device x $GRAD_ACCUM accumulation = global batch $GLOBAL_BATCH"

LAUNCHER=("$DEEPSPEED" --num_gpus "$NUM_GPUS")
if [[ -n "${HOSTFILE:-}" ]]; then
    LAUNCHER=("$DEEPSPEED" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS")
fi
IMAGE_ARGS=()
if [[ -n "$IMAGE_FOLDER" ]]; then
    IMAGE_ARGS=(--image_folder "$IMAGE_FOLDER")
fi

"${LAUNCHER[@]}" train/train.py \
    --stage 1 \
    --deepspeed "$ZERO" \
    --clip "$CLIP" --dino "$DINO" --llm "$LLM" \
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
