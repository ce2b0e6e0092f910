"""Items whose image is not usable: recorded as unanswerable, scored as wrong and counted, and the run goes on."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from PIL import Image

from comm.images import UnusableImageError, load_image

T = TypeVar("T")

# The record key that marks an item as unanswerable; its value says why (``image_too_large: ...``).
UNANSWERABLE = "unanswerable"


def count_unanswerable(records: Sequence[dict[str, Any]]) -> int:
    """How many ``records`` are marked `UNANSWERABLE`."""
    return sum(1 for record in records if record.get(UNANSWERABLE))


def answer_with_images(
    items: Sequence[T],
    image_path: Callable[[T], str | os.PathLike[str]],
    name: Callable[[T], str],
    answer: Callable[[list[T], list[Image.Image]], list[dict[str, Any]]],
    unanswerable: Callable[[T], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Records for ``items`` in order: ``answer(items, images)`` for those whose image loads (`load_image`).

    An item whose image is not usable (unreadable, too large: `UnusableImageError`) gets ``unanswerable(item)``
    with `UNANSWERABLE` set to the reason, and a line on stderr; a missing file still raises.
    """
    images: list[Image.Image | None] = []
    reasons: list[str | None] = []
    for item in items:
        try:
            images.append(load_image(image_path(item), name(item)))
            reasons.append(None)
        except UnusableImageError as error:
            print(f"warning: {error}: counted as unanswerable (wrong)", file=sys.stderr)
            images.append(None)
            reasons.append(f"{error.kind}: {error}")
    usable = [index for index, image in enumerate(images) if image is not None]
    answered = answer([items[i] for i in usable], [images[i] for i in usable]) if usable else []
    records: list[dict[str, Any] | None] = [None] * len(items)
    for index, record in zip(usable, answered, strict=True):
        records[index] = record
    for index, reason in enumerate(reasons):
        if reason is not None:
            records[index] = {**unanswerable(items[index]), UNANSWERABLE: reason}
    return records  # type: ignore[return-value]
