"""POPE object-hallucination benchmark: question/answer readers and the official yes/no metrics."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from comm.evaluation.files import read_unique_records
from comm.evaluation.unanswerable import UNANSWERABLE

POPE_LABELS = ("yes", "no")
QUESTION_KEYS = ("question_id", "image", "text", "label")
# The per-split columns of the POPE metrics table (`comm.evaluation.tables.format_metrics`).
POPE_TABLE_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")


def _id_key(question_id: Any) -> str:
    """Question ids are compared as strings, so ``1`` in an answers file matches ``"1"`` in the labels."""
    return str(question_id)


def load_pope_questions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read POPE questions, one ``{"question_id", "image", "text", "label": "yes"|"no"}`` object a line."""

    def check(record: dict[str, Any]) -> str | None:
        if record["label"] not in POPE_LABELS:
            return f"label must be 'yes' or 'no', got {record['label']!r}"
        if not isinstance(record["text"], str) or not isinstance(record["image"], str):
            return "'text' and 'image' must be strings"
        return None

    path = Path(path)
    questions = read_unique_records(path, QUESTION_KEYS, "question_id", check)
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def pope_answers(records: Iterable[Mapping[str, Any]]) -> dict[Any, str | None]:
    """``{question_id: text}`` of answers-file records; None for a record marked unanswerable (unusable image)."""
    return {record["question_id"]: None if record.get(UNANSWERABLE) else record["text"] for record in records}


def load_pope_answers(path: str | os.PathLike[str]) -> dict[Any, str | None]:
    """Read LLaVA-style answers (``{"question_id", "text", ...}`` a line) into `pope_answers`."""

    def check(record: dict[str, Any]) -> str | None:
        if not isinstance(record["text"], str):
            return f"'text' must be a string, got {type(record['text']).__name__}"
        return None

    return pope_answers(read_unique_records(path, ("question_id", "text"), "question_id", check))


def pope_answer_is_yes(text: str) -> bool:
    """Official POPE / LLaVA ``eval_pope.py`` rule: first sentence, no commas, "no" if No/not/no is a word."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def check_ids(answer_ids: Iterable[Any], expected_ids: Iterable[Any], what: str = "answers") -> None:
    """Raise ValueError when ``answer_ids`` miss some of ``expected_ids`` or hold ids not among them."""
    answers = [_id_key(i) for i in answer_ids]
    expected = [_id_key(i) for i in expected_ids]
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


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator else 0.0


def score_pope(answers: Mapping[Any, str | None], questions: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (positive = "yes") and yes-ratio of ``answers`` on ``questions``.

    A None answer (unanswerable: the image was not usable) counts as wrong, a false negative for a "yes" question
    and a false positive for a "no" one, and the number of them is given as ``unanswerable``.
    """
    if not questions:
        raise ValueError("no POPE questions to score")
    check_ids(answers.keys(), (question["question_id"] for question in questions))
    by_key = {_id_key(question_id): text for question_id, text in answers.items()}
    tp = fp = tn = fn = unanswerable = 0
    for question in questions:
        if question["label"] not in POPE_LABELS:
            raise ValueError(
                f"question {question['question_id']!r}: label must be 'yes' or 'no', got {question['label']!r}"
            )
        text = by_key[_id_key(question["question_id"])]
        label_yes = question["label"] == "yes"
        unanswerable += text is None
        predicted_yes = not label_yes if text is None else pope_answer_is_yes(text)
        if predicted_yes and label_yes:
            tp += 1
        elif predicted_yes:
            fp += 1
        elif label_yes:
            fn += 1
        else:
            tn += 1
    n = tp + fp + tn + fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    metrics = {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
    if unanswerable:
        metrics[UNANSWERABLE] = unanswerable
    return metrics


def summarize_pope_splits(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-split metrics, each split's n, ``mean_f1`` (LLaVA's figure) and ``mean_accuracy`` (COMM's)."""
    if not results:
        raise ValueError("no POPE splits to summarize")
    for split, metrics in results.items():
        missing = [key for key in ("accuracy", "f1", "n") if key not in metrics]
        if missing:
            raise ValueError(f"POPE split {split!r}: metrics lack {', '.join(missing)}")
    return {
        "splits": {split: dict(metrics) for split, metrics in results.items()},
        "n": {split: int(metrics["n"]) for split, metrics in results.items()},
        "mean_f1": sum(float(m["f1"]) for m in results.values()) / len(results),
        "mean_accuracy": sum(float(m["accuracy"]) for m in results.values()) / len(results),
    }
