"""The REC task (referring expression comprehension, RefCOCO/+/g): samples read from REFER or JSON lines, the
grounding prompt, the answer's first box mapped to pixels, Acc@0.5, and the visualization grid."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from comm.boxes import box_iou, is_box, xywh_to_xyxy
from comm.conversation import rec_prompt
from comm.evaluation.task import EvaluationTask, Record
from comm.evaluation.unanswerable import UNANSWERABLE, count_unanswerable
from comm.grounding import Grounding
from comm.io import iter_jsonl_strict
from comm.refer import iter_refer

if TYPE_CHECKING:
    from comm.processing import CommProcessor

IOU_THRESHOLD = 0.5
PREDICTION_KEYS = ("id", "expression", "answer", "pred_box", "gt_box", "iou")
REC_MAX_NEW_TOKENS = 64  # "[0.123,0.456,0.789,0.999]" is ~27 LLaMA tokens (digits are single tokens)
VISUALIZATION_FILE = "visualization.png"


@dataclass(frozen=True)
class RecSample:
    """One referring expression with its ground-truth box in original-image pixels."""

    id: str
    image: str
    expression: str
    bbox_xyxy: tuple[float, float, float, float]


def load_refer(
    data_root: str | os.PathLike[str],
    dataset: str,
    split_by: str | None,
    split: str,
    image_dir: str | os.PathLike[str],
) -> list[RecSample]:
    """Read one split of a REFER dataset (`iter_refer`) as REC samples, one a sentence, images in ``image_dir``."""
    return [
        RecSample(
            id=expression.id,
            image=str(Path(image_dir) / expression.file_name),
            expression=expression.expression,
            bbox_xyxy=xywh_to_xyxy(expression.bbox),
        )
        for expression in iter_refer(data_root, dataset, split_by, split)
    ]


def load_rec_jsonl(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None) -> list[RecSample]:
    """Read REC samples from JSON lines ``{"image", "expression", "bbox": [x, y, w, h], "id"?}``."""
    path = Path(path)
    samples: list[RecSample] = []
    seen: set[str] = set()
    for line_number, record in iter_jsonl_strict(path):
        where = f"{path}, line {line_number}"
        missing = [key for key in ("image", "expression", "bbox") if key not in record]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        image, expression, bbox = record["image"], record["expression"], record["bbox"]
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: 'image' must be a non-empty string")
        if not isinstance(expression, str):
            raise ValueError(f"{where}: 'expression' must be a string")
        if not is_box(bbox):
            raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise ValueError(f"{where}: 'bbox' width and height must be > 0, got {bbox!r}")
        sample_id = str(record.get("id", line_number))
        if sample_id in seen:
            raise ValueError(f"{where}: duplicate id {sample_id!r}")
        seen.add(sample_id)
        image_path = Path(image_root) / image if image_root is not None else Path(image)
        samples.append(
            RecSample(id=sample_id, image=str(image_path), expression=expression, bbox_xyxy=xywh_to_xyxy(bbox))
        )
    return samples


def rec_record(sample: RecSample, answer: str, width: int, height: int, pad_to_square: bool = True) -> Record:
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


def score_rec(records: Sequence[Record]) -> dict[str, Any]:
    """Acc@0.5 over ``{"pred_box": [x0, y0, x1, y1] | None, "gt_box": [x0, y0, x1, y1]}`` pixel records.

    A record without a box is wrong; it is counted in ``no_box``, or in ``unanswerable`` when it is marked so (its
    image was not usable).
    """
    n = len(records)
    if n == 0:
        raise ValueError("no REC records to score")
    correct = 0
    no_box = 0
    unanswerable = count_unanswerable(records)
    for index, record in enumerate(records):
        for key in ("pred_box", "gt_box"):
            if key not in record:
                raise ValueError(f"record #{index}: missing {key!r}")
        pred_box, gt_box = record["pred_box"], record["gt_box"]
        if not is_box(gt_box):
            raise ValueError(f"record #{index}: 'gt_box' must be 4 numbers, got {gt_box!r}")
        if pred_box is None:
            no_box += not record.get(UNANSWERABLE)
            continue
        if not is_box(pred_box):
            raise ValueError(f"record #{index}: 'pred_box' must be 4 numbers or null, got {pred_box!r}")
        if box_iou(pred_box, gt_box) >= IOU_THRESHOLD:
            correct += 1
    metrics = {"accuracy": correct / n, "n": n, "no_box": no_box}
    if unanswerable:
        metrics[UNANSWERABLE] = unanswerable
    return metrics


def rescore_predictions_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Recompute Acc@0.5 from a predictions file written by the REC evaluation (IoUs are recomputed)."""
    path = Path(path)
    records = []
    for line_number, record in iter_jsonl_strict(path):
        where = f"{path}, line {line_number}"
        missing = [key for key in PREDICTION_KEYS if key not in record]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        if not is_box(record["gt_box"]):
            raise ValueError(f"{where}: 'gt_box' must be 4 numbers, got {record['gt_box']!r}")
        if record["pred_box"] is not None and not is_box(record["pred_box"]):
            raise ValueError(f"{where}: 'pred_box' must be 4 numbers or null, got {record['pred_box']!r}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no predictions")
    return score_rec(records)


def save_rec_visualization(
    records: Sequence[Record], samples: Sequence[RecSample], count: int, path: str | os.PathLike[str]
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


@dataclass(frozen=True)
class RecTask(EvaluationTask[RecSample]):
    """Ground each sample's expression; Acc@0.5 of the first box; ``visualize`` draws that many into a grid."""

    items: Sequence[RecSample]
    visualize: int = 0
    name: ClassVar[str] = "REC"
    item_name: ClassVar[str] = "REC sample"
    max_new_tokens: ClassVar[int] = REC_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        if self.visualize < 0:
            raise ValueError(f"visualize must be >= 0, got {self.visualize}")

    def item_id(self, item: RecSample) -> str:
        """The sample's id."""
        return item.id

    def image_path(self, item: RecSample) -> str:
        """The sample's image."""
        return item.image

    def prompt(self, item: RecSample) -> str:
        """The grounding question for the sample's expression."""
        return rec_prompt(item.expression)

    def parse(self, item: RecSample, answer: str, image_size: tuple[int, int], processor: CommProcessor) -> Record:
        """`rec_record`: the answer's first box in pixels, in the processor's image mode."""
        return rec_record(item, answer, *image_size, processor.pad_to_square)

    def unanswered_record(self, item: RecSample) -> Record:
        """No answer: no box, IoU 0."""
        return rec_record(item, "", 1, 1)

    def score(self, records: Sequence[Record]) -> dict[str, Any]:
        """`score_rec`: Acc@0.5, n, no_box (and unanswerable)."""
        return score_rec(records)

    def save_extras(self, records: Sequence[Record], folder: Path) -> None:
        """``visualization.png`` of the first ``visualize`` predictions, when asked."""
        if self.visualize:
            save_rec_visualization(records, self.items, self.visualize, folder / VISUALIZATION_FILE)
