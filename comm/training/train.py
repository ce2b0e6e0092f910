"""COMM stage 1 / stage 2 training with the transformers Trainer (single process, torchrun, DeepSpeed). `train` takes
the argument dataclasses; `run_training` is what a training command runs once its options are parsed, by `main`
(``comm-train``, ``train/train.py``) or by ``comm train``.

    deepspeed --num_gpus 8 train/train.py --stage 1 --deepspeed zero_configs/zero2.json \\
        --clip openai/clip-vit-large-patch14-336 --dino facebook/dinov2-large --llm lmsys/vicuna-7b-v1.5 \\
        --data llava_pretrain.json refcoco.jsonl --output_dir checkpoints/stage1 ...
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ProgressCallback, TrainerCallback, set_seed

from comm.build import build_from_components
from comm.data import CommDataCollator, IssueLog, SupervisedDataset, build_dataset, parse_data_specs
from comm.errors import UserError, run_command
from comm.loading import load_model_and_processor
from comm.model.modeling import CommForConditionalGeneration
from comm.processing import CommProcessor
from comm.training.arguments import CommTrainingArguments, DataArguments, ModelArguments, parse_arguments
from comm.training.checkpoints import checkpoint_problem, newest_complete
from comm.training.plots import plot_loss
from comm.training.stopping import GracefulStop, StopOnSignal, continue_command
from comm.training.trainer import CommTrainer, ProgressBarCallback, add_lora, zero3_init_disabled

EXPORT_FOLDER = "final"
DATA_SUMMARY = "data_summary.json"
LOG_HISTORY = "log_history.json"
LOSS_PLOT = "loss.png"
AUTO_RESUME = ("auto", "last", "true")
# How the stop message says to continue a run started from Python.
CONTINUE_IN_PYTHON = "train() again with the same arguments and resume_from_checkpoint='auto'"


@dataclass
class TrainResult:
    """What a training run produced: its folders, the Trainer's log history and the data summary.

    A run stopped by a signal before its last step has ``stopped_by`` (the signal's number) and ``checkpoint`` (the
    one it wrote) set, and no export.
    """

    output_dir: Path
    export_dir: Path
    log_history: list[dict]
    data_summary: dict
    stopped_by: int | None = None
    checkpoint: Path | None = None


def load_dtype(args: CommTrainingArguments) -> torch.dtype:
    """Weights dtype at load: 16-bit under DeepSpeed mixed precision (it casts anyway), else fp32 (Trainer autocast)."""
    if args.deepspeed and args.bf16:
        return torch.bfloat16
    if args.deepspeed and args.fp16:
        return torch.float16
    return torch.float32


def load_model(
    model_args: ModelArguments, data_args: DataArguments, training_args: CommTrainingArguments
) -> tuple[CommForConditionalGeneration, CommProcessor]:
    """The model and processor from a COMM folder or from component checkpoints; towers frozen."""
    dtype = load_dtype(training_args)
    with zero3_init_disabled():
        if model_args.model_name_or_path:
            model, processor = load_model_and_processor(
                model_args.model_name_or_path,
                device="cpu",  # the Trainer (or DeepSpeed) places the model
                dtype=dtype,
                model_max_length=data_args.model_max_length,
                attn_implementation=model_args.attn_implementation,
            )
        else:
            model, processor = build_from_components(
                model_args.clip,
                model_args.dino,
                model_args.llm,
                tokenizer=model_args.tokenizer,
                dtype=dtype,
                attn_implementation=model_args.attn_implementation,
                model_max_length=data_args.model_max_length,
                **model_args.config_fields(),
            )
    if processor.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (and no unk/eos token to use as one)")
    model.config.loss_weighting = model_args.loss_weighting
    positions = getattr(model.config.text_config, "max_position_embeddings", None)
    if positions is not None and data_args.model_max_length > positions and training_args.process_index == 0:
        print(
            f"warning: --model_max_length {data_args.model_max_length} exceeds the LLM's max_position_embeddings "
            f"({positions})",
            file=sys.stderr,
        )
    return model, processor


def configure_trainable(model: CommForConditionalGeneration, model_args: ModelArguments) -> None:
    """Set what trains: towers never; the vision-side modules always; the LLM (body and head) fully, through LoRA on
    its body, or not at all."""
    model.requires_grad_(False)
    if model_args.lora_r:
        from peft import LoraConfig

        config = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=list(model_args.lora_target_modules),
            bias="none",
        )
        add_lora(model, config)
    elif model_args.tune == "all":
        model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    for module in model.trainable_vision_modules().values():
        module.requires_grad_(True)
    model.freeze_towers()


def check_deepspeed_config(args: CommTrainingArguments) -> None:
    """ZeRO-3 must gather 16-bit weights at save time, or the export would not be a loadable model."""
    config = getattr(args, "hf_deepspeed_config", None)
    if config is None or not config.is_zero3():
        return
    if not config.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save", False):
        raise ValueError(
            f"--deepspeed {args.deepspeed}: ZeRO-3 needs zero_optimization.stage3_gather_16bit_weights_on_model_save "
            "= true so that the final export holds the full weights"
        )


def resolve_resume(args: CommTrainingArguments) -> str | None:
    """The checkpoint to resume from: a given complete folder, or with 'auto' the newest complete one in output_dir.

    'auto' names, in one line, the incomplete folders newer than the one it takes (interrupted saves) and leaves them.
    """
    value = args.resume_from_checkpoint
    if not value:
        return None
    if value.lower() in AUTO_RESUME:
        last, passed_over = newest_complete(args.output_dir)
        if args.process_index == 0:
            taken = f"resuming from {last}" if last else f"no complete checkpoint in {args.output_dir}: starting afresh"
            skipped = ", ".join(f"{path} ({why})" for path, why in passed_over)
            note = f"; passed over the incomplete {skipped}: left in place to remove as you like (saves clear .partial)"
            print(f"--resume_from_checkpoint {value}: {taken}{note if passed_over else ''}", file=sys.stderr)
        return str(last) if last else None
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint: no such checkpoint folder: {value}")
    problem = checkpoint_problem(value)
    if problem is not None:
        raise UserError(
            f"--resume_from_checkpoint {value} is not a complete checkpoint: {problem} (an interrupted save?); "
            "give an earlier one, or 'auto' for the newest complete one"
        )
    return value


def signal_name(signum: int) -> str:
    """SIGTERM, SIGINT, ..."""
    return signal.Signals(signum).name


def write_outputs(output_dir: Path, log_history: list[dict], issues: IssueLog, stage: int) -> None:
    """``log_history.json``, ``loss.png`` and ``data_summary.json`` in ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / LOG_HISTORY).write_text(json.dumps(log_history, indent=2) + "\n")
    plot_loss(log_history, output_dir / LOSS_PLOT, title=f"COMM stage {stage}: training loss")
    issues.write(output_dir / DATA_SUMMARY)


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: CommTrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
    continue_with: str = CONTINUE_IN_PYTHON,
) -> TrainResult:
    """Train COMM as the arguments say, export ``{output_dir}/final`` and return what was produced.

    SIGTERM or SIGINT during training finishes the step, writes a checkpoint and returns without an export (unless
    the last step was done); the main process prints how to continue the run, ``continue_with`` (a command line
    passes its own command, see `continue_command`).
    """
    model_args.validate()
    data_args.validate()
    check_deepspeed_config(training_args)
    set_seed(training_args.seed)
    model, processor = load_model(model_args, data_args, training_args)
    configure_trainable(model, model_args)
    issues = IssueLog(strict=data_args.strict)
    dataset = load_training_data(data_args, training_args, processor, issues)
    trainer = CommTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=CommDataCollator.for_processor(processor),
        processing_class=processor,
        callbacks=list(callbacks),
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBarCallback())
    return run_trainer(trainer, issues, continue_with)


