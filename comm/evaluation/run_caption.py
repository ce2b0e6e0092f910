"""Caption evaluation with a model: caption each test image, then BLEU-4, METEOR, ROUGE-L, CIDEr (SPICE)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comm.conversation import CAPTION_PROMPT
from comm.evaluation.caption import CaptionSample, score_captions
from comm.evaluation.files import METRICS_FILE, check_files_exist, read_unique_records
from comm.evaluation.sharding import DEFAULT_BATCH_SIZE, predict_and_score
from comm.evaluation.unanswerable import UNANSWERABLE, answer_with_images, count_unanswerable
from comm.generation import generate_answers
from comm.io import write_json

CAPTION_MAX_NEW_TOKENS = 64
PREDICTIONS_FILE = "predictions.jsonl"


def predict_caption_batch(
    model: Any, processor: Any, samples: Sequence[CaptionSample], **generate_kwargs: Any
) -> list[dict[str, Any]]:
    """Caption one batch of images (one generate call); records ``{"id", "image", "caption"}`` in order.

    An image that is not usable gets the empty caption (it scores as a wrong one) and is marked `UNANSWERABLE`.
    """

    def answer(batch: list[CaptionSample], images: list[Any]) -> list[dict[str, Any]]:
        questions = [CAPTION_PROMPT] * len(batch)
        captions = generate_answers(model, processor, images, questions, batch_size=len(batch), **generate_kwargs)
        return [
            {"id": sample.id, "image": sample.image, "caption": caption}
            for sample, caption in zip(batch, captions, strict=True)
        ]

    return answer_with_images(
        samples,
        lambda sample: sample.image,
        lambda sample: f"image of caption sample {sample.id}",
        answer,
        lambda sample: {"id": sample.id, "image": sample.image, "caption": ""},
    )


def score_caption_records(
    records: Sequence[dict[str, Any]],
    samples: Sequence[CaptionSample],
    spice: bool = False,
    tokenizer: str = "ptb",
) -> dict[str, Any]:
    """`score_captions` of ``{"id", "caption"}`` records against the samples' references.

    Unanswerable records (their image was not usable) score with their empty caption and are counted under
    ``unanswerable``.
    """
    predictions = {str(record["id"]): record["caption"] for record in records}
    references = {sample.id: sample.references for sample in samples}
    scores = score_captions(predictions, references, spice=spice, tokenizer=tokenizer)
    unanswerable = count_unanswerable(records)
    if unanswerable:
        scores[UNANSWERABLE] = unanswerable
    return scores


def rescore_caption_file(
    path: str | os.PathLike[str], samples: Sequence[CaptionSample], spice: bool = False, tokenizer: str = "ptb"
) -> dict[str, Any]:
    """Re-score a predictions file written by `evaluate_captions` against ``samples`` (no model)."""

    def check(record: dict[str, Any]) -> str | None:
        if not isinstance(record["caption"], str):
            return f"'caption' must be a string, got {type(record['caption']).__name__}"
        return None

    path = Path(path)
    records = read_unique_records(path, ("id", "caption"), "id", check)
    if not records:
        raise ValueError(f"{path}: no predictions")
    try:
        return score_caption_records(records, samples, spice=spice, tokenizer=tokenizer)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def evaluate_captions(
    model: Any,
    processor: Any,
    samples: Sequence[CaptionSample],
    out_dir: str | os.PathLike[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = CAPTION_MAX_NEW_TOKENS,
    spice: bool = False,
    tokenizer: str = "ptb",
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Caption ``samples`` into ``predictions.jsonl`` (resumable, sharded), score them into ``metrics.json``.

    Returns BLEU-4, METEOR, ROUGE-L, CIDEr (and SPICE with ``spice``) on every rank; ``tokenizer="python"``
    scores without Java (see `score_captions`).
    """
    check_files_exist((sample.image for sample in samples), "image")
    out_dir = Path(out_dir)
    generate_kwargs["max_new_tokens"] = max_new_tokens

    def predict(batch: list[CaptionSample]) -> list[dict[str, Any]]:
        return predict_caption_batch(model, processor, batch, **generate_kwargs)

    def score(records: list[dict[str, Any]]) -> dict[str, Any]:
        metrics = score_caption_records(records, samples, spice=spice, tokenizer=tokenizer)
        write_json(out_dir / METRICS_FILE, metrics)
        return metrics

    return predict_and_score(
        samples,
        lambda sample: sample.id,
        predict,
        out_dir / PREDICTIONS_FILE,
        key="id",
        score=score,
        what=("captions", "caption"),
        batch_size=batch_size,
        progress=progress,
        description="captions",
    )
