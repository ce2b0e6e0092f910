"""The REFER release (RefCOCO, RefCOCO+, RefCOCOg): its ``refs(*).p`` pickles and ``instances.json`` read safely,
one sentence at a time; what training data (``comm data refer``) and REC evaluation read."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from comm.boxes import is_box, is_finite_number
from comm.io import read_json

# Valid splits for each (dataset, split_by) of the REFER release; the first split_by is the default.
REFER_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "refcoco": {"unc": ("train", "val", "testA", "testB"), "google": ("train", "val", "test")},
    "refcoco+": {"unc": ("train", "val", "testA", "testB")},
    "refcocog": {"umd": ("train", "val", "test"), "google": ("train", "val")},
}


@dataclass(frozen=True)
class ReferExpression:
    """One sentence of a REFER ref: its COCO image (file name and size) and its box ``[x, y, w, h]`` in pixels."""

    id: str
    file_name: str
    width: int | None
    height: int | None
    expression: str
    bbox: tuple[float, float, float, float]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global, so a pickle can build only plain containers and scalars.

    REFER's ``refs(*).p`` files are protocol-2 pickles of dicts, lists, strings and numbers: they need no
    global at all, while a malicious pickle needs one (``os.system``, ``builtins.eval``...) to run code.
    """

    def __init__(self, file: Any, source: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = str(source)

    def find_class(self, module: str, name: str) -> NoReturn:
        """Refuse to resolve any global."""
        raise pickle.UnpicklingError(
            f"{self.source}: refusing to load global {module}.{name}; "
            "REFER pickles hold only dicts, lists, strings and numbers"
        )


def load_restricted_pickle(path: str | os.PathLike[str]) -> Any:
    """Load a pickle of plain dicts/lists/str/int/float with :class:`RestrictedUnpickler`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle file not found: {path}")
    with path.open("rb") as handle:
        try:
            # Python 2 pickles store ``str`` as bytes: decode them as UTF-8 (a superset of the ASCII default).
            return RestrictedUnpickler(handle, path, encoding="utf-8").load()
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: a string in the pickle is not valid UTF-8 ({error})") from error
        except (EOFError, IndexError, KeyError, TypeError, AttributeError, ValueError) as error:
            raise pickle.UnpicklingError(f"{path}: not a readable pickle ({error!r})") from error


def _refer_error(path: Path, message: str) -> NoReturn:
    raise ValueError(f"{path}: {message}")


def iter_refer(
    data_root: str | os.PathLike[str], dataset: str, split_by: str | None, split: str
) -> Iterator[ReferExpression]:
    """Every sentence of one split of a REFER dataset (``{data_root}/{dataset}/refs({split_by}).p`` +
    ``instances.json``), in the refs' order; a malformed file is a ValueError naming it and the ref.

    ``split_by=None`` picks the usual one: ``unc`` for refcoco/refcoco+, ``umd`` for refcocog.
    """
    split_by = _checked_split_by(dataset, split_by, split)
    folder = Path(data_root) / dataset
    refs_path = folder / f"refs({split_by}).p"
    instances_path = folder / "instances.json"
    for required in (refs_path, instances_path):
        if not required.is_file():
            raise FileNotFoundError(f"REFER file not found: {required}")
    refs = load_restricted_pickle(refs_path)
    if not isinstance(refs, list):
        _refer_error(refs_path, f"expected a list of refs, got {type(refs).__name__}")
    instances = _Instances.read(instances_path)
    found = False
    for index, ref in enumerate(refs):
        _check_ref(refs_path, index, ref)
        if ref["split"] != split:
            continue
        for expression in _ref_expressions(ref, refs_path, instances):
            found = True
            yield expression
    if not found:
        _refer_error(refs_path, f"no refs in split {split!r}")


def _checked_split_by(dataset: str, split_by: str | None, split: str) -> str:
    """``split_by`` (or the dataset's usual one), once the dataset, it and the split are known to go together."""
    if dataset not in REFER_SPLITS:
        raise ValueError(f"unknown REFER dataset {dataset!r}; known: {', '.join(REFER_SPLITS)}")
    split_bys = REFER_SPLITS[dataset]
    if split_by is None:
        split_by = next(iter(split_bys))
    if split_by not in split_bys:
        raise ValueError(f"unknown split_by {split_by!r} for {dataset}; valid: {', '.join(split_bys)}")
    valid_splits = split_bys[split_by]
    if split not in valid_splits:
        raise ValueError(f"unknown split {split!r} for {dataset} ({split_by}); valid splits: {', '.join(valid_splits)}")
    return split_by


@dataclass(frozen=True)
class _Instances:
    """A REFER ``instances.json``: its COCO images and annotations by id."""

    path: Path
    images: dict[Any, dict[str, Any]]
    annotations: dict[Any, dict[str, Any]]

    @classmethod
    def read(cls, path: Path) -> _Instances:
        """Read and index ``path``; an object that is not COCO-like is a ValueError naming it."""
        instances = read_json(path)
        if not isinstance(instances, dict) or "images" not in instances or "annotations" not in instances:
            _refer_error(path, "expected a COCO object with 'images' and 'annotations'")
        try:
            images = {image["id"]: image for image in instances["images"]}
            annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: an image or annotation has no 'id' ({error!r})") from error
        return cls(path, images, annotations)


def _check_ref(refs_path: Path, index: int, ref: Any) -> None:
    """A ref must be a dict with its ids (numbers or strings), a split and a list of sentences."""
    where = f"ref #{index}"
    if not isinstance(ref, dict):
        _refer_error(refs_path, f"{where} is a {type(ref).__name__}, not a dict")
    missing = [key for key in ("ref_id", "ann_id", "image_id", "split", "sentences") if key not in ref]
    if missing:
        _refer_error(refs_path, f"{where} lacks {', '.join(missing)}")
    if not all(isinstance(ref[key], (int, str)) for key in ("ref_id", "ann_id", "image_id")):
        _refer_error(refs_path, f"{where}: ref_id, ann_id and image_id must be numbers or strings")
    if not isinstance(ref["sentences"], list):
        _refer_error(refs_path, f"{where}: 'sentences' must be a list")


def _ref_expressions(ref: dict[str, Any], refs_path: Path, instances: _Instances) -> Iterator[ReferExpression]:
    """The sentences of one ref, each with the ref's image and box from ``instances``."""
    where = f"ref_id {ref['ref_id']}"
    annotation = instances.annotations.get(ref["ann_id"])
    if annotation is None:
        _refer_error(instances.path, f"no annotation with id {ref['ann_id']} (needed by {where})")
    image = instances.images.get(ref["image_id"])
    if image is None:
        _refer_error(instances.path, f"no image with id {ref['image_id']} (needed by {where})")
    bbox = annotation.get("bbox")
    if not is_box(bbox):
        _refer_error(instances.path, f"annotation {ref['ann_id']} has no [x, y, w, h] bbox: {bbox!r}")
    if not isinstance(image.get("file_name"), str):
        _refer_error(instances.path, f"image {ref['image_id']} has no file_name string")
    size = [image.get(key) if is_finite_number(image.get(key)) else None for key in ("width", "height")]
    for sentence_index, sentence in enumerate(ref["sentences"]):
        text = sentence.get("sent", sentence.get("raw")) if isinstance(sentence, dict) else None
        if not isinstance(text, str):
            _refer_error(refs_path, f"{where}, sentence {sentence_index} has no 'sent' text")
        yield ReferExpression(
            id=f"{ref['ref_id']}_{sentence_index}",
            file_name=image["file_name"],
            width=size[0],
            height=size[1],
            expression=text,
            bbox=tuple(bbox),
        )
