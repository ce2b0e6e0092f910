"""The COCO caption metrics through pycocoevalcap: BLEU-4, METEOR, ROUGE-L, CIDEr (and SPICE), after the official
PTB tokenizer (Java) or a Python tokenization that needs no Java."""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from comm.errors import UserError
from comm.evaluation.records import check_ids
from comm.extras import require_extra

CAPTION_TOKENIZERS = ("ptb", "python")
# pycocoevalcap drops these tokens after the PTB tokenizer has run; the Python tokenization drops the same.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# Words (hyphenated and slashed words stay whole, as in PTB), the PTB clitics n't / 's / 're..., and any other
# single non-space character (punctuation, dropped below unless PTB keeps it).
_PYTHON_TOKEN = re.compile(r"[a-z0-9]+(?=n't\b)|n't\b|'[a-z]+\b|[a-z0-9]+(?:[-/.][a-z0-9]+)*|\.\.\.|--|\S")

# pycocoevalcap's input: per image id, its captions as ``{"caption": text}``; and the same tokenized, one string each.
Captions = dict[str, list[dict[str, str]]]
Tokenized = dict[str, list[str]]


def _one_line(text: str) -> str:
    """Collapse every kind of whitespace (the PTB tokenizer reads one caption a line) to single spaces."""
    return " ".join(text.split())


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
    if not references:
        raise ValueError("no references to score against")
    check_ids(predictions.keys(), references.keys(), what="predictions")
    if (tokenizer == "ptb" or spice) and shutil.which("java") is None:
        raise UserError(
            "the PTB tokenizer, METEOR and SPICE need Java on PATH (a JRE 8 or newer); without Java, score with "
            "the Python tokenization (--tokenizer python), which skips METEOR and SPICE"
        )
    gts, res = _references_and_predictions(predictions, references)
    return _compute_scores(_tokenize(gts, tokenizer), _tokenize(res, tokenizer), spice, tokenizer)


def _references_and_predictions(
    predictions: Mapping[Any, str], references: Mapping[Any, list[str]]
) -> tuple[Captions, Captions]:
    """Both sides in pycocoevalcap's form, each caption on one line; a caption that is not a string is an error."""
    gts: Captions = {}
    res: Captions = {}
    for image_id, captions in references.items():
        if isinstance(captions, str) or not captions:
            raise ValueError(f"references for {image_id!r} must be a non-empty list of strings")
        gts[str(image_id)] = [{"caption": _one_line(str(caption))} for caption in captions]
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise ValueError(f"prediction for {image_id!r} is not a string")
        res[str(image_id)] = [{"caption": _one_line(caption)}]
    return gts, res


def _tokenize(captions: Captions, tokenizer: str) -> Tokenized:
    if tokenizer == "ptb":
        return _ptb_tokenize(captions)
    return {key: [python_tokenize(item["caption"]) for item in items] for key, items in captions.items()}


def _compute_scores(gts_tokens: Tokenized, res_tokens: Tokenized, spice: bool, tokenizer: str) -> dict[str, Any]:
    """The scores of tokenized captions, METEOR only after the PTB tokenizer (it is Java too)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts_tokens, res_tokens, verbose=0)
    rouge, _ = Rouge().compute_score(gts_tokens, res_tokens)
    cider, _ = Cider().compute_score(gts_tokens, res_tokens)
    scores: dict[str, Any] = {
        "BLEU-4": float(bleu[3]),
        "METEOR": _meteor(gts_tokens, res_tokens) if tokenizer == "ptb" else None,
        "ROUGE-L": float(rouge),
        "CIDEr": float(cider),
    }
    if tokenizer == "python":
        scores["tokenizer"] = "python"
        scores["skipped"] = {"METEOR": "needs Java; scored with the Python tokenization (tokenizer='python')"}
    if spice:
        scores["SPICE"] = _spice(gts_tokens, res_tokens)
    return scores


def _ptb_tokenize(captions: Captions) -> Tokenized:
    """pycocoevalcap's PTB tokenization (Java), checked to keep every caption."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokens = PTBTokenizer().tokenize(captions)
    if set(tokens) != set(captions) or any(len(tokens[key]) != len(captions[key]) for key in captions):
        raise RuntimeError("the PTB tokenizer (Java) lost some captions; is Java working?")
    return tokens


def _meteor(gts_tokens: Tokenized, res_tokens: Tokenized) -> float:
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


def _spice(gts_tokens: Tokenized, res_tokens: Tokenized) -> float:
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
