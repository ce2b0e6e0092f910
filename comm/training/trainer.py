"""`CommTrainer`: checkpoints that hold only the trained weights and appear only when complete, a complete export
(LoRA merged), a progress bar."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
from torch.utils.data import Sampler
from transformers import ProgressCallback, Trainer
from transformers.integrations import deepspeed as hf_deepspeed
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from comm.model.modeling import CommForConditionalGeneration
from comm.training.checkpoints import (
    clear_staging,
    fault_point,
    publish,
    rotate,
    save_failure,
    staging_root,
    write_record,
)

if TYPE_CHECKING:
    from peft import LoraConfig

TRAINABLE_WEIGHTS = "trainable.safetensors"


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Build models outside DeepSpeed's ``zero.Init`` (transformers enters it whenever ZeRO-3 is configured).

    At load time the model is assembled from parts (meta device, resized embeddings) that zero.Init does not
    support, and the engine partitions it afterwards; at export the main process alone builds a plain copy, where
    zero.Init's collectives would wait forever for the other ranks.
    """
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


class CommTrainer(Trainer):
    """A `Trainer` whose checkpoints hold only the parameters being trained (never the frozen towers).

    Checkpoint folders get ``trainable.safetensors`` (plus the config and processor) instead of a full model, and
    DeepSpeed checkpoints are written with ``exclude_frozen_parameters``; resuming loads them back on top of the
    frozen weights the run starts from. A checkpoint is written into ``OUTPUT_DIR/.partial`` and renamed to
    ``checkpoint-N`` once every process has written its part (comm/training/checkpoints.py), so a run killed at any
    moment leaves the whole checkpoint or none. The final export (`export`) is a complete `from_pretrained` folder,
    renamed into place the same way.

    The private `Trainer` methods overridden here are the ones these checkpoints need (and the sampler that reads
    the lengths measured at tokenization); tests/test_trainer_overrides.py fails when transformers renames one,
    changes its parameters or stops calling it.
    """

    def __init__(self, *args, **kwargs):
        self._staging: Path | None = None  # the run's staging folder while a checkpoint is being written
        super().__init__(*args, **kwargs)
        self.trainable_names = {name for name, param in self.model.named_parameters() if param.requires_grad}
        if not self.trainable_names:
            raise ValueError("nothing to train: every parameter of the model is frozen")

    # --- sampling -------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None) -> Sampler | None:
        """Length-grouped batches from the lengths measured at tokenization (no pass over the images)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if self.args.train_sampling_strategy == "group_by_length" and lengths is not None:
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths
            )
        return super()._get_train_sampler(train_dataset)

    # --- checkpoints ------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into ``.partial`` and rename it to ``checkpoint-N`` once every process's part is there.

        Rotation (``save_total_limit``) runs after the rename, so the newest complete checkpoint is never deleted
        before the next one is complete. A full disk is one line naming the checkpoint; earlier ones stay as they were.
        """
        run_dir = Path(super()._get_output_dir(trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_root(run_dir) / final.name
        if self.args.should_save:
            clear_staging(run_dir)  # what interrupted saves left
        self.accelerator.wait_for_everyone()
        self._staging = staging.parent
        try:
            if self.args.should_save:
                staging.mkdir(parents=True, exist_ok=True)
            fault_point("start", self.state.global_step, self.args.process_index)
            super()._save_checkpoint(model, trial)
            self._staging = None
            best = self.state.best_model_checkpoint
            if best is not None and Path(best) == staging:  # the Trainer found the best checkpoint in the staging
                self.state.best_model_checkpoint = best = str(final)
                if self.args.should_save:
                    self.state.save_to_json(str(staging / TRAINER_STATE_NAME))
            self.accelerator.wait_for_everyone()  # every process has written its part
            if self.args.should_save:
                fault_point("files", self.state.global_step, self.args.process_index)
                write_record(staging, self.state.global_step)
                publish(staging, final)
                fault_point("published", self.state.global_step, self.args.process_index)
                protected = {final} | ({Path(best)} if best is not None else set())
                rotate(run_dir, self.args.save_total_limit, protected)
        except Exception as error:
            failure = save_failure(error, final, staging, run_dir)
            if failure is error:
                raise
            raise failure from error
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        """While a checkpoint is being written: the staging folder (the Trainer writes ``checkpoint-N`` there)."""
        if self._staging is not None:
            return str(self._staging)
        return super()._get_output_dir(trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint's model part: the trained weights only, the config and the processor (`export` writes all)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        trained = {
            name: tensor.detach().to("cpu").contiguous()
            for name, tensor in state_dict.items()
            if name in self.trainable_names
        }
        # Under ZeRO-3 without 16-bit gathering the state dict is empty: the DeepSpeed checkpoint holds the weights.
        if trained:
            safetensors.torch.save_file(trained, os.path.join(output_dir, TRAINABLE_WEIGHTS), metadata={"format": "pt"})
        self.accelerator.unwrap_model(self.model).config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self._staging is not None:
            fault_point("weights", self.state.global_step, self.args.process_index)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """DeepSpeed checkpoints without the frozen parameters (transformers excludes them for peft models only)."""
        if not self.is_deepspeed_enabled:
            super()._save_optimizer_and_scheduler(output_dir)
        else:
            # accelerate defines this wrapper only when deepspeed is installed: import it where DeepSpeed runs.
            from accelerate.utils import DeepSpeedSchedulerWrapper

            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        if self._staging is not None:
            fault_point("optimizer", self.state.global_step, self.args.process_index)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume from ``trainable.safetensors`` on top of the frozen weights the run started from."""
        path = os.path.join(resume_from_checkpoint, TRAINABLE_WEIGHTS)
        if not os.path.isfile(path):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        model = model if model is not None else self.model
        state = safetensors.torch.load_file(path)
        missing = sorted(self.trainable_names - state.keys())
        unexpected = sorted(state.keys() - set(model.state_dict()))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the parameters this run trains (was it written with other --tune or "
                f"--lora_r settings?): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        model.load_state_dict(state, strict=False)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Resume a DeepSpeed checkpoint non-strictly: it lacks the frozen parameters on purpose."""
        if not self.is_deepspeed_enabled or resume_from_checkpoint is None:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        # The DeepSpeed checkpoint lacks the frozen parameters on purpose: load its module states non-strictly.
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint, load_module_strict=False)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    # --- export -------------------------------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on the main process (gathered from ZeRO-3 partitions when needed)."""
        if self.is_deepspeed_enabled:
            return self.accelerator.get_state_dict(self.deepspeed)
        return self.accelerator.unwrap_model(self.model).state_dict()

    def export(self, export_dir: str | Path) -> None:
        """Write a complete model + processor folder that ``from_pretrained`` loads; LoRA is merged into the LLM.

        Every process takes part in gathering the ZeRO-3 partitions; the main process writes the folder into
        ``.partial`` beside it and renames it into place, so that an interrupted export leaves no partial folder.
        """
        export_dir = Path(export_dir)
        state_dict = self.full_state_dict()
        if self.args.should_save:
            staging = staging_root(export_dir.parent) / export_dir.name
            shutil.rmtree(staging, ignore_errors=True)
            trained = self.accelerator.unwrap_model(self.model)
            model = plain_model(trained.config, state_dict, lora_config(trained))
            model.generation_config = trained.generation_config  # as loaded, not re-derived from the training config
            model.save_pretrained(staging)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(staging)
            torch.save(self.args, os.path.join(staging, TRAINING_ARGS_NAME))
            publish(staging, export_dir)
        self.accelerator.wait_for_everyone()


def add_lora(model: CommForConditionalGeneration, config: LoraConfig) -> None:
    """Put LoRA adapters on the LLM's decoder body, in place (``model.language_model`` becomes a peft ``LoraModel``).

    peft's ``LoraModel`` rather than ``get_peft_model``: the latter's ``PeftModel`` reads transformers' deprecated
    ``is_gradient_checkpointing``, and COMM needs none of what it adds (the LLM body is wrapped, not the whole model).
    """
    from peft import LoraModel

    model.language_model = LoraModel(model.language_model, config, "default")


def lora_config(model: CommForConditionalGeneration) -> LoraConfig | None:
    """The LoRA config of the model's LLM when peft wraps it, else None."""
    peft_config = getattr(model.language_model, "peft_config", None)
    return peft_config[model.language_model.active_adapters[0]] if peft_config else None


def plain_model(
    config, state_dict: dict[str, torch.Tensor], lora: LoraConfig | None = None
) -> CommForConditionalGeneration:
    """A `CommForConditionalGeneration` holding ``state_dict`` (every key must match); a LoRA LLM merged by peft.

    The model is built on the meta device and takes the state dict's tensors as they are (no second copy of the
    weights), so it works from a ZeRO-3 state dict gathered on the main process. With ``lora`` the state dict is one
    of a model given `add_lora`: peft's ``merge_and_unload`` folds the adapters in, on copies of the base weights.
    """
    with zero3_init_disabled():
        with torch.device("meta"):
            model = CommForConditionalGeneration(config)
            if lora is not None:
                add_lora(model, lora)
        model.load_state_dict(state_dict, strict=True, assign=True)
    if lora is not None:
        model.language_model = model.language_model.merge_and_unload(safe_merge=True)
    return model


class ProgressBarCallback(ProgressCallback):
    """The Trainer's tqdm bar with loss, learning rate and samples/s in its postfix (instead of printed dicts)."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.start_time = time.perf_counter()
        self.start_step = state.global_step
        self.samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.postfix: dict[str, str] = {}

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is not None:
            elapsed = time.perf_counter() - self.start_time
            samples = (state.global_step - self.start_step) * self.samples_per_step
            self.postfix["samples/s"] = f"{samples / max(elapsed, 1e-9):.2f}"
            self.training_bar.set_postfix(self.postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs:
            return
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            self.postfix["lr"] = f"{logs['learning_rate']:.2e}"
        self.training_bar.set_postfix(self.postfix)
        if "train_runtime" in logs:
            summary = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}
            self.training_bar.write(str(summary))
