"""REC evaluation with a model: ground each expression, map the box to pixels, Acc@0.5, predictions jsonl."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comm.boxes import box_iou
from comm.conversation import rec_prompt
from comm.evaluation.files import METRICS_FILE, check_files_exist
from comm.evaluation.rec import RecSample, score_rec
from comm.evaluation.sharding import DEFAULT_BATCH_SIZE, predict_and_score
from comm.evaluation.unanswerable import UNANSWERABLE, answer_with_images
from comm.generation import generate_answers
from comm.grounding import Grounding
from comm.io import write_json

REC_MAX_NEW_TOKENS = 64  # "[0.123,0.456,0.789,0.999]" is ~27 LLaMA tokens (digits are single tokens)
PREDICTIONS_FILE = "predictions.jsonl"
VISUALIZATION_FILE = "visualization.png"


def rec_record(sample: RecSample, answer: str, width: int, height: int, pad_to_square: bool = True) -> dict[str, Any]:
    """The predictions-file line for ``sample``: the answer's first box mapped to original-image pixels.

    ``pad_to_square`` is the processor's image mode (the square the answer's box is normalised to).
    """
    box = Grounding.from_answer(answer, (width, height), pad_to_square).box
    pred_box = list(box) if box is not None else None
    gt_box = list(sample.bbox_xyxy)
    return {
        "id": sample.id,
        "expression": sample.expression,
        "answer": answer,
        "pred_box": pred_box,
        "gt_box": gt_box,
        "iou": box_iou(pred_box, gt_box),
    }


def predict_rec_batch(
    model: Any, processor: Any, samples: Sequence[RecSample], **generate_kwargs: Any
) -> list[dict[str, Any]]:
    """Ground one batch of samples (one generate call) and return their prediction records in order.

    A sample whose image is not usable is recorded unanswered (no answer, no box: wrong) and marked `UNANSWERABLE`.
    """

    def answer(batch: list[RecSample], images: list[Any]) -> list[dict[str, Any]]:
        questions = [rec_prompt(sample.expression) for sample in batch]
        answers = generate_answers(model, processor, images, questions, batch_size=len(batch), **generate_kwargs)
        return [
            rec_record(sample, text, *image.size, processor.pad_to_square)
            for sample, image, text in zip(batch, images, answers, strict=True)
        ]

    return answer_with_images(
        samples,
        lambda sample: sample.image,
        lambda sample: f"image of REC sample {sample.id}",
        answer,
        lambda sample: rec_record(sample, "", 1, 1),  # no answer: no box, IoU 0
    )


def save_rec_visualization(
    records: Sequence[dict[str, Any]], samples: Sequence[RecSample], count: int, path: str | os.PathLike[str]
) -> Path | None:
    """Draw the first ``count`` predictions (gt green, prediction red, expression and IoU below) into one PNG.

    Unanswerable records (their image is not usable) are passed over; with none left nothing is written (None).
    """
    from comm.visualize import save_rec_grid

    images = {sample.id: sample.image for sample in samples}
    cells = []
    for record in [record for record in records if not record.get(UNANSWERABLE)][:count]:
        caption = f"{record['expression']} (IoU {record['iou']:.2f})"
        if record["pred_box"] is None:
            caption += " [no box]"
        cells.append(
            {
                "image": images[record["id"]],
                "gt_box": record["gt_box"],
                "pred_box": record["pred_box"],
                "caption": caption,
            }
        )
    if not cells:
        return None
    path = Path(path)
    save_rec_grid(cells, path, columns=min(4, len(cells)))
    return path


def evaluate_rec(
    model: Any,
    processor: Any,
    samples: Sequence[RecSample],
    out_dir: str | os.PathLike[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = REC_MAX_NEW_TOKENS,
    visualize: int = 0,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Run REC on ``samples``: writes ``predictions.jsonl``, ``metrics.json`` (and ``visualization.png``).

    Resumes from the predictions already in ``out_dir``; under torchrun the samples are sharded over ranks
    and rank 0 writes the files. Returns the metrics (``accuracy``, ``n``, ``no_box``) on every rank.
    """
    if visualize < 0:
        raise ValueError(f"visualize must be >= 0, got {visualize}")
    check_files_exist((sample.image for sample in samples), "image")
    out_dir = Path(out_dir)
    generate_kwargs["max_new_tokens"] = max_new_tokens

    def predict(batch: list[RecSample]) -> list[dict[str, Any]]:
        return predict_rec_batch(model, processor, batch, **generate_kwargs)

    def score(records: list[dict[str, Any]]) -> dict[str, Any]:
        metrics = score_rec(records)
        write_json(out_dir / METRICS_FILE, metrics)
        if visualize:
            save_rec_visualization(records, samples, visualize, out_dir / VISUALIZATION_FILE)
        return metrics

    return predict_and_score(
        samples,
        lambda sample: sample.id,
        predict,
        out_dir / PREDICTIONS_FILE,
        key="id",
        score=score,
        what=("REC predictions", "REC"),
        batch_size=batch_size,
        progress=progress,
        description="REC",
    )
