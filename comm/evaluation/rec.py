"""Referring expression comprehension (RefCOCO/+/g): readers for REFER and JSON-lines data, Acc@0.5."""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from comm.boxes import box_iou, xywh_to_xyxy
from comm.evaluation.files import iter_jsonl_strict, read_json
from comm.evaluation.unanswerable import UNANSWERABLE, count_unanswerable

# Valid splits for each (dataset, split_by) of the REFER release; the first split_by is the default.
REFER_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "refcoco": {"unc": ("train", "val", "testA", "testB"), "google": ("train", "val", "test")},
    "refcoco+": {"unc": ("train", "val", "testA", "testB")},
    "refcocog": {"umd": ("train", "val", "test"), "google": ("train", "val")},
}

IOU_THRESHOLD = 0.5
PREDICTION_KEYS = ("id", "expression", "answer", "pred_box", "gt_box", "iou")


@dataclass(frozen=True)
class RecSample:
    """One referring expression with its ground-truth box in original-image pixels."""

    id: str
    image: str
    expression: str
    bbox_xyxy: tuple[float, float, float, float]


@dataclass(frozen=True)
class ReferExpression:
    """One sentence of a REFER ref: its COCO image (file name and size) and its box ``[x, y, w, h]`` in pixels."""

    id: str
    file_name: str
    width: int | None
    height: int | None
    expression: str
    bbox: tuple[float, float, float, float]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global, so a pickle can build only plain containers and scalars.

    REFER's ``refs(*).p`` files are protocol-2 pickles of dicts, lists, strings and numbers: they need no
    global at all, while a malicious pickle needs one (``os.system``, ``builtins.eval``...) to run code.
    """

    def __init__(self, file: Any, source: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = str(source)

    def find_class(self, module: str, name: str) -> NoReturn:
        """Refuse to resolve any global."""
        raise pickle.UnpicklingError(
            f"{self.source}: refusing to load global {module}.{name}; "
            "REFER pickles hold only dicts, lists, strings and numbers"
        )


def load_restricted_pickle(path: str | os.PathLike[str]) -> Any:
    """Load a pickle of plain dicts/lists/str/int/float with :class:`RestrictedUnpickler`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle file not found: {path}")
    with path.open("rb") as handle:
        try:
            # Python 2 pickles store ``str`` as bytes: decode them as UTF-8 (a superset of the ASCII default).
            return RestrictedUnpickler(handle, path, encoding="utf-8").load()
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: a string in the pickle is not valid UTF-8 ({error})") from error
        except (EOFError, IndexError, KeyError, TypeError, AttributeError, ValueError) as error:
            raise pickle.UnpicklingError(f"{path}: not a readable pickle ({error!r})") from error


def _refer_error(path: Path, message: str) -> NoReturn:
    raise ValueError(f"{path}: {message}")


