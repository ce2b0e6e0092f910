"""Training data: LLaVA conversations, REC jsonl and Shikra-style boxed conversations, validated and tokenized once.

Loading happens in three passes so that bad input is found before training starts: records are parsed (file and
line of each kept), images are checked (existence, header), conversations are validated and rendered with the
Vicuna v1.1 template, and finally every sample that will be used is tokenized once; the token ids and lengths are
kept (lengths feed length-grouped batching) and only the images are decoded during training.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from comm.boxes import format_box, normalize_box, validate_pixel_box, xywh_to_xyxy
from comm.conversation import IMAGE_PLACEHOLDER, VICUNA_V1, ConversationTemplate, rec_prompt, with_image
from comm.data.issues import DataIssue, IssueKind, IssueLog
from comm.processing import IMAGE_TOKENS, CommProcessor

IGNORE_INDEX = -100
BOX_PLACEHOLDER = "<box>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
_RATIO_SUFFIX = re.compile(r"^(?P<path>.+):(?P<ratio>\d*\.?\d+(?:[eE][-+]?\d+)?)$")
_WHITESPACE = re.compile(r"\s*")


class Rejected(Exception):
    """A sample fails a check; carries the issue kind and the reason."""

    def __init__(self, kind: IssueKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


# ---------------------------------------------------------------------------------------------------------------
# Data specs: ``path[:ratio]``
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """One training file and its sampling ratio (``1.0``: every sample once; ``0.5``: a seeded half; ``2``: twice)."""

    path: Path
    ratio: float = 1.0

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        """Parse ``path`` or ``path:ratio``; a path that exists as given wins over a ratio suffix."""
        text = text.strip()
        if not text:
            raise ValueError("--data: empty data file name")
        match = _RATIO_SUFFIX.match(text)
        if match and not Path(text).exists():
            ratio = float(match.group("ratio"))
            if not ratio > 0:
                raise ValueError(f"--data {text}: the sampling ratio must be > 0, got {ratio}")
            return cls(Path(match.group("path")), ratio)
        return cls(Path(text))


def parse_data_specs(values: Sequence[str]) -> list[DataSpec]:
    """Parse ``--data`` values; each may be a comma-separated list of ``path[:ratio]``."""
    specs = [DataSpec.parse(part) for value in values for part in value.split(",") if part.strip()]
    if not specs:
        raise ValueError("--data: give at least one training file (LLaVA .json or .jsonl, REC .jsonl)")
    for spec in specs:
        if not spec.path.is_file():
            raise FileNotFoundError(f"--data: no such file: {spec.path}")
    return specs


# ---------------------------------------------------------------------------------------------------------------
# Records: parse JSON lists and jsonl, keeping the line of every sample
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRecord:
    """One parsed element of a data file: its position and value, or why it could not be parsed."""

    index: int
    line: int
    value: Any = None
    error: str | None = None


class _LineCounter:
    """Line numbers of increasing character offsets in ``text`` without rescanning from the start."""

    def __init__(self, text: str):
        self.text = text
        self.offset = 0
        self.line = 1

    def line_at(self, offset: int) -> int:
        self.line += self.text.count("\n", self.offset, offset)
        self.offset = offset
        return self.line


def _skip_whitespace(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def iter_json_list(text: str) -> Iterator[RawRecord]:
    """Elements of a JSON list with the line each starts on; a syntax error ends the list with an error record."""
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    pos = _skip_whitespace(text, 0)
    if not text.startswith("[", pos):
        yield RawRecord(0, lines.line_at(pos), error="expected a JSON list of samples")
        return
    pos = _skip_whitespace(text, pos + 1)
    if text.startswith("]", pos):
        return
    index = 0
    while True:
        line = lines.line_at(pos)
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            yield RawRecord(index, line, error=f"not JSON ({error}); the rest of the file cannot be read")
            return
        yield RawRecord(index, line, value)
        pos = _skip_whitespace(text, end)
        if text.startswith(",", pos):
            pos = _skip_whitespace(text, pos + 1)
            index += 1
            continue
        if text.startswith("]", pos):
            return
        yield RawRecord(
            index + 1, lines.line_at(pos), error="expected ',' or ']' after a sample; the rest of the file is skipped"
        )
        return


def iter_jsonl(text: str) -> Iterator[RawRecord]:
    """One record per non-blank line; a line that is not JSON gives an error record and reading goes on."""
    index = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield RawRecord(index, number, json.loads(line))
        except json.JSONDecodeError as error:
            yield RawRecord(index, number, error=f"line is not JSON ({error.msg} at column {error.colno})")
        index += 1


def read_records(path: Path) -> Iterator[RawRecord]:
    """Records of a LLaVA-style JSON list or a jsonl file (decided by the first character, not the suffix)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise OSError(f"cannot read data file {path}: {error}") from error
    first = text[_skip_whitespace(text, 0) : _skip_whitespace(text, 0) + 1]
    yield from iter_json_list(text) if first == "[" else iter_jsonl(text)


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


