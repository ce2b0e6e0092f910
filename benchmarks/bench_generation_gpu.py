"""Benchmark (GPU): REC-style batched generation at 7B (random weights, bf16): samples/s at batch 1 and batch 32,
today's path vs the fast one, and where the time goes.

The paper's shapes: CLIP ViT-L/14-336 + DINOv2-L towers and a LLaMA-2-7B LLM, built on the meta device and
materialised with ``to_empty(device="cuda")`` and each sub-model's own init. Prompts use the REC template
("Can you point out ... and provide the coordinates of its location?") in the Vicuna v1.1 conversation, with 640x480
images; every answer is exactly ``--new-tokens`` tokens (``min_new_tokens = max_new_tokens``), greedy, through
`comm.generation.generate_answers` (left padding) as the REC evaluation runs it. Two paths (``--paths``):

* ``today``: the dynamic KV cache, preprocessing then generation one batch after the other (before issue 12);
* ``fast``: `generate_answers`' CUDA default: a static KV cache, whose decode step transformers compiles
  (``torch.compile``, CUDA graphs), and the next batch preprocessed in a background thread.

Per path and batch size: samples/s end to end (preprocessing included, as an evaluation sees it), the seconds in
preprocessing and in ``model.generate``, ms per new token (generate time / (calls x new tokens): prefill and vision
included), and the split of a call into prefill (a 1-token run) and decode steps. ``--profile`` adds a
``torch.profiler`` table of one ``today`` call at the largest batch (ops by device time, CPU vs device totals).
The fast path is warmed up on every request first, so its compilations (one per new shape) are not timed.

Prints ONE JSON line ``{"benchmark": "generation_gpu", "value": <samples/s at batch 32, fast path>, "unit":
"samples/s", "samples_per_s": {"today": {"1": ..., "32": ...}, "fast": {...}}}``; without a CUDA device it prints
``{"benchmark": "generation_gpu", "skipped": "no CUDA device", ...}`` and exits 0.

    python -m benchmarks.bench_generation_gpu
    python -m benchmarks.bench_generation_gpu --paths fast --attn flash_attention_2
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
# generate_answers options of each path (the fast one spelled out: on the CPU it is not the default).
PATHS = {
    "today": {"cache_implementation": "dynamic", "prefetch": False},
    "fast": {"cache_implementation": "static", "prefetch": True},
}
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
    from comm.demo.tiny import tiny_config

    tokenizer = llama_tokenizer()
    token_ids = add_image_tokens(tokenizer)
    if smoke:
        config = tiny_config(vocab_size=len(tokenizer), **token_ids)
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
    counter: TokenCounter,
    requests: tuple[list[Image.Image], list[str]],
    batch_size: int,
    new_tokens: int,
    repeats: int,
    options: dict[str, Any],
) -> dict[str, float]:
    """Fastest of ``repeats`` runs answering every request at ``batch_size``: seconds, preprocessing, generation."""
    from comm.generation import generate_answers

    images, questions = requests

    def one_run() -> tuple[list[str], float, float]:
        timed = TimedProcessor(processor)
        counter.seconds = 0.0
        answers = generate_answers(
            model, timed, images, questions, batch_size=batch_size,  # type: ignore[arg-type]
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options,
        )  # fmt: skip
        return answers, timed.seconds, counter.seconds

    (answers, preprocess, generate), seconds = fastest(one_run, repeats, model.device)
    if len(answers) != len(questions):
        raise RuntimeError(f"got {len(answers)} answers for {len(questions)} questions")
    calls = -(-len(questions) // batch_size)
    return {
        "seconds": seconds,
        "preprocess_s": preprocess,
        "generate_s": generate,
        "samples_per_s": len(questions) / seconds,
        "samples_per_s_generate_only": len(questions) / generate,
        "ms_per_new_token": 1000 * generate / (calls * new_tokens),
        "generate_calls": calls,
    }


def measure(
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    counter: TokenCounter,
    requests: tuple[list[Image.Image], list[str]],
    batch_size: int,
    args: argparse.Namespace,
    path: str,
) -> dict[str, float]:
    """One path at one batch size: the timed run, then a 1-token run for the prefill / decode split."""
    options = PATHS[path]
    if path == "fast":  # compile for every shape these requests make (static cache lengths, batch sizes)
        time_generation(model, processor, counter, requests, batch_size, args.new_tokens, 1, options)
        time_generation(model, processor, counter, requests, batch_size, 1, 1, options)
    else:
        first = (requests[0][:batch_size], requests[1][:batch_size])
        time_generation(model, processor, counter, first, batch_size, 2, 1, options)
    run = time_generation(model, processor, counter, requests, batch_size, args.new_tokens, args.repeats, options)
    prefill = time_generation(model, processor, counter, requests, batch_size, 1, 1, options)
    calls = run["generate_calls"]
    run["prefill_ms_per_call"] = 1000 * prefill["generate_s"] / calls
    if args.new_tokens > 1:
        decode_s = run["generate_s"] - prefill["generate_s"]
        run["decode_ms_per_step"] = 1000 * decode_s / (calls * (args.new_tokens - 1))
    run["items"] = len(requests[1])
    return run


def profile_generate(
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    requests: tuple[list[Image.Image], list[str]],
    batch_size: int,
    new_tokens: int,
    top: int = 15,
) -> dict[str, Any]:
    """``torch.profiler`` over one ``today`` generate call of ``batch_size`` requests: the ops with the most device
    time (CPU time on a CPU), and CPU vs device totals (a device busy far less than the wall time waits for the
    host: launch or Python overhead, or a sync)."""
    from torch.profiler import ProfilerActivity, profile

    from comm.generation import generate_answers

    images, questions = requests[0][:batch_size], requests[1][:batch_size]
    cuda = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    options = {**PATHS["today"], "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        generate_answers(model, processor, images, questions, batch_size=batch_size, **options)
        synchronize(model.device)
    wall_ms = 1000 * (time.perf_counter() - start)
    events = prof.key_averages()

    def device_us(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))

    key = device_us if cuda else (lambda event: float(event.self_cpu_time_total))
    rows = sorted(events, key=key, reverse=True)[:top]
    return {
        "batch_size": len(questions),
        "new_tokens": new_tokens,
        "wall_ms": round(wall_ms, 1),
        "device_busy_ms": round(sum(device_us(e) for e in events) / 1000, 1) if cuda else None,
        "ops": [
            {
                "name": event.key,
                "calls": event.count,
                "self_device_ms": round(device_us(event) / 1000, 2),
                "self_cpu_ms": round(event.self_cpu_time_total / 1000, 2),
            }
            for event in rows
        ],
    }


def run(args: argparse.Namespace, device: torch.device, smoke: bool) -> dict[str, Any]:
    """Build, then time generation on every path at each batch size (and profile with ``--profile``)."""
    dtype = torch.bfloat16
    build_start = time.perf_counter()
    model, processor = make_model(args.attn, smoke, device, dtype, args.seed)
    synchronize(device)
    build_s = time.perf_counter() - build_start
    counter = TokenCounter(model)
    items = args.items or (max(args.batch_sizes) if args.quick else 2 * max(args.batch_sizes))
    images, questions = make_requests(items, args.seed)
    args.repeats = args.repeats or (1 if args.quick else 2)
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for path in args.paths:
        runs[path] = {}
        for batch_size in args.batch_sizes:
            # Batch 1 answers a quarter of the items under --quick: its rate is per sample, the comparison is fair.
            count = max(1, items // 4) if args.quick and batch_size == 1 else items
            requests = (images[:count], questions[:count])
            runs[path][batch_size] = measure(model, processor, counter, requests, batch_size, args, path)
    if not set(counter.new_tokens) <= {1, 2, args.new_tokens}:
        raise RuntimeError(f"expected {args.new_tokens} new tokens per call, got {sorted(set(counter.new_tokens))}")
    largest, smallest = max(args.batch_sizes), min(args.batch_sizes)
    headline = "fast" if "fast" in runs else args.paths[0]

    def rounded(run: dict[str, float]) -> dict[str, float]:
        return {key: round(value, 4) for key, value in run.items()}

    fields: dict[str, Any] = {
        "value": round(runs[headline][largest]["samples_per_s"], 3),
        "unit": "samples/s",
        "value_is": f"samples/s at batch {largest}, {headline} path, preprocessing included",
        "samples_per_s": {
            path: {str(size): round(run["samples_per_s"], 3) for size, run in by_size.items()}
            for path, by_size in runs.items()
        },
        "ms_per_new_token": {
            path: {str(size): round(run["ms_per_new_token"], 2) for size, run in by_size.items()}
            for path, by_size in runs.items()
        },
        "speedup_batch": round(runs[headline][largest]["samples_per_s"] / runs[headline][smallest]["samples_per_s"], 3),
        "runs": {path: {str(size): rounded(run) for size, run in by_size.items()} for path, by_size in runs.items()},
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "params": {
            "llm": count_parameters(model.language_model) + count_parameters(model.lm_head),
            "towers": count_parameters(model.clip_tower) + count_parameters(model.dino_tower),
        },
        "build_s": round(build_s, 1),
    }
    if "today" in runs and "fast" in runs:
        fields["fast_vs_today"] = {
            str(size): round(runs["fast"][size]["samples_per_s"] / runs["today"][size]["samples_per_s"], 3)
            for size in args.batch_sizes
        }
    if args.profile:
        fields["profile"] = profile_generate(model, processor, (images, questions), largest, args.profile_tokens)
    if device.type == "cuda":
        fields["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or print the skip line) and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed run; batch 1 on a quarter of the items")
    parser.add_argument("--attn", choices=["sdpa", "flash_attention_2"], default="sdpa", help="LLM attention")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS), help="paths (default both)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--items", type=int, default=None, help="requests per run (default 64, 32 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per batch size, best kept (default 2)")
    parser.add_argument("--profile", action="store_true", help="profile one today-path call at the largest batch")
    parser.add_argument("--profile-tokens", type=int, default=8, help="new tokens in the profiled call (default 8)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke-cpu", action="store_true", help="run the same code on tiny shapes on the CPU (a check, no figure)"
    )
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.new_tokens < 1 or (args.items is not None and args.items < 1):
        parser.error("--batch-sizes, --items and --new-tokens must be >= 1")
    if (args.repeats is not None and args.repeats < 1) or args.profile_tokens < 1:
        parser.error("--repeats and --profile-tokens must be >= 1")
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
