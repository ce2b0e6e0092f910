"""Benchmark: batched (left-padded, KV-cached) vs one-at-a-time greedy generation with the tiny COMM model on CPU.

Prints ONE JSON line: ``{"benchmark": "batched_generation", "value": <speed ratio>, "unit": "x", ...}`` with a
breakdown of where the time goes (image preprocessing, vision path, LLM decoding per step). Exits 1 when the
batched predictions differ from the one-at-a-time ones. ``cpu_fast_path`` times the two levers `generate_answers`
turns on by default on CUDA only (static KV cache, prefetching the next batch's preprocessing) against its CPU
default at half the batch size (two batches even with ``--quick``), and checks their answers are the same.

    python -m benchmarks.bench_batched_generation            # 32 prompts, best of 3 (after a warm-up pass)
    python -m benchmarks.bench_batched_generation --quick    # 16 prompts, once (after a warm-up pass)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from benchmarks.common import TimedProcessor, build_tiny_model, fastest, timed_method
from comm import CommForConditionalGeneration, CommProcessor
from comm.conversation import CAPTION_PROMPT, rec_prompt, with_image
from comm.generation import generate_answers

BATCH_SIZE = 16
NEW_TOKENS = 24


def make_inputs(count: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """``count`` random images of varied sizes and prompts of varied lengths (captions, REC, questions)."""
    rng = np.random.default_rng(seed)
    images, questions = [], []
    for index in range(count):
        width, height = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        images.append(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))
        kind = index % 3
        if kind == 0:
            questions.append(CAPTION_PROMPT)
        elif kind == 1:
            questions.append(rec_prompt("the " + "small " * (index % 5) + "object on the left"))
        else:
            questions.append(with_image("Is there a " + "red " * (index % 4) + "car in the image?"))
    return images, questions


def run_mode(
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    batch_size: int,
    repeats: int,
    **options: object,
) -> tuple[list[str], dict[str, float]]:
    """Generate ``NEW_TOKENS`` tokens for every prompt ``repeats`` times; the answers and the fastest run's timings."""

    def one_run() -> tuple[list[str], float, float]:
        timed_processor = TimedProcessor(processor)
        totals: dict[str, float] = {}
        restore = timed_method(model.model, "get_image_features", totals)  # what the forward calls
        try:
            answers = generate_answers(
                model, timed_processor, images, questions, batch_size=batch_size,  # type: ignore[arg-type]
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options,
            )  # fmt: skip
        finally:
            restore()
        return answers, timed_processor.seconds, totals.get("get_image_features", 0.0)

    (answers, preprocess, vision), total = fastest(one_run, repeats)
    calls = -(-len(questions) // batch_size)
    llm = total - preprocess - vision
    timings = {
        "seconds": total,
        "preprocess_s": preprocess,
        "vision_s": vision,
        "llm_s": llm,
        "ms_per_decode_step": 1000 * llm / (calls * NEW_TOKENS),
        "generate_calls": calls,
    }
    return answers, timings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its JSON line; exit code 1 when the predictions differ."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 prompts, one timed run per mode")
    parser.add_argument("--items", type=int, default=None, help="number of prompts (default 32, 16 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per mode, best kept (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    items = args.items or (BATCH_SIZE if args.quick else 2 * BATCH_SIZE)
    repeats = args.repeats or (1 if args.quick else 3)
    if items < 1 or repeats < 1:
        parser.error("--items and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_batched_") as folder:
        model, processor = build_tiny_model(folder)
    images, questions = make_inputs(items)
    # One untimed pass per mode first: the first call with a new input shape is several times slower on CPU
    # (allocator and oneDNN kernel setup), and one-at-a-time generation meets a new shape with every prompt.
    run_mode(model, processor, images, questions, 1, 1)
    run_mode(model, processor, images, questions, BATCH_SIZE, 1)
    sequential_answers, sequential = run_mode(model, processor, images, questions, 1, repeats)
    batched_answers, batched = run_mode(model, processor, images, questions, BATCH_SIZE, repeats)
    identical = batched_answers == sequential_answers

    half = max(1, BATCH_SIZE // 2)
    modes = {"default": {}, "static_cache": {"cache_implementation": "static"}, "prefetch": {"prefetch": True}}
    fast_runs = {}
    for name, options in modes.items():
        run_mode(model, processor, images, questions, half, 1, **options)
        fast_runs[name] = run_mode(model, processor, images, questions, half, repeats, **options)
    fast_identical = all(answers == fast_runs["default"][0] for answers, _ in fast_runs.values())
    default_s = fast_runs["default"][1]["seconds"]
    cpu_fast_path = {
        "batch_size": half,
        "seconds": {name: round(timings["seconds"], 4) for name, (_, timings) in fast_runs.items()},
        "static_cache_speed": round(default_s / fast_runs["static_cache"][1]["seconds"], 3),
        "prefetch_speed": round(default_s / fast_runs["prefetch"][1]["seconds"], 3),
        "identical": fast_identical,
    }
    result = {
        "benchmark": "batched_generation",
        "value": round(sequential["seconds"] / batched["seconds"], 3),
        "unit": "x",
        "batch_size": BATCH_SIZE,
        "identical": identical,
        "items": items,
        "new_tokens": NEW_TOKENS,
        "repeats": repeats,
        "batched_items_per_s": round(items / batched["seconds"], 3),
        "sequential_items_per_s": round(items / sequential["seconds"], 3),
        "batched": {key: round(value, 4) for key, value in batched.items()},
        "sequential": {key: round(value, 4) for key, value in sequential.items()},
        "cpu_fast_path": cpu_fast_path,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    print(json.dumps(result))
    if not identical:
        differing = sum(a != b for a, b in zip(batched_answers, sequential_answers))
        print(f"error: {differing} of {items} batched answers differ from the one-at-a-time ones", file=sys.stderr)
        return 1
    if not fast_identical:
        print("error: the static cache or prefetching changed the answers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