class ImageChecker:
    """Checks image files once each (existence, header; full decode with ``verify``) and remembers their size."""

    def __init__(self, verify: bool = False, workers: int = 8):
        self.verify = verify
        self.workers = workers
        self._results: dict[Path, tuple[int, int] | Rejected] = {}

    def _check(self, path: Path) -> tuple[int, int] | Rejected:
        if not path.is_file():
            return Rejected(IssueKind.MISSING_IMAGE, f"image file not found: {path}")
        try:
            with Image.open(path) as image:
                size = image.size
                if self.verify:
                    image.load()
        except (UnidentifiedImageError, OSError, ValueError) as error:
            return Rejected(IssueKind.UNREADABLE_IMAGE, f"image {path} cannot be read: {error}")
        if min(size) < 2:
            return Rejected(IssueKind.UNREADABLE_IMAGE, f"image {path} is {size[0]}x{size[1]} pixels (at least 2x2)")
        return size

    def prefetch(self, paths: Sequence[Path]) -> None:
        """Check many images in a thread pool (header reads are I/O bound)."""
        todo = sorted({p for p in paths if p not in self._results})
        if len(todo) < 64 or self.workers <= 1:
            for path in todo:
                self._results[path] = self._check(path)
            return
        with ThreadPoolExecutor(self.workers) as pool:
            for path, result in zip(todo, pool.map(self._check, todo)):
                self._results[path] = result

    def size(self, path: Path) -> tuple[int, int]:
        """``(width, height)`` of the image, or raise `Rejected`."""
        if path not in self._results:
            self._results[path] = self._check(path)
        result = self._results[path]
        if isinstance(result, Rejected):
            raise result
        return result


# ---------------------------------------------------------------------------------------------------------------
# Samples: validated conversations
# ---------------------------------------------------------------------------------------------------------------


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
                bad, f"message {position} is from {message['from']!r}, expected {expected[0]!r} (roles must alternate "
                "human, gpt, human, gpt...)"
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


def _fill_boxes(turns: list[tuple[str, str]], boxes: Any, size: tuple[int, int] | None) -> list[tuple[str, str]]:
    """Replace the ``<box>`` placeholders, in order, by the normalised boxes in Shikra's text format."""
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
            pixels = validate_pixel_box(box, *size)
        except ValueError as error:
            raise Rejected(IssueKind.BAD_BOX, f"box {number}: {error}") from None
        texts.append(format_box(normalize_box(pixels, *size)))
    boxes_left = iter(texts)

    def fill(text: str) -> str:
        parts = text.split(BOX_PLACEHOLDER)
        return parts[0] + "".join(next(boxes_left) + part for part in parts[1:])

    return [(fill(q), fill(a)) for q, a in turns]


