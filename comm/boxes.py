"""Box maths in one place: normalisation to the square the towers see (padded or centre-cropped), the box text
format (Shikra's 3 decimals by default), parsing, IoU."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

Box = tuple[float, float, float, float]

# A number like 0.5, .25, 1, 0.123 (no sign: boxes in [0, 1]); separators may carry spaces.
_NUMBER = r"\d*\.?\d+"
_BOX_PATTERN = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")


def is_finite_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a box coordinate or an image size read from a file must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_box(value: Any) -> bool:
    """A list or tuple of four finite numbers (a box read from a file, in any of the formats)."""
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(is_finite_number(v) for v in value)


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """Convert a COCO ``[x, y, w, h]`` box to ``(x0, y0, x1, y1)``."""
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def square_padding(width: int, height: int) -> tuple[int, int, int]:
    """Side of the padded square and the (left, top) offsets of the original image inside it.

    The image is centred, as in LLaVA/Shikra's ``expand2square``; ``comm.processing`` pads the same way.
    """
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def validate_pixel_box(box: Sequence[float], width: int, height: int) -> Box:
    """Return ``box`` as floats, or raise ValueError when it is inverted or outside the image."""
    if len(box) != 4:
        raise ValueError(f"a box needs 4 numbers, got {len(box)}: {list(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {list(box)} has x1 < x0 or y1 < y0")
    tolerance = 1.0  # annotation tools round to the pixel
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        raise ValueError(f"box {list(box)} lies outside the {width}x{height} image")
    return (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))


def visible_square(width: int, height: int, pad_to_square: bool = True) -> tuple[float, float, float]:
    """``(left, top, side)`` in original-image pixels of the square the towers see, that boxes are normalised to.

    With ``pad_to_square`` it is the padded square (`square_padding`: it starts left of / above the image);
    without, the centre square of side ``min(width, height)`` that a shortest-edge resize and a centre crop keep
    (OpenAI's CLIP preprocessing; the crop's rounding in resized pixels moves it by under one model-input pixel).
    """
    if pad_to_square:
        side, left, top = square_padding(width, height)
        return -float(left), -float(top), float(side)
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, float(side)


def normalize_box(box: Sequence[float], width: int, height: int, pad_to_square: bool = True) -> Box:
    """Map an ``(x0, y0, x1, y1)`` pixel box on a ``width x height`` image to [0, 1] on its `visible_square`.

    Without ``pad_to_square`` a box reaching beyond the centre crop gets values outside [0, 1].
    """
    left, top, side = visible_square(width, height, pad_to_square)
    x0, y0, x1, y1 = (float(v) for v in box)
    return ((x0 - left) / side, (y0 - top) / side, (x1 - left) / side, (y1 - top) / side)


def denormalize_box(box: Sequence[float], width: int, height: int, pad_to_square: bool = True) -> Box:
    """Map a [0, 1] box on the `visible_square` back to original-image pixels, clipped to the image."""
    left, top, side = visible_square(width, height, pad_to_square)
    x0, y0, x1, y1 = (float(v) * side for v in box)

    def clip(value: float, limit: int) -> float:
        return min(max(value, 0.0), float(limit))

    return (clip(x0 + left, width), clip(y0 + top, height), clip(x1 + left, width), clip(y1 + top, height))


def overlaps_unit_square(box: Sequence[float]) -> bool:
    """Whether a normalised box has an area in common with [0, 1] x [0, 1] (the part the towers see)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 < 1 and y0 < 1 and x1 > 0 and y1 > 0


SHIKRA_DECIMALS = 3  # "[0.123,0.456,0.789,0.999]"; LLaVA-1.5 writes 2 ("[0.12,0.46,0.79,1.00]")


def check_box_decimals(decimals: int) -> int:
    """``decimals`` when it is a whole number from 1 to 6, else ValueError naming it."""
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 1 <= decimals <= 6:
        raise ValueError(f"box_decimals must be a whole number from 1 to 6, got {decimals!r}")
    return decimals


def format_box(box: Sequence[float], decimals: int = SHIKRA_DECIMALS) -> str:
    """A normalised box as text, ``[x0,y0,x1,y1]`` with ``decimals`` decimals (3: Shikra's), clipped to [0, 1]."""
    check_box_decimals(decimals)
    return "[" + ",".join(f"{min(max(float(v), 0.0), 1.0):.{decimals}f}" for v in box) + "]"


def parse_boxes(text: str) -> list[Box]:
    """Every ``[x0,y0,x1,y1]`` box in ``text``, in order; junk and malformed boxes are passed over."""
    boxes = []
    for match in _BOX_PATTERN.finditer(text or ""):
        try:
            boxes.append(tuple(float(group) for group in match.groups()))
        except ValueError:
            continue
    return boxes  # type: ignore[return-value]


def parse_box(text: str) -> Box | None:
    """The first box in ``text``, or None when it carries no box."""
    boxes = parse_boxes(text)
    return boxes[0] if boxes else None


def box_iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes in continuous coordinates (no +1).

    A missing box, or one with x1 < x0 or y1 < y0, has IoU 0.
    """
    if a is None or b is None:
        return 0.0
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    if ax1 < ax0 or ay1 < ay0 or bx1 < bx0 or by1 < by0:
        return 0.0
    inter_w = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    inter_h = max(0.0, min(ay1, by1) - max(ay0, by0))
    intersection = inter_w * inter_h
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - intersection
    return intersection / union if union > 0 else 0.0
