"""Records of a training file: LLaVA JSON lists and JSON lines parsed element by element, each with its line.

The readers are lenient: a bad element does not raise but comes back as a `RawRecord` with ``error`` set, so that
every problem is reported with its file and line and the rest of the file is still read where possible.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WHITESPACE = re.compile(r"\s*")


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


def iter_json_list_lenient(text: str) -> Iterator[RawRecord]:
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


def iter_jsonl_lenient(text: str) -> Iterator[RawRecord]:
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
    yield from iter_json_list_lenient(text) if first == "[" else iter_jsonl_lenient(text)
