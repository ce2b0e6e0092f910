"""Drawing helpers: pixel boxes with labels, image grids, and REC grids (ground truth green, prediction red)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageColor, ImageDraw, ImageFont

from comm.images import ImageInput, load_image

Color = str | tuple[int, int, int]
BoxSpec = tuple[Sequence[float] | None, Color, str | None]

GT_COLOR: Color = (0, 170, 0)
PRED_COLOR: Color = (220, 0, 0)
BACKGROUND: tuple[int, int, int] = (255, 255, 255)


@dataclass(frozen=True)
class RecVisualSample:
    """One cell of a REC grid: an image, its ground-truth and predicted pixel boxes (either may be None), a caption."""

    image: ImageInput
    gt_box: Sequence[float] | None
    pred_box: Sequence[float] | None
    caption: str = ""


def line_width(size: tuple[int, int]) -> int:
    """Box outline width for an image of ``size``: about 1 px per 150 px of the long side, at least 1.

    >>> line_width((640, 480))
    4
    """
    return max(1, round(max(size) / 150))


def default_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` px (the bitmap default where PIL lacks FreeType).

    >>> font = default_font(12)
    """
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError, AttributeError):
        return ImageFont.load_default()


def _rgb(color: Color) -> tuple[int, int, int]:
    if isinstance(color, str):
        value = ImageColor.getrgb(color)
    else:
        value = tuple(int(c) for c in color)
    if len(value) not in (3, 4):
        raise ValueError(f"a color needs 3 (or 4) channels, got {color!r}")
    return value[0], value[1], value[2]


def _text_color(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light fills, white on dark ones."""
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def _check_box(box: Sequence[float], index: int) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"box {index}: expected (x0, y0, x1, y1), got {list(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {index}: coordinates must be finite, got {list(box)}")
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def draw_boxes(
    image: ImageInput,
    boxes: Sequence[BoxSpec],
    width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """A copy of ``image`` with each ``(box_xyxy_pixels, color, label or None)`` outlined; None boxes are skipped.

    Outline width and label size scale with the image; labels sit in a filled rectangle of the box's color above
    the box (inside it when there is no room above).

    >>> from PIL import Image
    >>> out = draw_boxes(Image.new("RGB", (200, 100)), [((20, 0, 120, 100), "red", "the cat"), (None, "green", None)])
    >>> out.size
    (200, 100)
    """
    canvas = load_image(image).copy()
    draw = ImageDraw.Draw(canvas)
    stroke = width if width is not None else line_width(canvas.size)
    font = default_font(font_size if font_size is not None else max(10, round(max(canvas.size) / 45)))
    pad = max(1, stroke)
    for index, spec in enumerate(boxes):
        if len(spec) != 3:
            raise ValueError(f"box {index}: expected (box, color, label), got {spec!r}")
        box, color, label = spec
        if box is None:
            continue
        x0, y0, x1, y1 = _check_box(box, index)
        # Pixel boxes end at the image's size (x1 == width); the last drawable pixel is width - 1.
        x0, x1 = (min(max(v, 0.0), canvas.width - 1.0) for v in (x0, x1))
        y0, y1 = (min(max(v, 0.0), canvas.height - 1.0) for v in (y0, y1))
        fill = _rgb(color)
        draw.rectangle((x0, y0, x1, y1), outline=fill, width=stroke)
        if not label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
        lx = min(max(x0, 0.0), max(canvas.width - label_w, 0))
        ly = y0 - label_h if y0 - label_h >= 0 else max(y0, 0.0)
        draw.rectangle((lx, ly, lx + label_w, ly + label_h), fill=fill)
        draw.text((lx + pad - left, ly + pad - top), label, fill=_text_color(fill), font=font)
    return canvas


def _cell_size(cell_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (cell_size, cell_size) if isinstance(cell_size, int) else tuple(int(v) for v in cell_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"cell_size must be a positive int or (width, height), got {cell_size!r}")
    return size[0], size[1]


def _fit(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, float, tuple[int, int]]:
    """``image`` scaled to fit ``size`` (aspect kept), the scale, and its (left, top) offset centred in ``size``."""
    scale = min(size[0] / image.width, size[1] / image.height)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(new_size, Image.Resampling.LANCZOS) if new_size != image.size else image
    return resized, scale, ((size[0] - new_size[0]) // 2, (size[1] - new_size[1]) // 2)


def image_grid(
    images: Sequence[ImageInput],
    columns: int,
    cell_size: int | tuple[int, int],
    background: Color = BACKGROUND,
) -> Image.Image:
    """Tile images row by row, ``columns`` per row, each scaled to fit a ``cell_size`` cell (aspect kept, centred).

    >>> from PIL import Image
    >>> image_grid([Image.new("RGB", (64, 32))] * 5, columns=2, cell_size=100).size
    (200, 300)
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cell_w, cell_h = _cell_size(cell_size)
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), _rgb(background))
    for index, image in enumerate(images):
        fitted, _, (left, top) = _fit(load_image(image, f"image {index}"), (cell_w, cell_h))
        row, column = divmod(index, columns)
        grid.paste(fitted, (column * cell_w + left, row * cell_h + top))
    return grid


