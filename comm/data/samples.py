"""Sample validation: a parsed record becomes a checked `Sample` (conversation turns, boxes, image) or is rejected.

LLaVA conversations, REC records (``expression`` + ``bbox``) and Shikra-style conversations with ``<box>``
placeholders are accepted; images are checked once each (existence, header, size); every rejected record is
reported to the `IssueLog` with its file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comm.boxes import (
    SHIKRA_DECIMALS,
    Box,
    format_box,
    normalize_box,
    overlaps_unit_square,
    validate_pixel_box,
    xywh_to_xyxy,
)
from comm.conversation import IMAGE_PLACEHOLDER, rec_prompt, with_image
from comm.data.issues import DataIssue, IssueKind, IssueLog, Rejected
from comm.data.mixture import DataSpec
from comm.data.records import RawRecord, read_records
from comm.images import UnusableImageError, read_image_sizes
from comm.processing import IMAGE_TOKENS

BOX_PLACEHOLDER = "<box>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class ImageChecker:
    """Checks image files once each with `comm.images.read_image_sizes` (header; full decode with ``verify``).

    Remembers each file's size, or why it is not usable as a `Rejected` (missing, unreadable, too large).
    """

    def __init__(self, verify: bool = False, workers: int = 8):
        self.verify = verify
        self.workers = workers
        self._results: dict[Path, tuple[int, int] | Rejected] = {}

    @staticmethod
    def _rejected(error: FileNotFoundError | UnusableImageError) -> Rejected:
        if isinstance(error, FileNotFoundError):
            return Rejected(IssueKind.MISSING_IMAGE, str(error))
        return Rejected(IssueKind(error.kind), str(error))

    def prefetch(self, paths: Sequence[Path]) -> None:
        """Check many images at once (in a thread pool: header reads wait on the disk)."""
        todo = [path for path in paths if path not in self._results]
        for path, result in read_image_sizes(todo, decode=self.verify, workers=self.workers).items():
            self._results[path] = result if isinstance(result, tuple) else self._rejected(result)

    def size(self, path: Path) -> tuple[int, int]:
        """``(width, height)`` of the image, or raise `Rejected`."""
        if path not in self._results:
            self.prefetch([path])
        result = self._results[path]
        if isinstance(result, Rejected):
            raise result
        return result


@dataclass(frozen=True)
class Sample:
    """A validated training sample: ``(question, answer)`` turns, at most one image, and where it came from."""

    file: str
    line: int
    index: int
    turns: tuple[tuple[str, str], ...]
    image: Path | None = None
    sample_id: str | None = None

    def issue(self, kind: IssueKind, message: str) -> DataIssue:
        """A `DataIssue` located at this sample."""
        return DataIssue(kind, self.file, self.line, message, self.index, self.sample_id)


def conversation_turns(conversations: Any) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs from a LLaVA ``conversations`` list, or raise `Rejected` saying what is wrong."""
    bad = IssueKind.BAD_CONVERSATION
    if not isinstance(conversations, list) or not conversations:
        raise Rejected(bad, "'conversations' must be a non-empty list of {'from', 'value'} messages")
    if len(conversations) % 2:
        raise Rejected(bad, f"{len(conversations)} messages: expected human/gpt pairs (an even number)")
    values = []
    for position, message in enumerate(conversations):
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise Rejected(bad, f"message {position} lacks 'from' or 'value': {str(message)[:80]!r}")
        expected = USER_ROLES if position % 2 == 0 else ASSISTANT_ROLES
        if message["from"] not in expected:
            raise Rejected(
                bad,
                f"message {position} is from {message['from']!r}, expected {expected[0]!r} (roles must alternate "
                "human, gpt, human, gpt...)",
            )
        value = message["value"]
        if not isinstance(value, str) or not value.strip():
            raise Rejected(bad, f"message {position} ({message['from']}) has an empty or non-text value")
        values.append(value)
    return list(zip(values[0::2], values[1::2]))