def rec_turns(record: dict, size: tuple[int, int] | None) -> list[tuple[str, str]]:
    """The REC question/answer pair for ``{"expression", "bbox": [x, y, w, h]}`` (box on the padded square)."""
    expression = record.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise Rejected(IssueKind.BAD_CONVERSATION, "'expression' must be a non-empty string")
    bbox = record.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        raise Rejected(IssueKind.BAD_BOX, f"'bbox' must be [x, y, w, h] in pixels, got {bbox!r}")
    if size is None:
        raise Rejected(IssueKind.BAD_CONVERSATION, "a REC sample needs an 'image'")
    try:
        pixels = validate_pixel_box(xywh_to_xyxy(bbox), *size)
    except ValueError as error:
        raise Rejected(IssueKind.BAD_BOX, f"bbox {bbox} (x, y, w, h): {error}") from None
    return [(rec_prompt(expression.strip()), format_box(normalize_box(pixels, *size)))]


def record_to_sample(
    record: RawRecord, file: str, image_folder: Path, images: ImageChecker
) -> Sample:
    """Validate one parsed record and turn it into a `Sample`, or raise `Rejected`."""
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
        turns = _fill_boxes(turns, value.get("boxes"), size)
    elif "expression" in value or "bbox" in value:
        turns = rec_turns(value, size)
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
    spec: DataSpec, issues: IssueLog, image_folder: str | Path | None = None, images: ImageChecker | None = None
) -> list[Sample]:
    """Every valid sample of one data file; each rejected one is reported to ``issues`` with its file and line."""
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
            sample = record_to_sample(record, file, folder, images)
        except Rejected as rejected:
            sample_id = record.value.get("id") if isinstance(record.value, dict) else None
            issues.report(
                DataIssue(
                    rejected.kind, file, record.line, rejected.message, record.index,
                    None if sample_id is None else str(sample_id),
                )
            )
            continue
        samples.append(sample)
        issues.kept[file] += 1
    return samples


