"""Batched generation with left padding and the KV cache, shared by the inference API and the eval scripts."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import BatchFeature, PreTrainedTokenizerBase

from comm.conversation import ConversationTemplate
from comm.images import ImageInput
from comm.model.modeling import CommForConditionalGeneration
from comm.processing import CommProcessor

DEFAULT_MAX_NEW_TOKENS = 64


def fast_generate_kwargs(device: torch.device | str) -> dict[str, Any]:
    """`generate` options of the fast decode path on ``device``: on CUDA a static KV cache, whose fixed shapes let
    transformers compile the decode step (CUDA graphs); elsewhere none (the dynamic cache, as measured no slower)."""
    if torch.device(device).type == "cuda":
        return {"cache_implementation": "static"}
    return {}


def generation_options(
    model: CommForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, generate_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``generate_kwargs`` with the defaults of `generate_answers`: greedy, `DEFAULT_MAX_NEW_TOKENS`, the fast path
    on the model's device (`fast_generate_kwargs`), the tokenizer's pad and end ids."""
    options = dict(generate_kwargs)
    options.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    options.setdefault("do_sample", False)
    for key, value in fast_generate_kwargs(model.device).items():
        options.setdefault(key, value)
    options.setdefault("pad_token_id", tokenizer.pad_token_id)
    options.setdefault("eos_token_id", tokenizer.eos_token_id)
    if not options["do_sample"]:
        # Greedy decoding: drop sampling defaults a checkpoint's generation_config may carry.
        for key in ("temperature", "top_p", "top_k"):
            options.setdefault(key, None)
    return options


def encode_batch(
    processor: CommProcessor,
    template: ConversationTemplate,
    images: Sequence[ImageInput],
    questions: Sequence[str],
    first_index: int = 0,
    truncate: bool = True,
) -> BatchFeature:
    """Model inputs of one batch: each question rendered with ``template``, tokenized once, left-padded, with its
    image.

    With ``truncate`` a prompt over the processor's ``model_max_length`` loses its earliest text tokens (with a
    warning, the image kept); without, it raises ValueError naming its question (``first_index`` numbers the first).
    """
    prompts = [template.prompt(question) for question in questions]
    if truncate:
        return processor(text=prompts, images=list(images), padding_side="left")
    inputs = processor(text=prompts, images=list(images), padding_side="left", truncation=False)
    limit = processor.model_max_length
    if limit is not None:
        for row, length in enumerate(inputs["attention_mask"].sum(dim=1).tolist()):
            if length > limit:
                raise ValueError(
                    f"question {first_index + row} makes a prompt of {length} tokens (image included), over the "
                    f"model's limit of {limit}: shorten it"
                )
    return inputs


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
    truncate: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Answer ``questions[i]`` about ``images[i]`` for every i, in input order.

    Each question must hold one ``<image>`` placeholder. Prompts are rendered with ``template`` (default: the
    processor's, the one the model was trained with), batched ``batch_size`` at a time with left padding
    (`encode_batch`; ``truncate=False`` makes a prompt over the model's limit an error instead of cutting it), and
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
    options = generation_options(model, processor.tokenizer, generate_kwargs)
    prefetch = model.device.type == "cuda" if prefetch is None else prefetch
    template = template or processor.template
    starts = range(0, len(questions), batch_size)

    def encode(start: int) -> BatchFeature:
        chunk = slice(start, start + batch_size)
        return encode_batch(processor, template, images[chunk], questions[chunk], start, truncate)

    answers: list[str] = []
    bar = tqdm(total=len(questions), desc=description, unit="item", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming: Future | None = None
        for index, start in enumerate(starts):
            inputs = upcoming.result() if upcoming is not None else encode(start)
            upcoming = pool.submit(encode, starts[index + 1]) if prefetch and index + 1 < len(starts) else None
            # Device copies stay on this thread (none may run beside a CUDA graph capture); pixel values take the
            # model's dtype, ids stay ints.
            inputs = inputs.to(model.device, dtype=model.dtype)
            new_tokens = model.generate(**inputs, **options)[:, inputs["input_ids"].shape[1] :]
            if upcoming is not None:
                # The tokenizer is not safe to use from two threads at once: decode once the next batch is ready.
                upcoming.result()
            answers.extend(text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True))
            bar.update(new_tokens.shape[0])
    bar.close()
    return answers