def iter_refer(
    data_root: str | os.PathLike[str], dataset: str, split_by: str | None, split: str
) -> Iterator[ReferExpression]:
    """Every sentence of one split of a REFER dataset (``{data_root}/{dataset}/refs({split_by}).p`` +
    ``instances.json``), in the refs' order; a malformed file is a ValueError naming it and the ref.

    ``split_by=None`` picks the usual one: ``unc`` for refcoco/refcoco+, ``umd`` for refcocog.
    """
    if dataset not in REFER_SPLITS:
        raise ValueError(f"unknown REFER dataset {dataset!r}; known: {', '.join(REFER_SPLITS)}")
    split_bys = REFER_SPLITS[dataset]
    if split_by is None:
        split_by = next(iter(split_bys))
    if split_by not in split_bys:
        raise ValueError(f"unknown split_by {split_by!r} for {dataset}; valid: {', '.join(split_bys)}")
    valid_splits = split_bys[split_by]
    if split not in valid_splits:
        raise ValueError(f"unknown split {split!r} for {dataset} ({split_by}); valid splits: {', '.join(valid_splits)}")

    folder = Path(data_root) / dataset
    refs_path = folder / f"refs({split_by}).p"
    instances_path = folder / "instances.json"
    for required in (refs_path, instances_path):
        if not required.is_file():
            raise FileNotFoundError(f"REFER file not found: {required}")

    refs = load_restricted_pickle(refs_path)
    if not isinstance(refs, list):
        _refer_error(refs_path, f"expected a list of refs, got {type(refs).__name__}")
    instances = read_json(instances_path)
    if not isinstance(instances, dict) or "images" not in instances or "annotations" not in instances:
        _refer_error(instances_path, "expected a COCO object with 'images' and 'annotations'")

    try:
        images = {image["id"]: image for image in instances["images"]}
        annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
    except (KeyError, TypeError) as error:
        raise ValueError(f"{instances_path}: an image or annotation has no 'id' ({error!r})") from error

    found = False
    for index, ref in enumerate(refs):
        where = f"ref #{index}"
        if not isinstance(ref, dict):
            _refer_error(refs_path, f"{where} is a {type(ref).__name__}, not a dict")
        missing = [key for key in ("ref_id", "ann_id", "image_id", "split", "sentences") if key not in ref]
        if missing:
            _refer_error(refs_path, f"{where} lacks {', '.join(missing)}")
        if not all(isinstance(ref[key], (int, str)) for key in ("ref_id", "ann_id", "image_id")):
            _refer_error(refs_path, f"{where}: ref_id, ann_id and image_id must be numbers or strings")
        if not isinstance(ref["sentences"], list):
            _refer_error(refs_path, f"{where}: 'sentences' must be a list")
        if ref["split"] != split:
            continue
        where = f"ref_id {ref['ref_id']}"
        annotation = annotations.get(ref["ann_id"])
        if annotation is None:
            _refer_error(instances_path, f"no annotation with id {ref['ann_id']} (needed by {where})")
        image = images.get(ref["image_id"])
        if image is None:
            _refer_error(instances_path, f"no image with id {ref['image_id']} (needed by {where})")
        bbox = annotation.get("bbox")
        if not _is_box(bbox):
            _refer_error(instances_path, f"annotation {ref['ann_id']} has no [x, y, w, h] bbox: {bbox!r}")
        if not isinstance(image.get("file_name"), str):
            _refer_error(instances_path, f"image {ref['image_id']} has no file_name string")
        size = [image.get(key) if _is_number(image.get(key)) else None for key in ("width", "height")]
        for sentence_index, sentence in enumerate(ref["sentences"]):
            text = sentence.get("sent", sentence.get("raw")) if isinstance(sentence, dict) else None
            if not isinstance(text, str):
                _refer_error(refs_path, f"{where}, sentence {sentence_index} has no 'sent' text")
            found = True
            yield ReferExpression(
                id=f"{ref['ref_id']}_{sentence_index}",
                file_name=image["file_name"],
                width=size[0],
                height=size[1],
                expression=text,
                bbox=tuple(bbox),
            )
    if not found:
        _refer_error(refs_path, f"no refs in split {split!r}")


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value)


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
        if not _is_box(bbox):
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


def score_rec(records: list[dict[str, Any]]) -> dict[str, Any]:
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
        if not _is_box(gt_box):
            raise ValueError(f"record #{index}: 'gt_box' must be 4 numbers, got {gt_box!r}")
        if pred_box is None:
            no_box += not record.get(UNANSWERABLE)
            continue
        if not _is_box(pred_box):
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
        if not _is_box(record["gt_box"]):
            raise ValueError(f"{where}: 'gt_box' must be 4 numbers, got {record['gt_box']!r}")
        if record["pred_box"] is not None and not _is_box(record["pred_box"]):
            raise ValueError(f"{where}: 'pred_box' must be 4 numbers or null, got {record['pred_box']!r}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no predictions")
    return score_rec(records)