def _check_placeholders(turns: list[tuple[str, str]], has_image: bool) -> list[tuple[str, str]]:
    """Enforce one ``<image>`` in the questions for an image sample (added in front if missing), none otherwise."""
    bad = IssueKind.BAD_CONVERSATION
    for question, answer in turns:
        for token in IMAGE_TOKENS:
            if token in question or token in answer:
                raise Rejected(bad, f"the text contains the reserved image token {token}")
        if IMAGE_PLACEHOLDER in answer:
            raise Rejected(bad, f"an assistant reply contains {IMAGE_PLACEHOLDER}")
    count = sum(question.count(IMAGE_PLACEHOLDER) for question, _ in turns)
    if not has_image:
        if count:
            raise Rejected(bad, f"the text has {count} {IMAGE_PLACEHOLDER} placeholder(s) but the sample has no image")
        return turns
    if count > 1:
        raise Rejected(bad, f"the text has {count} {IMAGE_PLACEHOLDER} placeholders; one image per sample is supported")
    if count == 0:
        turns = [(with_image(turns[0][0]), turns[0][1]), *turns[1:]]
    return turns


def box_text(pixels: Box, size: tuple[int, int], pad_to_square: bool = True, decimals: int = SHIKRA_DECIMALS) -> str:
    """A checked pixel box as text with ``decimals`` decimals, normalised to the square the towers see
    (`visible_square`).

    Raises ValueError when the towers see none of it (outside the centre crop, with ``pad_to_square=False``).
    """
    normalized = normalize_box(pixels, *size, pad_to_square)
    if not pad_to_square and not overlaps_unit_square(normalized):
        raise ValueError(
            f"box {list(pixels)} lies outside the centre square the towers see (the processor crops: pad_to_square "
            "is False)"
        )
    return format_box(normalized, decimals)


def _fill_boxes(
    turns: list[tuple[str, str]],
    boxes: Any,
    size: tuple[int, int] | None,
    pad_to_square: bool = True,
    decimals: int = SHIKRA_DECIMALS,
) -> list[tuple[str, str]]:
    """Replace the ``<box>`` placeholders, in order, by the normalised boxes as text (`box_text`)."""
    placeholders = sum(q.count(BOX_PLACEHOLDER) + a.count(BOX_PLACEHOLDER) for q, a in turns)
    if boxes is None:
        if placeholders:
            raise Rejected(IssueKind.BAD_BOX, f"the text has {placeholders} {BOX_PLACEHOLDER} but no 'boxes' list")
        return turns
    if not isinstance(boxes, list):
        raise Rejected(IssueKind.BAD_BOX, "'boxes' must be a list of [x0, y0, x1, y1] pixel boxes")
    if placeholders != len(boxes):
        raise Rejected(
            IssueKind.BAD_BOX, f"the text has {placeholders} {BOX_PLACEHOLDER} placeholders but {len(boxes)} boxes"
        )
    if size is None:
        raise Rejected(IssueKind.BAD_BOX, "a sample with boxes needs an image")
    texts = []
    for number, box in enumerate(boxes):
        if not isinstance(box, (list, tuple)) or not all(isinstance(v, (int, float)) for v in box):
            raise Rejected(IssueKind.BAD_BOX, f"box {number} is not a list of numbers: {box!r}")
        try:
            texts.append(box_text(validate_pixel_box(box, *size), size, pad_to_square, decimals))
        except ValueError as error:
            raise Rejected(IssueKind.BAD_BOX, f"box {number}: {error}") from None
    boxes_left = iter(texts)

    def fill(text: str) -> str:
        parts = text.split(BOX_PLACEHOLDER)
        return parts[0] + "".join(next(boxes_left) + part for part in parts[1:])

    return [(fill(q), fill(a)) for q, a in turns]


