"""Command-line arguments of `comm-train`: model source and what to tune, data, and the Trainer's settings."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from transformers import HfArgumentParser, TrainingArguments

from comm.errors import OneLineUsageErrors
from comm.extras import require_extra

# CommConfig fields that can be set when a model is assembled from component checkpoints.
CONFIG_FIELDS = (
    "clip_layers",
    "dino_layers",
    "grid_size",
    "concat",
    "layerscale_init",
    "layerscale_softmax",
    "dino_aligner_depth",
    "dino_aligner_ratio",
    "dino_image_size",
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPORTING_BACKENDS = ("tensorboard", "wandb")


@dataclass
class ModelArguments:
    """Where the model comes from (a COMM folder or separate tower/LLM checkpoints) and which parts train."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A COMM model folder (stage 1's export for stage 2, or a released model)."}
    )
    clip: str | None = field(default=None, metadata={"help": "CLIP checkpoint (stage 1 from scratch)."})
    dino: str | None = field(default=None, metadata={"help": "DINOv2 checkpoint (stage 1 from scratch)."})
    llm: str | None = field(default=None, metadata={"help": "LLM checkpoint (stage 1 from scratch)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder or name (default: the LLM's)."})
    clip_layers: list[int] | None = field(default=None, metadata={"help": "CLIP layers to merge (1-based)."})
    dino_layers: list[int] | None = field(default=None, metadata={"help": "DINOv2 layers to merge (1-based)."})
    grid_size: int | None = field(default=None, metadata={"help": "Visual tokens per tower: grid_size**2."})
    concat: str | None = field(
        default=None, metadata={"help": "channel or sequence concatenation.", "choices": ["channel", "sequence"]}
    )
    layerscale_init: float | None = field(default=None, metadata={"help": "Initial layer scale (default 1/L)."})
    layerscale_softmax: bool | None = field(default=None, metadata={"help": "Softmax over the layer scales."})
    dino_aligner_depth: int | None = field(default=None, metadata={"help": "Layers of the DINOv2 MLP aligner."})
    dino_aligner_ratio: int | None = field(default=None, metadata={"help": "Hidden width ratio of the aligner."})
    dino_image_size: int | None = field(default=None, metadata={"help": "Input side of the DINOv2 tower."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})
    tune: Literal["all", "projector"] = field(
        default="all",
        metadata={
            "help": "all: merger, aligners, projection and the LLM train (the paper's recipe); projector: only "
            "the modules between the towers and the LLM train (LLaVA's projector-only stage 1). Towers are "
            "always frozen."
        },
    )
    loss_weighting: Literal["token", "sample"] = field(
        default="token",
        metadata={
            "help": "token: every labelled token counts the same (transformers' causal-LM loss); sample: every "
            "sample counts the same whatever its answer length, so one-word answers (yes/no) are not drowned by "
            "long ones (boxes) in a mixture."
        },
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the LLM (0: full fine-tuning)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS), metadata={"help": "LLM linear layers that get LoRA adapters."}
    )

    def config_fields(self) -> dict:
        """The CommConfig fields given on the command line."""
        return {name: getattr(self, name) for name in CONFIG_FIELDS if getattr(self, name) is not None}

    def validate(self) -> None:
        """Raise ValueError naming the arguments when the model source or the tuning switches contradict."""
        components = {"--clip": self.clip, "--dino": self.dino, "--llm": self.llm}
        given = [name for name, value in components.items() if value]
        if self.model_name_or_path:
            extra = given + (["--tokenizer"] if self.tokenizer else [])
            extra += [f"--{name}" for name in self.config_fields()]
            if extra:
                raise ValueError(
                    f"--model_name_or_path loads a complete COMM model; {', '.join(extra)} only apply when a model "
                    "is assembled from --clip --dino --llm"
                )
        elif len(given) != 3:
            missing = [name for name, value in components.items() if not value]
            raise ValueError(
                "give either --model_name_or_path (a COMM folder) or all of --clip --dino --llm; "
                f"missing {', '.join(missing)}"
            )
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0, got {self.lora_r}")
        if self.lora_r and self.tune == "projector":
            raise ValueError("--lora_r trains the LLM but --tune projector freezes it: use one or the other")
        if self.lora_r and not self.lora_target_modules:
            raise ValueError("--lora_target_modules is empty")
        if self.attn_implementation == "flash_attention_2":
            require_extra("flash_attn", "--attn_implementation flash_attention_2")


