"""The scaffold of the three eval scripts: shared options, the model run or ``--score``, output on rank 0, errors."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from comm.errors import run_command
from comm.evaluation.files import METRICS_FILE, check_files_exist
from comm.evaluation.sharding import DEFAULT_BATCH_SIZE, process_state
from comm.evaluation.tables import format_metrics

T = TypeVar("T")

DEFAULT_SEED = 0


def add_run_arguments(
    parser: argparse.ArgumentParser, max_new_tokens: int, batch_size: int = DEFAULT_BATCH_SIZE
) -> None:
    """The options every evaluation script shares: model, output folder, batching, decoding, seed, device."""
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


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error naming the argument when a run option is missing or out of range."""
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
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """``model.generate`` options from the parsed run arguments (greedy unless ``--temperature`` > 0)."""
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        options["temperature"] = args.temperature
        if args.top_p is not None:
            options["top_p"] = args.top_p
    return options


def load_model(
    path: str | os.PathLike[str], device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[Any, Any]:
    """``(model, processor)`` in eval mode with `comm.loading.load_model_and_processor`.

    The device defaults to this process's GPU when CUDA is available (under a launcher, the one accelerate gives
    its local rank), else the CPU; the dtype to bf16 on GPUs that support it and float32 on CPU (``"auto"``).
    """
    from comm.loading import load_model_and_processor

    if device is None and torch.cuda.is_available():
        device = process_state().device
    if isinstance(dtype, str) and dtype.lower() == "auto":
        dtype = None
    return load_model_and_processor(path, device, dtype)


def print_metrics(
    metrics: Mapping[str, Any], title: str | None = None, path: str | os.PathLike[str] | None = None
) -> None:
    """Print the metrics table (and where the JSON was written) on rank 0."""
    if not process_state().is_main_process:
        return
    print(format_metrics(metrics, title))
    if path is not None:
        print(f"metrics written to {path}")


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on rank 0 (what ``--score`` prints)."""
    if process_state().is_main_process:
        print(json.dumps(obj, indent=2, ensure_ascii=False))


def cli_main(run: Callable[[], int]) -> int:
    """`comm.errors.run_command` for a script's body; other ranks name themselves in their error line."""
    rank = process_state().process_index
    return run_command(
        run,
        prefix="error" if rank == 0 else f"error (rank {rank})",
        interrupted="interrupted: run the same command again to resume from the predictions written",
    )


def run_evaluation(
    args: argparse.Namespace,
    load_data: Callable[[], T],
    images: Callable[[T], Iterable[str | os.PathLike[str]]],
    evaluate: Callable[..., Mapping[str, Any]],
    title: str,
) -> int:
    """A script's model run: join the processes, seed, load the data, check its images, load the model, evaluate.

    ``evaluate(model, processor, data, batch_size=..., progress=..., **generation_options(args))`` returns the
    metrics, printed under ``title`` on rank 0; returns 0.
    """
    from transformers import set_seed

    state = process_state()
    set_seed(args.seed)  # Python, NumPy and torch: two runs give the same predictions
    data = load_data()
    check_files_exist(images(data), "image")  # before the (slow) model load
    model, processor = load_model(args.model, args.device, args.dtype)
    metrics = evaluate(
        model, processor, data, batch_size=args.batch_size, progress=not args.no_progress, **generation_options(args)
    )
    print_metrics(metrics, title, args.output_dir / METRICS_FILE)
    state.wait_for_everyone()
    state.destroy_process_group()  # after a successful run; a failed one just exits
    return 0


def script_main(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    score: Callable[[argparse.Namespace], int],
    run: Callable[[argparse.Namespace], int],
    scored: str = "a predictions file",
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None,
) -> int:
    """Parse ``argv``, then `cli_main` ``score`` (with ``--score``, no model) or ``run`` (after the argument checks)."""
    args = parser.parse_args(argv)
    if args.score is not None:
        if args.model:
            parser.error(f"--score re-scores {scored} without a model: drop --model")
        return cli_main(lambda: score(args))
    check_run_arguments(parser, args)
    if check is not None:
        check(parser, args)
    return cli_main(lambda: run(args))