# ---------------------------------------------------------------------------------------------------------------
# Tokenization with assistant-only labels
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of a rendered sample and the ``[start, end)`` token ranges that carry the loss."""

    input_ids: np.ndarray
    target_ranges: tuple[tuple[int, int], ...]

    def labels(self) -> np.ndarray:
        """Labels: the ids inside the target ranges, `IGNORE_INDEX` everywhere else."""
        labels = np.full(len(self.input_ids), IGNORE_INDEX, dtype=np.int64)
        for start, end in self.target_ranges:
            labels[start:end] = self.input_ids[start:end]
        return labels


def target_token_ranges(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], text: str
) -> list[tuple[int, int]]:
    """Token ranges covering each character span; raise `Rejected` when a token straddles a span boundary."""
    ranges = []
    token = 0
    for span_start, span_end in spans:
        first = None
        while token < len(offsets):
            start, end = offsets[token]
            if start == end:  # added special tokens (BOS) have empty offsets
                token += 1
                continue
            if end <= span_start:
                token += 1
                continue
            if start < span_start or (start < span_end < end):
                raise Rejected(
                    IssueKind.LABEL_MISMATCH,
                    f"token {token} covers characters {start}..{end} ({text[start:end]!r}), across the boundary of "
                    f"the assistant reply at {span_start}..{span_end}: the template and the tokenizer disagree",
                )
            if start >= span_end:
                break
            if first is None:
                first = token
            token += 1
        if first is None:
            raise Rejected(IssueKind.LABEL_MISMATCH, f"no token falls inside the reply at {span_start}..{span_end}")
        ranges.append((first, token))
    return ranges


class SampleEncoder:
    """Render samples with the conversation template and tokenize them with offsets to build the labels."""

    def __init__(
        self,
        processor: CommProcessor,
        model_max_length: int | None = None,
        template: ConversationTemplate = VICUNA_V1,
    ):
        tokenizer = processor.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets are needed to build labels"
            )
        self.processor = processor
        self.tokenizer = tokenizer
        self.template = template
        self.model_max_length = model_max_length or processor.model_max_length
        self.image_token_id = processor.image_token_id
        self.dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32

    def render(self, sample: Sample):
        """The rendered conversation with image placeholders already expanded (spans refer to the expanded text)."""
        turns = [(self.processor.expand_image_placeholders(q), a) for q, a in sample.turns]
        return self.template.render(turns)

    def _encode_one(self, sample: Sample, rendered, ids: list[int], offsets: list[tuple[int, int]]) -> EncodedSample:
        if self.model_max_length is not None and len(ids) > self.model_max_length:
            raise Rejected(
                IssueKind.TOO_LONG,
                f"{len(ids)} tokens with the image tokens expanded, over model_max_length={self.model_max_length}",
            )
        expected_image_tokens = (sample.image is not None) * self.processor.num_image_tokens
        found = sum(1 for i in ids if i == self.image_token_id)
        if found != expected_image_tokens:
            raise Rejected(
                IssueKind.LABEL_MISMATCH,
                f"the tokenizer produced {found} image patch tokens where {expected_image_tokens} were expected",
            )
        ranges = target_token_ranges(offsets, rendered.target_spans, rendered.text)
        for (start, end), (char_start, char_end) in zip(ranges, rendered.target_spans):
            decoded = self.tokenizer.decode(
                ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            reply = rendered.text[char_start:char_end]
            if decoded.strip() != reply.strip():
                raise Rejected(
                    IssueKind.LABEL_MISMATCH,
                    f"the reply tokens decode to {decoded.strip()!r}, not the reply text {reply.strip()!r} "
                    "(LLaVA's 'tokenization mismatch')",
                )
        return EncodedSample(np.asarray(ids, dtype=self.dtype), tuple(ranges))

    def encode(self, sample: Sample) -> EncodedSample:
        """Token ids and target ranges of one sample, or raise `Rejected`."""
        return self.encode_many([sample])[0]

    def encode_many(self, samples: Sequence[Sample]) -> list[EncodedSample | Rejected]:
        """Encode a batch of samples at once (the fast tokenizer runs the batch in parallel)."""
        rendered = [self.render(sample) for sample in samples]
        if not rendered:
            return []
        encoding = self.tokenizer(
            [r.text for r in rendered], return_offsets_mapping=True, add_special_tokens=True, verbose=False
        )
        results: list[EncodedSample | Rejected] = []
        for sample, render, ids, offsets in zip(
            samples, rendered, encoding["input_ids"], encoding["offset_mapping"]
        ):
            try:
                results.append(self._encode_one(sample, render, ids, offsets))
            except Rejected as rejected:
                results.append(rejected)
        return results


# ---------------------------------------------------------------------------------------------------------------
# Mixture and the torch dataset
# ---------------------------------------------------------------------------------------------------------------


def mixture_indices(sizes: Sequence[int], ratios: Sequence[float], seed: int) -> list[np.ndarray]:
    """Per source, the sample indices to train on: ``ratio * size`` of them, drawn deterministically from ``seed``.

    A ratio below 1 draws a subset without replacement; a ratio above 1 repeats the whole source ``floor(ratio)``
    times plus a random subset for the fraction. Indices come back sorted (the trainer's sampler shuffles).
    """
    if len(sizes) != len(ratios):
        raise ValueError(f"{len(sizes)} sources but {len(ratios)} ratios")
    rng = np.random.default_rng(seed)
    chosen = []
    for size, ratio in zip(sizes, ratios):
        if ratio <= 0:
            raise ValueError(f"sampling ratios must be > 0, got {ratio}")
        whole, fraction = divmod(ratio, 1.0)
        extra = int(round(fraction * size))
        subset = rng.choice(size, size=extra, replace=False) if extra else np.empty(0, dtype=np.int64)
        indices = np.concatenate([np.tile(np.arange(size), int(whole)), subset]).astype(np.int64)
        chosen.append(np.sort(indices))
    return chosen


class SupervisedDataset(Dataset):
    """Tokenized samples (ids and label ranges kept in memory) whose images are decoded in ``__getitem__``.

    ``order`` maps dataset positions to unique samples (a sample repeats when its source's ratio is above 1);
    ``lengths`` are the token lengths in dataset order, for length-grouped batching.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        encoded: Sequence[EncodedSample],
        processor: CommProcessor,
        order: Sequence[int] | None = None,
    ):
        if len(samples) != len(encoded):
            raise ValueError(f"{len(samples)} samples but {len(encoded)} encodings")
        self.samples = list(samples)
        self.processor = processor
        # One flat buffer instead of one array per sample keeps the memory of ~1M samples small.
        dtype = encoded[0].input_ids.dtype if encoded else np.int32
        self._ids = np.concatenate([e.input_ids for e in encoded]) if encoded else np.empty(0, dtype=dtype)
        self._starts = np.cumsum([0] + [len(e.input_ids) for e in encoded]).astype(np.int64)
        self._ranges = [e.target_ranges for e in encoded]
        self.order = np.arange(len(self.samples)) if order is None else np.asarray(order, dtype=np.int64)
        unique_lengths = np.diff(self._starts)
        self.lengths: list[int] = unique_lengths[self.order].tolist()

    def __len__(self) -> int:
        return len(self.order)

    def encoded(self, position: int) -> EncodedSample:
        """The token ids and target ranges of the sample at ``position``."""
        unique = int(self.order[position])
        ids = self._ids[self._starts[unique] : self._starts[unique + 1]]
        return EncodedSample(ids, self._ranges[unique])

    def sample(self, position: int) -> Sample:
        """The `Sample` at ``position`` (its file, line, turns and image)."""
        return self.samples[int(self.order[position])]

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        encoded = self.encoded(position)
        item = {
            "input_ids": torch.from_numpy(encoded.input_ids.astype(np.int64)),
            "labels": torch.from_numpy(encoded.labels()),
        }
        sample = self.sample(position)
        if sample.image is not None:
            try:
                pixels = self.processor.preprocess_images([sample.image])
            except (OSError, ValueError) as error:
                issue = sample.issue(IssueKind.UNREADABLE_IMAGE, f"decoding {sample.image} failed: {error}")
                raise RuntimeError(
                    f"{issue}\n(the image header was fine at load time; pass --verify_images to decode every image "
                    "before training and skip the broken ones)"
                ) from error
            item.update(pixels)
        return item


def build_dataset(
    specs: Sequence[DataSpec],
    processor: CommProcessor,
    issues: IssueLog,
    seed: int = 0,
    image_folder: str | Path | None = None,
    model_max_length: int | None = None,
    verify_images: bool = False,
    progress: bool = False,
    chunk_size: int = 512,
) -> SupervisedDataset:
    """Load, validate, sample (ratios) and tokenize the training files into one `SupervisedDataset`."""
    images = ImageChecker(verify=verify_images)
    sources = [load_samples(spec, issues, image_folder, images) for spec in specs]
    chosen = mixture_indices([len(s) for s in sources], [spec.ratio for spec in specs], seed)
    encoder = SampleEncoder(processor, model_max_length)

    unique_samples: list[Sample] = []
    unique_encoded: list[EncodedSample] = []
    order: list[int] = []
    total = sum(len(np.unique(indices)) for indices in chosen)
    bar = tqdm(total=total, desc="tokenizing", disable=not progress, unit="sample")
    for spec, samples, indices in zip(specs, sources, chosen):
        file = str(spec.path)
        unique = np.unique(indices)
        position_of: dict[int, int] = {}
        for begin in range(0, len(unique), chunk_size):
            batch = [samples[i] for i in unique[begin : begin + chunk_size]]
            for index, sample, result in zip(unique[begin : begin + chunk_size], batch, encoder.encode_many(batch)):
                if isinstance(result, Rejected):
                    issues.kept[file] -= 1
                    issues.report(sample.issue(result.kind, result.message))
                    continue
                position_of[int(index)] = len(unique_samples)
                unique_samples.append(sample)
                unique_encoded.append(result)
            bar.update(len(batch))
        used = [position_of[int(i)] for i in indices if int(i) in position_of]
        issues.used[file] += len(used)
        order.extend(used)
    bar.close()
    return SupervisedDataset(unique_samples, unique_encoded, processor, order)