@dataclass
class DataArguments:
    """Training files, images and how bad input is handled."""

    data: list[str] = field(
        metadata={
            "help": "Training files: LLaVA .json, REC or conversation .jsonl, each optionally path:ratio "
            "(e.g. --data llava_instruct.json:0.5 shikra_rd.json:0.5). Repeat the flag or use a comma list.",
            "action": "extend",
            "aliases": ["--data_path"],
        }
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder of relative image paths (default: each data file's folder)."}
    )
    model_max_length: int = field(
        default=2048, metadata={"help": "Longest sample in tokens, image tokens included; longer ones are skipped."}
    )
    strict: bool = field(default=False, metadata={"help": "Stop at the first bad sample instead of skipping it."})
    verify_images: bool = field(
        default=False, metadata={"help": "Decode every image at load time (default: open the header only)."}
    )
    cache_images: bool = field(
        default=False,
        metadata={
            "help": "Keep each image's pixel values in memory after its first use (small sets seen for many epochs; "
            "about 2 x 3 x side^2 floats an image)."
        },
    )

    def validate(self) -> None:
        """Raise ValueError on impossible values."""
        if self.model_max_length < 1:
            raise ValueError(f"--model_max_length must be positive, got {self.model_max_length}")


@dataclass
class CommTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's recipe as defaults and a few LLaVA-style conveniences.

    Defaults: AdamW (torch), cosine schedule, lr 2e-5, warmup 3% of the steps, logging every step. On a machine
    without CUDA ``use_cpu`` is switched on. ``report_to`` defaults to the installed tensorboard/wandb, else none.
    """

    stage: int = field(default=1, metadata={"help": "Training stage (1 or 2); names the run.", "choices": [1, 2]})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Warmup steps, or a ratio of the total steps when below 1."}
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "LLaVA-style alias: warmup as a ratio of the total steps."}
    )
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (adamw_torch avoids DeepSpeed's Adam ops)."})
    logging_steps: float = field(default=1, metadata={"help": "Log (loss, learning rate) every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all collated inputs (images)."})
    group_by_length: bool = field(
        default=False, metadata={"help": "LLaVA-style alias of --train_sampling_strategy group_by_length."}
    )
    report_to: None | str | list[str] = field(
        default=None, metadata={"help": "Logging integrations; default: tensorboard/wandb when installed, else none."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder to resume from, or 'auto' for the last checkpoint in output_dir."},
    )

    def __post_init__(self):
        if self.deepspeed:
            require_extra("deepspeed", f"--deepspeed {self.deepspeed}")
        if not self.use_cpu and not torch.cuda.is_available():
            self.use_cpu = True
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.report_to is None:
            installed = [name for name in REPORTING_BACKENDS if importlib.util.find_spec(name) is not None]
            self.report_to = installed or "none"
        if self.run_name is None:
            self.run_name = f"comm-stage{self.stage}"
        super().__post_init__()


class OneLineArgumentParser(OneLineUsageErrors, HfArgumentParser):
    """transformers' dataclass argument parser with one-line usage errors (its usage runs to 120 lines)."""


# comm-train's options, in the order `train` takes them.
TRAINING_ARGUMENTS = (ModelArguments, DataArguments, CommTrainingArguments)


def dataclasses_from_namespace(namespace: argparse.Namespace, types: Sequence[type]) -> tuple:
    """One instance of each dataclass in ``types`` from the options parsed into ``namespace`` by a parser built from
    them (what `HfArgumentParser.parse_args_into_dataclasses` makes of its own parse)."""
    return tuple(cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if f.init}) for cls in types)


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, CommTrainingArguments]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into the three argument dataclasses (`train` validates them)."""
    return OneLineArgumentParser(TRAINING_ARGUMENTS).parse_args_into_dataclasses(args=argv)
