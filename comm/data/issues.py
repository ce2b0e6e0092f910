"""Bad-input reporting: every rejected sample is named by file and line, counted, or stops the run (strict)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path


class IssueKind(str, Enum):
    """The kinds of bad training input that are detected before training."""

    BAD_JSON = "bad_json"  # a line / list element that is not JSON, or a sample that is not an object
    MISSING_IMAGE = "missing_image"
    UNREADABLE_IMAGE = "unreadable_image"  # not an image PIL reads, cut short, or under 2x2 pixels
    IMAGE_TOO_LARGE = "image_too_large"  # a header over PIL.Image.MAX_IMAGE_PIXELS (a decompression bomb)
    BAD_CONVERSATION = "bad_conversation"  # empty, wrong role order, empty value, missing keys, bad placeholders
    BAD_BOX = "bad_box"  # outside the image, inverted, or not matching the <box> placeholders
    LABEL_MISMATCH = "label_mismatch"  # targets do not line up with the tokenizer (LLaVA's tokenization mismatch)
    TOO_LONG = "too_long"  # longer than model_max_length once the image tokens are expanded
    SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"  # the text holds a special token's text (</s>, <s>, <unk>...)


@dataclass(frozen=True)
class DataIssue:
    """One rejected sample (or unparseable stretch of a file) and why."""

    kind: IssueKind
    file: str
    line: int
    message: str
    index: int | None = None  # position of the sample in its file (JSON list index or jsonl record number)
    sample_id: str | None = None

    def location(self) -> str:
        """``file:line`` plus the sample index and id when known."""
        where = f"{self.file}:{self.line}"
        if self.index is not None:
            where += f" (sample {self.index}"
            where += f", id {self.sample_id!r})" if self.sample_id is not None else ")"
        return where

    def __str__(self) -> str:
        return f"{self.location()}: {self.kind.value}: {self.message}"

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        data = asdict(self)
        data["kind"] = self.kind.value
        return data


class Rejected(Exception):
    """A sample fails a check; carries the issue kind and the reason."""

    def __init__(self, kind: IssueKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class DataError(ValueError):
    """Raised at the first bad input in ``--strict`` mode; the one-line message names the file, line and kind."""

    def __init__(self, issue: DataIssue):
        super().__init__(f"{issue} (bad training input: drop --strict to skip such samples and count them instead)")
        self.issue = issue


@dataclass
class IssueLog:
    """Collects bad-input reports; in strict mode the first report raises `DataError` at once."""

    strict: bool = False
    issues: list[DataIssue] = field(default_factory=list)
    loaded: Counter = field(default_factory=Counter)  # samples read per file
    kept: Counter = field(default_factory=Counter)  # samples that passed every check per file
    used: Counter = field(default_factory=Counter)  # samples in the training mixture per file (after ratios)

    def report(self, issue: DataIssue) -> None:
        """Record ``issue``; raise `DataError` when strict."""
        if self.strict:
            raise DataError(issue)
        self.issues.append(issue)

    def counts(self) -> dict[str, int]:
        """Number of issues per kind (only kinds that occurred)."""
        return dict(Counter(issue.kind.value for issue in self.issues))

    def summary(self) -> dict:
        """A JSON-ready summary: totals, counts per kind and per file, and every issue."""
        files = sorted(set(self.loaded) | {issue.file for issue in self.issues})
        per_file = {
            name: {
                "loaded": self.loaded.get(name, 0),
                "kept": self.kept.get(name, 0),
                "used": self.used.get(name, 0),
                "skipped": sum(1 for issue in self.issues if issue.file == name),
            }
            for name in files
        }
        return {
            "samples_loaded": sum(self.loaded.values()),
            "samples_kept": sum(self.kept.values()),
            "samples_skipped": len(self.issues),
            "samples_used": sum(self.used.values()),
            "skipped_by_kind": self.counts(),
            "files": per_file,
            "issues": [issue.to_json() for issue in self.issues],
        }

    def format_summary(self, max_listed: int = 20) -> str:
        """A human-readable summary with up to ``max_listed`` issues spelled out."""
        summary = self.summary()
        lines = [
            f"data: {summary['samples_loaded']} samples read, {summary['samples_skipped']} skipped, "
            f"{summary['samples_used']} in the training mixture"
        ]
        for kind, count in sorted(summary["skipped_by_kind"].items()):
            lines.append(f"  {kind}: {count}")
        for issue in self.issues[:max_listed]:
            lines.append(f"  - {issue}")
        if len(self.issues) > max_listed:
            lines.append(f"  ... and {len(self.issues) - max_listed} more (see the summary json)")
        return "\n".join(lines)

    def write(self, path: str | Path) -> None:
        """Write the summary as json to ``path``."""
        Path(path).write_text(json.dumps(self.summary(), indent=2) + "\n")
