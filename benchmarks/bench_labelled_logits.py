"""Benchmark: training memory with the LM head and loss on every position (the LLM's own loss) vs on the labelled
positions only (`CommForConditionalGeneration.labelled_logits_only`, the default), at the ``small`` config.

The ``small`` config of `bench_train_memory` (towers 384 x 8 layers at 224 px, LLM 512 x 4 layers, 32k vocabulary),
batch 8 of 64 image + 65 text tokens of which 32 carry the loss (25 %, as in the LLaVA-like mixture of
`bench_padding`), everything but the towers trained (``--tune all``). Four settings, each on one model whose loss
path is toggled: float32 or bfloat16 weights, with or without activation checkpointing of the LLM's layers.
bf16 + checkpointing is how the stage scripts train (``--bf16`` under DeepSpeed, ``--gradient_checkpointing``).

Memory: `common.PeakTensorMemory`, the peak bytes of the tensors created during the measured call and alive at
once (the CPU counterpart of ``torch.cuda.max_memory_allocated``): weights and optimizer state made before are
not counted. Per setting and path: the loss step (forward + loss + backward) and the steady training step (the
same + `torch.optim.AdamW` update + ``zero_grad``, the optimizer state made by a warm-up step first). Also the
fastest loss step's seconds (no memory tracking) and the two paths' losses (they must agree).

Prints ONE JSON line ``{"benchmark": "labelled_logits", "value": full-logits / labelled peak memory of the loss
step in the stage scripts' setting, "unit": "x"}`` (bar: >= 2), with every setting's figures.

    python -m benchmarks.bench_labelled_logits
    python -m benchmarks.bench_labelled_logits --quick     # 1 timed loss step per path instead of 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.bench_train_memory import comm_config, enable_llm_checkpointing, make_batch
from benchmarks.common import PeakTensorMemory, fastest, finish, set_threads, stdout_to_stderr

BENCHMARK = "labelled_logits"
BAR = 2.0
# (name, weights dtype, activation checkpointing); the last is the stage scripts' recipe and gives the headline.
SETTINGS = (
    ("fp32", torch.float32, False),
    ("fp32_checkpointing", torch.float32, True),
    ("bf16", torch.bfloat16, False),
    ("bf16_checkpointing", torch.bfloat16, True),
)
HEADLINE = "bf16_checkpointing"
PATHS = {"full": False, "labelled": True}


def peak_mb(fn: Callable[[], Any]) -> float:
    """Peak MB of the tensors ``fn`` creates (see `PeakTensorMemory`)."""
    with PeakTensorMemory() as memory:
        fn()
    return round(memory.peak / 2**20, 1)


def measure_setting(dtype: torch.dtype, checkpointing: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Both loss paths on one model of the small config: peak MB of the loss and training steps, seconds, losses."""
    from comm import CommForConditionalGeneration
    from comm.training.arguments import ModelArguments
    from comm.training.train import configure_trainable

    torch.manual_seed(args.seed)
    config = comm_config("small")
    config._attn_implementation = "sdpa"
    model = CommForConditionalGeneration(config).to(dtype)
    configure_trainable(model, ModelArguments(tune="all"))
    if checkpointing:
        enable_llm_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = {
        key: value.to(dtype) if value.is_floating_point() else value
        for key, value in make_batch(config, args.batch_size, args.text_tokens, args.seed).items()
    }
    losses: dict[str, float] = {}

    def loss_step(path: str) -> None:
        model.labelled_logits_only = PATHS[path]
        loss = model(**batch).loss
        loss.backward()
        losses[path] = float(loss.detach())

    def training_step(path: str) -> None:
        loss_step(path)
        optimizer.step()
        model.zero_grad(set_to_none=True)

    training_step("labelled")  # creates the AdamW state: later steps measure what a steady step adds to it
    result: dict[str, Any] = {"loss_step_mb": {}, "training_step_mb": {}, "loss_step_s": {}, "loss": {}}
    for path in PATHS:  # same weights for both: no update in between
        result["loss_step_mb"][path] = peak_mb(lambda path=path: loss_step(path))
        result["loss"][path] = losses[path]
        model.zero_grad(set_to_none=True)
    for path in PATHS:
        result["training_step_mb"][path] = peak_mb(lambda path=path: training_step(path))
    for path in PATHS:

        def timed(path: str = path) -> None:
            loss_step(path)
            model.zero_grad(set_to_none=True)

        result["loss_step_s"][path] = round(fastest(timed, args.repeats)[1], 4)
    full, labelled = result["loss"]["full"], result["loss"]["labelled"]
    result["loss_relative_difference"] = abs(full - labelled) / abs(full)
    for kind in ("loss_step", "training_step"):
        figures = result[f"{kind}_mb"]
        result[f"{kind}_ratio"] = round(figures["full"] / figures["labelled"], 3)
    result["loss_step_speedup"] = round(result["loss_step_s"]["full"] / result["loss_step_s"]["labelled"], 3)
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every setting and print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 timed loss step per path instead of 3")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step (default 8, as bench_train_memory)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample besides BOS and image")
    names = [name for name, _, _ in SETTINGS]
    parser.add_argument("--settings", nargs="+", default=names, choices=names, help="settings to measure (default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.text_tokens < 2:
        parser.error("need --batch-size >= 1 and --text-tokens >= 2")
    args.repeats = 1 if args.quick else 3
    set_threads(args.threads)

    start = time.perf_counter()
    settings = {}
    with stdout_to_stderr():
        for name, dtype, checkpointing in SETTINGS:
            if name in args.settings:
                settings[name] = measure_setting(dtype, checkpointing, args)
                print(f"{BENCHMARK}: {name}: {settings[name]['loss_step_mb']}", flush=True)
    headline = HEADLINE if HEADLINE in settings else next(iter(settings))
    value = settings[headline]["loss_step_ratio"]
    config = comm_config("small")
    result = {
        "benchmark": BENCHMARK,
        "value": value,
        "unit": "x",
        "value_is": f"full-logits / labelled-positions peak memory of the loss step (forward + backward), {headline}",
        "bar": f">= {BAR}",
        "bar_met": value >= BAR,
        "settings": settings,
        "labelled_fraction": round(
            (args.text_tokens - args.text_tokens // 2) / (1 + config.num_image_tokens + args.text_tokens), 4
        ),
        "config": "small",
        "batch_size": args.batch_size,
        "method": "peak bytes of live tensors created during the step (PeakTensorMemory: a TorchDispatchMode)",
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return finish(result, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
