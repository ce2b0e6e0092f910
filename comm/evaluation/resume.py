"""Resuming an interrupted evaluation: the per-rank part files, a last line cut short repaired, the records done."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comm.io import write_jsonl


def part_path(path: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank`` appends its predictions: ``predictions.jsonl`` -> ``predictions.rank{rank}.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def part_files(path: str | os.PathLike[str]) -> list[Path]:
    """The per-rank part files of ``path`` left in its folder (by any number of ranks), by rank."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(path.stem)}\.rank(\d+){re.escape(path.suffix)}$")
    found = [(int(match.group(1)), child) for child in path.parent.iterdir() if (match := pattern.match(child.name))]
    return [child for _, child in sorted(found)]


def read_predictions_for_resume(path: str | os.PathLike[str], key: str) -> list[dict[str, Any]]:
    """Read a predictions file an interrupted run left, dropping a last line the run did not finish writing.

    Every line is written whole with its newline, so a last line without one was cut short, whatever bytes it
    holds (half a record, half a UTF-8 character): it is dropped from the file and its item is predicted again,
    and a message on stderr names the file and the records kept. Any other line that is not UTF-8, not a JSON
    object or has no ``key`` raises ValueError naming the file and the line.
    """
    path = Path(path)
    body, newline, torn = path.read_bytes().rpartition(b"\n")
    records: list[dict[str, Any]] = []
    for line_number, raw in enumerate(body.split(b"\n") if newline else [], start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}, line {line_number}: not UTF-8 text ({error.reason} at byte {error.start})"
            ) from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}")
        if key not in record:
            raise ValueError(f"{path}, line {line_number}: the record has no {key!r}")
        records.append(record)
    if torn:
        write_jsonl(path, records)
        print(
            f"{path}: dropped its last line ({len(torn)} bytes without a newline: a write the interrupted run did not "
            f"finish); kept {len(records)} record(s)",
            file=sys.stderr,
        )
    return records


def load_done_records(path: str | os.PathLike[str], key: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Records already written for ``ids`` in ``path`` and its part files, by id; a foreign id is an error."""
    path = Path(path)
    known = set(ids)
    done: dict[str, dict[str, Any]] = {}
    sources = ([path] if path.is_file() else []) + part_files(path)
    for source in sources:
        records = read_predictions_for_resume(source, key)
        foreign = [str(record[key]) for record in records if str(record[key]) not in known]
        if foreign:
            raise ValueError(
                f"{source} holds {len(foreign)} prediction(s) for ids that are not in the data being evaluated "
                f"(first: {foreign[0]!r}): it is from another run; use another output folder or delete it"
            )
        for record in records:
            done.setdefault(str(record[key]), record)
    return done
