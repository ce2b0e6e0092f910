"""Benchmark: POPE answers from one forward pass (yes/no logits) vs generation, on the tiny COMM model on CPU.

Prints ONE JSON line: ``{"benchmark": "pope_scoring", "value": <speed ratio>, "unit": "x", "agreement": ...}``.
``agreement`` compares the logits answer with the official POPE rule applied to the generated text; on a random
tiny model that text is hardly ever a yes/no answer, so ``agreement_restricted`` also compares with generation
restricted to the two answer tokens (one token), which must agree exactly (exit code 1 otherwise).

``--real-size`` (GPU) runs the same comparison at the paper's shapes (ViT-L towers + LLaMA-2-7B, random weights,
bf16, 640x480 images, the model of `bench_generation_gpu`) at ``--batch-size``; generation then takes
`generate_answers`' CUDA default path, and agreement is reported, not required (bf16 logits of random weights can
tie). ``--smoke-cpu`` runs that code on tiny shapes on the CPU (a check, no figure).

    python -m benchmarks.bench_pope_scoring           # 64 questions, best of 3
    python -m benchmarks.bench_pope_scoring --quick   # 16 questions, once
    python -m benchmarks.bench_pope_scoring --real-size --batch-size 32 --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from benchmarks.common import build_tiny_model, fastest, finish, gpu_device, stdout_to_stderr, synchronize
from comm.conversation import with_image
from comm.evaluation.pope import POPE_MAX_NEW_TOKENS, pope_answer_is_yes
from comm.evaluation.yes_no import NO_ANSWER, YES_ANSWER, yes_no_logits, yes_no_token_ids
from comm.generation import generate_answers

BATCH_SIZE = 16
OBJECTS = ("dog", "cat", "car", "person", "chair", "cup", "bicycle", "bottle")


class OnlyTokens(LogitsProcessor):
    """Let generation choose among ``token_ids`` only."""

    def __init__(self, token_ids: Sequence[int]):
        self.token_ids = list(token_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.token_ids] = 0
        return scores + mask


def make_questions(
    count: int, seed: int = 0, size: tuple[int, int] | None = None
) -> tuple[list[Image.Image], list[str]]:
    """``count`` random images (of varied small sizes, or all ``size``) with POPE-style questions."""
    rng = np.random.default_rng(seed)
    images, questions = [], []
    for index in range(count):
        width, height = size or (int(rng.integers(40, 160)), int(rng.integers(40, 160)))
        images.append(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))
        questions.append(with_image(f"Is there a {OBJECTS[index % len(OBJECTS)]} in the image?"))
    return images, questions


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its JSON line; exit code 1 when restricted generation disagrees."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 questions, one timed run per mode")
    parser.add_argument("--items", type=int, default=None, help="number of questions (default 64, 16 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per mode, best kept (default 3)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=POPE_MAX_NEW_TOKENS, help="generate mode's token budget (eval default)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"questions per batch (default {BATCH_SIZE})"
    )
    parser.add_argument("--real-size", action="store_true", help="ViT-L towers + 7B LLM, random weights, bf16, GPU")
    parser.add_argument("--smoke-cpu", action="store_true", help="--real-size's code on tiny shapes on the CPU")
    parser.add_argument("--attn", choices=["sdpa", "flash_attention_2"], default="sdpa", help="LLM attention")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    items = args.items or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    if items < 1 or repeats < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--items, --repeats, --max-new-tokens and --batch-size must be >= 1")

    build_s = 0.0
    if args.real_size or args.smoke_cpu:
        from benchmarks.bench_generation_gpu import make_model

        device = gpu_device("pope_scoring", args, parser)
        if device is None:
            return 0
        start = time.perf_counter()
        with stdout_to_stderr():
            model, processor = make_model(args.attn, args.smoke_cpu, device, torch.bfloat16, seed=0)
        synchronize(device)
        build_s = time.perf_counter() - start
        images, questions = make_questions(items, size=(640, 480))
    else:
        with tempfile.TemporaryDirectory(prefix="bench_pope_") as folder:
            model, processor = build_tiny_model(folder)
        images, questions = make_questions(items)
    batch_size = args.batch_size
    token_ids = yes_no_token_ids(processor.tokenizer)

    def logits_mode() -> list[bool]:
        pairs = []
        for start in range(0, items, batch_size):
            chunk = slice(start, start + batch_size)
            pairs.extend(yes_no_logits(model, processor, images[chunk], questions[chunk], token_ids))
        return [yes > no for yes, no in pairs]

    def generate_mode() -> list[str]:
        return generate_answers(
            model, processor, images, questions, batch_size=batch_size, max_new_tokens=args.max_new_tokens
        )

    # One untimed pass per mode: the first call with a new input shape is several times slower on CPU.
    logits_mode()
    generate_mode()
    logits_yes, logits_s = fastest(logits_mode, repeats, model.device)
    generated, generate_s = fastest(generate_mode, repeats, model.device)
    restricted = generate_answers(
        model, processor, images, questions, batch_size=batch_size, max_new_tokens=1,
        logits_processor=LogitsProcessorList([OnlyTokens(token_ids)]),
    )  # fmt: skip
    generated_yes = [pope_answer_is_yes(text) for text in generated]
    restricted_yes = [text == YES_ANSWER for text in restricted]
    unexpected = [text for text in restricted if text not in (YES_ANSWER, NO_ANSWER)]
    agreement_restricted = sum(a == b for a, b in zip(logits_yes, restricted_yes)) / items
    result = {
        "benchmark": "pope_scoring",
        "value": round(generate_s / logits_s, 3),
        "unit": "x",
        "agreement": round(sum(a == b for a, b in zip(logits_yes, generated_yes)) / items, 4),
        "agreement_restricted": round(agreement_restricted, 4),
        "items": items,
        "batch_size": batch_size,
        "generate_max_new_tokens": args.max_new_tokens,
        "logits_s": round(logits_s, 4),
        "generate_s": round(generate_s, 4),
        "logits_items_per_s": round(items / logits_s, 3),
        "generate_items_per_s": round(items / generate_s, 3),
        "yes_ratio_logits": round(sum(logits_yes) / items, 4),
        "yes_ratio_generate": round(sum(generated_yes) / items, 4),
        "generated_yes_or_no": sum(text.split(" ")[0].strip(".,").lower() in ("yes", "no") for text in generated),
        "model": "random tiny COMM (free-form text is rarely a yes/no answer)",
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    if args.real_size or args.smoke_cpu:
        result["model"] = "tiny (smoke check)" if args.smoke_cpu else "CLIP ViT-L/14-336 + DINOv2-L + LLaMA-2-7B, bf16"
        result["config"] = "smoke" if args.smoke_cpu else "real-size"
        result["smoke"] = args.smoke_cpu
        result["build_s"] = round(build_s, 1)
        if model.device.type == "cuda":
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(model.device) / 2**30, 2)
        return finish(result, args.quick)  # bf16 logits of random weights can tie: agreement is reported only
    print(json.dumps(result))
    if unexpected or agreement_restricted != 1.0:
        print(
            f"error: logits mode disagrees with generation restricted to ' {YES_ANSWER}'/' {NO_ANSWER}' "
            f"(agreement {agreement_restricted:.3f}, {len(unexpected)} answers neither)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