def rec_turns(
    record: dict, size: tuple[int, int] | None, pad_to_square: bool = True, decimals: int = SHIKRA_DECIMALS
) -> list[tuple[str, str]]:
    """The REC question/answer pair for ``{"expression", "bbox": [x, y, w, h]}`` (box on the towers' square)."""
    expression = record.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise Rejected(IssueKind.BAD_CONVERSATION, "'expression' must be a non-empty string")
    bbox = record.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        raise Rejected(IssueKind.BAD_BOX, f"'bbox' must be [x, y, w, h] in pixels, got {bbox!r}")
    if size is None:
        raise Rejected(IssueKind.BAD_CONVERSATION, "a REC sample needs an 'image'")
    try:
        answer = box_text(validate_pixel_box(xywh_to_xyxy(bbox), *size), size, pad_to_square, decimals)
    except ValueError as error:
        raise Rejected(IssueKind.BAD_BOX, f"bbox {bbox} (x, y, w, h): {error}") from None
    return [(rec_prompt(expression.strip()), answer)]


def record_to_sample(
    record: RawRecord,
    file: str,
    image_folder: Path,
    images: ImageChecker,
    pad_to_square: bool = True,
    box_decimals: int = SHIKRA_DECIMALS,
) -> Sample:
    """Validate one parsed record and turn it into a `Sample`, or raise `Rejected`.

    Boxes are normalised for the processor's image mode (``pad_to_square``, see `comm.boxes.visible_square`) and
    written with its ``box_decimals``. Box text already in a conversation (LLaVA-1.5's ``[0.12,0.34,0.56,0.78]``)
    is kept as written.
    """
    value = record.value
    if not isinstance(value, dict):
        raise Rejected(IssueKind.BAD_JSON, f"a sample must be a JSON object, got {type(value).__name__}")
    image = None
    size = None
    if value.get("image") is not None:
        if not isinstance(value["image"], str) or not value["image"].strip():
            raise Rejected(IssueKind.BAD_CONVERSATION, f"'image' must be one file name, got {value['image']!r}")
        image = image_folder / value["image"]
        size = images.size(image)
    if "conversations" in value:
        turns = conversation_turns(value["conversations"])
        turns = _check_placeholders(turns, image is not None)
        turns = _fill_boxes(turns, value.get("boxes"), size, pad_to_square, box_decimals)
    elif "expression" in value or "bbox" in value:
        turns = rec_turns(value, size, pad_to_square, box_decimals)
    else:
        raise Rejected(
            IssueKind.BAD_CONVERSATION,
            "missing keys: a sample needs 'conversations' (LLaVA) or 'expression' and 'bbox' (REC); "
            f"it has {sorted(value)}",
        )
    sample_id = value.get("id")
    return Sample(
        file=file,
        line=record.line,
        index=record.index,
        turns=tuple(turns),
        image=image,
        sample_id=None if sample_id is None else str(sample_id),
    )


def load_samples(
    spec: DataSpec,
    issues: IssueLog,
    image_folder: str | Path | None = None,
    images: ImageChecker | None = None,
    pad_to_square: bool = True,
    box_decimals: int = SHIKRA_DECIMALS,
) -> list[Sample]:
    """Every valid sample of one data file; each rejected one is reported to ``issues`` with its file and line.

    ``pad_to_square`` is the processor's image mode, which boxes are normalised for; ``box_decimals`` its box text.
    """
    file = str(spec.path)
    folder = Path(image_folder) if image_folder is not None else spec.path.parent
    images = images or ImageChecker()
    records = list(read_records(spec.path))
    named = [r.value["image"] for r in records if isinstance(r.value, dict) and isinstance(r.value.get("image"), str)]
    images.prefetch([folder / name for name in named])
    samples = []
    for record in records:
        issues.loaded[file] += 1
        if record.error is not None:
            issues.report(DataIssue(IssueKind.BAD_JSON, file, record.line, record.error, record.index))
            continue
        try:
            sample = record_to_sample(record, file, folder, images, pad_to_square, box_decimals)
        except Rejected as rejected:
            sample_id = record.value.get("id") if isinstance(record.value, dict) else None
            issues.report(
                DataIssue(
                    rejected.kind,
                    file,
                    record.line,
                    rejected.message,
                    record.index,
                    None if sample_id is None else str(sample_id),
                )
            )
            continue
        samples.append(sample)
        issues.kept[file] += 1
    return samples
