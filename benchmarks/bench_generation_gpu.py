"""Benchmark (GPU): REC-style batched generation at 7B (random weights, bf16): samples/s at batch 1 and batch 32.

The paper's shapes: CLIP ViT-L/14-336 + DINOv2-L towers and a LLaMA-2-7B LLM, built on the meta device and
materialised with ``to_empty(device="cuda")`` and each sub-model's own init. Prompts use the REC template
("Can you point out ... and provide the coordinates of its location?") in the Vicuna v1.1 conversation, with 640x480
images; every answer is exactly ``--new-tokens`` tokens (``min_new_tokens = max_new_tokens``), greedy, through
`comm.generation.generate_answers` (left padding, KV cache) as the REC evaluation runs it. Time includes image
preprocessing (reported apart) and the vision path.

Prints ONE JSON line ``{"benchmark": "generation_gpu", "value": <samples/s at batch 32>, "unit": "samples/s",
"samples_per_s": {"1": ..., "32": ...}}``; without a CUDA device it prints ``{"benchmark": "generation_gpu",
"skipped": "no CUDA device", ...}`` and exits 0.

    python -m benchmarks.bench_generation_gpu
    python -m benchmarks.bench_generation_gpu --attn flash_attention_2
    python -m benchmarks.bench_generation_gpu --smoke-cpu     # the same code on tiny shapes on the CPU (a check)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import (
    LLAMA_7B,
    TimedProcessor,
    TokenCounter,
    build_on_meta,
    count_parameters,
    fastest,
    finish,
    gpu_device,
    llama_tokenizer,
    set_threads,
    stdout_to_stderr,
    synchronize,
)

if TYPE_CHECKING:
    from comm import CommForConditionalGeneration, CommProcessor

BENCHMARK = "generation_gpu"
EXPRESSIONS = (
    "the man in the red shirt",
    "the dog on the left",
    "the second car from the right",
    "a white cup on the table",
    "the woman holding an umbrella",
    "the tallest tree behind the house",
    "the blue bicycle",
    "the child sitting on the bench",
)


def make_model(
    attn: str, smoke: bool, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[CommForConditionalGeneration, CommProcessor]:
    """The random-weight model (real towers + LLaMA-2-7B, or tiny shapes with ``smoke``) and its processor."""
    from transformers import LlamaConfig

    from comm import CommConfig, add_image_tokens, build_processor

    tokenizer = llama_tokenizer()
    token_ids = add_image_tokens(tokenizer)
    if smoke:
        config = CommConfig.tiny(vocab_size=len(tokenizer), **token_ids)
    else:
        config = CommConfig(text_config=LlamaConfig(vocab_size=len(tokenizer), **LLAMA_7B), **token_ids)
    config._attn_implementation = {"": "sdpa", "clip_config": "sdpa", "dino_config": "sdpa", "text_config": attn}
    model = build_on_meta(config, device, dtype, seed=seed).eval()
    return model, build_processor(tokenizer, config, model_max_length=2048)


def make_requests(count: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """``count`` 640x480 random images with REC questions."""
    from comm.conversation import rec_prompt

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(count)]
    questions = [rec_prompt(EXPRESSIONS[i % len(EXPRESSIONS)]) for i in range(count)]
    return images, questions


def time_generation(
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    images: list[Image.Image],
    questions: list[str],
    batch_size: int,
    new_tokens: int,
    repeats: int,
) -> dict[str, float]:
    """Fastest of ``repeats`` runs answering every question at ``batch_size``: seconds, preprocessing, samples/s."""
    from comm.generation import generate_answers

    def one_run() -> tuple[list[str], float]:
        timed = TimedProcessor(processor)
        answers = generate_answers(
            model, timed, images, questions, batch_size=batch_size,  # type: ignore[arg-type]
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        )  # fmt: skip
        return answers, timed.seconds

    (answers, preprocess), seconds = fastest(one_run, repeats, model.device)
    if len(answers) != len(questions):
        raise RuntimeError(f"got {len(answers)} answers for {len(questions)} questions")
    return {
        "seconds": seconds,
        "preprocess_s": preprocess,
        "samples_per_s": len(questions) / seconds,
        "ms_per_decode_step": 1000 * (seconds - preprocess) / (-(-len(questions) // batch_size) * new_tokens),
    }


def run(args: argparse.Namespace, device: torch.device, smoke: bool) -> dict[str, Any]:
    """Build, warm up, and time generation at each batch size."""
    dtype = torch.bfloat16
    build_start = time.perf_counter()
    model, processor = make_model(args.attn, smoke, device, dtype, args.seed)
    synchronize(device)
    build_s = time.perf_counter() - build_start
    counter = TokenCounter(model)
    items = args.items or (max(args.batch_sizes) if args.quick else 2 * max(args.batch_sizes))
    images, questions = make_requests(items, args.seed)
    for batch_size in args.batch_sizes:  # warm-up at each shape (kernels, allocator, KV cache growth)
        time_generation(model, processor, images[:batch_size], questions[:batch_size], batch_size, 2, 1)
    counter.new_tokens.clear()
    repeats = args.repeats or (1 if args.quick else 2)
    runs = {}
    for batch_size in args.batch_sizes:
        # Batch 1 answers a quarter of the items under --quick: its rate is per sample, so the comparison stays fair.
        count = max(1, items // 4) if args.quick and batch_size == 1 else items
        runs[batch_size] = time_generation(
            model, processor, images[:count], questions[:count], batch_size, args.new_tokens, repeats
        )
        runs[batch_size]["items"] = count
    if set(counter.new_tokens) != {args.new_tokens}:
        raise RuntimeError(f"expected {args.new_tokens} new tokens per call, got {sorted(set(counter.new_tokens))}")
    largest, smallest = max(args.batch_sizes), min(args.batch_sizes)
    fields: dict[str, Any] = {
        "value": round(runs[largest]["samples_per_s"], 3),
        "unit": "samples/s",
        "value_is": f"samples/s at batch {largest}",
        "samples_per_s": {str(size): round(run["samples_per_s"], 3) for size, run in runs.items()},
        "speedup": round(runs[largest]["samples_per_s"] / runs[smallest]["samples_per_s"], 3),
        "runs": {str(size): {key: round(value, 4) for key, value in run.items()} for size, run in runs.items()},
        "new_tokens": args.new_tokens,
        "repeats": repeats,
        "params": {
            "llm": count_parameters(model.language_model),
            "towers": count_parameters(model.clip_tower) + count_parameters(model.dino_tower),
        },
        "build_s": round(build_s, 1),
    }
    if device.type == "cuda":
        fields["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or print the skip line) and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed run; batch 1 on a quarter of the items")
    parser.add_argument("--attn", choices=["sdpa", "flash_attention_2"], default="sdpa", help="LLM attention")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--items", type=int, default=None, help="requests per run (default 64, 32 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per batch size, best kept (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke-cpu", action="store_true", help="run the same code on tiny shapes on the CPU (a check, no figure)"
    )
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.new_tokens < 1 or (args.items is not None and args.items < 1):
        parser.error("--batch-sizes, --items and --new-tokens must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    set_threads(args.threads)

    device = gpu_device(BENCHMARK, args, parser)
    if device is None:
        return 0

    with stdout_to_stderr():
        fields = run(args, device, args.smoke_cpu)
    result = {
        "benchmark": BENCHMARK,
        **fields,
        "attn": args.attn,
        "dtype": "bfloat16",
        "model": "tiny (smoke check)" if args.smoke_cpu else "CLIP ViT-L/14-336 + DINOv2-L + LLaMA-2-7B",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "smoke": args.smoke_cpu,
    }
    return finish(result, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
