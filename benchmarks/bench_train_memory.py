"""Benchmark: peak memory and samples/s of a CPU training step with frozen towers vs a naive step that keeps them in
autograd, for the ``tiny`` and a ``small`` config; plus the step with activation checkpointing on the LLM.

Each measurement runs in a fresh subprocess (``--worker``), so one variant's allocations never inflate another's
peak. A step is forward + backward + `torch.optim.AdamW` step + ``zero_grad(set_to_none=True)``, with what trains set
by the training code itself (`comm.training.train.configure_trainable`, ``--tune all``: LLM + mergers + aligners +
projector; towers frozen). Variants:

* ``frozen``: the model as it is (towers under ``torch.no_grad``, ``requires_grad=False``);
* ``naive``: what an implementation that forgets to freeze does: `FrozenVisionTower.encode` monkeypatched to its
  undecorated function and the towers' parameters ``requires_grad_(True)`` (their activations are kept for autograd
  and their gradients computed), but the optimizer is the same (no update of the towers);
* ``checkpointing``: ``frozen`` plus activation (gradient) checkpointing of the LLM's decoder layers.

Memory method: Linux resident-set high-water mark. After the model and optimizer are built, free heap is returned to
the OS (``malloc_trim``), the RSS is read, and the high-water mark is reset (``echo 5 > /proc/self/clear_refs``);
after the steps ``VmHWM`` from /proc/self/status minus that RSS is the step's peak: gradients, AdamW state (created
at the first step) and activations, allocator overhead included. Without clear_refs the worker falls back to
``getrusage(RUSAGE_SELF).ru_maxrss`` (then the build's own peak can hide the step's: flagged in ``method``).

Prints ONE JSON line: ``{"benchmark": "train_memory", "value": 1 - frozen_peak / naive_peak at the small config,
"unit": "fraction"}`` (bar: >= 0.30), with every measurement.

    python -m benchmarks.bench_train_memory            # 6 steps per measurement (1 warm-up)
    python -m benchmarks.bench_train_memory --quick    # 3 steps per measurement (1 warm-up)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.common import (
    ROOT,
    count_parameters,
    finish,
    median,
    module_command,
    print_result,
    set_threads,
    stdout_to_stderr,
)

if TYPE_CHECKING:
    from comm import CommConfig, CommForConditionalGeneration

BAR = 0.30
VARIANTS = ("frozen", "naive", "checkpointing")
CONFIGS = ("tiny", "small")
VOCAB = 32000  # the LLaMA tokenizer's


def comm_config(name: str) -> CommConfig:
    """The `CommConfig` of ``name``: ``tiny`` (the tests' model) or ``small`` (ViT-S-like towers at 224 px)."""
    from comm.demo.tiny import tiny_config

    if name == "tiny":
        config = tiny_config(vocab_size=VOCAB)
    elif name == "small":
        config = tiny_config(
            vocab_size=VOCAB,
            clip_config={
                "hidden_size": 384,
                "intermediate_size": 1536,
                "num_hidden_layers": 8,
                "num_attention_heads": 6,
                "image_size": 224,
                "patch_size": 14,
                "projection_dim": 384,
            },
            dino_config={
                "hidden_size": 384,
                "num_hidden_layers": 8,
                "num_attention_heads": 6,
                "mlp_ratio": 4,
                "image_size": 224,
                "patch_size": 14,
            },
            text_config={
                "hidden_size": 512,
                "intermediate_size": 1408,
                "num_hidden_layers": 4,
                "num_attention_heads": 8,
                "num_key_value_heads": 8,
                "max_position_embeddings": 1024,
            },
            clip_layers=list(range(1, 9)),
            dino_layers=list(range(3, 9)),
            grid_size=8,
            dino_image_size=224,
        )
    else:
        raise ValueError(f"unknown config {name!r}: expected one of {CONFIGS}")
    config.image_token_index = VOCAB - 1
    return config


# ---------------------------------------------------------------------------------------------------------------
# Worker: one measurement in this process
# ---------------------------------------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def high_water_mark() -> int | None:
    """``VmHWM`` (peak RSS since start or the last reset) in bytes, or None where /proc lacks it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_high_water_mark() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); True when it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm = high_water_mark()
    return hwm is not None and hwm <= current_rss() + 4 * 2**20


def trim_heap() -> None:
    """Collect garbage and give free heap pages back to the OS so the RSS counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_batch(config: CommConfig, batch_size: int, text_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """Random training inputs: BOS, a prompt, the image tokens, an answer that carries the loss."""
    from comm.model.modeling import PIXEL_VALUES_CLIP, PIXEL_VALUES_DINO

    generator = torch.Generator().manual_seed(seed)
    image_tokens = config.num_image_tokens
    prompt, answer = text_tokens // 2, text_tokens - text_tokens // 2
    vocab_top = VOCAB - 8  # ordinary tokens, below the image token id
    ids = torch.cat(
        [
            torch.ones(batch_size, 1, dtype=torch.long),
            torch.randint(3, vocab_top, (batch_size, prompt), generator=generator),
            torch.full((batch_size, image_tokens), config.image_token_index, dtype=torch.long),
            torch.randint(3, vocab_top, (batch_size, answer), generator=generator),
        ],
        dim=1,
    )
    labels = ids.clone()
    labels[:, : 1 + prompt + image_tokens] = -100
    clip_side, dino_side = config.clip_config.image_size, config.dino_image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        PIXEL_VALUES_CLIP: torch.randn(batch_size, 3, clip_side, clip_side, generator=generator),
        PIXEL_VALUES_DINO: torch.randn(batch_size, 3, dino_side, dino_side, generator=generator),
    }


def enable_llm_checkpointing(model: CommForConditionalGeneration) -> None:
    """Activation checkpointing of the LLM's decoder layers (the model never checkpoints its frozen towers)."""
    model.activation_checkpointing_enable()


def run_worker(config_name: str, variant: str, batch_size: int, text_tokens: int, steps: int, seed: int) -> dict:
    """Build, train ``steps`` steps (the first untimed) and measure; returns the measurement."""
    from comm import CommForConditionalGeneration
    from comm.model.towers import FrozenVisionTower
    from comm.training.arguments import ModelArguments
    from comm.training.train import configure_trainable

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {VARIANTS}")
    torch.manual_seed(seed)
    config = comm_config(config_name)
    config._attn_implementation = "sdpa"
    model = CommForConditionalGeneration(config)
    configure_trainable(model, ModelArguments(tune="all"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    towers = (model.clip_tower, model.dino_tower)
    tower_params = sum(count_parameters(t) for t in towers)
    if variant == "naive":
        FrozenVisionTower.encode = FrozenVisionTower.encode.__wrapped__  # drop @torch.no_grad()
        for tower in towers:
            tower.requires_grad_(True)
    elif variant == "checkpointing":
        enable_llm_checkpointing(model)
    model.train()
    batch = make_batch(config, batch_size, text_tokens, seed)

    trim_heap()
    rss_after_build = current_rss()
    reset_ok = reset_high_water_mark()

    tower_grads: list[bool] = []

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        tower_grads.append(any(p.grad is not None for tower in towers for p in tower.parameters()))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    times, losses = [], []
    for index in range(steps):
        start = time.perf_counter()
        losses.append(step())
        if index:
            times.append(time.perf_counter() - start)
    peak = high_water_mark() if reset_ok else None
    method = "VmHWM after clear_refs reset, minus RSS after build (malloc_trim)"
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = "ru_maxrss (no clear_refs: includes the build's peak) minus RSS after build"
    step_s = median(times) if times else float("nan")
    trainable_count = sum(p.numel() for p in trainable)
    tokens = batch["input_ids"].numel()
    tower_layer_floats = batch_size * sum(
        (tower.num_patches + 1) * sub.hidden_size
        for tower, sub in ((model.clip_tower, config.clip_config), (model.dino_tower, config.dino_config))
    )
    return {
        "config": config_name,
        "variant": variant,
        "rss_after_build_mb": round(rss_after_build / 2**20, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_step_mb": round((peak - rss_after_build) / 2**20, 1),
        "step_s": round(step_s, 4),
        "samples_per_s": round(batch_size / step_s, 3),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "finite": all(loss == loss for loss in losses),
        "trainable_params": trainable_count,
        "accounting_mb": {  # float32 sizes of the big items, to read the peak against
            "grads_plus_adamw_state": round(3 * 4 * trainable_count / 2**20, 1),
            "tower_grads_if_naive": round(4 * tower_params / 2**20, 1),
            "one_logits_tensor": round(4 * tokens * config.text_config.vocab_size / 2**20, 1),
            "one_layer_hidden_states_both_towers": round(4 * tower_layer_floats / 2**20, 2),
        },
        "tower_params": tower_params,
        "tower_grads_computed": any(tower_grads),
        "llm_tokens_per_sample": int(batch["input_ids"].shape[1]),
        "image_tokens": config.num_image_tokens,
        "tower_tokens": {"clip": model.clip_tower.num_patches + 1, "dino": model.dino_tower.num_patches + 1},
        "method": method,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent: one subprocess per (config, variant)
# ---------------------------------------------------------------------------------------------------------------


def measure(config_name: str, variant: str, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """Run one worker subprocess and return its measurement."""
    batch_size = args.batch_size if args.batch_size else (16 if config_name == "tiny" else 8)
    command = [
        *module_command(__file__), "--worker",
        "--config", config_name, "--variant", variant, "--steps", str(steps),
        "--batch-size", str(batch_size), "--text-tokens", str(args.text_tokens),
        "--threads", str(args.threads), "--seed", str(args.seed),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    sys.stderr.write(completed.stderr)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode or not lines:
        raise RuntimeError(f"worker {config_name}/{variant} failed (exit {completed.returncode})")
    measurement = json.loads(lines[-1])
    measurement["batch_size"] = batch_size
    return measurement


def summarise(config_name: str, runs: dict[str, dict]) -> dict[str, Any]:
    """Ratios of one config's variants: memory saved by freezing, speed-up, checkpointing's effect."""
    frozen, naive = runs["frozen"], runs["naive"]
    summary: dict[str, Any] = {
        "peak_step_mb": {variant: run["peak_step_mb"] for variant, run in runs.items()},
        "samples_per_s": {variant: run["samples_per_s"] for variant, run in runs.items()},
        "memory_saved_vs_naive": round(1 - frozen["peak_step_mb"] / naive["peak_step_mb"], 4),
        "speedup_vs_naive": round(frozen["samples_per_s"] / naive["samples_per_s"], 3),
    }
    if "checkpointing" in runs:
        ckpt = runs["checkpointing"]
        summary["checkpointing_memory_vs_frozen"] = round(ckpt["peak_step_mb"] / frozen["peak_step_mb"], 4)
        summary["checkpointing_speed_vs_frozen"] = round(ckpt["samples_per_s"] / frozen["samples_per_s"], 3)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement in its own subprocess (or, with ``--worker``, one measurement) and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 steps per measurement instead of 6")
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement, the first untimed")
    parser.add_argument("--batch-size", type=int, default=0, help="samples per step (default: tiny 16, small 8)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample besides BOS and image")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="small", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="frozen", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 6)
    if steps < 2 or args.text_tokens < 2 or args.batch_size < 0:
        parser.error("need --steps >= 2 (the first is untimed), --text-tokens >= 2, --batch-size >= 0")

    if args.worker:
        set_threads(args.threads)
        with stdout_to_stderr():
            batch_size = args.batch_size or 8
            measurement = run_worker(args.config, args.variant, batch_size, args.text_tokens, steps, args.seed)
        print_result(measurement)
        return 0

    runs: dict[str, dict[str, dict]] = {}
    for config_name in args.configs:
        runs[config_name] = {variant: measure(config_name, variant, args, steps) for variant in VARIANTS}
    summaries = {name: summarise(name, config_runs) for name, config_runs in runs.items()}
    headline = "small" if "small" in summaries else args.configs[0]
    value = summaries[headline]["memory_saved_vs_naive"]
    result = {
        "benchmark": "train_memory",
        "value": value,
        "unit": "fraction",
        "value_is": f"1 - frozen/naive peak step memory at the {headline} config",
        "bar": f">= {BAR}",
        "bar_met": value >= BAR,
        "speedup_vs_naive": summaries[headline]["speedup_vs_naive"],
        "summary": summaries,
        "runs": runs,
        "method": next(iter(runs[headline].values()))["method"] + "; one fresh subprocess per measurement",
        "step": "forward + backward + AdamW step + zero_grad(set_to_none=True), float32, sdpa",
        "steps_per_measurement": steps,
    }
    return finish(result, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