def load_training_data(
    data_args: DataArguments, training_args: CommTrainingArguments, processor: CommProcessor, issues: IssueLog
) -> SupervisedDataset:
    """The training mixture (bad samples noted in ``issues``, whose summary the main process prints); ValueError when
    no sample is left."""
    is_main = training_args.process_index == 0
    dataset = build_dataset(
        parse_data_specs(data_args.data),
        processor,
        issues,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        image_folder=data_args.image_folder,
        model_max_length=data_args.model_max_length,
        verify_images=data_args.verify_images,
        progress=is_main and not training_args.disable_tqdm,
        cache_images=data_args.cache_images,
    )
    if is_main:
        print(issues.format_summary())
    if len(dataset) == 0:
        raise ValueError("no training samples are left after validation: see the data summary above")
    return dataset


def run_trainer(trainer: CommTrainer, issues: IssueLog, continue_with: str) -> TrainResult:
    """Train (resuming as ``--resume_from_checkpoint`` says) until the last step or a stop signal; then export and
    write the outputs, or, stopped by a signal, say where the checkpoint is and how to continue."""
    args = trainer.args
    is_main = args.process_index == 0
    output_dir = Path(args.output_dir)
    export_dir = output_dir / EXPORT_FOLDER
    resume = resolve_resume(args)
    with GracefulStop(announce=is_main) as stop:
        trainer.add_callback(StopOnSignal(stop))
        trainer.train(resume_from_checkpoint=resume)
        log_history = list(trainer.state.log_history)
        step = trainer.state.global_step
        if stop.signum is not None and step < trainer.state.max_steps:
            checkpoint = output_dir / f"checkpoint-{step}"
            if is_main:
                print(
                    f"stopped by {signal_name(stop.signum)} after step {step} of {trainer.state.max_steps}: "
                    f"checkpoint {checkpoint}; continue with: {continue_with}",
                    file=sys.stderr,
                )
            return TrainResult(output_dir, export_dir, log_history, issues.summary(), stop.signum, checkpoint)
        trainer.export(export_dir)
    if is_main:
        write_outputs(output_dir, log_history, issues, args.stage)
        print(issues.format_summary())
        print(f"exported model and processor to {export_dir}")
    return TrainResult(output_dir, export_dir, log_history, issues.summary())


def run_training(arguments: tuple[ModelArguments, DataArguments, CommTrainingArguments], continue_with: str) -> int:
    """A training command once its options are parsed: `train`, then the exit status, 0, or 143/130 for a run that
    SIGTERM/SIGINT stopped (checkpoint written)."""
    result = train(*arguments, continue_with=continue_with)
    # Tear the process group down before the interpreter does: left to exit, its gloo/shm threads can die
    # with "terminate called without an active exception" and a non-zero status after a successful run.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if result.stopped_by is None else 128 + result.stopped_by


def main(argv: Sequence[str] | None = None) -> int:
    """The ``comm-train`` command on ``argv`` (default ``sys.argv[1:]``): `run_training`'s exit status; a user error
    is one ``error:`` line and status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: run_training(parse_arguments(argv), continue_command(argv)))


if __name__ == "__main__":
    sys.exit(main())
