"""What a saved COMM processor folder holds and where its image processors are: the one place that knows the layout
from before `CommProcessor` was a transformers ``ProcessorMixin`` (image processors in subfolders)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import BitImageProcessorPil, CLIPImageProcessorPil

PROCESSOR_CONFIG = "processor_config.json"
# The two image processors are saved inside processor_config.json under their attribute names; folders written
# before CommProcessor was a ProcessorMixin keep them in these subfolders instead (still loaded).
IMAGE_PROCESSOR_ATTRIBUTES = ("clip_image_processor", "dino_image_processor")
_LEGACY_SUBFOLDERS = {"clip_image_processor": "image_processor_clip", "dino_image_processor": "image_processor_dino"}
_LEGACY_IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
# Always the PIL backends: the pixels do not depend on whether torchvision is installed.
_PIL_CLASSES = {"clip_image_processor": CLIPImageProcessorPil, "dino_image_processor": BitImageProcessorPil}
# A Hugging Face Hub id (owner/name) that is not a local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _legacy_folder(folder: str | os.PathLike, attribute: str) -> Path | None:
    """The subfolder of ``folder`` holding the ``attribute`` image processor in the older layout, or None."""
    subfolder = Path(folder, _LEGACY_SUBFOLDERS[attribute])
    return subfolder if (subfolder / _LEGACY_IMAGE_PROCESSOR_CONFIG).is_file() else None


def missing_image_processors(folder: str | os.PathLike, settings: Mapping[str, Any]) -> list[str]:
    """The image processor attributes that neither ``settings`` (the folder's ``processor_config.json``) nor an
    older folder's subfolders hold."""
    return [
        attribute
        for attribute in IMAGE_PROCESSOR_ATTRIBUTES
        if attribute not in settings and _legacy_folder(folder, attribute) is None
    ]


def load_image_processors(folder: str | os.PathLike, settings: Mapping[str, Any], subfolder: str = "") -> list[Any]:
    """Both towers' image processors (CLIP, DINOv2) of a saved processor: from their ``settings`` in
    ``processor_config.json``, else from an older folder's subfolders; ValueError naming the one found nowhere."""
    image_processors = []
    for attribute in IMAGE_PROCESSOR_ATTRIBUTES:
        pil_class = _PIL_CLASSES[attribute]
        legacy = _legacy_folder(Path(folder, subfolder), attribute)
        if isinstance(settings.get(attribute), dict):
            image_processors.append(pil_class(**settings[attribute]))
        elif legacy is not None:
            image_processors.append(pil_class.from_pretrained(legacy))
        else:
            raise ValueError(f"{folder}: {PROCESSOR_CONFIG} has no {attribute} settings")
    return image_processors
