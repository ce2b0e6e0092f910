"""POPE evaluation with a model: answer yes/no questions by generation or by one forward pass (logits)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from comm.conversation import VICUNA_V1, ConversationTemplate, with_image
from comm.evaluation.files import METRICS_FILE, check_files_exist
from comm.evaluation.pope import pope_answers, score_pope, summarize_pope_splits
from comm.evaluation.sharding import DEFAULT_BATCH_SIZE, on_main, predict_and_score
from comm.evaluation.unanswerable import answer_with_images
from comm.generation import generate_answers
from comm.io import write_json

POPE_MAX_NEW_TOKENS = 32  # the official rule reads the first sentence only
ANSWER_MODES = ("generate", "logits")
YES_ANSWER, NO_ANSWER = "Yes", "No"


def answers_file(out_dir: str | os.PathLike[str], split: str) -> Path:
    """Where the answers of ``split`` go: ``{out_dir}/answers_{split}.jsonl``."""
    return Path(out_dir) / f"answers_{split}.jsonl"


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
    model: Any,
    processor: Any,
    images: Sequence[Any],
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


def pope_record(question: Mapping[str, Any], text: str, model_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """An answers-file line in LLaVA's format (``question_id``, ``prompt``, ``text``, ``model_id``, ``metadata``)."""
    return {
        "question_id": question["question_id"],
        "prompt": question["text"],
        "text": text,
        "model_id": model_id,
        "metadata": metadata,
    }


def predict_pope_batch(
    model: Any,
    processor: Any,
    questions: Sequence[Mapping[str, Any]],
    image_dir: str | os.PathLike[str] | None,
    model_id: str,
    answer_mode: str = "generate",
    token_ids: tuple[int, int] | None = None,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Answer one batch of POPE questions and return their answers-file records in order.

    A question whose image is not usable gets the empty answer, marked `UNANSWERABLE` (scored as wrong).
    """
    if answer_mode not in ANSWER_MODES:
        raise ValueError(f"answer_mode must be one of {', '.join(ANSWER_MODES)}, got {answer_mode!r}")
    root = Path(image_dir) if image_dir is not None else Path()

    def answer(batch: list[Mapping[str, Any]], images: list[Any]) -> list[dict[str, Any]]:
        prompts = [with_image(q["text"]) for q in batch]
        if answer_mode == "generate":
            texts = generate_answers(
                model,
                processor,
                images,
                prompts,
                batch_size=len(prompts),
                **generate_kwargs,
            )
            return [pope_record(q, text, model_id, {"answer_mode": "generate"}) for q, text in zip(batch, texts)]
        ids = token_ids if token_ids is not None else yes_no_token_ids(processor.tokenizer, processor.template)
        records = []
        for question, (yes, no) in zip(batch, yes_no_logits(model, processor, images, prompts, ids)):
            text = YES_ANSWER if yes > no else NO_ANSWER
            metadata = {"answer_mode": "logits", "yes_logit": yes, "no_logit": no}
            records.append(pope_record(question, text, model_id, metadata))
        return records

    return answer_with_images(
        questions,
        lambda q: root / q["image"],
        lambda q: f"image of POPE question {q['question_id']}",
        answer,
        lambda q: pope_record(q, "", model_id, {"answer_mode": answer_mode}),
    )


def evaluate_pope(
    model: Any,
    processor: Any,
    questions: Sequence[Mapping[str, Any]],
    image_dir: str | os.PathLike[str] | None,
    answers_path: str | os.PathLike[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    answer_mode: str = "generate",
    max_new_tokens: int = POPE_MAX_NEW_TOKENS,
    model_id: str = "comm",
    progress: bool = True,
    description: str = "POPE",
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Answer one POPE split into ``answers_path`` (resumable, sharded) and return its `score_pope` metrics."""
    if answer_mode not in ANSWER_MODES:
        raise ValueError(f"answer_mode must be one of {', '.join(ANSWER_MODES)}, got {answer_mode!r}")
    root = Path(image_dir) if image_dir is not None else Path()
    check_files_exist((root / question["image"] for question in questions), "image")
    token_ids = yes_no_token_ids(processor.tokenizer, processor.template) if answer_mode == "logits" else None
    generate_kwargs["max_new_tokens"] = max_new_tokens

    def predict(batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return predict_pope_batch(
            model, processor, batch, image_dir, model_id, answer_mode, token_ids, **generate_kwargs
        )

    def score(records: list[dict[str, Any]]) -> dict[str, Any]:
        return score_pope(pope_answers(records), list(questions))

    return predict_and_score(
        questions,
        lambda question: question["question_id"],
        predict,
        answers_path,
        key="question_id",
        score=score,
        what=("POPE answers", "POPE"),
        batch_size=batch_size,
        progress=progress,
        description=description,
    )


def evaluate_pope_splits(
    model: Any,
    processor: Any,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    image_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    answer_mode: str = "generate",
    max_new_tokens: int = POPE_MAX_NEW_TOKENS,
    model_id: str = "comm",
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate each split (``answers_{split}.jsonl``) and write ``metrics.json``.

    Returns one split's `score_pope` metrics, or `summarize_pope_splits` of all (mean F1 and accuracy) for several.
    """
    if not splits:
        raise ValueError("no POPE splits to evaluate")
    results = {}
    for split, questions in splits.items():
        results[split] = evaluate_pope(
            model,
            processor,
            questions,
            image_dir,
            answers_file(out_dir, split),
            batch_size=batch_size,
            answer_mode=answer_mode,
            max_new_tokens=max_new_tokens,
            model_id=model_id,
            progress=progress,
            description=f"POPE {split}",
            **generate_kwargs,
        )
    metrics = next(iter(results.values())) if len(results) == 1 else summarize_pope_splits(results)
    on_main(lambda: write_json(Path(out_dir) / METRICS_FILE, metrics), share=False)
    return metrics
