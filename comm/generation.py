"""Batched generation with left padding and the KV cache, shared by the inference API and the eval scripts."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm

from comm.conversation import ConversationTemplate
from comm.model.modeling import CommForConditionalGeneration
from comm.processing import CommProcessor, ImageInput

DEFAULT_MAX_NEW_TOKENS = 64


def fast_generate_kwargs(device: torch.device | str) -> dict[str, Any]:
    """`generate` options of the fast decode path on ``device``: on CUDA a static KV cache, whose fixed shapes let
    transformers compile the decode step (CUDA graphs); elsewhere none (the dynamic cache, as measured no slower)."""
    if torch.device(device).type == "cuda":
        return {"cache_implementation": "static"}
    return {}


@torch.inference_mode()
def generate_answers(
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    images: Sequence[ImageInput],
    questions: Sequence[str],
    batch_size: int = 8,
    template: ConversationTemplate | None = None,
    progress: bool = False,
    description: str = "generating",
    prefetch: bool | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Answer ``questions[i]`` about ``images[i]`` for every i, in input order.

    Each question must hold one ``<image>`` placeholder. Prompts are rendered with ``template`` (default: the
    processor's, the one the model was trained with), batched ``batch_size`` at a time with left padding, and
    decoded greedily unless sampling arguments are passed through ``generate_kwargs`` (``do_sample``,
    ``temperature``, ``top_p``, ``max_new_tokens``, ``streamer``...).
    On CUDA the fast path is the default (`fast_generate_kwargs`; pass ``cache_implementation="dynamic"`` to
    leave it). ``prefetch`` preprocesses the next batch in a background thread while the current one generates
    (default: on CUDA, where the GPU would otherwise wait for the CPU; on a CPU both compete for the same cores).
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generate_kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    generate_kwargs.setdefault("do_sample", False)
    for key, value in fast_generate_kwargs(model.device).items():
        generate_kwargs.setdefault(key, value)
    tokenizer = processor.tokenizer
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    if not generate_kwargs["do_sample"]:
        # Greedy decoding: drop sampling defaults a checkpoint's generation_config may carry.
        for key in ("temperature", "top_p", "top_k"):
            generate_kwargs.setdefault(key, None)
    if prefetch is None:
        prefetch = model.device.type == "cuda"
    template = template or processor.template

    def preprocess(start: int) -> Any:
        chunk = slice(start, start + batch_size)
        prompts = [template.prompt(question) for question in questions[chunk]]
        return processor(text=prompts, images=list(images[chunk]), padding_side="left")

    starts = range(0, len(questions), batch_size)
    answers: list[str] = []
    bar = tqdm(total=len(questions), desc=description, unit="item", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming: Future | None = None
        for index, start in enumerate(starts):
            inputs = upcoming.result() if upcoming is not None else preprocess(start)
            upcoming = None
            if prefetch and index + 1 < len(starts):
                upcoming = pool.submit(preprocess, starts[index + 1])
            # Device copies stay on this thread (none may run beside a CUDA graph capture); pixel values take the
            # model's dtype, ids stay ints.
            inputs = inputs.to(model.device, dtype=model.dtype)
            output = model.generate(**inputs, **generate_kwargs)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            if upcoming is not None:
                # The tokenizer is not safe to use from two threads at once: decode once the next batch is ready.
                upcoming.result()
            answers.extend(text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True))
            bar.update(new_tokens.shape[0])
    bar.close()
    return answers
