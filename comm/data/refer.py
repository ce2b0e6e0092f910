"""REFER annotations (RefCOCO, RefCOCO+, RefCOCOg) as a grounding training file: the ``comm data refer`` command."""

from __future__ import annotations

import os
from pathlib import Path

from comm.io import write_jsonl
from comm.refer import iter_refer


def refer_records(
    data_root: str | os.PathLike[str], dataset: str, split: str, split_by: str | None = None
) -> list[dict]:
    """One REC training record a sentence of the split: ``{"id", "image", "expression", "bbox": [x, y, w, h],
    "width", "height"}``, the box in pixels and ``image`` the COCO file name (train with ``--image_folder`` set to
    the COCO folder that holds it, ``train2014`` for all three datasets)."""
    records = []
    for expression in iter_refer(data_root, dataset, split_by, split):
        record = {
            "id": f"{dataset}_{expression.id}",
            "image": expression.file_name,
            "expression": expression.expression,
            "bbox": list(expression.bbox),
        }
        if expression.width is not None and expression.height is not None:
            record.update(width=expression.width, height=expression.height)
        records.append(record)
    return records


def write_refer_jsonl(
    data_root: str | os.PathLike[str],
    dataset: str,
    split: str,
    out: str | os.PathLike[str],
    split_by: str | None = None,
    image_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Write `refer_records` to ``out`` (JSON lines, atomically) and return how many were written.

    With ``image_dir`` (the COCO folder of the images) each image is written as a path relative to ``out``'s folder,
    where training looks for relative paths when no ``--image_folder`` is given; without it, the bare file name.
    """
    out = Path(out)
    if image_dir is not None and not Path(image_dir).is_dir():
        raise FileNotFoundError(f"--image-dir: no such folder: {image_dir}")
    records = refer_records(data_root, dataset, split, split_by)
    out.parent.mkdir(parents=True, exist_ok=True)
    if image_dir is not None:
        prefix = Path(os.path.relpath(Path(image_dir).resolve(), out.parent.resolve()))
        for record in records:
            record["image"] = (prefix / record["image"]).as_posix()
    write_jsonl(out, records)
    return len(records)
