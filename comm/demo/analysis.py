"""What the demo's REC answers get wrong: accuracy by objects in the image, object size and expression kind, the IoU
histogram, and each miss sorted into another object, the right object with a loose box, or empty space."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from comm.boxes import box_iou
from comm.demo.scenes import RELATIONS, Scene
from comm.evaluation.rec import IOU_THRESHOLD

# Object sides in pixels of a 64-pixel image split in three bands (the world draws 12-24 px objects).
SIZE_BANDS: tuple[tuple[str, float], ...] = (
    ("small (<16 px)", 16.0),
    ("mid (16-21 px)", 22.0),
    ("large (>=22 px)", 1e9),
)
MISS_KINDS = ("another object", "right object, loose box", "empty space", "no box")


def expression_kind(expression: str) -> str:
    """The expression's kind: "relational" when it names a landmark, else its attribute count ("1 attribute"...)."""
    if any(f" {relation} " in f" {expression} " for relation in RELATIONS):
        return "relational"
    words = len(expression.split()) - 1  # "the" + one word per attribute
    return f"{words} attribute" + ("s" if words != 1 else "")


def _size_band(side: float, image_size: int) -> str:
    side = side * 64.0 / image_size
    return next(name for name, upper in SIZE_BANDS if side < upper)


def classify_miss(pred_box: Sequence[float] | None, target: Sequence[float], others: Iterable[Sequence[float]]) -> str:
    """Why a wrong box is wrong: it overlaps another object more than the target ("another object"), it overlaps
    the target ("right object, loose box"), it overlaps nothing ("empty space"), or there is no box."""
    if pred_box is None:
        return "no box"
    on_target = box_iou(pred_box, target)
    on_other = max((box_iou(pred_box, box) for box in others), default=0.0)
    if on_other > on_target:
        return "another object"
    return "right object, loose box" if on_target > 0 else "empty space"


def _rate(hits: list[bool]) -> dict[str, Any]:
    return {"accuracy": round(sum(hits) / len(hits), 3), "n": len(hits)}


def scenes_by_image(scenes: Iterable[Scene]) -> dict[str, Scene]:
    """``scenes`` keyed by their image's name without folder and suffix ("test_00000"), the REC ids' prefix."""
    return {Path(scene.image).stem: scene for scene in scenes}


def rec_error_analysis(records: Sequence[dict[str, Any]], scenes: dict[str, Scene]) -> dict[str, Any]:
    """The error analysis of REC prediction records (``id``, ``expression``, ``pred_box``, ``gt_box`` in pixels, as
    `comm.evaluation.rec.RecTask` writes them) on the world's scenes (`scenes_by_image`; a record's id starts with its
    image's name)."""
    by_objects: dict[str, list[bool]] = defaultdict(list)
    by_size: dict[str, list[bool]] = defaultdict(list)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    histogram = [0] * 10
    misses = dict.fromkeys(MISS_KINDS, 0)
    for record in records:
        scene = scenes[record["id"].split("_rec_")[0]]
        target = [float(v) for v in record["gt_box"]]
        referent = max(scene.objects, key=lambda obj: box_iou(list(obj.box), target))
        others = [list(obj.box) for obj in scene.objects if obj is not referent]
        iou = box_iou(record["pred_box"], target) if record["pred_box"] is not None else 0.0
        hit = iou >= IOU_THRESHOLD
        by_objects[f"{len(scene.objects)} object" + ("s" if len(scene.objects) > 1 else "")].append(hit)
        by_size[_size_band(referent.side, scene.image_size)].append(hit)
        by_kind[expression_kind(record["expression"])].append(hit)
        histogram[min(int(iou * 10), 9)] += 1
        if not hit:
            misses[classify_miss(record["pred_box"], target, others)] += 1
    return {
        "by_objects": {key: _rate(value) for key, value in sorted(by_objects.items())},
        "by_object_size": {name: _rate(by_size[name]) for name, _ in SIZE_BANDS if by_size[name]},
        "by_expression": {key: _rate(value) for key, value in sorted(by_kind.items())},
        "iou_histogram": histogram,  # tenths: [0, 0.1), [0.1, 0.2) ... [0.9, 1.0]
        "misses": misses,
    }


def format_error_analysis(analysis: dict[str, Any]) -> list[str]:
    """The analysis as a few report lines."""

    def rates(group: dict[str, dict[str, Any]]) -> str:
        return ", ".join(f"{key} {value['accuracy']:.2f} ({value['n']})" for key, value in group.items())

    total = sum(analysis["misses"].values())
    misses = ", ".join(f"{kind} {count}" for kind, count in analysis["misses"].items() if count or kind != "no box")
    return [
        f"REC by objects in the image: {rates(analysis['by_objects'])}",
        f"REC by object size: {rates(analysis['by_object_size'])}",
        f"REC by expression: {rates(analysis['by_expression'])}",
        f"REC IoU histogram by tenths: {', '.join(map(str, analysis['iou_histogram']))}",
        f"REC misses ({total}): {misses}",
    ]
