"""The captioning task (COCO Karpathy test, Flickr30k, NoCaps): samples read from Karpathy or COCO caption files,
the caption prompt, and the COCO caption metrics (`comm.evaluation.caption_metrics`) of the captions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from comm.conversation import CAPTION_PROMPT
from comm.evaluation.caption_metrics import (
    CAPTION_TOKENIZERS,
    score_captions,
)
from comm.evaluation.records import read_unique_records
from comm.evaluation.task import EvaluationTask, Record
from comm.evaluation.unanswerable import UNANSWERABLE, count_unanswerable
from comm.io import read_json

if TYPE_CHECKING:
    from comm.processing import CommProcessor

KARPATHY_SPLITS = ("train", "restval", "val", "test")
CAPTION_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class CaptionSample:
    """One image with its reference captions."""

    id: str
    image: str
    references: list[str]


def _image_path(image_root: str | os.PathLike[str] | None, *parts: str) -> str:
    root = Path(image_root) if image_root is not None else Path()
    return str(root.joinpath(*parts))


def _karpathy_samples(
    data: dict[str, Any], path: Path, split: str, image_root: str | os.PathLike[str] | None
) -> list[CaptionSample]:
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"unknown Karpathy split {split!r}; valid splits: {', '.join(KARPATHY_SPLITS)}")
    samples: list[CaptionSample] = []
    seen: set[str] = set()
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        sample = _karpathy_sample(image, where, split, image_root)
        if sample is None:
            continue
        if sample.id in seen:
            raise ValueError(f"{where}: duplicate image id {sample.id}")
        seen.add(sample.id)
        samples.append(sample)
    if not samples:
        present = sorted({str(image.get("split")) for image in data["images"] if isinstance(image, dict)})
        raise ValueError(f"{path}: no images in split {split!r} (splits present: {', '.join(present)})")
    return samples


def _karpathy_sample(
    image: Any, where: str, split: str, image_root: str | os.PathLike[str] | None
) -> CaptionSample | None:
    """One image of a Karpathy file as a sample, or None when it is in another split (it is checked all the same)."""
    if not isinstance(image, dict):
        raise ValueError(f"{where} is not an object")
    missing = [key for key in ("filename", "split", "sentences") if key not in image]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    if not isinstance(image["filename"], str) or not isinstance(image.get("filepath", ""), str):
        raise ValueError(f"{where}: 'filename' and 'filepath' must be strings")
    if not isinstance(image["sentences"], list):
        raise ValueError(f"{where}: 'sentences' must be a list")
    if image["split"] != split:
        return None
    if "cocoid" in image:
        image_id = str(image["cocoid"])
    elif "imgid" in image:
        image_id = str(image["imgid"])
    else:
        raise ValueError(f"{where} has neither 'cocoid' nor 'imgid'")
    references = []
    for sentence_index, sentence in enumerate(image["sentences"]):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str):
            raise ValueError(f"{where}, sentence {sentence_index} has no 'raw' text")
        references.append(raw)
    if not references:
        raise ValueError(f"{where} has no reference sentences")
    parts = [image["filepath"], image["filename"]] if image.get("filepath") else [image["filename"]]
    return CaptionSample(image_id, _image_path(image_root, *parts), references)


def _is_karpathy(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and "annotations" not in data
        and all(isinstance(image, dict) and "sentences" in image for image in data["images"][:10])
    )


def _is_coco(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)


def _coco_samples(data: dict[str, Any], path: Path, image_root: str | os.PathLike[str] | None) -> list[CaptionSample]:
    file_names: dict[str, str] = {}
    order: list[str] = []
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ValueError(f"{path}: images[{index}] needs 'id' and a 'file_name' string")
        image_id = str(image["id"])
        if image_id in file_names:
            raise ValueError(f"{path}: images[{index}] repeats image id {image_id}")
        file_names[image_id] = image["file_name"]
        order.append(image_id)
    references: dict[str, list[str]] = {image_id: [] for image_id in order}
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            raise ValueError(f"{path}: annotations[{index}] needs 'image_id' and 'caption'")
        image_id = str(annotation["image_id"])
        if image_id not in references:
            raise ValueError(f"{path}: annotations[{index}] refers to unknown image id {image_id}")
        if not isinstance(annotation["caption"], str):
            raise ValueError(f"{path}: annotations[{index}] caption is not a string")
        references[image_id].append(annotation["caption"])
    samples = [
        CaptionSample(image_id, _image_path(image_root, file_names[image_id]), references[image_id])
        for image_id in order
        if references[image_id]
    ]
    if not samples:
        raise ValueError(f"{path}: no image has a caption")
    return samples


def load_caption_file(
    path: str | os.PathLike[str], split: str = "test", image_root: str | os.PathLike[str] | None = None
) -> list[CaptionSample]:
    """Read a Karpathy split file or a COCO caption annotation file (detected; ``split`` is Karpathy-only).

    A COCO-format file is one split already, so ``split`` is not used for it; images without a caption
    (e.g. a test set whose references are withheld) are left out.
    """
    path = Path(path)
    data = read_json(path, "caption file")
    if _is_coco(data):
        return _coco_samples(data, path, image_root)
    if _is_karpathy(data):
        return _karpathy_samples(data, path, split, image_root)
    raise ValueError(
        f"{path}: neither a Karpathy file ({{'images': [{{'sentences': ...}}]}}) "
        "nor a COCO caption file ({'images': [...], 'annotations': [...]})"
    )


def caption_record(sample: CaptionSample, caption: str) -> Record:
    """The predictions-file line of ``sample``: ``{"id", "image", "caption"}``."""
    return {"id": sample.id, "image": sample.image, "caption": caption}


def score_caption_records(
    records: Sequence[Record],
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
    """Re-score a predictions file a caption run wrote against ``samples`` (no model)."""

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


@dataclass(frozen=True)
class CaptionTask(EvaluationTask[CaptionSample]):
    """Caption each image; BLEU-4, METEOR, ROUGE-L, CIDEr (and SPICE with ``spice``) against its references.

    ``tokenizer="python"`` scores without Java (see `score_captions`).
    """

    items: Sequence[CaptionSample]
    spice: bool = False
    tokenizer: str = "ptb"
    name: ClassVar[str] = "captions"
    item_name: ClassVar[str] = "caption sample"
    max_new_tokens: ClassVar[int] = CAPTION_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        if self.tokenizer not in CAPTION_TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {CAPTION_TOKENIZERS}, got {self.tokenizer!r}")

    def item_id(self, item: CaptionSample) -> str:
        """The image's id."""
        return item.id

    def image_path(self, item: CaptionSample) -> str:
        """The image."""
        return item.image

    def prompt(self, item: CaptionSample) -> str:
        """The caption prompt the model was trained with."""
        return CAPTION_PROMPT

    def parse(self, item: CaptionSample, answer: str, image_size: tuple[int, int], processor: CommProcessor) -> Record:
        """The answer is the caption."""
        return caption_record(item, answer)

    def unanswered_record(self, item: CaptionSample) -> Record:
        """The empty caption (it scores as a wrong one)."""
        return caption_record(item, "")

    def score(self, records: Sequence[Record]) -> dict[str, Any]:
        """`score_caption_records` against the samples' references."""
        return score_caption_records(records, self.items, spice=self.spice, tokenizer=self.tokenizer)
