"""Items whose image is not usable: recorded as unanswerable, scored as wrong and counted, and the run goes on."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from PIL import Image

from comm.images import UnusableImageError, load_image

# The record key that marks an item as unanswerable; its value says why (``image_too_large: ...``).
UNANSWERABLE = "unanswerable"


def count_unanswerable(records: Sequence[dict[str, Any]]) -> int:
    """How many ``records`` are marked `UNANSWERABLE`."""
    return sum(1 for record in records if record.get(UNANSWERABLE))


def load_usable_image(path: str | os.PathLike[str], name: str) -> tuple[Image.Image | None, str | None]:
    """``(image, None)`` with the image at ``path`` (`load_image`), or ``(None, why)`` when it is not usable.

    An unusable image (unreadable, too large: `UnusableImageError`) prints a warning on stderr naming it, and
    ``why`` is the value to record under `UNANSWERABLE`; a missing file still raises.
    """
    try:
        return load_image(path, name), None
    except UnusableImageError as error:
        print(f"warning: {error}: counted as unanswerable (wrong)", file=sys.stderr)
        return None, f"{error.kind}: {error}"
