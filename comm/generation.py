"""Batched generation with left padding and the KV cache, shared by the inference API and the eval scripts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from comm.conversation import VICUNA_V1, ConversationTemplate
from comm.model.modeling import CommForConditionalGeneration
from comm.processing import CommProcessor, ImageInput

DEFAULT_MAX_NEW_TOKENS = 64


@torch.inference_mode()
def generate_answers(
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    images: Sequence[ImageInput],
    questions: Sequence[str],
    batch_size: int = 8,
    template: ConversationTemplate = VICUNA_V1,
    progress: bool = False,
    description: str = "generating",
    **generate_kwargs: Any,
) -> list[str]:
    """Answer ``questions[i]`` about ``images[i]`` for every i, in input order.

    Each question must hold one ``<image>`` placeholder. Prompts are rendered with ``template``, batched
    ``batch_size`` at a time with left padding, and decoded greedily unless sampling arguments are passed
    through ``generate_kwargs`` (``do_sample``, ``temperature``, ``top_p``, ``max_new_tokens``, ``streamer``...).
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generate_kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    generate_kwargs.setdefault("do_sample", False)
    tokenizer = processor.tokenizer
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    if not generate_kwargs["do_sample"]:
        # Greedy decoding: drop sampling defaults a checkpoint's generation_config may carry.
        for key in ("temperature", "top_p", "top_k"):
            generate_kwargs.setdefault(key, None)
    answers: list[str] = []
    bar = tqdm(total=len(questions), desc=description, unit="item", disable=not progress)
    for start in range(0, len(questions), batch_size):
        chunk = slice(start, start + batch_size)
        prompts = [template.prompt(question) for question in questions[chunk]]
        inputs = processor(text=prompts, images=list(images[chunk]), padding_side="left")
        inputs = inputs.to(model.device, dtype=model.dtype)  # pixel values take the model's dtype, ids stay ints
        output = model.generate(**inputs, **generate_kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers.extend(text.strip() for text in processor.batch_decode(new_tokens))
        bar.update(len(prompts))
    bar.close()
    return answers
