"""The options every evaluation run shares, declared once for ``comm eval`` and the ``eval/`` scripts: the model and
the output folder, batching, decoding, seed and device."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comm.evaluation.runner import DEFAULT_BATCH_SIZE

DEFAULT_SEED = 0


@dataclass(frozen=True)
class RunOptions:
    """How an evaluation runs its model: where the model and the output are, batching, decoding, seed, device."""

    model: str
    output_dir: Path
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    seed: int = DEFAULT_SEED
    dtype: str = "auto"
    device: str | None = None
    progress: bool = True

    @classmethod
    def from_arguments(cls, parser: argparse.ArgumentParser, args: argparse.Namespace) -> RunOptions:
        """The options `add_run_arguments` parsed; a missing or out-of-range one is a usage error naming it."""
        if not args.model:
            parser.error("--model is required (or --score to re-score a predictions file)")
        if args.output_dir is None:
            parser.error("--output-dir is required")
        if args.batch_size < 1:
            parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.max_new_tokens < 1:
            parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.temperature < 0:
            parser.error(f"--temperature must be >= 0, got {args.temperature}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
        return cls(
            args.model,
            args.output_dir,
            args.batch_size,
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            args.seed,
            args.dtype,
            args.device,
            not args.no_progress,
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """``model.generate`` options (greedy unless ``temperature`` > 0; the task's token budget unless set)."""
        options: dict[str, Any] = {"do_sample": self.temperature > 0}
        if self.max_new_tokens is not None:
            options["max_new_tokens"] = self.max_new_tokens
        if self.temperature > 0:
            options["temperature"] = self.temperature
            if self.top_p is not None:
                options["top_p"] = self.top_p
        return options


def add_run_arguments(
    parser: argparse.ArgumentParser, max_new_tokens: int, batch_size: int = DEFAULT_BATCH_SIZE
) -> None:
    """The options every evaluation shares (`RunOptions`): model, output folder, batching, decoding, seed, device."""
    group = parser.add_argument_group("running a model")
    group.add_argument("--model", help="COMM model folder (config, weights and processor files)")
    group.add_argument("--output-dir", type=Path, help="folder for the predictions and metrics.json")
    group.add_argument("--batch-size", type=int, default=batch_size, help=f"prompts a batch (default {batch_size})")
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"tokens generated at most (default {max_new_tokens})",
    )
    group.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 (the default) decodes greedily"
    )
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --temperature > 0)")
    group.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    group.add_argument(
        "--dtype", default="auto", help="auto (bf16 on GPUs that support it, else fp32), fp32, bf16 or fp16"
    )
    group.add_argument("--device", default=None, help="torch device (default: this rank's GPU, else the CPU)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The deepspeed launcher passes --local_rank=N (torchrun sets LOCAL_RANK instead).
    group.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
