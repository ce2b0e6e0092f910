"""Benchmark `CommPipeline.caption` throughput (images/s) at batch 1 and batch 16, and their ratio.

Every caption is exactly ``--new-tokens`` tokens long (``min_new_tokens = max_new_tokens``, so end-of-sequence
cannot stop a row early), so the batch sizes do the same work. Prints one JSON line.

    python -m benchmarks.bench_caption_throughput --quick              # tiny random model, CPU (1 thread), < 60 s
    python -m benchmarks.bench_caption_throughput --real-size          # ViT-L/14-336 + DINOv2-L + 7B LLM, GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import LlamaConfig, LlamaTokenizer

from benchmarks.common import LLAMA_7B, TOKENIZER_DIR, TokenCounter, build_tiny_model, fastest
from comm import CommConfig, CommForConditionalGeneration, add_image_tokens, build_processor
from comm.loading import resolve_dtype
from comm.pipeline import CommPipeline

BATCH_SIZES = (1, 16)


def build_tiny(folder: Path, device: torch.device, dtype: torch.dtype) -> CommPipeline:
    """A random tiny COMM model built from saved components, as a user would, with the LLaMA tokenizer fixture."""
    model, processor = build_tiny_model(folder, seed=0, dtype=dtype, model_max_length=None)
    return CommPipeline(model.to(device), processor)


def build_random(config: CommConfig, device: torch.device, dtype: torch.dtype) -> CommForConditionalGeneration:
    """A random-weight model of ``config`` made directly on ``device`` in ``dtype`` (no fp32 copy in between)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CommForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    # Parameters are made in ``dtype``; float32 buffers (RoPE inverse frequencies) stay float32, as from_pretrained.
    stray = {str(p.dtype) for p in model.parameters() if p.dtype != dtype}
    if stray:
        raise RuntimeError(f"parameters built in {sorted(stray)} instead of {dtype}")
    return model.eval()


def build_real_size(device: torch.device, dtype: torch.dtype) -> CommPipeline:
    """The paper's shapes with random weights: CLIP ViT-L/14-336 and DINOv2 ViT-L/14 towers, a 7B LLaMA LLM."""
    torch.manual_seed(0)
    tokenizer = LlamaTokenizer.from_pretrained(TOKENIZER_DIR)
    token_ids = add_image_tokens(tokenizer)
    text_config = LlamaConfig(vocab_size=len(tokenizer), **LLAMA_7B)
    config = CommConfig(text_config=text_config, **token_ids)
    config._attn_implementation = "sdpa"
    model = build_random(config, device, dtype)
    return CommPipeline(model, build_processor(tokenizer, config))


def make_images(count: int, seed: int = 0) -> list[Image.Image]:
    """``count`` random 320x240 RGB images (all one size, so every run preprocesses the same pixels)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(count)]


def time_captions(
    pipe: CommPipeline, images: list[Image.Image], batch_size: int, new_tokens: int, repeats: int
) -> float:
    """Best images/s over ``repeats`` runs of captioning ``images`` at ``batch_size``."""
    options = {"min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "batch_size": batch_size}
    captions, seconds = fastest(lambda: pipe.caption(images, **options), repeats, pipe.device)
    if len(captions) != len(images):
        raise RuntimeError(f"got {len(captions)} captions for {len(images)} images")
    return len(images) / seconds


def run_benchmark(
    args: argparse.Namespace, device: torch.device, num_images: int, repeats: int
) -> tuple[torch.dtype, dict[int, float], float]:
    """Build the model, warm up, and time captioning at each batch size; returns dtype, images/s, build seconds."""
    build_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="comm-bench-") as folder:
        if args.real_size:
            dtype = resolve_dtype(None, device)
            pipe = build_real_size(device, dtype)
        else:
            dtype = torch.float32 if device.type == "cpu" else resolve_dtype(None, device)
            pipe = build_tiny(Path(folder), device, dtype)
    build_seconds = time.perf_counter() - build_start

    counter = TokenCounter(pipe.model)
    images = make_images(num_images)
    warmup = {"min_new_tokens": 2, "max_new_tokens": 2}
    for batch_size in BATCH_SIZES:  # warm up kernels and allocator at both shapes
        pipe.caption(images[:batch_size], batch_size=batch_size, **warmup)
    counter.new_tokens.clear()

    # --quick times batch 1 on half the images (its rate is per image, so the ratio stays fair) to stay < 60 s.
    subsets = {1: images[: max(1, num_images // 2)] if args.quick else images, 16: images}
    rates = {size: time_captions(pipe, subsets[size], size, args.new_tokens, repeats) for size in BATCH_SIZES}
    if set(counter.new_tokens) != {args.new_tokens}:
        raise RuntimeError(
            f"expected exactly {args.new_tokens} new tokens per call, got {sorted(set(counter.new_tokens))}"
        )

    return dtype, rates, build_seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (under a minute on a CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--real-size", action="store_true", help="ViT-L towers + 7B LLM, random weights, bf16 GPU")
    parser.add_argument("--images", type=int, default=None, help="images per timed run (default 16, 64 for full)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per caption (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per batch size, best kept")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; 0 keeps torch's default (default: 1 for the tiny model on CPU, whose small matmuls "
        "gain nothing from more and slow down badly on a shared machine)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line; returns the exit status."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for but CUDA is not available", file=sys.stderr)
        return 2
    if args.real_size and device.type != "cuda":
        print(
            "error: --real-size builds a 7B LLM with ViT-L towers (~14 GB in bf16) and is meant for a GPU; "
            "no CUDA device here. Run without --real-size for the tiny CPU model.",
            file=sys.stderr,
        )
        return 2
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" and not args.real_size else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    num_images = args.images or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    if num_images < max(BATCH_SIZES) or args.new_tokens < 1 or repeats < 1:
        print(f"error: need --images >= {max(BATCH_SIZES)}, --new-tokens >= 1, --repeats >= 1", file=sys.stderr)
        return 2

    # Library chatter (DeepSpeed's accelerator notice, printed when save_pretrained imports it) goes to stderr:
    # stdout carries the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        dtype, rates, build_seconds = run_benchmark(args, device, num_images, repeats)

    result = {
        "benchmark": "caption_throughput",
        "value": round(rates[16] / rates[1], 3),
        "unit": "x",
        "images_per_s_batch1": round(rates[1], 3),
        "images_per_s_batch16": round(rates[16], 3),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "dtype": str(dtype).removeprefix("torch."),
        "config": "real-size" if args.real_size else "tiny",
        "num_images": num_images,
        "num_images_batch1": max(1, num_images // 2) if args.quick else num_images,
        "new_tokens": args.new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "build_s": round(build_seconds, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
