"""The settings of a `comm demo` run, its command-line options among them (declared once, on the fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comm.conversation import ConversationTemplate


@dataclass
class DemoConfig:
    """Everything the demo run depends on; the defaults finish in under 10 minutes on a 2-core CPU.

    A field with a ``help`` text is an option of ``comm demo`` (`comm.dataclass_options`: ``--train-images`` for
    ``train_images``); the others are the demo's fixed settings.
    """

    out: Path = field(default=Path("comm-demo"), metadata={"help": "output folder (default: %(default)s)"})
    seed: int = field(
        default=0, metadata={"help": "seed of the world, the model and the training (default: %(default)s)"}
    )
    steps: int = field(
        default=2200, metadata={"help": "optimizer steps over both stages, at least 2 (default: %(default)s)"}
    )
    stage1_fraction: float = 0.05  # share of the steps spent in stage 1
    # Both stages train on the whole mixture. A ratio is the share of a file each stage samples (as in --data
    # FILE:RATIO): an epoch of the default world holds about 16k REC expressions, 13k POPE and 8k attribute
    # questions and 4k captions. A loss weight multiplies the loss of the file's samples (--data FILE:RATIO:WEIGHT):
    # with every sample weighted the same, REC learned about 4x slower in the mixture than alone (README, findings).
    mixture_ratios: dict[str, float] = field(
        default_factory=lambda: {"rec": 1.0, "pope": 1.0, "attributes": 1.0, "captions": 0.25}
    )
    loss_weights: dict[str, float] = field(default_factory=lambda: {"rec": 4.0})
    batch_size: int = field(default=32, metadata={"help": "training batch size (default: %(default)s)"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate (default: %(default)s)"})
    train_images: int = field(
        default=4000, metadata={"help": "training images generated, at least 10 (default: %(default)s)"}
    )
    test_images: int = field(
        default=100, metadata={"help": "held-out images generated, at least 2 (default: %(default)s)"}
    )
    pope_pairs_per_image: int = 2
    eval_batch_size: int = 64
    visualize: int = 8
    captions_shown: int = 4
    curve_every: int = 440  # optimizer steps between two points of the held-out learning curve (0: no curve)
    curve_items: int = 96  # held-out REC expressions and POPE questions measured at each point
    # Results differ in the last bits between thread counts.
    threads: int = field(default=2, metadata={"help": "torch threads (default %(default)s; 0 keeps torch's default)"})
    random_towers: bool = field(
        default=False, metadata={"help": "random-init tiny towers instead of the shipped pretrained ones"}
    )
    clip: str | None = field(
        default=None, metadata={"help": "a real CLIP checkpoint (name or folder) instead of the shipped tiny tower"}
    )
    dino: str | None = field(
        default=None, metadata={"help": "a real DINOv2 checkpoint instead of the shipped tiny tower"}
    )
    llm: str | None = field(
        default=None, metadata={"help": "a real causal LM checkpoint (and its tokenizer) instead of the tiny one"}
    )
    # Box text with 2 decimals (LLaVA-1.5's): 2 digits per coordinate instead of 3, and the model grounds about
    # three times better at the same step (README, findings). No system prompt: shorter sequences, cheaper steps.
    box_decimals: int = 2
    template: ConversationTemplate = field(default_factory=lambda: ConversationTemplate(system=""))
    # The demo's tiny model: 8x8 visual tokens per tower (a 4x4 grid grounds ~3x worse), a 4-layer 128-wide
    # Llama. Its LLM starts at the 1/sqrt(width) init: transformers' 0.02 default is tuned for widths in the
    # thousands and, at width 128, leaves attention nearly uniform, so the model takes far longer to learn where
    # to look. The tower fields apply to random towers; shipped or given towers bring their own configs.
    model_overrides: dict[str, Any] = field(
        default_factory=lambda: {
            "grid_size": 8,
            # The visual tokens of an image share one LLM position, and each carries its grid cell's embedding:
            # REC only, after 8k samples, Acc@0.5 0.25 against 0.09 with one position per token and no cell
            # embedding, LLaVA's way (README, findings).
            "image_positions": "shared",
            "image_position_embedding": True,
            "clip_config": {"hidden_size": 64, "intermediate_size": 128},
            "dino_config": {"hidden_size": 64},
            "text_config": {
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "initializer_range": 128**-0.5,
            },
        }
    )

    def validate(self) -> None:
        """Raise ValueError naming the option when the demo cannot run with these values."""
        if self.steps < 2:
            raise ValueError("--steps must be at least 2 (one per stage)")
        if self.train_images < 10 or self.test_images < 2:
            raise ValueError("--train-images must be >= 10 and --test-images >= 2")
        if self.random_towers and (self.clip or self.dino):
            raise ValueError("--random-towers and --clip/--dino exclude each other")

    @property
    def stage_steps(self) -> tuple[int, int]:
        """Optimizer steps of stage 1 and stage 2."""
        first = max(1, round(self.steps * self.stage1_fraction))
        return first, max(1, self.steps - first)
