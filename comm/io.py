"""JSON and JSON-lines files, the one place the project reads and writes them: read strictly (errors name the file
and line), appended as records come, and written atomically (never half-written)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """The JSON value in ``path``; a missing file, bytes that are not UTF-8 or bad JSON raise an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def iter_jsonl_strict(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; a bad line raises ValueError naming it."""
    path = Path(path)
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not UTF-8 text ({error.reason})") from None
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file of objects; blank lines are skipped, a bad line raises ValueError."""
    return [record for _, record in iter_jsonl_strict(path)]


def append_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """Append ``records`` to a JSON-lines file, one object a line, creating the file and its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()


def write_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode open() would have given
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_atomically(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """Write ``records`` as JSON lines, atomically."""
    write_atomically(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
