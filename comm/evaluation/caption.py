"""Image captioning (COCO Karpathy test, Flickr30k, NoCaps): readers and the COCO caption metrics."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comm.errors import UserError
from comm.evaluation.pope import check_ids
from comm.extras import require_extra
from comm.io import read_json

KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclass(frozen=True)
class CaptionSample:
    """One image with its reference captions."""

    id: str
    image: str
    references: list[str]


def _image_path(image_root: str | os.PathLike[str] | None, *parts: str) -> str:
    root = Path(image_root) if image_root is not None else Path()
    return str(root.joinpath(*parts))


def _karpathy_samples(
    data: dict[str, Any], path: Path, split: str, image_root: str | os.PathLike[str] | None
) -> list[CaptionSample]:
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"unknown Karpathy split {split!r}; valid splits: {', '.join(KARPATHY_SPLITS)}")
    samples: list[CaptionSample] = []
    seen: set[str] = set()
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        if not isinstance(image, dict):
            raise ValueError(f"{where} is not an object")
        missing = [key for key in ("filename", "split", "sentences") if key not in image]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        if not isinstance(image["filename"], str) or not isinstance(image.get("filepath", ""), str):
            raise ValueError(f"{where}: 'filename' and 'filepath' must be strings")
        if not isinstance(image["sentences"], list):
            raise ValueError(f"{where}: 'sentences' must be a list")
        if image["split"] != split:
            continue
        if "cocoid" in image:
            image_id = str(image["cocoid"])
        elif "imgid" in image:
            image_id = str(image["imgid"])
        else:
            raise ValueError(f"{where} has neither 'cocoid' nor 'imgid'")
        if image_id in seen:
            raise ValueError(f"{where}: duplicate image id {image_id}")
        seen.add(image_id)
        references = []
        for sentence_index, sentence in enumerate(image["sentences"]):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise ValueError(f"{where}, sentence {sentence_index} has no 'raw' text")
            references.append(raw)
        if not references:
            raise ValueError(f"{where} has no reference sentences")
        parts = [image["filepath"], image["filename"]] if image.get("filepath") else [image["filename"]]
        samples.append(CaptionSample(image_id, _image_path(image_root, *parts), references))
    if not samples:
        present = sorted({str(image.get("split")) for image in data["images"] if isinstance(image, dict)})
        raise ValueError(f"{path}: no images in split {split!r} (splits present: {', '.join(present)})")
    return samples


def load_karpathy(
    path: str | os.PathLike[str], split: str = "test", image_root: str | os.PathLike[str] | None = None
) -> list[CaptionSample]:
    """Read one split of a Karpathy ``dataset_coco.json`` / ``dataset_flickr30k.json`` file."""
    path = Path(path)
    data = read_json(path, "caption file")
    if not _is_karpathy(data):
        raise ValueError(f"{path}: not a Karpathy caption file (expected images with 'sentences')")
    return _karpathy_samples(data, path, split, image_root)


def _is_karpathy(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and "annotations" not in data
        and all(isinstance(image, dict) and "sentences" in image for image in data["images"][:10])
    )


def _is_coco(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)


def _coco_samples(data: dict[str, Any], path: Path, image_root: str | os.PathLike[str] | None) -> list[CaptionSample]:
    file_names: dict[str, str] = {}
    order: list[str] = []
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ValueError(f"{path}: images[{index}] needs 'id' and a 'file_name' string")
        image_id = str(image["id"])
        if image_id in file_names:
            raise ValueError(f"{path}: images[{index}] repeats image id {image_id}")
        file_names[image_id] = image["file_name"]
        order.append(image_id)
    references: dict[str, list[str]] = {image_id: [] for image_id in order}
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            raise ValueError(f"{path}: annotations[{index}] needs 'image_id' and 'caption'")
        image_id = str(annotation["image_id"])
        if image_id not in references:
            raise ValueError(f"{path}: annotations[{index}] refers to unknown image id {image_id}")
        if not isinstance(annotation["caption"], str):
            raise ValueError(f"{path}: annotations[{index}] caption is not a string")
        references[image_id].append(annotation["caption"])
    samples = [
        CaptionSample(image_id, _image_path(image_root, file_names[image_id]), references[image_id])
        for image_id in order
        if references[image_id]
    ]
    if not samples:
        raise ValueError(f"{path}: no image has a caption")
    return samples


def load_caption_file(
    path: str | os.PathLike[str], split: str = "test", image_root: str | os.PathLike[str] | None = None
) -> list[CaptionSample]:
    """Read a Karpathy split file or a COCO caption annotation file (detected; ``split`` is Karpathy-only).

    A COCO-format file is one split already, so ``split`` is not used for it; images without a caption
    (e.g. a test set whose references are withheld) are left out.
    """
    path = Path(path)
    data = read_json(path, "caption file")
    if _is_coco(data):
        return _coco_samples(data, path, image_root)
    if _is_karpathy(data):
        return _karpathy_samples(data, path, split, image_root)
    raise ValueError(
        f"{path}: neither a Karpathy file ({{'images': [{{'sentences': ...}}]}}) "
        "nor a COCO caption file ({'images': [...], 'annotations': [...]})"
    )


def _one_line(text: str) -> str:
    """Collapse every kind of whitespace (the PTB tokenizer reads one caption a line) to single spaces."""
    return " ".join(text.split())


CAPTION_TOKENIZERS = ("ptb", "python")
# pycocoevalcap drops these tokens after the PTB tokenizer has run; the Python tokenization drops the same.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# Words (hyphenated and slashed words stay whole, as in PTB), the PTB clitics n't / 's / 're..., and any other
# single non-space character (punctuation, dropped below unless PTB keeps it).
_PYTHON_TOKEN = re.compile(r"[a-z0-9]+(?=n't\b)|n't\b|'[a-z]+\b|[a-z0-9]+(?:[-/.][a-z0-9]+)*|\.\.\.|--|\S")


def python_tokenize(caption: str) -> str:
    """Lower-case ``caption`` and split it like pycocoevalcap's PTB tokenizer (no Java); punctuation is dropped.

    It agrees with the PTB tokenizer on captions of plain words and punctuation; exotic input (quotes, brackets,
    abbreviations) may split differently, so official numbers use the PTB tokenizer.
    """
    tokens = _PYTHON_TOKEN.findall(_one_line(caption).lower())
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATION and token not in '()[]{}"')


def score_captions(
    predictions: Mapping[Any, str],
    references: Mapping[Any, list[str]],
    spice: bool = False,
    tokenizer: str = "ptb",
) -> dict[str, Any]:
    """BLEU-4, METEOR, ROUGE-L, CIDEr (and SPICE when asked) with pycocoevalcap.

    ``tokenizer="ptb"`` is the official protocol: Stanford's PTB tokenizer and METEOR, both Java programs.
    ``tokenizer="python"`` needs no Java: `python_tokenize` instead of PTB, and METEOR (Java) is reported as
    None with the reason under ``"skipped"``; BLEU-4, ROUGE-L and CIDEr are pycocoevalcap's own Python scorers.
    """
    if tokenizer not in CAPTION_TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {CAPTION_TOKENIZERS}, got {tokenizer!r}")
    require_extra("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not references:
        raise ValueError("no references to score against")
    check_ids(predictions.keys(), references.keys(), what="predictions")
    java = tokenizer == "ptb" or spice
    if java and shutil.which("java") is None:
        raise UserError(
            "the PTB tokenizer, METEOR and SPICE need Java on PATH (a JRE 8 or newer); without Java, score with "
            "the Python tokenization (--tokenizer python), which skips METEOR and SPICE"
        )

    gts: dict[str, list[dict[str, str]]] = {}
    res: dict[str, list[dict[str, str]]] = {}
    for image_id, captions in references.items():
        if isinstance(captions, str) or not captions:
            raise ValueError(f"references for {image_id!r} must be a non-empty list of strings")
        gts[str(image_id)] = [{"caption": _one_line(str(caption))} for caption in captions]
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise ValueError(f"prediction for {image_id!r} is not a string")
        res[str(image_id)] = [{"caption": _one_line(caption)}]

    if tokenizer == "ptb":
        gts_tokens, res_tokens = _ptb_tokenize(gts), _ptb_tokenize(res)
    else:
        gts_tokens = {key: [python_tokenize(item["caption"]) for item in items] for key, items in gts.items()}
        res_tokens = {key: [python_tokenize(item["caption"]) for item in items] for key, items in res.items()}

    bleu, _ = Bleu(4).compute_score(gts_tokens, res_tokens, verbose=0)
    rouge, _ = Rouge().compute_score(gts_tokens, res_tokens)
    cider, _ = Cider().compute_score(gts_tokens, res_tokens)
    scores: dict[str, Any] = {"BLEU-4": float(bleu[3])}
    if tokenizer == "ptb":
        scores["METEOR"] = _meteor(gts_tokens, res_tokens)
    else:
        scores["METEOR"] = None
    scores.update({"ROUGE-L": float(rouge), "CIDEr": float(cider)})
    if tokenizer == "python":
        scores["tokenizer"] = "python"
        scores["skipped"] = {"METEOR": "needs Java; scored with the Python tokenization (tokenizer='python')"}
    if spice:
        scores["SPICE"] = _spice(gts_tokens, res_tokens)
    return scores


def _ptb_tokenize(captions: dict[str, list[dict[str, str]]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTB tokenization (Java), checked to keep every caption."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokens = PTBTokenizer().tokenize(captions)
    if set(tokens) != set(captions) or any(len(tokens[key]) != len(captions[key]) for key in captions):
        raise RuntimeError("the PTB tokenizer (Java) lost some captions; is Java working?")
    return tokens


def _meteor(gts_tokens: dict[str, list[str]], res_tokens: dict[str, list[str]]) -> float:
    """METEOR 1.5 through pycocoevalcap's Java scorer."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor_scorer = Meteor()
    try:
        meteor, _ = meteor_scorer.compute_score(gts_tokens, res_tokens)
    finally:
        # A failed read leaves the scorer's lock held and its __del__ (which takes the lock) would hang.
        if meteor_scorer.lock.locked():
            meteor_scorer.lock.release()
        meteor_scorer.meteor_p.kill()
        meteor_scorer.meteor_p.wait()
    return float(meteor)


def _spice(gts_tokens: dict[str, list[str]], res_tokens: dict[str, list[str]]) -> float:
    """SPICE needs Stanford CoreNLP 3.6.0 next to pycocoevalcap's spice jar; it is not downloaded here."""
    from pycocoevalcap.spice import get_stanford_models
    from pycocoevalcap.spice.spice import Spice

    jar = Path(get_stanford_models.SPICEDIR) / get_stanford_models.SPICELIB / f"{get_stanford_models.JAR}.jar"
    if not jar.is_file():
        raise UserError(
            f"SPICE needs {jar}; fetch it once with `python -m pycocoevalcap.spice.get_stanford_models` "
            "(it downloads Stanford CoreNLP) or score without SPICE"
        )
    score, _ = Spice().compute_score(gts_tokens, res_tokens)
    return float(score)
