# Shared by train/stage1.sh and train/stage2.sh (sourced, not run): the defaults of their shared settings, and
# comm_launch_setup (batch-size check, launcher, shared train/train.py arguments).

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

# comm_launch_setup STAGE: checks GLOBAL_BATCH against NUM_NODES x NUM_GPUS x PER_DEVICE_BATCH and sets WORLD,
# GRAD_ACCUM, LAUNCHER (DeepSpeed, with --hostfile/--num_nodes when HOSTFILE is set), IMAGE_ARGS (--image_folder
# when IMAGE_FOLDER is set) and TRAIN_ARGS (the shared train/train.py recipe arguments); exits 1 when the global
# batch cannot be split evenly.
comm_launch_setup() {
    local stage=$1
    WORLD=$((NUM_NODES * NUM_GPUS))
    # (A zero WORLD x PER_DEVICE_BATCH fails here too: a division error in a function would not stop the script.)
    if (( WORLD * PER_DEVICE_BATCH == 0 || GLOBAL_BATCH % (WORLD * PER_DEVICE_BATCH) != 0 )); then
        echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of $WORLD GPUs x PER_DEVICE_BATCH=$PER_DEVICE_BATCH" >&2
        exit 1
    fi
    GRAD_ACCUM=$((GLOBAL_BATCH / (WORLD * PER_DEVICE_BATCH)))
    echo "stage $stage: $WORLD GPUs x $PER_DEVICE_BATCH per device x $GRAD_ACCUM accumulation" \
        "= global batch $GLOBAL_BATCH"

    LAUNCHER=("$DEEPSPEED" --num_gpus "$NUM_GPUS")
    if [[ -n "${HOSTFILE:-}" ]]; then
        LAUNCHER=("$DEEPSPEED" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS")
    fi
    IMAGE_ARGS=()
    if [[ -n "$IMAGE_FOLDER" ]]; then
        IMAGE_ARGS=(--image_folder "$IMAGE_FOLDER")
    fi

    # The paper recipe both stages share: full tuning, AdamW, cosine, warmup 3%, bf16, activation checkpointing.
    TRAIN_ARGS=(
        --output_dir "$OUTPUT_DIR"
        --tune all
        --num_train_epochs "$EPOCHS"
        --per_device_train_batch_size "$PER_DEVICE_BATCH"
        --gradient_accumulation_steps "$GRAD_ACCUM"
        --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps 0.03 --weight_decay 0.0
        --optim adamw_torch
        --bf16 True
        --activation_checkpointing True
        --model_max_length "$MODEL_MAX_LENGTH"
        --group_by_length True
        --dataloader_num_workers "$WORKERS"
        --logging_steps 1
        --save_strategy steps --save_steps 1000 --save_total_limit 2
        --resume_from_checkpoint auto
    )
}
