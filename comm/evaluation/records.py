"""Evaluation files and ids: the output file names, input records read with distinct ids, answers' ids checked
against the items', and the image files checked to exist before any model work."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from comm.io import iter_jsonl_strict

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


def read_unique_records(
    path: str | os.PathLike[str],
    keys: Sequence[str],
    id_key: str,
    check: Callable[[dict[str, Any]], str | None] | None = None,
) -> list[dict[str, Any]]:
    """JSON-lines records that hold ``keys``, pass ``check`` (returns a problem or None), with distinct ``id_key``s.

    Ids must be numbers or strings and are compared as strings (``1`` and ``"1"`` are the same id). A bad record
    raises ValueError naming the file and the line.
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line_number, record in iter_jsonl_strict(path):
        where = f"{path}, line {line_number}"
        missing = [key for key in keys if key not in record]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        problem = check(record) if check is not None else None
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        if isinstance(record[id_key], bool) or not isinstance(record[id_key], (int, str)):
            raise ValueError(f"{where}: {id_key} must be a number or a string, got {record[id_key]!r}")
        key = str(record[id_key])
        if key in seen:
            raise ValueError(f"{where}: duplicate {id_key} {record[id_key]!r} (first on line {seen[key]})")
        seen[key] = line_number
        records.append(record)
    return records


def check_ids(answer_ids: Iterable[Any], expected_ids: Iterable[Any], what: str = "answers") -> None:
    """Raise ValueError when ``answer_ids`` miss some of ``expected_ids`` or hold ids not among them.

    Ids are compared as strings, so ``1`` in an answers file matches ``"1"`` in the labels.
    """
    answers = [str(i) for i in answer_ids]
    expected = [str(i) for i in expected_ids]
    answer_set, expected_set = set(answers), set(expected)
    if len(answer_set) != len(answers):
        duplicate = next(i for i in answers if answers.count(i) > 1)
        raise ValueError(f"{what} hold the same id twice (as a string), e.g. {duplicate!r}")
    missing = [i for i in expected if i not in answer_set]
    unknown = [i for i in answers if i not in expected_set]
    problems = []
    if missing:
        problems.append(f"{len(missing)} id(s) missing from the {what} (first: {missing[0]!r})")
    if unknown:
        problems.append(f"{len(unknown)} unknown id(s) in the {what} (first: {unknown[0]!r})")
    if problems:
        raise ValueError("; ".join(problems))


def check_files_exist(paths: Iterable[str | os.PathLike[str]], what: str = "image") -> None:
    """Raise FileNotFoundError saying how many of ``paths`` are missing and which first (before any model work)."""
    missing = sorted({str(path) for path in paths if not Path(path).is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} file(s) not found (first: {missing[0]})")
