"""Tokenization with assistant-only labels: rendered conversations tokenized with offsets, loss on the replies only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from comm.data.issues import IssueKind, Rejected
from comm.data.samples import Sample
from comm.processing import CommProcessor, special_token_texts

IGNORE_INDEX = -100


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
    """Render samples with the processor's conversation template and tokenize them with offsets to build the labels."""

    def __init__(self, processor: CommProcessor, model_max_length: int | None = None):
        tokenizer = processor.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets are needed to build labels"
            )
        self.processor = processor
        self.tokenizer = tokenizer
        self.template = processor.template
        self.model_max_length = model_max_length or processor.model_max_length
        self.image_token_id = processor.image_token_id
        self.dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
        # "</s>" inside a reply would become an end of sequence the model learns to write mid-reply.
        self.special_texts = special_token_texts(tokenizer)

    def special_token_in_text(self, sample: Sample) -> Rejected | None:
        """A `Rejected` when a question or reply of ``sample`` holds the text of a special token, else None."""
        for number, (question, answer) in enumerate(sample.turns, start=1):
            for role, text in (("question", question), ("reply", answer)):
                found = [token for token in self.special_texts if token in text]
                if found:
                    return Rejected(
                        IssueKind.SPECIAL_TOKEN_IN_TEXT,
                        f"the {role} of turn {number} holds the text {found[0]!r}, which the tokenizer reads as its "
                        "special token, not as text",
                    )
        return None

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
        results: list[EncodedSample | Rejected | None] = [self.special_token_in_text(sample) for sample in samples]
        todo = [index for index, result in enumerate(results) if result is None]
        if not todo:
            return results  # type: ignore[return-value]
        rendered = [self.render(samples[index]) for index in todo]
        encoding = self.tokenizer(
            [r.text for r in rendered], return_offsets_mapping=True, add_special_tokens=True, verbose=False
        )
        for index, render, ids, offsets in zip(todo, rendered, encoding["input_ids"], encoding["offset_mapping"]):
            try:
                results[index] = self._encode_one(samples[index], render, ids, offsets)
            except Rejected as rejected:
                results[index] = rejected
        return results  # type: ignore[return-value]
