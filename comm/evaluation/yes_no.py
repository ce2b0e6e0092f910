"""Yes/no answers by one forward pass: the first tokens of " Yes" and " No" as the assistant writes them, and their
next-token logits after each prompt (POPE's ``logits`` answer mode)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from comm.conversation import VICUNA_V1, ConversationTemplate
from comm.images import ImageInput

if TYPE_CHECKING:
    from comm.model.modeling import CommForConditionalGeneration
    from comm.processing import CommProcessor

YES_ANSWER, NO_ANSWER = "Yes", "No"


def answer_token_id(tokenizer: Any, answer: str, template: ConversationTemplate = VICUNA_V1) -> int:
    """The first token of ``answer`` as the assistant writes it after the prompt (``ASSISTANT:`` and a space, or
    ChatML's assistant header: the template's ``reply_prefix``).

    Found by tokenizing a rendered prompt with and without the answer, so SentencePiece's ``▁Yes`` (the space
    glued to the word) is what comes out, not a bare ``Yes`` or a lone ``▁`` piece.
    """
    prompt = template.prompt("Is there a cat in the image?")
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + template.reply_prefix + answer)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) <= len(prompt_ids):
        raise ValueError(
            f"the tokenizer does not tokenize the prompt the same with and without the answer {answer!r}: "
            "cannot find the answer's first token"
        )
    return int(full_ids[len(prompt_ids)])


def yes_no_token_ids(tokenizer: Any, template: ConversationTemplate = VICUNA_V1) -> tuple[int, int]:
    """Token ids of the first tokens of " Yes" and " No" as the assistant would answer in ``template`` (pass the
    processor's, ``processor.template``)."""
    yes_id = answer_token_id(tokenizer, YES_ANSWER, template)
    no_id = answer_token_id(tokenizer, NO_ANSWER, template)
    if yes_id == no_id:
        raise ValueError(f"' {YES_ANSWER}' and ' {NO_ANSWER}' start with the same token ({yes_id})")
    return yes_id, no_id


@torch.inference_mode()
def yes_no_logits(
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    images: Sequence[ImageInput],
    questions: Sequence[str],
    token_ids: tuple[int, int],
) -> list[tuple[float, float]]:
    """Next-token logits ``(yes, no)`` after each prompt (rendered with the processor's template): ONE left-padded
    forward pass for the whole batch."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions")
    prompts = [processor.template.prompt(question) for question in questions]
    inputs = processor(text=prompts, images=list(images), padding_side="left")
    inputs = inputs.to(model.device, dtype=model.dtype)  # pixel values take the model's dtype, ids stay ints
    logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
    chosen = logits[:, list(token_ids)].cpu()
    return [(float(yes), float(no)) for yes, no in chosen.tolist()]