def _fit_width(text: str, font, max_width: int, measure: ImageDraw.ImageDraw, ellipsis: bool = False) -> str:
    """``text`` cut (ending in "...") to fit ``max_width`` px; ``ellipsis`` forces the "..." ending."""
    if not ellipsis and measure.textlength(text, font=font) <= max_width:
        return text
    while text and measure.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text.rstrip() + "..."


def _wrap(text: str, font, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``max_width`` px and at most ``max_lines`` lines ("..." marks cut text)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and measure.textlength(f"{lines[-1]} {word}", font=font) <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    return [
        _fit_width(line, font, max_width, measure, ellipsis=cut and row == len(lines) - 1)
        for row, line in enumerate(lines)
    ]


def _as_rec_sample(sample: RecVisualSample | Mapping[str, Any], index: int) -> RecVisualSample:
    if isinstance(sample, RecVisualSample):
        return sample
    if isinstance(sample, Mapping):
        if "image" not in sample:
            raise ValueError(f"sample {index}: needs an 'image' (path or PIL image)")
        return RecVisualSample(
            image=sample["image"],
            gt_box=sample.get("gt_box"),
            pred_box=sample.get("pred_box"),
            caption=str(sample.get("caption", "") or ""),
        )
    raise TypeError(f"sample {index}: expected a RecVisualSample or a mapping, got {type(sample).__name__}")


def rec_cell(
    sample: RecVisualSample | Mapping[str, Any],
    cell_size: int = 256,
    caption_lines: int = 3,
    font_size: int = 12,
    name: str = "image",
) -> Image.Image:
    """One REC grid cell: the image fitted to ``cell_size``, gt box green, predicted box red, caption below.

    >>> from PIL import Image
    >>> rec_cell({"image": Image.new("RGB", (200, 100)), "gt_box": (20, 0, 120, 100), "pred_box": None}).size
    (256, 310)
    """
    sample = _as_rec_sample(sample, 0)
    image = load_image(sample.image, name)
    fitted, scale, _ = _fit(image, (cell_size, cell_size))

    def scaled(box: Sequence[float] | None) -> tuple[float, ...] | None:
        return None if box is None else tuple(float(v) * scale for v in box)

    drawn = draw_boxes(
        fitted,
        [(scaled(sample.gt_box), GT_COLOR, "gt"), (scaled(sample.pred_box), PRED_COLOR, "pred")],
        width=max(2, line_width(fitted.size)),
        font_size=font_size,
    )
    font = default_font(font_size)
    line_height = font_size + 4
    cell = Image.new("RGB", (cell_size, cell_size + caption_lines * line_height + 6), BACKGROUND)
    cell.paste(drawn, ((cell_size - drawn.width) // 2, (cell_size - drawn.height) // 2))
    draw = ImageDraw.Draw(cell)
    for row, line in enumerate(_wrap(sample.caption, font, cell_size - 8, caption_lines)):
        draw.text((4, cell_size + 3 + row * line_height), line, fill=(0, 0, 0), font=font)
    return cell


def save_rec_grid(
    samples: Sequence[RecVisualSample | Mapping[str, Any]],
    path: str | Path,
    columns: int = 4,
    cell_size: int = 256,
) -> Image.Image:
    """Save a grid of REC samples (ground truth green, prediction red, caption under each) to ``path``.

    Each sample is a `RecVisualSample` or a mapping with ``image`` (path or PIL image), ``gt_box`` and
    ``pred_box`` (pixel ``(x0, y0, x1, y1)`` or None) and ``caption``. Returns the grid image.

    >>> save_rec_grid([{"image": "a.jpg", "gt_box": (10, 10, 90, 60), "pred_box": None, "caption": "the dog"}],
    ...               "rec_grid.png")  # doctest: +SKIP
    """
    if not samples:
        raise ValueError("save_rec_grid needs at least one sample")
    cells = [rec_cell(_as_rec_sample(sample, i), cell_size, name=f"sample {i}") for i, sample in enumerate(samples)]
    grid = image_grid(cells, columns, cells[0].size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid
